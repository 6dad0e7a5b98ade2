"""Recipes: mergekit 0.1.5's YAML merge configurations, read unchanged, as one `Recipe`.

`read_recipe(file)` checks every field of the YAML (`yaml.safe_load`) and resolves every model
reference to a folder; anything wb does not do, or does not know, is one error line naming it and
the file, never a silent fallback. `wb merge --base B --adapter A ...` builds the same `Recipe`
(`shorthand_recipe`), so one engine runs both.

What a recipe says, and where this module follows mergekit (config.py, parameter_resolver.py,
plan.py, common.py):

- the tokenizer (`tokenizer_source`, the `tokenizer:` block) is checked and planned by
  tokenizer_union; `chat_template` is resolved there too.
- model references: a local folder (relative to the current directory, as mergekit's
  `os.path.exists` test is), else a hub id `org/name[@revision]` found offline in the Hugging Face
  cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; `refs/<rev>` names
  the snapshot). `model+lora` is a LoRA adapter applied to the model (streamed by the engine, never
  materialised). The mapping form `{model: ..., lora: ...}` is read too.
- parameter settings (`evaluate_setting`, mergekit's rule exactly): a scalar; a list of numbers, a
  gradient interpolated piecewise-linearly at t (a list of bools or strings picks
  `values[int(t·(n−1))]`); `{value, filter}` or a list of them, the first whose `filter` is absent,
  `*` or a substring of the tensor's name (an empty or unmatched one gives nothing, and the next
  source is asked). t is a layer's position in its slice, i/(n−1) (1 for a one-layer slice), and 0
  for tensors outside the layers.
- precedence (merge.py's `_Planner`): a model's own `parameters`, then its slice's, then the
  recipe's; a global (not per-model) parameter skips the first.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.io.paths import check_member_name
from workbench.weights.methods.base import Param

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template")
NOT_DONE = {
    "modules": "per-module recipes ('modules:', for multi-module architectures)",
}
DTYPES = ("float32", "float16", "bfloat16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelRef:
    """One model a recipe names: `text` as written (its identity, as mergekit's ModelReference),
    the folder it resolves to, and a LoRA adapter folder applied to it (`model+lora`)."""

    text: str
    path: Path
    lora: Path | None = None

    def to_json(self) -> dict:
        return {"reference": self.text, "path": str(self.path), "lora": None if self.lora is None else str(self.lora)}


@dataclass(frozen=True)
class Conditional:
    """mergekit's ConditionalParameter: `value` where `filter` (None or "*": every tensor) is a
    substring of the tensor's name."""

    value: Any
    filter: str | None = None


@dataclass
class Source:
    """A model taking part in a slice (or in the merge, for `models:`), with its own parameters."""

    model: ModelRef
    layer_range: tuple[int, int] | None  # None: every layer (`models:`)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    """One `slices:` entry: output layers made from the same number of layers of each source."""

    sources: list[Source]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A merge, as a recipe gives it (`given`, for merge.json) and resolved."""

    merge_method: str
    base_model: ModelRef | None
    models: list[Source] | None
    slices: list[OutputSlice] | None
    parameters: dict[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer: Any = None  # tokenizer_union.TokenizerChoice: tokenizer_source or the tokenizer: block
    chat_template: str | None = None
    file: Path | None = None
    given: dict | None = None
    sha256: str | None = None  # of the recipe file's bytes, as read

    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe names, once, the base first, then in the recipe's order."""
        found = [self.base_model] if self.base_model else []
        for source in self.models or []:
            found.append(source.model)
        for piece in self.slices or []:
            found.extend([piece.base_model] if piece.base_model else [])
            found.extend(source.model for source in piece.sources)
        return list(dict.fromkeys(found))

    def where(self) -> str | Path:
        """What error lines name: the recipe file, or the command line."""
        return self.file if self.file is not None else "command line"

    def to_json(self) -> dict:
        """The recipe as resolved: every reference with its folder."""
        def source(s: Source) -> dict:
            return {"model": s.model.text, "layer_range": None if s.layer_range is None else list(s.layer_range),
                    "parameters": _plain(s.parameters)}
        return {
            "merge_method": self.merge_method,
            "base_model": None if self.base_model is None else self.base_model.text,
            "models": None if self.models is None else [source(s) for s in self.models],
            "slices": None if self.slices is None else [
                {"sources": [source(s) for s in piece.sources],
                 "base_model": None if piece.base_model is None else piece.base_model.text,
                 "parameters": _plain(piece.parameters)} for piece in self.slices],
            "parameters": _plain(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer": None if self.tokenizer is None else {
                "source": self.tokenizer.source, "tokens": sorted(self.tokenizer.tokens),
                "pad_to_multiple_of": self.tokenizer.pad_to_multiple_of},
            "chat_template": self.chat_template,
            "references": {ref.text: ref.to_json() for ref in self.referenced_models()},
        }


def _plain(settings: Mapping[str, Any]) -> dict:
    def plain(value: Any) -> Any:
        if isinstance(value, Conditional):
            return {"value": plain(value.value), "filter": value.filter}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return {name: plain(value) for name, value in settings.items()}


# ----- reading ----------------------------------------------------------------------------------
def read_recipe(file: str | Path) -> Recipe:
    """The recipe in YAML file `file`, every field checked and every model resolved."""
    import yaml

    file = Path(file)
    try:
        data = file.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"cannot read the recipe: {err.strerror if isinstance(err, OSError) else err}", file) from None
    try:
        given = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WorkbenchError(f"not valid YAML{where}: {getattr(err, 'problem', None) or err}", file) from None
    recipe = parse_recipe(given, file)
    recipe.sha256 = hashlib.sha256(data).hexdigest()
    return recipe


