"""`wb compat`: can two folders be diffed, recovered, merged or evaluated together? Asked before any weight work.

The most common failure of weight tools is found hours into a job: a diff made from another base, an
adapter for another model size, a tokenizer one token longer than the embeddings. Everything here
is decided from configs, tokenizer files and tensor headers alone (`open_checkpoint` reads headers;
no tensor is ever read), so a check of a 70B pair takes as long as one of a tiny pair.

Each comparison is a `Finding`: what was compared, FIRST's and SECOND's values, what wb will do
(`ok`, `warn`, `resize` with Alpaca's rule, `refuse`) and why. The tensor checks are the very
functions the commands run (`check_same_names`, `resized_rows`, `LoraAdapter.bind`, `read_float_model_config`),
so a refusal here is the refusal the command would make, with the same message, only earlier.

Two ways in:

- `compat(first, second)`: the `wb compat` command's result (exit 1 when anything is refused);
- `check_before(purpose, first, second)`: run first by diff, recover, merge and eval/chat with an
  adapter; raises the first refusal as the command's one-line error, returns the warnings as `Note`s.

What each purpose refuses, so that nothing that works today is refused:

- `diff` (RAW, TUNED) and `compat` of two models: tensor names must agree, shapes too except where
  TUNED's vocabulary grew (resized with Alpaca's rule). Config and tokenizer differences are warnings.
- `recover` (RAW, DIFF): a wb diff's recorded base (names, shapes; a dtype difference is a warning,
  as RAW is cast to the recorded dtype before its fingerprint is compared); another tool's diff as
  `wb recover` takes it (rotary buffers on one side skipped, float added to float only).
- `merge` (BASE, ADAPTER): every LoRA pair or whole tensor must fit the base (no resize); variants
  whose merge is not `W + s·B@A` and quantized bases are refused.
- `eval` (MODEL, ADAPTER): what peft itself would refuse once the model is loaded (target modules
  that name nothing in the model); shapes are checked by `evals.run`'s own adapter check, with
  lm-eval's tolerance for a resized vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import MAX_SIZE, read_json, read_model_config
from workbench.io.paths import hub_snapshot
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.outputs import Note
from workbench.weights.adapters.lora import (
    ADAPTER_CONFIG,
    check_numbers,
    is_lora_adapter,
    read_adapter_config,
    read_lora_adapter,
    refuse_unmergeable,
)
from workbench.weights.recover import THE_BASE  # recover's words for a wb diff's recorded base
from workbench.weights.weight_diff import (
    META_FILE,
    RESIZE_RULE,
    check_same_names,
    dtype_name,
    is_rotary_buffer,
    is_vocab_tensor,
    read_meta,
    resized_rows,
)

ACTIONS = ("ok", "warn", "resize", "refuse")  # in rising severity
PURPOSES = ("compat", "diff", "recover", "merge", "eval")
RESIZE_WORDS = {"mean": "new rows = mean of the existing rows"}
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_TOKENIZER_BYTES = 512 * 1024 * 1024  # far above any real tokenizer file (Gemma's tokenizer.json: 34 MB)
SHOWN_TENSOR_FINDINGS = 8  # lines() lists this many per-tensor findings; --json lists them all


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One comparison: `first` and `second` are the two inputs' values (JSON values; None: absent)."""

    what: str
    first: object
    second: object
    action: str  # one of ACTIONS
    why: str
    error: WorkbenchError | None = field(default=None, compare=False, repr=False)  # the command's own refusal
    tensor: bool = False  # a per-tensor finding (lines() shows only the first few)

    def values(self) -> str:
        """`A vs B`; one value where both agree, or where only one side has it (an adapter's type)."""
        if self.first is None or self.first == self.second:
            return _show(self.second)
        if self.second is None:
            return _show(self.first)
        return f"{_show(self.first)} vs {_show(self.second)}"

    def line(self) -> str:
        return f"{self.action:<6} {self.what}: {self.values()}: {self.why}"

    def to_json(self) -> dict:
        return {"what": self.what, "first": self.first, "second": self.second, "action": self.action, "why": self.why}


@dataclass
class CompatResult:
    """What `wb compat` found; `error()` is the first refusal (exit 1), None when the pair is usable."""

    purpose: str
    first: dict  # the input's summary: path, kind, tensors, architecture, ...
    second: dict
    findings: list[Finding]
    source: Path  # the file a refusal without a command error of its own is reported against

    @property
    def refused(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "refuse"]

    @property
    def compatible(self) -> bool:
        return not self.refused

    def counts(self) -> dict[str, int]:
        return {action: sum(f.action == action for f in self.findings) for action in ACTIONS}

    def notes(self) -> list[Note]:
        """The lines a command prints on stderr before it starts: the warnings, and for eval the resize
        lm-eval makes silently (diff and recover print their resizes themselves)."""
        shown = ("warn", "resize") if self.purpose == "eval" else ("warn",)
        return [Note(f"note: {f.what}: {f.values()}: {f.why}") for f in self.findings if f.action in shown]

    def lines(self) -> list[str]:
        shown = [f"FIRST: {_describe(self.first)}", f"SECOND: {_describe(self.second)}"]
        tensor_findings = [f for f in self.findings if f.tensor and f.action != "ok"]  # ok ones: --json
        shown += [f.line() for f in self.findings if not f.tensor]
        shown += [f.line() for f in tensor_findings[:SHOWN_TENSOR_FINDINGS]]
        if len(tensor_findings) > SHOWN_TENSOR_FINDINGS:
            shown.append(f"... and {len(tensor_findings) - SHOWN_TENSOR_FINDINGS} more tensor finding(s) "
                         "(--json lists them all)")
        counts = self.counts()
        tally = ", ".join(f"{counts[a]} {a}" for a in ACTIONS if counts[a])
        shown.append(f"{'refused' if self.refused else 'compatible'}: {tally}")
        return shown

    def error(self) -> WorkbenchError | None:
        if not self.refused:
            return None
        own = next((f.error for f in self.refused if f.error is not None), None)
        first = self.refused[0]
        return own or WorkbenchError(f"{first.what}: {first.why}", self.source)

    def to_json(self) -> dict:
        return {
            "purpose": self.purpose,
            "compatible": self.compatible,
            "first": self.first,
            "second": self.second,
            "counts": self.counts(),
            "findings": [f.to_json() for f in self.findings],
        }


