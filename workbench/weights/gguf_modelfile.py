"""The ollama `Modelfile` written beside an exported GGUF: FROM, TEMPLATE, PARAMETER stop, SYSTEM.

ollama's templates are Go templates, not Jinja, so a chat template cannot be carried over as text. It
is recognised instead by what it renders: three probe conversations are rendered with the folder's
Jinja template (by transformers' own renderer) and compared with what ChatML and Llama-3 produce.
A template that renders exactly one of them gets that format's Go template; one that renders neither
(tool formats, date headers, anything else) gets no TEMPLATE and a note, never a guess. A template
that inserts a system message when the conversation has none (SmolLM2's "You are a helpful AI
assistant named SmolLM…", Qwen's "You are Qwen…") is recognised too, and its text becomes SYSTEM,
which ollama puts first whenever a conversation brings no system message of its own: the same thing.

SYSTEM: the system message the model was fine-tuned with, when that can be established from the
records `wb` writes: DIR/train_args.json, or the adapters DIR/merge.json names and their
train_args.json; the training files they list must still be there with the recorded sha256, and
every training conversation must begin with the same system message. Otherwise the template's
default (above), otherwise none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError

PROBES = (
    ([{"role": "user", "content": "U1"}], True),
    ([{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}], True),
    ([{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}], False),
)

# The Go templates, in the form of ollama's own library templates: every message rendered as a turn;
# after a last message that is not the assistant's, the assistant's header (the generation prompt);
# a last assistant message is left open, so that ollama continues it.
GO_CHATML = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

GO_LLAMA3 = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""


@dataclass(frozen=True)
class ChatFormat:
    name: str
    start: str  # before the role
    middle: str  # between role and content
    end: str  # after the content: the end-of-turn
    go_template: str
    required: tuple[str, ...]  # special tokens the vocabulary must have
    stop: tuple[str, ...]  # PARAMETER stop

    def turn(self, role: str, content: str) -> str:
        return f"{self.start}{role}{self.middle}{content}{self.end}"

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        text = "".join(self.turn(m["role"], m["content"]) for m in messages)
        return text + (f"{self.start}assistant{self.middle}" if generation_prompt else "")


FORMATS = (
    ChatFormat("chatml", "<|im_start|>", "\n", "<|im_end|>\n", GO_CHATML, ("<|im_start|>", "<|im_end|>"),
               ("<|im_end|>",)),
    ChatFormat("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", GO_LLAMA3,
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>",)),
)


@dataclass
class Recognised:
    format: ChatFormat | None
    default_system: str | None = None  # what the template inserts when there is no system message
    bos_prefix: str = ""  # a BOS the template writes and the tokenizer does not add
    reason: str = ""  # why nothing was recognised


def recognise(template: str | None, special: dict[str, str | None], vocabulary: set[str], add_bos: bool) -> Recognised:
    """Which known chat format `template` renders, by rendering the probes with it."""
    if template is None:
        return Recognised(None, reason="the folder has no chat template")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # pragma: no cover - transformers is a dependency
        return Recognised(None, reason="transformers is not importable to render the chat template")
    tokens = {f"{kind}_token": text or "" for kind, text in special.items()}
    rendered = []
    for messages, generation in PROBES:
        try:
            texts, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                             add_generation_prompt=generation, **tokens)
        except Exception as exc:  # noqa: BLE001 - a template may raise anything; that only means "unknown"
            return Recognised(None, reason=f"rendering it failed ({type(exc).__name__}: {str(exc)[:80]})")
        rendered.append(texts[0])
    # A template may write the BOS token first (Llama-3's); llama.cpp adds it itself where add_bos is set.
    # Tried as rendered first: SmolLM2's BOS is <|im_start|>, which every ChatML text begins with anyway.
    bos = special.get("bos") or ""
    readings = [(rendered, False)]
    if bos and all(text.startswith(bos) for text in rendered):
        readings.append(([text[len(bos):] for text in rendered], True))
    for chat in FORMATS:
        if not all(token in vocabulary for token in chat.required):
            continue
        for texts, emits_bos in readings:
            default = _match(chat, texts)
            if default is not False:
                return Recognised(chat, default_system=default, bos_prefix=bos if emits_bos and not add_bos else "")
    return Recognised(None, reason="it renders neither ChatML nor Llama-3 turns")


def _match(chat: ChatFormat, rendered: list[str]) -> str | None | bool:
    """False when the renderings are not `chat`'s; else the default system message (None: none)."""
    (first, _), (second, _), (third, _) = PROBES
    if rendered[1] != chat.render(second, True):
        return False
    plain = chat.render(first, True)
    if rendered[0] == plain:
        return None if rendered[2] == chat.render(third, False) else False
    head = rendered[0][: len(rendered[0]) - len(plain)]
    opening = chat.turn("system", "")[: -len(chat.end)]
    if not rendered[0].endswith(plain) or not head.startswith(opening) or not head.endswith(chat.end):
        return False
    default = head[len(opening): -len(chat.end)]
    if chat.turn("system", default) != head or rendered[2] != head + chat.render(third, False):
        return False
    return default