def parse_recipe(given: object, file: Path | None = None) -> Recipe:
    """A `Recipe` from the YAML document `given` (what yaml.safe_load returned)."""
    where: str | Path = file if file is not None else "recipe"
    top = _mapping(given, "the recipe", where)
    for key in top:
        if key in NOT_DONE:
            raise WorkbenchError(f"recipe key {key!r}: wb does not do {NOT_DONE[key]}", where)
        if key not in TOP_KEYS:
            raise WorkbenchError(f"unknown recipe key {key!r}; a recipe has {', '.join(TOP_KEYS)}", where)
    if "merge_method" not in top:
        raise WorkbenchError("the recipe has no merge_method", where)
    method = top["merge_method"]
    if not isinstance(method, str) or not method:
        raise WorkbenchError(f"merge_method must be a method name, got {method!r}", where)
    if ("models" in top) == ("slices" in top) or not (top.get("models") or top.get("slices")):
        raise WorkbenchError("a recipe has exactly one of 'models' or 'slices' (and it is not empty)", where)

    refs = _References(where)
    base = refs.resolve(top["base_model"], "base_model") if top.get("base_model") is not None else None
    models = slices = None
    if top.get("models") is not None:
        models = [_model_entry(entry, i, refs, where) for i, entry in enumerate(_list(top["models"], "models", where))]
    else:
        slices = [_slice_entry(entry, i, refs, where) for i, entry in enumerate(_list(top["slices"], "slices", where))]
    if top.get("tokenizer_source") is not None and top.get("tokenizer") is not None:
        raise WorkbenchError("give tokenizer_source or a tokenizer: block, not both", where)
    return Recipe(
        merge_method=method,
        base_model=base,
        models=models,
        slices=slices,
        parameters=_settings(top.get("parameters"), "parameters", where),
        dtype=_dtype(top.get("dtype"), "dtype", where),
        out_dtype=_dtype(top.get("out_dtype"), "out_dtype", where),
        tokenizer=_tokenizer(top, where),
        chat_template=_chat_template(top.get("chat_template"), where),
        file=file,
        given=top,
    )


def _model_entry(entry: object, index: int, refs: _References, where: str | Path) -> Source:
    what = f"models[{index}]"
    entry = _mapping(entry, what, where)
    _only_keys(entry, ("model", "parameters"), what, where)
    if "model" not in entry:
        raise WorkbenchError(f"{what} has no 'model'", where)
    return Source(refs.resolve(entry["model"], f"{what}.model"), None,
                  _settings(entry.get("parameters"), f"{what}.parameters", where))


