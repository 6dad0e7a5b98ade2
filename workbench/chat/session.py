"""A chat session: a model, its tokenizer, one chat template and the conversation so far.

`ChatSession.reply` renders the conversation with the template, drops whole oldest turns until the
prompt and the longest answer fit in `max_context` tokens, and generates with `model.generate` in
the calling thread, handing text to a callback as tokens arrive (so Ctrl-C interrupts a generation
where it stands, and nothing of an interrupted turn is kept). Greedy unless a temperature is given.

`choose_template` decides which template a model (and adapter) is chatted with; `open_session`
checks and loads everything, reusing `wb eval`'s pre-load checks (`check_model_files`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError

DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer says how long the context is
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclass
class Reply:
    """The last answer: its text, the tokens generated (the end-of-turn token included), the time."""

    text: str
    tokens: int
    seconds: float
    prompt_tokens: int
    dropped_turns: int  # oldest turns dropped before this answer to fit max_context


@dataclass
class TemplateChoice:
    """The chat template a session renders with, and where it came from."""

    source: str  # the Jinja text
    origin: str  # "model" | "adapter" (its train_args.json) | "adapter-tokenizer"
    name: str | None  # the template name train_args.json records (auto, chatml, llama3, default), if any
    description: str  # for people: "the model's chat template", ...
    note: str | None = None  # one line when it differs from the model tokenizer's own template


class _Stream:
    """A `generate` streamer: skips the prompt, decodes the new tokens, hands on only what is final.

    The whole answer is decoded at every step and the new part handed on, held back while it ends
    in an incomplete UTF-8 character, so the pieces join to exactly the decoded answer.
    """

    def __init__(self, tokenizer, on_token):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._send(final=False)

    def end(self) -> None:
        self._send(final=True)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _send(self, final: bool) -> None:
        text = self.text()
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            if self.on_token is not None:
                self.on_token(piece)


@dataclass
class ChatSession:
    """Multi-turn chat with `model`: `reply(text, on_token)`, `clear()`, `set_system(text)`."""

    model: object
    tokenizer: object
    template: str
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    max_context: int = DEFAULT_CONTEXT
    stop_ids: list[int] = field(default_factory=list)  # besides EOS: the template's end-of-turn token(s)
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) turns, oldest first
    last: Reply | None = None

    def __post_init__(self):
        check_settings(self.max_new_tokens, self.temperature, self.top_p, self.max_context)
        self.stop_ids = sorted(set(self.stop_ids) | set(template_stop_ids(self.tokenizer, self.template)))

    # -- the conversation ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every turn (the system message stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """The system message for the following answers; empty or None removes it. Turns are kept."""
        self.system = text.strip() if text and text.strip() else None

    def messages(self, user: str | None = None, skip: int = 0) -> list[dict]:
        """The conversation as chat messages: system, the turns (less the `skip` oldest), `user` if given."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.history[skip:]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if user is not None:
            messages.append({"role": "user", "content": user})
        return messages

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """The token ids of the prompt for `user`, and how many whole oldest turns it leaves out to fit.

        The prompt and `max_new_tokens` must fit in `max_context`. The system message is never dropped;
        when the system message and `user` alone do not fit, an error says so.
        """
        budget = self.max_context - self.max_new_tokens
        for skip in range(len(self.history) + 1):
            ids = self._encode(self.messages(user, skip))
            if len(ids) <= budget:
                return ids, skip
        raise WorkbenchError(
            f"the message is too long: the prompt is {len(ids)} tokens"
            f"{' with the system message' if self.system else ''}, and with --max-new-tokens "
            f"{self.max_new_tokens} it must fit in --max-context {self.max_context}")

    def reply(self, text: str, on_token=None) -> str:
        """The model's answer to `text`, streamed through `on_token(piece)` as it is generated.

        The turn joins the history (and the oldest turns that no longer fit leave it) only once the
        answer is complete: an interrupted generation (KeyboardInterrupt) leaves the session as it was.
        """
        import torch

        from workbench.evals.generate import until_eos

        ids, dropped = self.prompt_ids(text)
        config = self._generation_config()
        started = time.perf_counter()
        input_ids = torch.tensor([ids], dtype=torch.long, device=_device_of(self.model))
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         generation_config=config, streamer=_Stream(self.tokenizer, on_token))
        kept = until_eos(output[0, len(ids):].tolist(), set(config.eos_token_id))
        answer = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        del self.history[:dropped]
        self.history.append((text, answer))
        self.last = Reply(answer, len(kept), time.perf_counter() - started, len(ids), dropped)
        return answer

    # -- internals ----------------------------------------------------------------------------------
    def _encode(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError) as exc:
            raise WorkbenchError(f"the chat template cannot render this conversation: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _generation_config(self):
        from workbench.evals.generate import greedy_config

        config = greedy_config(self.model, self.tokenizer, self.max_new_tokens)  # nothing inherited from the model
        config.eos_token_id = sorted(set(config.eos_token_id) | set(self.stop_ids))
        if self.temperature > 0:
            config.do_sample, config.temperature, config.top_p, config.top_k = True, self.temperature, self.top_p, 0
        return config


def check_settings(max_new_tokens: int, temperature: float, top_p: float, max_context: int | None) -> None:
    """The numbers a session takes, checked (one error line each)."""
    if max_new_tokens < 1:
        raise WorkbenchError("--max-new-tokens must be at least 1")
    if not temperature >= 0 or temperature == float("inf"):
        raise WorkbenchError("--temperature must be 0 (greedy) or a positive number")
    if not 0 < top_p <= 1:
        raise WorkbenchError("--top-p must be above 0 and at most 1")
    if max_context is not None and max_context <= max_new_tokens:
        raise WorkbenchError(f"--max-context {max_context} leaves no room for the conversation: it must be more "
                             f"than --max-new-tokens ({max_new_tokens})")


def template_stop_ids(tokenizer, template: str) -> list[int]:
    """The special tokens the template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...).

    Found by rendering a one-turn conversation with and without its answer; none when the template
    cannot be probed (the tokenizer's EOS still stops generation).
    """
    try:
        prompt = tokenizer.apply_chat_template(_PROBE[:1], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - any template failure: no extra stop tokens
        return []
    if not full.startswith(prompt):
        return []
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted({t for t in tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"] if t in special})


def _device_of(model):
    return next(model.parameters()).device


# -- which template -------------------------------------------------------------------------------
def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own chat template (the default one of a named set), or None."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default")
    return source if isinstance(source, str) and source.strip() else None


def recorded_template(adapter: Path) -> str | None:
    """The template name `wb train` recorded in the adapter's train_args.json, or None without one."""
    from workbench.io.jsonfile import read_json
    from workbench.train.templates import TEMPLATES

    path = adapter / "train_args.json"
    if not path.is_file():
        return None
    record = read_json(path, "train_args.json")
    template = record.get("template") if isinstance(record, dict) else None
    if template is None:
        return None
    name = template.get("name") if isinstance(template, dict) else None
    if name not in TEMPLATES:
        raise WorkbenchError(f"train_args.json records the template {str(name)[:80]!r}, which wb does not know "
                             f"(one of {', '.join(TEMPLATES)})", path)
    return name


def choose_template(model_template: str | None, adapter: Path | None = None,
                    adapter_template: str | None = None) -> TemplateChoice:
    """The template to chat with: the adapter's training template when it has one, else the model's.

    model_template: the model tokenizer's own; adapter_template: the one of the tokenizer saved in
    the adapter folder (None when it has none). The adapter's training template is the built-in that
    train_args.json names (chatml, llama3, default), or, for `auto`, the tokenizer's template that
    training used: the one saved with the adapter (else the model's). An adapter made elsewhere
    (no train_args.json) brings its tokenizer's template, if any. When the choice differs from the
    model tokenizer's own template, `note` says so.
    """
    from workbench.train.templates import BUILTINS

    name = recorded_template(adapter) if adapter is not None else None
    if name in BUILTINS:
        choice = TemplateChoice(BUILTINS[name], "adapter", name,
                                f"the adapter's training template ({name}, recorded in train_args.json)")
    elif adapter_template is not None:
        what = ("the adapter's training template (the tokenizer's own, saved with the adapter)" if name == "auto"
                else "the chat template of the adapter's tokenizer")
        choice = TemplateChoice(adapter_template, "adapter" if name else "adapter-tokenizer", name, what)
    elif model_template is not None:
        what = "the model's chat template" + (" (the adapter was trained with it: template auto)" if name else "")
        choice = TemplateChoice(model_template, "model", name, what)
    else:
        where = f" or the adapter ({adapter})" if adapter is not None else ""
        raise WorkbenchError(f"the tokenizer has no chat template{where} (a base model?); wb chat needs a chat "
                             "model, or an adapter trained with `wb train --template chatml|llama3|default`")
    if choice.origin != "model" and choice.source != model_template:
        theirs = ", which differs from the model tokenizer's own" if model_template else \
            "; the model's tokenizer has none"
        choice.note = f"chatting with {choice.description}{theirs}"
    return choice


# -- loading --------------------------------------------------------------------------------------
@dataclass
class Loaded:
    session: ChatSession
    template: TemplateChoice
    device: str
    dtype: str
    context_length: int  # the model's own
    notes: list[str]


def context_length(model, tokenizer) -> int:
    """The model's context length: the config's max_position_embeddings, else the tokenizer's limit."""
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else DEFAULT_CONTEXT


def open_session(model: str | Path, adapter: str | Path | None = None, *, system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 max_context: int | None = None, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False) -> Loaded:
    """Check the files (as `wb eval` does), pick the template, load the model (adapter unmerged)."""
    from workbench.dtypes import resolve_compute_dtype, resolve_device
    from workbench.evals.run import check_model_files, load_tokenizer, quiet_libraries, tokenizer_folder

    model, adapter = Path(model), Path(adapter) if adapter is not None else None
    check_settings(max_new_tokens, temperature, top_p, max_context)
    if not model.is_dir():
        raise WorkbenchError("--model must be a model folder (config.json, tokenizer, weights)", model)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise WorkbenchError("--adapter must be a PEFT adapter folder (adapter_config.json)", adapter)
    torch_device = resolve_device(device)
    compute = resolve_compute_dtype(dtype, torch_device)
    notes: list[str] = []
    with quiet_libraries():
        tokenizer = check_model_files(model, adapter, trust_remote_code)
        own = tokenizer_folder(model, adapter) != model  # the adapter brings its tokenizer
        model_tokenizer = load_tokenizer(model, trust_remote_code) if own else tokenizer
        choice = choose_template(tokenizer_template(model_tokenizer), adapter,
                                 tokenizer_template(tokenizer) if own else None)
        if choice.note:
            notes.append(choice.note)
        lm = _load_model(model, adapter, tokenizer, compute, torch_device, trust_remote_code)
    window = context_length(lm, tokenizer)
    if max_context is None:
        max_context = window
        if max_context <= max_new_tokens:
            raise WorkbenchError(f"--max-new-tokens {max_new_tokens} does not fit in the model's context of "
                                 f"{window} tokens; give fewer", model)
    elif max_context > window:
        notes.append(f"--max-context {max_context} is more than the model's context length ({window} tokens)")
    session = ChatSession(lm, tokenizer, choice.source, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, max_context=max_context,
                          stop_ids=_recorded_stop_ids(adapter, tokenizer))
    return Loaded(session, choice, str(torch_device), str(compute).removeprefix("torch."), window, notes)


def _recorded_stop_ids(adapter: Path | None, tokenizer) -> list[int]:
    """The end-of-turn token train_args.json records (what the adapter learned to stop with), as an id."""
    if adapter is None or not (adapter / "train_args.json").is_file():
        return []
    from workbench.io.jsonfile import read_json

    record = read_json(adapter / "train_args.json", "train_args.json")
    token = record.get("template", {}).get("end_of_turn") if isinstance(record, dict) and isinstance(
        record.get("template"), dict) else None
    if not isinstance(token, str) or not token:
        return []
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids if len(ids) == 1 else []


def _load_model(model: Path, adapter: Path | None, tokenizer, dtype, device, trust_remote_code: bool):
    """The model on `device` in `dtype`, with the adapter as a PeftModel (unmerged), in eval mode."""
    from transformers import AutoModelForCausalLM

    from workbench.evals.run import one_line

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(model.resolve()), dtype=dtype,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise WorkbenchError(f"could not load the model: {one_line(exc)}", model) from None
    lm.to(device)
    if adapter is not None:
        from peft import PeftModel

        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:  # an adapter that added tokens, as lm-eval
            lm.resize_token_embeddings(len(tokenizer))
        try:
            lm = PeftModel.from_pretrained(lm, str(adapter.resolve()))
        except RuntimeError as exc:  # a state dict of other shapes (what wb's own check cannot read: DoRA, ...)
            mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
            if not mismatches:
                raise
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise WorkbenchError(f"adapter was made for another base: {mismatches[0]}{more}", adapter) from None
        except (OSError, ValueError, KeyError) as exc:
            text = one_line(exc)
            if "not found in the base model" in text:
                raise WorkbenchError(f"adapter was made for another base: {text}", adapter) from None
            raise WorkbenchError(f"could not load the adapter: {text}", adapter) from None
    return lm.eval()