@dataclass
class SystemChoice:
    text: str | None
    source: str  # where it came from, or why there is none
    notes: list[str] = field(default_factory=list)


def training_system(model_dir: Path) -> SystemChoice:
    """The one system message every training conversation of this model began with, if established."""
    from workbench.io.jsonfile import read_json

    records: list[Path] = []
    if (model_dir / "train_args.json").is_file():
        records.append(model_dir / "train_args.json")
    merge = model_dir / "merge.json"
    if merge.is_file():
        try:
            record = read_json(merge, "merge.json")
        except WorkbenchError as exc:
            return SystemChoice(None, "none", [f"merge.json unreadable ({exc.message}); SYSTEM from it left out"])
        for adapter in (record.get("adapters") or []) if isinstance(record, dict) else []:
            path = adapter.get("path") if isinstance(adapter, dict) else None
            if not isinstance(path, str):
                continue
            found = _existing(Path(path) / "train_args.json", model_dir)
            if found is None:
                return SystemChoice(None, "none", [f"the adapter {path} that merge.json names has no train_args.json "
                                                   "here; SYSTEM from training data left out"])
            records.append(found)
    if not records:
        return SystemChoice(None, "none")
    systems: set[str | None] = set()
    for record_path in records:
        found = _record_systems(record_path)
        if isinstance(found, str):
            return SystemChoice(None, "none", [found])
        systems |= found
    if len(systems) == 1 and None not in systems:
        return SystemChoice(systems.pop(), "training data (" + ", ".join(str(p) for p in records) + ")")
    if systems == {None}:
        return SystemChoice(None, "none")
    return SystemChoice(None, "none", [f"the training conversations begin with {len(systems - {None})} different "
                                       "system messages (or none); SYSTEM from training data left out"])


def _existing(path: Path, model_dir: Path) -> Path | None:
    """`path` as recorded (relative to where the command ran), or relative to the model folder's parent."""
    for candidate in (path, model_dir.parent / path, model_dir / path):
        if candidate.is_file():
            return candidate
    return None


def _record_systems(record_path: Path) -> set[str | None] | str:
    """The first system message of every training conversation a train_args.json names; a str is a note."""
    from workbench.io.hashing import sha256_file
    from workbench.io.jsonfile import read_json

    try:
        record = read_json(record_path, "train_args.json")
    except WorkbenchError as exc:
        return f"{record_path} unreadable ({exc.message}); SYSTEM from training data left out"
    data = record.get("data") if isinstance(record, dict) else None
    options = record.get("options") if isinstance(record, dict) else None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not files or not isinstance(options, dict):
        return f"{record_path} lists no training files; SYSTEM from training data left out"
    paths = []
    for entry in files:
        path = entry.get("path") if isinstance(entry, dict) else None
        found = _existing(Path(path), record_path.parent) if isinstance(path, str) else None
        if found is None or sha256_file(found) != entry.get("sha256"):
            return (f"the training file {path} named in {record_path} is missing or changed; SYSTEM from training "
                    "data left out")
        paths.append(found)
    try:
        from workbench.train.data import load_conversations

        loaded = load_conversations(paths, fmt=options.get("format") or "auto", columns=options.get("columns"),
                                    max_samples=options.get("max_samples"))
    except (WorkbenchError, ImportError, TypeError) as exc:
        return f"cannot re-read the training data of {record_path} ({exc}); SYSTEM from training data left out"
    return {
        (c.messages[0]["content"] if c.messages and c.messages[0]["role"] == "system" else None)
        for c in loaded.conversations
    }


def modelfile_text(gguf_name: str, recognised: Recognised, system: str | None, stops: list[str],
                   source: str) -> str:
    """The Modelfile: FROM the file beside it, TEMPLATE when recognised, PARAMETER stop, SYSTEM."""
    lines = [f"# written by wb export-gguf from {source}", f"FROM ./{gguf_name}"]
    if recognised.format is not None:
        lines.append(f'TEMPLATE """{recognised.bos_prefix}{recognised.format.go_template}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def stop_tokens(recognised: Recognised, eos: str | None) -> list[str]:
    """The end-of-turn token(s) of the recognised format, else the EOS token."""
    if recognised.format is not None:
        return list(recognised.format.stop)
    return [eos] if eos else []


def quotable(text: str) -> bool:
    """Whether `text` fits in a Modelfile triple-quoted string."""
    return '"""' not in text


def stop_quotable(text: str) -> bool:
    return '"' not in text and "\\" not in text and "\n" not in text
