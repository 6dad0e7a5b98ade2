"""The tokenizer of a merged model, chosen as mergekit 0.1.5 chooses it, and the embedding rows that follow.

A recipe's `tokenizer_source: base | union | <model>`, or its `tokenizer:` block (`source`, default
`union`; `tokens`, each with a `source` and `force`; `pad_to_multiple_of`), gives the output
vocabulary. Every vocabulary-indexed tensor (embed_tokens, lm_head: axis 0) of every model,
the base included, is then laid out in that vocabulary before the merge method sees it, so the
method merges row t of each model as the same token t:

- a model that has the token gives its own row (unless the token is `force`d);
- a model that lacks it gets the token's default embedding: from the token's `source` when the
  `tokens` block gives one (`zero`; a model, its own row of the token; `{kind: model_token, model,
  token | token_id}`, that model's row of another token); otherwise from the one model that has
  it, else from the base when the base has it, else the mean of the rows of the models that have
  it, else zeros (no model has it);
- rows past the vocabulary, added by `pad_to_multiple_of`, are each model's mean row.

The output vocabulary, as mergekit's `build_tokenizer` makes it: `base` is the base model's
tokenizer without the tokens its embedding has no rows for (ids >= config vocab_size); a model
name is that model's tokenizer; `union` starts from the base's, appends every other model's
ordinary tokens the base lacks, then every added token (the first model's settings win); then
any token of the `tokens` block that is still missing is appended. The output has
len(vocabulary) rows (rounded up to `pad_to_multiple_of`), which config.json's vocab_size must say.

Where wb and mergekit differ, it is where mergekit depends on hash order or fails:
- models are taken in the order given (the base first for `union`); mergekit takes them from a
  set, and each tokenizer's ordinary tokens in its `get_vocab()` order, which change from run to
  run (PYTHONHASHSEED, Rust's hasher); wb takes each tokenizer's tokens by id. Added tokens and
  the base's ids are the same in both; the ids of ordinary tokens a union appends are mergekit's
  for one of its orders;
- a token whose id in a model's tokenizer is beyond that model's embedding rows counts as absent
  from it (mergekit logs it, leaves no entry and then fails with a KeyError);
- with `source: base`, a `tokens` entry the base lacks is absent from the base (mergekit appends
  it to the base tokenizer object it also reads the base's ids from, so the base "has" the new id,
  which either fails as above or takes an untrained padding row).

API for the engine (transformers is imported only here, only when a recipe chooses a tokenizer):

    choice = tokenizer_choice(recipe.get("tokenizer_source"), recipe.get("tokenizer"), recipe_file)
    if choice is not None:  # None: neither key, so mergekit copies the donor's tokenizer files
        plan = plan_vocabulary({name: folder, ...}, base_name, choice)  # every model, recipe order
        plan.vocab_size                             # rows of the output's vocabulary tensors
        rows = plan.permute([tensor_of_model_0, None, ...])  # per tensor; None: model lacks it
        rows.rows(i, start, stop)                   # model i's rows [start, stop), output order
        plan.write(tmp_dir, chat_template)          # tokenizer files, as save_pretrained writes them
        plan.to_json(), plan.line()                 # merge.json's record, the line `wb merge` prints
        plan.notes                                  # lines worth a Note: a model without a tokenizer
                                                    # (taken as the base's, as mergekit), clashing added tokens
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.jsonfile import read_model_config

SOURCES = ("base", "union")
MAX_VOCABULARY = 2**31 - 1
MAX_PAD_MULTIPLE = 2**20
TOKENIZER_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError, RuntimeError)
MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")  # mergekit's bundled chat_template names


# -- the recipe's choice ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSource:
    """Where a `tokens` entry's default embedding comes from: `kind` is "model" (that model's row
    of the token itself), "model_token" (that model's row of `token` or of id `token_id`), "zero"."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of the `tokens` block: its default embedding's source (None: none given) and
    whether every model takes that default even where it has the token (`force`)."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerChoice:
    source: str  # "base", "union" or a model's name as the recipe writes it
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def tokenizer_choice(tokenizer_source: object, block: object, where: str | Path | None = None) -> TokenizerChoice | None:
    """The recipe's `tokenizer_source` and `tokenizer:` block as one checked choice (the block wins,
    as in mergekit, and its `source` defaults to `union`), or None when the recipe gives neither."""
    if block is None:
        if tokenizer_source is None:
            return None
        return TokenizerChoice(_source_name(tokenizer_source, "tokenizer_source", where))
    if not isinstance(block, Mapping):
        raise WorkbenchError(f"tokenizer: must be a mapping with source, tokens and pad_to_multiple_of, not {_short(block)}", where)
    _refuse_unknown(block, ("source", "tokens", "pad_to_multiple_of"), "tokenizer", where)
    source = _source_name(block.get("source", "union"), "tokenizer.source", where)
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise WorkbenchError(f"tokenizer.tokens must map each token to its settings, not {_short(tokens)}", where)
    settings = {_token_text(token, where): _token_setting(token, value, where) for token, value in tokens.items()}
    return TokenizerChoice(source, settings, _pad_multiple(block.get("pad_to_multiple_of"), where))


def _source_name(value: object, key: str, where: str | Path | None) -> str:
    if not isinstance(value, str) or not value:
        raise WorkbenchError(f"{key} must be base, union or the name of a model of the recipe, not {_short(value)}", where)
    return value


def _token_text(token: object, where: str | Path | None) -> str:
    if not isinstance(token, str) or not token:
        raise WorkbenchError(f"tokenizer.tokens has a key {_short(token)} that is not a token (a non-empty string)", where)
    return token


def _token_setting(token: str, value: object, where: str | Path | None) -> TokenSetting:
    key = f"tokenizer.tokens[{token!r}]"
    if value is None:
        return TokenSetting()
    if not isinstance(value, Mapping):
        raise WorkbenchError(f"{key} must be a mapping with source and force, not {_short(value)}", where)
    _refuse_unknown(value, ("source", "force"), key, where)
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise WorkbenchError(f"{key}.force must be true or false, not {_short(force)}", where)
    return TokenSetting(_token_source(value.get("source"), f"{key}.source", where), force)


def _token_source(value: object, key: str, where: str | Path | None) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return TokenSource("model", model=value)
    if not isinstance(value, Mapping) or value.get("kind") not in ("zero", "model_token"):
        raise WorkbenchError(f"{key} must be a model's name, {{kind: zero}} or {{kind: model_token, model: ..., "
                             f"token: ... or token_id: ...}}, not {_short(value)}", where)
    if value["kind"] == "zero":
        _refuse_unknown(value, ("kind",), key, where)
        return TokenSource("zero")
    _refuse_unknown(value, ("kind", "model", "token", "token_id"), key, where)
    model, token, token_id = value.get("model"), value.get("token"), value.get("token_id")
    if not isinstance(model, str) or not model:
        raise WorkbenchError(f"{key}.model must name a model of the recipe, not {_short(model)}", where)
    if (token is None) == (token_id is None):
        raise WorkbenchError(f"{key} must give exactly one of token and token_id", where)
    if token is not None and (not isinstance(token, str) or not token):
        raise WorkbenchError(f"{key}.token must be a token (a non-empty string), not {_short(token)}", where)
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)
                                 or not 0 <= token_id <= MAX_VOCABULARY):
        raise WorkbenchError(f"{key}.token_id must be a whole number from 0 to {MAX_VOCABULARY}, not {_short(token_id)}", where)
    return TokenSource("model_token", model=model, token=token, token_id=token_id)