# -- the two ways in ---------------------------------------------------------------------------------
def compat(first: str | Path, second: str | Path) -> CompatResult:
    """`wb compat FIRST SECOND`: two model folders (FIRST the base), a model and an adapter (either
    order), or a base and a wb diff. Reads configs, tokenizer files and tensor headers only."""
    first, second = Path(first), Path(second)
    if _kind(first) in ("adapter", "wb diff") and _kind(second) == "model":
        first, second = second, first  # the model is FIRST: a base, then what is applied to it
    if _kind(first) == "adapter":
        raise WorkbenchError("both are adapters; compare a model with an adapter, or two models", second)
    return _check("compat", first, second)


def check_before(purpose: str, first: str | Path, second: str | Path) -> list[Note]:
    """The check `purpose` ("diff", "recover", "merge", "eval") runs before any weight work: raises
    the first refusal as a WorkbenchError (one line naming the difference and the file), else returns
    the warnings as Note lines (see `print_notes`)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}")
    result = _check(purpose, Path(first), Path(second))
    error = result.error()
    if error is not None:
        raise error
    return result.notes()


def print_notes(notes: list[Note]) -> None:
    """Print `check_before`'s warnings on stderr, as `workbench.outputs` prints its notes."""
    for note in notes:
        click.echo(note, err=True)


# -- one input -------------------------------------------------------------------------------------
@dataclass
class _Tokenizer:
    """What the tokenizer files of a folder say, read as JSON (and a protobuf walk), never loaded."""

    files: list[str]
    tokens: int | None = None  # the highest token id + 1: the embedding rows the tokenizer needs
    added: list[str] = field(default_factory=list)  # tokens added past the base vocabulary ([PAD])
    chat_template: str | None = None  # sha256 of the template text, first 12 hex digits
    special: dict[str, str | None] = field(default_factory=dict)
    problem: str | None = None

    def to_json(self) -> dict:
        return {"files": self.files, "tokens": self.tokens, "added": self.added, "chat_template": self.chat_template,
                "special": self.special, "problem": self.problem}


@dataclass
class _Side:
    path: Path  # as given
    kind: str  # "model", "adapter", "wb diff", "diff"
    folder: Path  # where its side files are
    checkpoint: Checkpoint | None = None
    config: dict | None = None
    config_problem: str | None = None
    tokenizer: _Tokenizer | None = None
    adapter_config: dict | None = None

    def get(self, key: str) -> object:
        """A config value, from `text_config` where a multimodal config keeps it."""
        if self.config is None:
            return None
        if key in self.config:
            return self.config[key]
        text = self.config.get("text_config")
        return text.get(key) if isinstance(text, dict) else None

    @property
    def names(self) -> list[str]:
        return self.checkpoint.names() if self.checkpoint is not None else []

    def rows(self) -> int | None:
        """Rows of the input embedding (of any vocabulary tensor when there is no input embedding)."""
        if self.checkpoint is None:
            return None
        vocab = [info for name, info in self.checkpoint.infos.items() if is_vocab_tensor(name) and info.shape]
        inputs = [info for info in vocab if info.name.endswith(INPUT_EMBEDDINGS)]
        chosen = (inputs or vocab)[:1]
        return chosen[0].shape[0] if chosen else None

    def float_dtypes(self) -> list[str]:
        if self.checkpoint is None:
            return []
        return sorted({dtype_name(i.dtype) for i in self.checkpoint.infos.values() if i.dtype.is_floating_point})

    def summary(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "architectures": _plain(self.get("architectures")),
            "model_type": _plain(self.get("model_type")),
            "tensors": len(self.names),
            "weight_files": len(self.checkpoint.files) if self.checkpoint is not None else 0,
            "dtypes": self.float_dtypes(),
            "config": "config.json" if self.config is not None else self.config_problem,
            "tokenizer": self.tokenizer.to_json() if self.tokenizer is not None else None,
            **({"peft_type": _plain(self.adapter_config.get("peft_type")), "r": _plain(self.adapter_config.get("r")),
                "base_model_name_or_path": _plain(self.adapter_config.get("base_model_name_or_path"))}
               if self.adapter_config is not None else {}),
        }