def _slice_entry(entry: object, index: int, refs: _References, where: str | Path) -> OutputSlice:
    what = f"slices[{index}]"
    entry = _mapping(entry, what, where)
    if entry.get("residual_weight") is not None:
        raise WorkbenchError(f"{what}.residual_weight: wb does not do residual weights (mergekit 0.1.5 ignores them too)",
                             where)
    _only_keys(entry, ("sources", "base_model", "parameters", "residual_weight"), what, where)
    sources = []
    for i, source in enumerate(_list(entry.get("sources"), f"{what}.sources", where)):
        name = f"{what}.sources[{i}]"
        source = _mapping(source, name, where)
        _only_keys(source, ("model", "layer_range", "parameters"), name, where)
        if "model" not in source or "layer_range" not in source:
            raise WorkbenchError(f"{name} needs 'model' and 'layer_range'", where)
        sources.append(Source(refs.resolve(source["model"], f"{name}.model"),
                              _layer_range(source["layer_range"], f"{name}.layer_range", where),
                              _settings(source.get("parameters"), f"{name}.parameters", where)))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) != 1:
        raise WorkbenchError(f"{what}: every source of a slice must have the same number of layers", where)
    base = refs.resolve(entry["base_model"], f"{what}.base_model") if entry.get("base_model") is not None else None
    return OutputSlice(sources, base, _settings(entry.get("parameters"), f"{what}.parameters", where))


def _layer_range(value: object, what: str, where: str | Path) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1] <= 2**24):
        raise WorkbenchError(f"{what} must be [start, stop] with 0 <= start <= stop, got {value!r}", where)
    return value[0], value[1]


def _dtype(value: object, what: str, where: str | Path) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise WorkbenchError(f"{what} {value!r}: wb writes {', '.join(DTYPES)}", where)
    return name


def _chat_template(value: object, where: str | Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise WorkbenchError(f"chat_template must be a template name or a Jinja template, got {value!r}", where)
    return value


def _tokenizer(top: dict, where: str | Path) -> Any:
    """tokenizer_source or the tokenizer: block, checked by tokenizer_union (None: neither, and the
    donor's tokenizer files are copied, as mergekit does)."""
    from workbench.weights.tokenizer_union import tokenizer_choice

    return tokenizer_choice(top.get("tokenizer_source"), top.get("tokenizer"), where)


# ----- parameter settings -------------------------------------------------------------------------
def _settings(value: object, what: str, where: str | Path) -> dict[str, Any]:
    """A `parameters:` mapping, each setting's shape checked (scalar, gradient, conditionals)."""
    if value is None:
        return {}
    settings = _mapping(value, what, where)
    return {_name(name, what, where): _setting(setting, f"{what}.{name}", where) for name, setting in settings.items()}


def _name(name: object, what: str, where: str | Path) -> str:
    if not isinstance(name, str) or not name:
        raise WorkbenchError(f"{what} has a key {name!r} that is not a parameter name", where)
    return name


def _setting(value: object, what: str, where: str | Path, nested: bool = False) -> Any:
    if _is_scalar(value):
        return value
    if isinstance(value, dict) and not nested:
        return _conditional(value, what, where)
    if isinstance(value, list):
        if all(_is_scalar(v) for v in value):
            return list(value)
        if not nested and all(isinstance(v, dict) for v in value):
            return [_conditional(v, f"{what}[{i}]", where) for i, v in enumerate(value)]
    raise WorkbenchError(f"{what}: a setting is a value, a list of values (a gradient), or "
                         f"{{value, filter}} entries; got {value!r}", where)


def _conditional(value: dict, what: str, where: str | Path) -> Conditional:
    _only_keys(value, ("value", "filter"), what, where)
    if "value" not in value:
        raise WorkbenchError(f"{what} has no 'value'", where)
    filt = value.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise WorkbenchError(f"{what}.filter must be a string, got {filt!r}", where)
    return Conditional(_setting(value["value"], f"{what}.value", where, nested=True), filt)


def _is_scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (bool, int, str))