def _pad_multiple(value: object, where: str | Path | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PAD_MULTIPLE:
        raise WorkbenchError(f"tokenizer.pad_to_multiple_of must be a whole number from 1 to {MAX_PAD_MULTIPLE}, "
                             f"not {_short(value)}", where)
    return value


def _refuse_unknown(mapping: Mapping, known: tuple[str, ...], key: str, where: str | Path | None) -> None:
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise WorkbenchError(f"{key} has {_short(unknown[0])}, which wb does not know (it takes {', '.join(known)})", where)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the vocabulary ----------------------------------------------------------------------------------
@dataclass
class VocabularyPlan:
    """The output tokenizer and, for each model, the row of each output token in that model's
    vocabulary tensors (-1: the model lacks it)."""

    names: list[str]  # the models, in the order given (the engine's tensors come in this order)
    base: str | None
    choice: TokenizerChoice
    tokenizer: Any  # the output transformers tokenizer
    vocab: dict[str, int]  # output token -> id
    positions: torch.Tensor  # int64 [models, len(vocab)]
    original_vocabs: list[dict[str, int]]  # each model's tokenizer's token -> id (the base's if it has none)
    added: list[str]  # output tokens the base's tokenizer lacks, by id
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        """The rows of every output vocabulary tensor, config.json's vocab_size: len(vocab)
        rounded up to pad_to_multiple_of."""
        size, multiple = len(self.vocab), self.choice.pad_to_multiple_of
        return size if not multiple else math.ceil(size / multiple) * multiple

    def index(self, name: str) -> int:
        return self.names.index(name)

    def permute(self, tensors: Sequence[torch.Tensor | None]) -> PermutedRows:
        """One vocabulary tensor of every model (axis 0 the vocabulary; None where a model lacks
        the tensor), laid out in the output vocabulary row block by row block."""
        return PermutedRows(self, list(tensors))

    def write(self, out_dir: Path, chat_template: str | None = None) -> list[str]:
        """The tokenizer files in `out_dir` (tokenizer.json, tokenizer_config.json, ...), as
        mergekit writes them: the tokenizer's save_pretrained; `chat_template` (the template's
        text, see `resolve_chat_template`) replaces its chat template. Returns the file names."""
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        written = self.tokenizer.save_pretrained(str(out_dir))
        return sorted(Path(name).name for name in written)

    def to_json(self) -> dict:
        """What merge.json records of the tokenizer choice."""
        return {
            "source": self.choice.source,
            "tokens": len(self.vocab),
            "vocab_size": self.vocab_size,
            "added_to_base": len(self.added),
            "absent": {name: int((row < 0).sum()) for name, row in zip(self.names, self.positions)},
            "token_settings": sorted(self.choice.tokens),
            "pad_to_multiple_of": self.choice.pad_to_multiple_of,
        }

    def line(self) -> str:
        what = {"base": "the base's", "union": f"the union of {len(self.names)} models'"}.get(
            self.choice.source, f"{self.choice.source}'s")
        padded = f", {self.vocab_size} rows" if self.vocab_size != len(self.vocab) else ""
        return f"tokenizer: {what} ({len(self.vocab)} tokens, {len(self.added)} not in the base's{padded})"


def plan_vocabulary(models: Mapping[str, Path], base: str | None, choice: TokenizerChoice,
                    sizes: Mapping[str, int | None] | None = None) -> VocabularyPlan:
    """The output vocabulary of `choice` over `models` ({name as the recipe writes it: its tokenizer
    folder}, recipe order, the base included) with base model `base` (None: the recipe has none,
    and the first model's tokenizer is the starting point, as in mergekit). `sizes`: each model's
    config `vocab_size` (its embedding rows); None reads each tokenizer folder's config.json, which
    only a model folder has: a `model+lora` whose adapter carries the tokenizer must pass its model's."""
    names = list(models)
    if not names:
        raise WorkbenchError("no models to build a tokenizer from")
    if base is not None and base not in models:
        raise WorkbenchError(f"the base model {base!r} is not among the models")
    _check_references(choice, names)
    first = base if base is not None else names[0]
    sizes = {name: (config_vocab_size(Path(models[name])) if sizes is None else sizes[name]) for name in names}
    notes: list[str] = []
    base_tokenizer = _stripped(load_tokenizer(Path(models[first])), sizes[first], Path(models[first]))
    tokenizers = {first: base_tokenizer}
    for name in names:
        if name != first:
            tokenizers[name] = _try_load(name, Path(models[name]), first, notes)
    base_vocab = dict(base_tokenizer.get_vocab())  # before `tokens` are added to it (see the module docstring)
    out = _output_tokenizer(choice.source, first, tokenizers, sizes, models, notes)
    existing = set(out.get_vocab())
    for token in choice.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = dict(out.get_vocab())
    model_vocabs = [base_vocab if name == first or tokenizers[name] is None else dict(tokenizers[name].get_vocab())
                    for name in names]
    positions = torch.stack([_positions(vocab, mine, sizes[name]) for name, mine in zip(names, model_vocabs)])
    added = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if token not in base_vocab]
    return VocabularyPlan(names, base, choice, out, vocab, positions, model_vocabs, added, notes)