def _kind(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    if is_lora_adapter(folder):
        return "adapter"
    if (folder / META_FILE).is_file():
        return "wb diff"
    return "model"


def _open_model(path: Path, kind: str, strict: bool) -> _Side:
    """A model (or diff) folder: its headers, its config (a broken one raises when `strict`, else
    becomes a warning: diff and recover never read config.json) and its tokenizer files."""
    checkpoint = open_checkpoint(path)
    side = _Side(path=path, kind=kind, folder=checkpoint.root, checkpoint=checkpoint)
    if (side.folder / "config.json").is_file():
        try:
            side.config = read_model_config(side.folder, "config.json and weights")
        except WorkbenchError as err:
            if strict:
                raise
            side.config_problem = err.line()
    side.tokenizer = tokenizer_facts(side.folder)
    return side


def _open_adapter(path: Path) -> _Side:
    """An adapter folder: its config (bad JSON is refused: every command that takes an adapter reads
    it) and tokenizer files; its tensors are opened by the LoRA reader where they are compared."""
    config = read_adapter_config(path)
    return _Side(path=path, kind="adapter", folder=path, adapter_config=config, tokenizer=tokenizer_facts(path))


# -- the comparison ----------------------------------------------------------------------------------
def _check(purpose: str, first_path: Path, second_path: Path) -> CompatResult:
    strict = purpose in ("compat", "merge", "eval")  # the commands that read config.json themselves
    sides: list[_Side] = []
    try:
        first = _open_model(first_path, "model", strict)
        sides.append(first)
        second_kind = _kind(second_path)
        if second_kind == "adapter":
            second = _open_adapter(second_path)
            findings = _adapter_findings(purpose, first, second)
        else:
            if purpose == "recover" and second_kind == "model":
                second_kind = "diff"
            second = _open_model(second_path, second_kind, strict)
            sides.append(second)
            if second_kind == "wb diff" and purpose in ("compat", "recover"):
                findings = _recorded_base_findings(first, second)
            else:
                findings = _model_findings(purpose, first, second)
        return CompatResult(purpose, first.summary(), second.summary(), findings, first_path)
    finally:
        for side in sides:
            side.checkpoint.close()


def _labels(purpose: str) -> tuple[str, str]:
    """The names the commands' own messages give the two inputs."""
    if purpose == "diff":
        return "RAW", "TUNED"
    if purpose == "recover":
        return "RAW", "DIFF"
    return "FIRST", "SECOND"


# -- two models (diff, compat), or RAW and another tool's diff (recover) -------------------------------------
def _model_findings(purpose: str, first: _Side, second: _Side) -> list[Finding]:
    labels = _labels(purpose)
    tensors = _tensor_findings(purpose, first, second, labels)
    tensors_refused = any(f.action == "refuse" for f in tensors)
    findings = [
        *_quantized_findings(purpose, first, second),  # first: wb merge refuses a quantized model before all else
        *_config_problem_findings(first, second),
        _architecture_finding(first, second),
        *(_size_finding(key, what, first, second, tensors_refused)
          for key, what in (("hidden_size", "hidden size"), ("num_hidden_layers", "layers"))),
        _rows_finding(purpose, first, second, labels),
        _vocabulary_finding(first, second),
        _tied_finding(first, second),
        _dtype_finding(purpose, first, second),
        *_tokenizer_findings(purpose, first, second),
        _special_ids_finding(purpose, first, second),
        *tensors,
    ]
    return [f for f in findings if f is not None]


def _special_ids_finding(purpose: str, first: _Side, second: _Side) -> Finding | None:
    """config.json's bos/eos/pad token ids (what generation stops on), where both configs are read."""
    if first.config is None or second.config is None:
        return None
    a, b = ({key.removesuffix("_token_id"): _plain(side.get(key)) for key in SPECIAL_IDS} for side in (first, second))
    carried = {"diff": "the diff carries TUNED's config.json", "recover": "OUT gets DIFF's config.json"}.get(purpose)
    return _compared("special token ids", a, b, "ok" if carried else "warn",
                     carried or "generation starts, stops or pads on other ids")


def _tensor_findings(purpose: str, first: _Side, second: _Side, labels: tuple[str, str]) -> list[Finding]:
    """Names and shapes, in the order and with the messages of the command that would refuse them."""
    one, two = labels
    path = first.path
    findings: list[Finding] = []
    skipped: list[str] = []
    first_names, second_names = first.names, second.names
    if second.kind == "diff":  # wb recover skips a rotary buffer present on one side only
        skipped = sorted(n for n in set(first_names) ^ set(second_names) if is_rotary_buffer(n))
        first_names = [n for n in first_names if n not in skipped]
        second_names = [n for n in second_names if n not in skipped]
    try:
        check_same_names(second_names, first_names, two, one, path)
        same = Finding("tensor names", len(first_names), len(second_names), "ok", "the same tensors on both sides")
    except WorkbenchError as err:
        same = Finding("tensor names", len(first_names), len(second_names), "refuse", err.message, err)
    findings.append(same)
    if skipped:
        findings.append(Finding("rotary buffers", len(skipped), 0, "ok",
                                f"wb recover skips {len(skipped)} rotary_emb.inv_freq buffer(s) present on one side "
                                "only (transformers recomputes them)"))
    common, second_set = set(first_names), set(second_names)
    for name in second_names:
        if name not in common:
            findings.append(Finding(f"tensor {name}", None, list(second.checkpoint.info(name).shape), "refuse",
                                    f"only in {two}", tensor=True))
            continue
        findings += _one_tensor(purpose, name, first, second, labels)
    for name in first_names:
        if name not in second_set:
            findings.append(Finding(f"tensor {name}", list(first.checkpoint.info(name).shape), None, "refuse",
                                    f"only in {one}", tensor=True))
    return findings


def _one_tensor(purpose: str, name: str, first: _Side, second: _Side, labels: tuple[str, str]) -> list[Finding]:
    one, two = labels
    a, b = first.checkpoint.info(name), second.checkpoint.info(name)
    shapes = list(a.shape), list(b.shape)
    found: list[Finding] = []
    if second.kind == "diff" and a.dtype.is_floating_point != b.dtype.is_floating_point:
        error = WorkbenchError(f"tensor {name!r} is {dtype_name(b.dtype)} in DIFF but {dtype_name(a.dtype)} in RAW; "
                               "a weight diff adds like to like", second.checkpoint.root)
        found.append(Finding(f"tensor {name}", dtype_name(a.dtype), dtype_name(b.dtype), "refuse", error.message,
                             error, tensor=True))
    try:
        old = resized_rows(name, a.shape, b.shape, one, two, first.path)
    except WorkbenchError as err:  # the command's message is the error; the line says why in short
        shrinks = is_vocab_tensor(name) and a.shape[1:] == b.shape[1:] and len(a.shape) == len(b.shape)
        why = (f"{two} has fewer rows: wb does not drop vocabulary rows" if shrinks else
               "another shape (only a vocabulary tensor may differ, by gaining rows)")
        return [*found, Finding(f"tensor {name}", *shapes, "refuse", why, err, tensor=True)]
    if old is None:
        return found
    return [*found, Finding(f"tensor {name}", *shapes, "resize",
                            f"{one}'s {old} rows grow to {b.shape[0]} ({RESIZE_WORDS[RESIZE_RULE]}, Alpaca's rule)",
                            tensor=True)]


def _config_problem_findings(first: _Side, second: _Side) -> list[Finding]:
    """A config.json that diff and recover need not read, but that is broken: a warning."""
    problems = [side.config_problem for side in (first, second) if side.config_problem]
    if not problems:
        return []
    states = ["unreadable" if side.config_problem else "ok" if side.config is not None else "absent"
              for side in (first, second)]
    return [Finding("config.json", *states, "warn", f"{'; '.join(problems)}; its settings are not compared")]


def _architecture_finding(first: _Side, second: _Side) -> Finding | None:
    if first.config is None or second.config is None:
        return _not_compared("architecture", first, second, "config.json")
    values = [{"architectures": _plain(s.get("architectures")), "model_type": _plain(s.get("model_type"))}
              for s in (first, second)]
    if values[0] == values[1]:
        return Finding("architecture", values[0], values[1], "ok", "the same architecture")
    return Finding("architecture", values[0], values[1], "warn",
                   "another architecture: wb pairs tensors by name, so only their names and shapes decide")


def _size_finding(key: str, what: str, first: _Side, second: _Side, tensors_refused: bool) -> Finding | None:
    a, b = first.get(key), second.get(key)
    if a is None or b is None:
        return None
    if a == b:
        return Finding(what, a, b, "ok", f"config.json's {key} agrees")
    if tensors_refused:
        return Finding(what, a, b, "refuse", f"config.json's {key} differs: another model size, whose tensors "
                                             "cannot line up (the tensor findings say which)")
    return Finding(what, a, b, "warn", f"config.json's {key} differs though every tensor lines up: one of the "
                                       "config.json files is wrong")


def _rows_finding(purpose: str, first: _Side, second: _Side, labels: tuple[str, str]) -> Finding | None:
    one, two = labels
    a, b = first.rows(), second.rows()
    if a is None or b is None:
        return None
    if a == b:
        return Finding("embedding rows", a, b, "ok", "the same vocabulary size")
    if a > b:
        return Finding("embedding rows", a, b, "refuse", f"{two} has fewer rows than {one}: a fine-tune only adds "
                                                        "tokens, and wb does not drop rows")
    added = (second.tokenizer.added if second.tokenizer else [])
    names = f" (added: {', '.join(added[:5])}{'…' if len(added) > 5 else ''})" if added else ""
    return Finding("embedding rows", a, b, "resize",
                   f"{two} has {b - a} more row(s){names}: wb diff and wb recover grow {one}'s vocabulary tensors first "
                   f"with Alpaca's rule ({RESIZE_WORDS[RESIZE_RULE]})")


def _vocabulary(side: _Side) -> dict:
    tokens = side.tokenizer.tokens if side.tokenizer else None
    return {"rows": side.rows(), "config": _plain(side.get("vocab_size")), "tokenizer": tokens}


def _vocabulary_problems(label: str, side: _Side) -> list[str]:
    """Where a folder's own config, tokenizer and embeddings disagree (each a warning)."""
    values = _vocabulary(side)
    rows, config, tokens = values["rows"], values["config"], values["tokenizer"]
    problems = []
    if rows is not None and isinstance(config, int) and config != rows:
        problems.append(f"{label}'s config.json says vocab_size {config} but its embeddings have {rows} rows "
                        "(transformers refuses to load that)")
    if rows is not None and tokens is not None and tokens > rows:
        problems.append(f"{label}'s tokenizer has ids up to {tokens - 1} but its embeddings only {rows} rows")
    return problems


def _vocabulary_finding(first: _Side, second: _Side) -> Finding:
    problems = _vocabulary_problems("FIRST", first) + _vocabulary_problems("SECOND", second)
    values = _vocabulary(first), _vocabulary(second)
    if problems:
        return Finding("vocabulary", *values, "warn", "; ".join(problems))
    return Finding("vocabulary", *values, "ok", "each folder's config, tokenizer and embeddings agree")


def _tied_finding(first: _Side, second: _Side) -> Finding | None:
    values = [{"config": _plain(s.get("tie_word_embeddings")), "lm_head_saved": _has_lm_head(s)} for s in (first, second)]
    if first.config is None or second.config is None:
        values = [{"lm_head_saved": v["lm_head_saved"]} for v in values]
    if values[0] == values[1]:
        return Finding("tied embeddings", *values, "ok", "both tie (or untie) lm_head alike")
    return Finding("tied embeddings", *values, "warn",
                   "one ties lm_head to the input embeddings and the other does not: transformers builds them differently")


def _has_lm_head(side: _Side) -> bool:
    return any(name == "lm_head.weight" or name.endswith(".lm_head.weight") for name in side.names)


def _dtype_finding(purpose: str, first: _Side, second: _Side) -> Finding:
    a, b = first.float_dtypes(), second.float_dtypes()
    why = {
        "diff": "wb diff computes in float32 (float64 when a side is) and stores the diff in --dtype",
        "recover": "wb recover adds in float32 and stores DIFF's dtype (or --dtype)",
    }.get(purpose, "wb computes in float32; each command's output keeps its source's dtype unless --dtype")
    return Finding("dtype", a, b, "ok", why if a != b else "the same dtypes")


def _quantized_findings(purpose: str, *sides: _Side) -> list[Finding]:
    """A quantized checkpoint (config.json's quantization_config): wb merge refuses it with its own
    message; diff and compat warn, as its integer tensors are not weights to add to; eval says nothing."""
    from workbench.weights.adapters.finetune import read_float_model_config

    methods = [_quant_method(side) for side in sides]
    if not any(methods) or purpose == "eval":  # evaluating a quantized model with its adapter is QLoRA's use
        return []
    values = methods if len(sides) == 2 else [methods[0], None]
    if purpose == "merge":
        for side, method in zip(sides, methods):
            try:
                if method:
                    read_float_model_config(side.folder)
            except WorkbenchError as err:
                return [Finding("quantization", *values, "refuse", err.message, err)]
    return [Finding("quantization", *values, "warn",
                    "a quantized checkpoint: its integer tensors are not float weights to diff, add or merge")]


def _quant_method(side: _Side) -> str | None:
    quantization = side.get("quantization_config")
    if not quantization:
        return None
    return str(_plain(quantization.get("quant_method", "unknown"))) if isinstance(quantization, dict) else "unknown"


def _tokenizer_findings(purpose: str, first: _Side, second: _Side) -> list[Finding]:
    """Chat template and special tokens, where both folders have tokenizer files. Between two models
    they are warnings for `wb compat` (prompts differ); diff and recover carry SECOND's files as they are."""
    a, b = first.tokenizer, second.tokenizer
    problems = [t.problem for t in (a, b) if t is not None and t.problem]
    if problems:
        states = ["absent" if t is None else "unreadable" if t.problem else "ok" for t in (a, b)]
        return [Finding("tokenizer files", *states, "warn", f"{'; '.join(problems)}; they are not compared")]
    if a is None or b is None:
        return []
    found = []
    carried = {"diff": "the diff carries TUNED's tokenizer files", "recover": "OUT gets DIFF's tokenizer files"}.get(purpose)
    action, why = ("ok", carried) if carried else ("warn", "prompts and generation differ between the two")
    found.append(_compared("chat template", a.chat_template, b.chat_template, action, why))
    found.append(_compared("special tokens", a.special, b.special, action, why))
    return found


def _compared(what: str, a: object, b: object, action: str, why: str) -> Finding:
    return Finding(what, a, b, "ok", "the same") if a == b else Finding(what, a, b, action, why)


def _not_compared(what: str, first: _Side, second: _Side, file: str) -> Finding:
    lacking = [label for label, side in (("FIRST", first), ("SECOND", second)) if side.config is None]
    return Finding(what, None, None, "ok", f"not compared: {' and '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} "
                                          f"no readable {file}")


# -- RAW against a wb diff's recorded base --------------------------------------------------------------
def _recorded_base_findings(raw: _Side, diff: _Side) -> list[Finding]:
    """What `wb recover` checks first: RAW's tensors against the base weight_diff.json records (the
    same messages), then RAW's config against the diff's (TUNED's) config."""
    diff_dir = diff.folder
    meta = read_meta(diff_dir)
    recorded = meta["base"]["tensors"]
    findings: list[Finding] = []
    try:
        check_same_names(list(recorded), raw.names, THE_BASE, "RAW", raw.path)
        findings.append(Finding("tensor names", len(raw.names), len(recorded), "ok", f"RAW has exactly the tensors of {THE_BASE}"))
    except WorkbenchError as err:
        findings.append(Finding("tensor names", len(raw.names), len(recorded), "refuse", err.message, err))
    dtypes_differ = []
    for name, entry in recorded.items():
        if name not in raw.checkpoint:
            continue
        info = raw.checkpoint.info(name)
        if list(info.shape) != entry["shape"]:
            error = WorkbenchError(f"RAW is not {THE_BASE}: tensor {name!r} has shape {list(info.shape)} in RAW, "
                                   f"{entry['shape']} in {THE_BASE}", raw.path)
            findings.append(Finding(f"tensor {name}", list(info.shape), entry["shape"], "refuse", error.message, error,
                                    tensor=True))
        if dtype_name(info.dtype) != entry["dtype"]:
            dtypes_differ.append(name)
    for name, entry in meta["resized"].items():
        findings.append(Finding(f"tensor {name}", entry["old_rows"], entry["new_rows"], "resize",
                                f"recorded by wb diff: RAW's rows grow with Alpaca's rule ({RESIZE_WORDS[RESIZE_RULE]})",
                                tensor=True))
    raw_dtypes = raw.float_dtypes()
    recorded_dtypes = sorted({e["dtype"] for e in recorded.values() if e["dtype"].startswith(("float", "bfloat"))})
    if dtypes_differ:
        findings.append(Finding("dtype", raw_dtypes, recorded_dtypes, "warn",
                                f"{len(dtypes_differ)} of RAW's tensors are in another dtype than {THE_BASE}; wb recover "
                                "casts them to the recorded dtype before comparing their sha256, which passes only when "
                                "RAW was converted losslessly from that base"))
    else:
        findings.append(Finding("dtype", raw_dtypes, recorded_dtypes, "ok", f"RAW's dtypes are those of {THE_BASE}"))
    tensors_refused = any(f.action == "refuse" for f in findings)
    config_side = [
        *_config_problem_findings(raw, diff),
        _architecture_finding(raw, diff),
        *(_size_finding(key, what, raw, diff, tensors_refused)
          for key, what in (("hidden_size", "hidden size"), ("num_hidden_layers", "layers"))),
        _vocabulary_finding(raw, diff),
        *_tokenizer_findings("recover", raw, diff),
    ]
    return [f for f in config_side if f is not None] + findings


# -- a model and an adapter ---------------------------------------------------------------------------
def _adapter_findings(purpose: str, model: _Side, adapter: _Side) -> list[Finding]:
    config = adapter.adapter_config
    findings: list[Finding] = [*_quantized_findings(purpose, model), _base_name_finding(model, adapter)]
    peft_type = _plain(config.get("peft_type"))
    lora = str(peft_type).upper() == "LORA"
    mergeable = lora
    if lora:
        try:
            check_numbers(config, adapter.path)
        except WorkbenchError as err:
            return [*findings, Finding("adapter config", None, str(peft_type), "refuse", err.message, err)]
        try:
            refuse_unmergeable(config, adapter.path)
            findings.append(Finding("adapter type", None, "LoRA", "ok", "plain LoRA: base + scale * B @ A"))
        except WorkbenchError as err:
            mergeable = False
            action = {"merge": "refuse", "eval": "ok"}.get(purpose, "warn")
            why = err.message if purpose == "merge" else f"{err.message}; wb eval and wb chat apply it through peft"
            findings.append(Finding("adapter type", None, str(peft_type), action, why, err if action == "refuse" else None))
    else:
        action = {"merge": "refuse", "eval": "ok"}.get(purpose, "warn")
        error = WorkbenchError(f"peft_type {peft_type!r} is not LoRA; wb merges LoRA adapters only", adapter.path)
        findings.append(Finding("adapter type", None, str(peft_type), action,
                                error.message if action == "refuse" else
                                "not LoRA: wb merge refuses it; wb eval and wb chat apply it through peft, which checks it",
                                error if action == "refuse" else None))
    findings.append(_target_modules_finding(purpose, model, adapter))
    findings += _model_tokenizer_vs_adapter(purpose, model, adapter)
    if mergeable and purpose != "eval":  # eval: evals.run checks the tensors with lm-eval's tolerance
        findings += _lora_tensor_findings(purpose, model, adapter)
    return findings


def _base_name_finding(model: _Side, adapter: _Side) -> Finding:
    """The adapter's `base_model_name_or_path` against what this model is called: its folder, its
    config's `_name_or_path`, or the repo id of a hub-cache snapshot. Names are only a hint (a copied
    or renamed folder holds the same weights), so a mismatch is a warning; the tensors decide."""
    recorded = adapter.adapter_config.get("base_model_name_or_path")
    names = _model_names(model)
    if recorded in (None, ""):
        return Finding("base model", names, None, "ok", "the adapter does not record its base")
    if not isinstance(recorded, str):
        return Finding("base model", names, _plain(recorded), "warn", "base_model_name_or_path is not a string")
    wanted = _name_forms(recorded)
    if any(form in wanted for name in names for form in _name_forms(name)):
        return Finding("base model", names, recorded, "ok", "the adapter names this model")
    return Finding("base model", names, recorded, "warn",
                   f"the adapter was trained on {_short(recorded)!r}, a name this model does not have (a renamed folder "
                   "may hold the same weights: the tensors decide)")


def _model_names(model: _Side) -> list[str]:
    """The folder's name (as given, and with symlinks resolved), a hub snapshot's repo id, and config's `_name_or_path`."""
    folder = model.folder
    names: list[str] = []
    for path in (Path(os.path.abspath(folder)), _resolved(folder)):
        repo = (hub_snapshot(path) or (None,))[0]
        for name in (repo, path.name):
            if name and name not in names:
                names.append(name)
    given = model.get("_name_or_path")
    if isinstance(given, str) and given and given not in names:
        names.append(given)
    return names


def _name_forms(name: str) -> set[str]:
    """A name as compared: whole, and its last path component, lower-cased; a hub-cache path's repo id too."""
    text = name.strip().rstrip("/\\")
    forms = {text.lower(), re.split(r"[/\\]", text)[-1].lower()}
    repo = (hub_snapshot(Path(text)) or (None,))[0]
    if repo:
        forms |= {repo.lower(), repo.rsplit("/", 1)[-1].lower()}
    return {form for form in forms if form}


def _target_modules_finding(purpose: str, model: _Side, adapter: _Side) -> Finding:
    """The config's target_modules (a list) against the model's modules, matched as peft matches them:
    a name matches a module that is it or ends in `.name`. When none matches, peft refuses to load the
    adapter ('Target modules ... not found'). A string is a regular expression: only compiled here."""
    targets = adapter.adapter_config.get("target_modules")
    modules = _module_names(model)
    if targets is None:
        return Finding("target modules", None, None, "ok", "not recorded")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return Finding("target modules", None, targets, "ok", "all linear layers")
        try:
            re.compile(targets)
        except re.error as exc:
            error = WorkbenchError(f"target_modules is not a valid regular expression: {exc}", adapter.path / ADAPTER_CONFIG)
            return Finding("target modules", None, _short(targets), "refuse", error.message, error)
        # not matched here: a crafted pattern can backtrack for hours, and the tensors decide anyway
        return Finding("target modules", None, _short(targets), "ok",
                       "a regular expression, which peft matches against the model's modules when it loads the adapter")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        keys: list[str] = targets
        missing = [t for t in keys if not any(m == t or m.endswith("." + t) for m in modules)]
    else:
        error = WorkbenchError(f"target_modules must be a list of module names or a regular expression, not "
                               f"{_short(repr(targets))}", adapter.path / ADAPTER_CONFIG)
        return Finding("target modules", None, None, "refuse", error.message, error)
    found = [k for k in keys if k not in missing]
    if not missing:
        return Finding("target modules", found, keys, "ok", "every target module is in the model")
    if found:
        return Finding("target modules", found, keys, "ok",
                       f"{', '.join(map(repr, missing[:5]))} name(s) no module of the model; peft adapts the others")
    shown = ", ".join(repr(k) for k in keys[:5])
    if purpose == "merge":
        return Finding("target modules", found, keys, "warn",
                       f"no module of the model is named {shown}: peft would refuse to load this adapter (wb merge "
                       "goes by its tensors)")
    error = WorkbenchError(f"adapter was made for another base: its target_modules ({shown}) name no module of the "
                           "model, so peft cannot apply it", adapter.path / ADAPTER_CONFIG)
    return Finding("target modules", found, keys, "refuse", error.message, error)


def _module_names(model: _Side) -> set[str]:
    """Every module path the model's tensor names imply (`model.layers.0.self_attn.q_proj` and its
    parents), plus `lm_head` when the embeddings are tied (the module exists, its tensor is not saved)."""
    modules: set[str] = set()
    for name in model.names:
        parts = name.split(".")
        modules.update(".".join(parts[:end]) for end in range(1, len(parts)))
    if model.get("tie_word_embeddings") and not _has_lm_head(model):
        modules.add("lm_head")
    return modules


def _model_tokenizer_vs_adapter(purpose: str, model: _Side, adapter: _Side) -> list[Finding]:
    """The vocabulary the adapter's tokenizer needs against the model's rows, and its template and
    special tokens against the model's: the adapter's tokenizer is the one used (wb eval and wb chat
    take it, wb merge's OUT gets it)."""
    tokenizer = adapter.tokenizer
    if tokenizer is None:
        return []
    if tokenizer.problem:
        state = "absent" if model.tokenizer is None else "unreadable" if model.tokenizer.problem else "ok"
        return [Finding("tokenizer files", state, "unreadable", "warn", f"{tokenizer.problem}; they are not compared")]
    rows, config_vocab = model.rows(), model.get("vocab_size")
    found: list[Finding] = []
    tokens = tokenizer.tokens
    if tokens is not None and rows is not None:
        if purpose == "eval" and isinstance(config_vocab, int) and tokens != config_vocab:
            found.append(Finding("vocabulary", config_vocab, tokens, "resize",
                                 f"lm-eval resizes the model's embeddings from {config_vocab} to the adapter tokenizer's "
                                 f"{tokens} tokens before it applies the adapter"))
        elif tokens > rows:
            found.append(Finding("vocabulary", rows, tokens, "warn",
                                 f"the adapter's tokenizer has ids up to {tokens - 1} but the model only {rows} embedding "
                                 "rows; unless the adapter saves its own embeddings, those tokens have none"))
        else:
            found.append(Finding("vocabulary", rows, tokens, "ok", "the model has a row for every token of the adapter's tokenizer"))
    if model.tokenizer is not None and not model.tokenizer.problem:
        why = "the adapter's tokenizer is used (wb eval, wb chat, wb merge's OUT)"
        found.append(_compared("chat template", model.tokenizer.chat_template, tokenizer.chat_template, "ok", why))
        found.append(_compared("special tokens", model.tokenizer.special, tokenizer.special, "ok", why))
    return found


def _lora_tensor_findings(purpose: str, model: _Side, adapter: _Side) -> list[Finding]:
    """wb merge's own checks, module by module: every LoRA pair's rank against the config and its
    update's shape against the module's (out, in) features, every whole tensor against the base's."""
    try:
        lora = read_lora_adapter(adapter.path)
    except WorkbenchError as err:
        return [Finding("adapter tensors", None, None, "refuse", err.message, err)]
    try:
        tied = bool(model.get("tie_word_embeddings"))
        if tied:  # the head's copy of the embedding's tensors is merged as the embedding, as bind does
            lora = lora.without_tied_head_copy(model.checkpoint)
        findings: list[Finding] = []
        for target, pair in lora.modules.items():
            single = replace(lora, modules={target: pair}, replacements={})
            a, b = lora.checkpoint.info(pair.a_name).shape, lora.checkpoint.info(pair.b_name).shape
            findings.append(_bound(single, model, tied, f"LoRA {pair.module}", _features(model, target),
                                   {"lora_A": list(a), "lora_B": list(b)}, tensor=True))
        for target, tensor_name in lora.replacements.items():
            single = replace(lora, modules={}, replacements={target: tensor_name})
            findings.append(_bound(single, model, tied, f"tensor {target}", _features(model, target),
                                   list(lora.checkpoint.info(tensor_name).shape), tensor=True))
        refused = [f for f in findings if f.action == "refuse"]
        summary = Finding("adapter tensors", len(model.names), len(lora.modules) + len(lora.replacements),
                          "refuse" if refused else "ok",
                          f"{len(refused)} of {len(findings)} do not fit the model" if refused else
                          f"{len(lora.modules)} LoRA pair(s) and {len(lora.replacements)} whole tensor(s) fit the model")
        return [summary, *findings]
    finally:
        lora.checkpoint.close()


def _bound(single, model: _Side, tied: bool, what: str, theirs: object, mine: object, tensor: bool) -> Finding:
    try:
        single.bind(model.checkpoint, tied_embeddings=tied)
    except WorkbenchError as err:
        return Finding(what, theirs, mine, "refuse", err.message, err, tensor=tensor)
    return Finding(what, theirs, mine, "ok", "fits", tensor=tensor)


def _features(model: _Side, target: str) -> list[int] | None:
    return list(model.checkpoint.info(target).shape) if target in model.checkpoint else None


# -- tokenizer files -------------------------------------------------------------------------------------
def tokenizer_facts(folder: Path) -> _Tokenizer | None:
    """The tokenizer facts of `folder`, or None when it has no tokenizer. A broken file is a problem
    (reported as a warning), not an error: no weight command reads tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        return None
    files = [name for name in (*TOKENIZER_MARKERS, "added_tokens.json", "special_tokens_map.json",
                               "chat_template.jinja", "chat_template.json") if (folder / name).is_file()]
    facts = _Tokenizer(files=files)
    try:
        _TokenizerReader(folder, facts).read()
    except WorkbenchError as err:
        return _Tokenizer(files=files, problem=err.line())
    return facts


class _TokenizerReader:
    """Counts the ids a tokenizer can produce from its files, and reads its template and special tokens.

    Every id read is checked (a whole number from 0 to MAX_SIZE) before use."""

    def __init__(self, folder: Path, facts: _Tokenizer):
        self.folder, self.facts = folder, facts
        self.base = 0  # the base vocabulary: ids below it are not "added"
        self.added: dict[int, str] = {}

    def read(self) -> None:
        config = self.json("tokenizer_config.json")
        self.vocabulary()
        if isinstance(config, dict):
            decoder = config.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                for key, entry in decoder.items():
                    self.add(_token_id(key, "added_tokens_decoder key", self.folder / "tokenizer_config.json"),
                             entry.get("content") if isinstance(entry, dict) else None)
        added = self.json("added_tokens.json")
        if isinstance(added, dict):
            for token, token_id in added.items():
                self.add(_token_id(token_id, f"added_tokens.json's id of {token!r}", self.folder / "added_tokens.json"), token)
        highest = max([self.base - 1, *self.added])
        self.facts.tokens = highest + 1 if highest >= 0 else None
        self.facts.added = [_short(str(text)) for token_id, text in sorted(self.added.items()) if token_id >= self.base]
        self.facts.chat_template = self.chat_template(config)
        self.facts.special = self.special(config)

    def vocabulary(self) -> None:
        """The base vocabulary: tokenizer.json's model.vocab (+ its added tokens), else vocab.json, else
        the pieces of a sentencepiece tokenizer.model."""
        data = self.json("tokenizer.json")
        if isinstance(data, dict):
            model = data.get("model")
            vocab = model.get("vocab") if isinstance(model, dict) else None
            self.base = self.count(vocab, "tokenizer.json")
            for entry in data.get("added_tokens") or []:
                if isinstance(entry, dict):
                    self.add(_token_id(entry.get("id"), "an added token's id", self.folder / "tokenizer.json"),
                             entry.get("content"))
            return
        vocab = self.json("vocab.json")
        if vocab is not None:
            self.base = self.count(vocab, "vocab.json")
        elif (self.folder / "tokenizer.model").is_file():
            self.base = sentencepiece_pieces(self.folder / "tokenizer.model")

    def count(self, vocab: object, file: str) -> int:
        """A vocabulary's size: {token: id} (BPE, WordPiece: highest id + 1) or [[piece, score], ...] (Unigram)."""
        if isinstance(vocab, list):
            return len(vocab)
        if not isinstance(vocab, dict) or not vocab:
            return 0
        ids = vocab.values()
        if not all(type(v) is int for v in ids):  # noqa: E721 - bool is not an id
            bad = next(v for v in ids if type(v) is not int)  # noqa: E721
            _token_id(bad, "a vocabulary id", self.folder / file)
        for extreme in (min(ids), max(ids)):
            _token_id(extreme, "a vocabulary id", self.folder / file)
        return max(ids) + 1

    def add(self, token_id: int, content: object) -> None:
        self.added[token_id] = content if isinstance(content, str) else str(token_id)

    def chat_template(self, config: object) -> str | None:
        """The template's text hashed: chat_template.jinja (what transformers writes now), else
        tokenizer_config.json's chat_template (a string, or a list of named templates), else chat_template.json."""
        text: object = None
        if (self.folder / "chat_template.jinja").is_file():
            text = self.text("chat_template.jinja")
        elif isinstance(config, dict) and config.get("chat_template"):
            text = config["chat_template"]
        else:
            data = self.json("chat_template.json")
            text = data.get("chat_template") if isinstance(data, dict) else None
        if not text:
            return None
        encoded = text if isinstance(text, str) else repr(text)
        return "sha256:" + hashlib.sha256(encoded.encode("utf-8", "replace")).hexdigest()[:12]

    def special(self, config: object) -> dict[str, str | None]:
        """bos/eos/pad/unk as text: tokenizer_config.json's, else special_tokens_map.json's."""
        sources = [config, self.json("special_tokens_map.json")]
        found: dict[str, str | None] = {}
        for key in SPECIAL_TOKENS:
            value = next((s[key] for s in sources if isinstance(s, dict) and s.get(key) is not None), None)
            if isinstance(value, dict):
                value = value.get("content")
            found[key.removesuffix("_token")] = _short(value) if isinstance(value, str) else None
        return found

    def json(self, name: str) -> object:
        path = self.folder / name
        if not path.is_file():
            return None
        _check_size(path)
        return read_json(path, name)

    def text(self, name: str) -> str:
        path = self.folder / name
        _check_size(path)
        try:
            return path.read_bytes().decode("utf-8", "replace")
        except OSError as exc:
            raise WorkbenchError(f"cannot read {name}: {exc.strerror or exc}", path) from None


def sentencepiece_pieces(path: Path) -> int:
    """The number of pieces in a sentencepiece model (LLaMA's tokenizer.model): the count of field 1
    (`pieces`) in its ModelProto, found by walking the protobuf's top-level fields, bounds-checked."""
    _check_size(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WorkbenchError(f"cannot read tokenizer.model: {exc.strerror or exc}", path) from None
    position, pieces = 0, 0
    while position < len(data):
        tag, position = _varint(data, position, path)
        field_number, wire = tag >> 3, tag & 7
        if wire == 2:
            length, position = _varint(data, position, path)
            position += length
            pieces += field_number == 1
        elif wire == 0:
            _, position = _varint(data, position, path)
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
        else:
            raise WorkbenchError(f"tokenizer.model is not a sentencepiece model (wire type {wire})", path)
        if position > len(data):
            raise WorkbenchError("tokenizer.model is truncated", path)
    return pieces


def _varint(data: bytes, position: int, path: Path) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise WorkbenchError("tokenizer.model is truncated or not a sentencepiece model", path)
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _check_size(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise WorkbenchError(f"cannot read {path.name}: {exc.strerror or exc}", path) from None
    if size > MAX_TOKENIZER_BYTES:
        raise WorkbenchError(f"{path.name} is {size} bytes, too large for a tokenizer file", path)


def _token_id(value: object, where: str, file: Path) -> int:
    if isinstance(value, str) and value.isdigit() and len(value) <= 9:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_SIZE:
        raise WorkbenchError(f"{where} must be a whole number from 0 to {MAX_SIZE - 1}, not {_short(repr(value))}", file)
    return value


# -- helpers ------------------------------------------------------------------------------------------
def _plain(value: object) -> object:
    """A value read from a file, as a JSON value that prints in one short line."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _short(value)
    if isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (str, int, float, bool)) for v in value):
        return [_plain(v) for v in value]
    return _short(repr(value))


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(v)}" for k, v in value.items() if v is not None) or "none"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _describe(side: dict) -> str:
    arch = side["architectures"][0] if isinstance(side["architectures"], list) and side["architectures"] else None
    parts = [side["kind"]]
    if side.get("peft_type"):
        parts.append(f"{side['peft_type']} r={side['r']}" if side.get("r") is not None else str(side["peft_type"]))
    if arch:
        parts.append(str(arch))
    if side["tensors"]:
        parts.append(f"{side['tensors']} tensors in {side['weight_files']} file(s)")
    if side["dtypes"]:
        parts.append("/".join(side["dtypes"]))
    return f"{side['path']} ({', '.join(parts)})"


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))