def evaluate_setting(tensor: str, setting: Any, t: float, param: Param, where: str | Path) -> Any:
    """The value of `setting` for `tensor` at layer position `t`, validated as `param`, or None
    when no entry applies (mergekit's `evaluate_setting`)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if _is_scalar(setting):
        return validate(setting, param, where)
    if not setting:
        return None
    if not isinstance(setting[0], Conditional):
        values = [validate(v, param, where) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return validate((1 - frac) * values[low] + frac * values[high], param, where)
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor and cond.filter in tensor):
            return evaluate_setting(tensor, cond.value, t, param, where)
    return None


def validate(value: Any, param: Param, where: str | Path) -> Any:
    """`value` as `param`'s type (a numeric string such as "1e-3" counts as its number, as
    pydantic reads it), in its range; else one error line naming the parameter."""
    if param.type in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if param.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if param.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not param.allows(value):
        raise WorkbenchError(f"parameter {param.name} must be {param.expected(plural=False)}, got {value!r}", where)
    return value


# ----- model references ---------------------------------------------------------------------------
class _References:
    """Resolves the recipe's model references, each text once (the same text is the same model)."""

    def __init__(self, where: str | Path):
        self.where = where
        self.found: dict[str, ModelRef] = {}

    def resolve(self, value: object, what: str) -> ModelRef:
        text, model, lora = self._split(value, what)
        if text not in self.found:
            self.found[text] = ModelRef(text, locate(model, what, self.where),
                                        None if lora is None else locate(lora, f"{what} (its LoRA)", self.where))
        return self.found[text]

    def _split(self, value: object, what: str) -> tuple[str, str, str | None]:
        """(identity text, model part, LoRA part) of a string `model[+lora]` or the mapping form."""
        if isinstance(value, str):
            parts = value.split("+")
            if len(parts) > 2 or not all(parts):
                raise WorkbenchError(f"{what} {value!r}: write MODEL or MODEL+LORA", self.where)
            return value, parts[0], parts[1] if len(parts) == 2 else None
        if isinstance(value, dict):
            if value.get("override_architecture") is not None:
                raise WorkbenchError(f"{what}.override_architecture: wb does not do architecture overrides", self.where)
            _only_keys(value, ("model", "lora", "override_architecture"), what, self.where)
            model, lora = (_model_path(value.get(k), f"{what}.{k}", self.where) for k in ("model", "lora"))
            if model is None:
                raise WorkbenchError(f"{what} has no 'model'", self.where)
            return model if lora is None else f"{model}+{lora}", model, lora
        raise WorkbenchError(f"{what} must name a model, got {value!r}", self.where)