def _check_references(choice: TokenizerChoice, names: list[str]) -> None:
    if choice.source not in SOURCES and choice.source not in names:
        raise WorkbenchError(f"tokenizer source {choice.source!r} is not base, union or a model of the recipe "
                             "(wb takes the tokenizer of a model it merges)")
    for token, setting in choice.tokens.items():
        model = setting.source.model if setting.source is not None else None
        if model is not None and model not in names:
            raise WorkbenchError(f"tokenizer.tokens[{token!r}] takes its embedding from {model!r}, which is not a model "
                                 "of the recipe")


def _output_tokenizer(source: str, first: str, tokenizers: dict[str, Any], sizes: dict[str, int | None],
                      models: Mapping[str, Path], notes: list[str]) -> Any:
    if source == "base":
        return tokenizers[first]
    if source == "union":
        return _union(first, tokenizers, sizes, notes)
    return load_tokenizer(Path(models[source]))


def _union(first: str, tokenizers: dict[str, Any], sizes: dict[str, int | None], notes: list[str]) -> Any:
    """The base's tokenizer plus every other model's ordinary tokens it lacks (models in order, each
    by id), then every model's added tokens (the first settings of a token win)."""
    ordinary: dict[str, None] = {}  # an ordered set
    added: dict[str, Any] = {}
    for name, tokenizer in tokenizers.items():
        if tokenizer is None:
            continue
        size = sizes[name] or tokenizer.vocab_size
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size:
                ordinary.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index >= size:
                continue
            if info.content in added and added[info.content] != info:
                notes.append(f"token {info.content!r} is added with different settings by {name}; using the first")
            added.setdefault(info.content, info)
    union = _copy_tokenizer(tokenizers[first])
    base_vocab = tokenizers[first].get_vocab()
    union.add_tokens([token for token in ordinary if token not in added and token not in base_vocab])
    for info in added.values():
        union.add_tokens(info)
    return union