def _model_path(value: object, what: str, where: str | Path) -> str | None:
    """mergekit's ModelPath: a string `path[@revision]` or {path, revision}."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        _only_keys(value, ("path", "revision"), what, where)
        path, revision = value.get("path"), value.get("revision")
        if not isinstance(path, str) or not path or not isinstance(revision, (str, type(None))):
            raise WorkbenchError(f"{what} must have a path (and maybe a revision)", where)
        return path if not revision else f"{path}@{revision}"
    raise WorkbenchError(f"{what} must name a model, got {value!r}", where)


def locate(reference: str, what: str, where: str | Path) -> Path:
    """The folder `reference` names: a local path (relative to the current directory) when it
    exists, else a hub id `org/name[@revision]` in the Hugging Face cache. Offline only."""
    if "@" not in reference and Path(reference).exists():
        return _folder(Path(reference).absolute(), reference, what, where)
    repo, _, revision = reference.partition("@")
    if reference.count("@") > 1 or not _HUB_ID.match(repo):
        raise WorkbenchError(f"{what} {reference!r} is not a folder (relative to {Path.cwd()}) nor a hub id", where)
    if revision and Path(repo).exists():
        raise WorkbenchError(f"{what} {reference!r}: a local folder has no revision", where)
    cache = hub_cache()
    folder = cache / ("models--" + repo.replace("/", "--"))
    if not folder.is_dir():
        raise WorkbenchError(f"{what} {reference!r} is not a folder (relative to {Path.cwd()}) nor in the "
                             f"Hugging Face cache {cache} (wb merge works offline)", where)
    return _folder(_snapshot(folder, revision or "main", reference, what, where), reference, what, where)


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot(repo: Path, revision: str, reference: str, what: str, where: str | Path) -> Path:
    """snapshots/<commit> of `repo`, where refs/<revision> names the commit (or `revision` is one)."""
    commit = revision
    ref_file = repo / "refs" / check_member_name(revision, "a revision", where)
    if ref_file.is_file():
        try:
            commit = ref_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise WorkbenchError("cannot read the revision file", ref_file) from None
        commit = check_member_name(commit, "a revision", ref_file)
        if "/" in commit:
            raise WorkbenchError(f"revision file names {commit!r}, not a commit", ref_file)
    elif "/" in revision:
        raise WorkbenchError(f"{what} {reference!r}: no revision {revision!r} in the cache", where)
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise WorkbenchError(f"{what} {reference!r}: revision {revision!r} is not in the Hugging Face cache "
                             f"({snapshot} is missing; wb merge works offline)", where)
    return snapshot


def _folder(path: Path, reference: str, what: str, where: str | Path) -> Path:
    if not path.is_dir():
        raise WorkbenchError(f"{what} {reference!r} is not a folder", where)
    return path


# ----- the command-line shorthand -----------------------------------------------------------------
def shorthand_recipe(base: str | Path, adapters: list[str | Path], method: str, parameters: dict[str, Any],
                     weights: list[float] | None, tokenizer_source: str | None = None,
                     dtype: str | None = None) -> Recipe:
    """What `wb merge --base B --adapter A1 --adapter A2 --weights w1,w2 --method M` means: a
    recipe whose models are B+A (a LoRA adapter) or A (a full fine-tune), with per-model weights."""
    from workbench.weights.adapters.lora import is_lora_adapter

    base_path = Path(base).absolute()
    base_ref = ModelRef(str(base), base_path)
    if weights is not None and len(weights) != len(adapters):
        raise WorkbenchError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s)")
    models = []
    for i, adapter in enumerate(adapters):
        path = Path(adapter).absolute()
        if is_lora_adapter(path):
            ref = ModelRef(f"{base}+{adapter}", base_path, path)
        elif (path / "config.json").is_file():
            ref = ModelRef(str(adapter), path)
        else:
            raise WorkbenchError("not a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)", path)
        models.append(Source(ref, None, {"weight": 1.0 if weights is None else weights[i]}))
    tokenizer = None
    if tokenizer_source is not None:
        from workbench.weights.tokenizer_union import TokenizerChoice

        tokenizer = TokenizerChoice(_shorthand_tokenizer(tokenizer_source, base_ref, models))
    return Recipe(method, base_ref, models, None, {k: v for k, v in parameters.items() if v is not None},
                  out_dtype=dtype, tokenizer=tokenizer)


def _shorthand_tokenizer(value: str, base: ModelRef, models: list[Source]) -> str:
    """`--tokenizer-source`: base, union, or the folder of --base or of one --adapter (its model)."""
    if value in ("base", "union"):
        return value
    folder = Path(value).absolute()
    for ref in [base, *(s.model for s in models)]:
        if folder in (ref.lora, ref.path if ref.lora is None else None):
            return ref.text
    raise WorkbenchError(f"--tokenizer-source {value!r} is not base, union, --base or an --adapter")


# ----- small checks -------------------------------------------------------------------------------
def _mapping(value: object, what: str, where: str | Path) -> dict:
    if not isinstance(value, dict):
        raise WorkbenchError(f"{what} must be a mapping, got {type(value).__name__}", where)
    return value


def _list(value: object, what: str, where: str | Path) -> list:
    if not isinstance(value, list) or not value:
        raise WorkbenchError(f"{what} must be a non-empty list", where)
    return value


def _only_keys(value: dict, allowed: tuple[str, ...], what: str, where: str | Path) -> None:
    for key in value:
        if key not in allowed:
            raise WorkbenchError(f"unknown key {key!r} in {what}; use {', '.join(allowed)}", where)


def walk_settings(recipe: Recipe) -> Iterator[tuple[str, str, bool]]:
    """(where, parameter name, per-model?) of every setting the recipe gives: per-model ones are
    in a model's or source's own `parameters`."""
    for name in recipe.parameters:
        yield "parameters", name, False
    for i, source in enumerate(recipe.models or []):
        for name in source.parameters:
            yield f"models[{i}].parameters", name, True
    for i, piece in enumerate(recipe.slices or []):
        for name in piece.parameters:
            yield f"slices[{i}].parameters", name, False
        for j, source in enumerate(piece.sources):
            for name in source.parameters:
                yield f"slices[{i}].sources[{j}].parameters", name, True