def _copy_tokenizer(tokenizer: Any) -> Any:
    """An independent copy, made as mergekit makes it (saved and loaded again), so that the files
    written are the same."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="wb-tokenizer-") as folder:
        tokenizer.save_pretrained(folder, legacy_format=False)
        return AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)


def _positions(vocab: dict[str, int], mine: dict[str, int], size: int | None) -> torch.Tensor:
    """For each output id, the model's row of that token, or -1 where it lacks it (or its id lies
    beyond the model's embedding)."""
    size = len(mine) if size is None else size
    positions = [-1] * len(vocab)
    for token, index in vocab.items():
        row = mine.get(token, -1)
        if row < size:
            positions[index] = row
    return torch.tensor(positions, dtype=torch.int64)


def _stripped(tokenizer: Any, size: int | None, folder: Path) -> Any:
    """The base's tokenizer without the tokens whose ids its embedding has no rows for (mergekit's
    get_stripped_tokenizer): dropped from the BPE vocabulary, the added tokens and the merges."""
    vocab = tokenizer.get_vocab()
    size = len(vocab) if size is None else size
    unused = {token for token, index in vocab.items() if index >= size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise WorkbenchError(f"the tokenizer has {len(unused)} token(s) beyond the model's vocab_size {size} and no fast "
                             "tokenizer to remove them from", folder)
    import tokenizers

    state = json.loads(tokenizer._tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise WorkbenchError(f"the tokenizer has {len(unused)} token(s) beyond the model's vocab_size {size}, and only a "
                             f"BPE tokenizer can be cut to it (this one is {state['model']['type']})", folder)
    state["added_tokens"] = [entry for entry in state["added_tokens"] if entry["id"] < size]
    for token in unused:
        state["model"]["vocab"].pop(token, None)
    state["model"]["merges"] = [merge for merge in state["model"]["merges"] if not unused & set(_merge_parts(merge, folder))]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(state))
    return tokenizer


def _merge_parts(merge: object, folder: Path) -> list[str]:
    if isinstance(merge, str) and merge.count(" ") == 1:
        return merge.split(" ")
    if isinstance(merge, list):
        return merge
    raise WorkbenchError(f"the tokenizer has a BPE merge {_short(merge)} that is neither 'a b' nor [a, b]", folder)


# -- loading ---------------------------------------------------------------------------------------
def load_tokenizer(folder: Path) -> Any:
    """The folder's fast tokenizer, never running code from it; one error line when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except TOKENIZER_ERRORS as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise WorkbenchError(f"could not load the tokenizer: {detail[:300]}", folder) from None


def _try_load(name: str, folder: Path, first: str, notes: list[str]) -> Any | None:
    """A model's tokenizer, or None (with a note) when it has none: mergekit then takes it to be
    the base's."""
    try:
        return load_tokenizer(folder)
    except WorkbenchError as exc:
        notes.append(f"{name} has no tokenizer wb can load ({exc.message}); taking it to be {first}'s")
        return None


def config_vocab_size(folder: Path) -> int | None:
    """config.json's vocab_size (or text_config's), checked by `read_model_config` as every model
    config is; None when the folder has no config.json (an adapter's) or it gives no vocab_size."""
    if not (folder / "config.json").is_file():
        return None
    config = read_model_config(folder, "a model's tokenizer and config.json")
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and section.get("vocab_size") is not None:
            return section["vocab_size"]
    return None


def resolve_chat_template(value: str | None, folders: Sequence[Path]) -> str | None:
    """A recipe's chat_template as text: "auto" is the template most of `folders`' tokenizers have
    (the first of equals, in order; None when none has one), else the value itself when it reads
    as a template. mergekit's own named templates are not shipped with wb."""
    if not value:
        return None
    if value == "auto":
        templates = []
        for folder in folders:
            try:
                template = load_tokenizer(folder).chat_template
            except WorkbenchError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                templates.append(template.strip())
        return Counter(templates).most_common(1)[0][0] if templates else None
    if value in MERGEKIT_TEMPLATES:
        raise WorkbenchError(f"chat_template {value!r} names one of mergekit's bundled templates, which wb does not ship; "
                             "give the template's text, or auto")
    if len(value) < 20 or "{" not in value:
        raise WorkbenchError(f"chat_template {_short(value)} is neither auto nor a template's text")
    return value


# -- the rows ----------------------------------------------------------------------------------------
NO_MODEL = -1


class PermutedRows:
    """One vocabulary tensor of every model laid out in the output vocabulary, as mergekit's
    PermutedVocabulary lays it out, computed row block by row block from the models' tensors
    (mapped views are fine: only the rows a block needs are read). Rows come in the inputs'
    promoted dtype, defaults computed in it, as mergekit computes them."""

    def __init__(self, plan: VocabularyPlan, tensors: list[torch.Tensor | None]):
        if len(tensors) != len(plan.names):
            raise ValueError(f"{len(tensors)} tensors for {len(plan.names)} models")
        self.plan, self.tensors = plan, tensors
        self.holders = [i for i, tensor in enumerate(tensors) if tensor is not None]
        if not self.holders:
            raise ValueError("no model has this tensor")
        shapes = {tuple(tensors[i].shape[1:]) for i in self.holders}
        if len(shapes) != 1:
            raise WorkbenchError(f"the models' vocabulary tensors differ beyond the vocabulary axis: "
                                 f"{sorted(tuple(tensors[i].shape) for i in self.holders)}")
        self.shape = (plan.vocab_size, *shapes.pop())
        self.dtype = tensors[self.holders[0]].dtype
        for i in self.holders:
            self.dtype = torch.promote_types(self.dtype, tensors[i].dtype)
        for i in self.holders:
            rows = tensors[i].shape[0]
            beyond = plan.positions[i] >= rows
            if bool(beyond.any()):
                token_id = int(beyond.nonzero()[0])
                raise WorkbenchError(f"{plan.names[i]}'s tokenizer gives {_token_of(plan.vocab, token_id)!r} the id "
                                     f"{int(plan.positions[i, token_id])}, but its vocabulary tensor has {rows} rows")
        self._assign()
        self._padding: dict[int, torch.Tensor] = {}

    # -- which row each output token takes ---------------------------------------------------------
    def _assign(self) -> None:
        """Per output id: whether each model uses its own row, and else where the default comes
        from (one model's row, the mean of the rows of the models that have it, or zeros)."""
        plan, holders = self.plan, self.holders
        size = len(plan.vocab)
        present = plan.positions[holders] >= 0  # [holders, V]
        forced = torch.zeros(size, dtype=torch.bool)
        for token, setting in plan.choice.tokens.items():
            forced[plan.vocab[token]] = setting.force
        self.own = torch.zeros((len(plan.names), size), dtype=torch.bool)
        self.own[holders] = present & ~forced
        count = present.sum(0)
        needed = ~present.all(0) | forced
        self.donor = torch.full((size,), NO_MODEL, dtype=torch.int64)
        self.donor_row = torch.zeros(size, dtype=torch.int64)
        explicit = {plan.vocab[token]: setting for token, setting in plan.choice.tokens.items()}
        auto = needed.clone()
        auto[torch.tensor(list(explicit), dtype=torch.int64)] = False
        single = auto & (count == 1)
        self.donor[single] = torch.tensor(holders)[present[:, single].int().argmax(0)]
        from_base = torch.zeros_like(auto)
        if plan.base is not None and plan.index(plan.base) in holders:  # the base, where it has the token
            from_base = auto & (count > 1) & (plan.positions[plan.index(plan.base)] >= 0)
            self.donor[from_base] = plan.index(plan.base)
        self.average = auto & (count > 1) & ~from_base
        donors = self.donor >= 0
        self.donor_row[donors] = plan.positions[self.donor[donors], donors.nonzero().flatten()]
        self.count = count
        for token_id, setting in explicit.items():
            if bool(needed[token_id]):
                self._assign_explicit(token_id, setting)

    def _assign_explicit(self, token_id: int, setting: TokenSetting) -> None:
        plan, token = self.plan, _token_of(self.plan.vocab, token_id)
        source = setting.source
        if source is None:
            raise WorkbenchError(f"tokenizer.tokens[{token!r}] gives no source, but some model lacks the token (or it "
                                 "is forced): say where its embedding comes from")
        if source.kind == "zero":
            return
        model = plan.index(source.model)
        if self.tensors[model] is None:
            raise WorkbenchError(f"token {token!r} takes its embedding from {source.model}, which lacks this tensor")
        if source.kind == "model":
            row = int(plan.positions[model, token_id])
            if row < 0:
                raise WorkbenchError(f"token {token!r} takes its embedding from {source.model}, which lacks the token")
        else:
            row = source.token_id if source.token_id is not None else plan.original_vocabs[model].get(source.token, -1)
            if row < 0:
                raise WorkbenchError(f"token {token!r} takes the embedding of {source.token!r} in {source.model}, "
                                     "which lacks that token")
            if row >= self.tensors[model].shape[0]:
                raise WorkbenchError(f"token {token!r} takes row {row} of {source.model}, whose tensor has "
                                     f"{self.tensors[model].shape[0]} rows")
        self.donor[token_id], self.donor_row[token_id] = model, row

    # -- the rows ------------------------------------------------------------------------------
    def rows(self, model: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of model `model`'s tensor in the output vocabulary, a new tensor."""
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        size = len(self.plan.vocab)
        out = torch.zeros((stop - start, *self.shape[1:]), dtype=self.dtype)
        if start < size:
            out[: min(stop, size) - start] = self._token_rows(model, start, min(stop, size))
        if stop > size:
            out[max(start, size) - start:] = self._padding_row(model)
        return out

    def _token_rows(self, model: int, start: int, stop: int) -> torch.Tensor:
        ids = torch.arange(start, stop)
        out = torch.zeros((stop - start, *self.shape[1:]), dtype=self.dtype)
        own = self.own[model, ids]
        if bool(own.any()):
            out[own] = self._gather(model, self.plan.positions[model, ids[own]])
        need = ~own
        donor = self.donor[ids]
        for source in donor[need & (donor >= 0)].unique().tolist():
            where = need & (donor == source)
            out[where] = self._gather(source, self.donor_row[ids[where]])
        average = need & self.average[ids]
        if bool(average.any()):
            out[average] = self._mean_of_present(ids[average])
        return out

    def _mean_of_present(self, ids: torch.Tensor) -> torch.Tensor:
        """Σ rows of the models that have each token, in model order, / their count: mergekit's order."""
        total = torch.zeros((len(ids), *self.shape[1:]), dtype=self.dtype)
        for holder in self.holders:
            has = self.plan.positions[holder, ids] >= 0
            if bool(has.any()):
                total[has] = total[has] + self._gather(holder, self.plan.positions[holder, ids[has]])
        counts = self.count[ids].to(self.dtype).view(-1, *([1] * (total.dim() - 1)))
        return total / counts

    def _gather(self, model: int, rows: torch.Tensor) -> torch.Tensor:
        return self.tensors[model][rows].to(self.dtype)

    def _padding_row(self, model: int) -> torch.Tensor:
        """The mean of the model's token rows (float64 sums over row blocks), which every padding
        row takes."""
        if model not in self._padding:
            size = len(self.plan.vocab)
            total = torch.zeros(self.shape[1:], dtype=torch.float64)
            for start, stop in row_blocks((size, *self.shape[1:])):
                total += self._token_rows(model, start, stop).to(torch.float64).sum(0)
            self._padding[model] = (total / size).to(self.dtype)
        return self._padding[model]


def _token_of(vocab: dict[str, int], token_id: int) -> str:
    return next(token for token, index in vocab.items() if index == token_id)
