"""`wb merge`: run a merge recipe (mergekit's YAML, or the command-line shorthand) tensor by tensor.

A `Recipe` (recipe.py) names the models, the method and the parameters. The engine here

1. opens every model a recipe names (a folder's checkpoint, headers only; `model+lora`: the model's
   checkpoint and the LoRA adapter bound to it, applied as each tensor is read, never materialised);
2. plans every output tensor (`plan_merge`): which models take part, under which input names (a
   slice renumbers layers), and every parameter's value for this tensor (gradients and filters
   resolved by mergekit's rule: recipe.evaluate_setting);
3. writes each tensor: the method's `merge_tensor` on row blocks when the method declares
   `row_blocks` (a few row blocks per model in memory); a streamed whole-tensor method
   (`streaming.StreamedMethod`) its `merge_blocks` over the row blocks, reading each block once per
   pass (a few row blocks per model too); any other method, and a vocabulary tensor laid out in a
   tokenizer union, `merge_tensor` on whole tensors (the tensors of one name, float32, nothing
   more); a tensor that no model changes is copied from the base; the result is rounded once to
   the output dtype;
4. writes config.json, the tokenizer (the base's by default, as mergekit; a named model's; or the
   union of every model's vocabulary, through tokenizer_union) and merge.json, which records the
   recipe as given and as resolved, the method's `reference`, the tokenizer choice and provenance.

Which tensors are layers comes from the names: `<prefix>.<layers|h|blocks|block|layer>.<i>.<rest>`.
Tensors outside the layers are taken from the first slice's sources when they hold embeddings (a name
with "embed", `wte` or `wpe`; mergekit's pre-weights) and from the last slice's otherwise (final norm,
lm_head; mergekit's post-weights).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.dtypes import TORCH_TO_SAFETENSORS, parse_dtype, resolve_device
from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.jsonfile import read_json
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.weightsum import gains_non_finite
from workbench.io.writer import (
    MODEL_SIDE_FILES,
    TensorSpec,
    WriteReport,
    parse_size,
    plan_shards,
    write_checkpoint,
)
from workbench.outputs import Note, atomic_dir, check_can_write, check_not_input
from workbench.provenance import created, file_fingerprints, versions
from workbench.weights.adapters.base import MergeSource
from workbench.weights.adapters.finetune import read_float_model_config
from workbench.weights.methods import registry
from workbench.weights.methods.base import MergeMethod, Param, TensorInputs, take_rows, tensor_seed
from workbench.weights.methods.streaming import StreamedMethod
from workbench.weights.recipe import (
    ModelRef,
    OutputSlice,
    Recipe,
    Source,
    evaluate_setting,
    read_recipe,
    shorthand_recipe,
    walk_settings,
)

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = tuple(n for n in MODEL_SIDE_FILES if n not in CONFIG_FILES)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|block|layer)\.)(?P<index>\d+)(?P<rest>\..+)$")
PRE_WEIGHT = re.compile(r"(^|\.)(wte|wpe|[^.]*embed[^.]*)(\.|$)")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class MergeResult:
    """What a merge made: merge.json's record (also written to OUT/merge.json) and the lines `wb merge` prints."""

    out: Path
    record: dict

    def lines(self) -> list[str]:
        record, output = self.record, self.record["output"]
        return [
            f"merged {len(record['models'])} model(s) into {self.out} with {record['method']} "
            f"({record['reference']})",
            record["tokenizer"]["line"],
            f"tensors: {output['tensors']} ({output['tensors_changed']} merged), files: {len(output['files'])}, "
            f"dtype: {'/'.join(record['output_dtypes'])}",
            f"weight-sum: {output['weight_sum']:.6f}",
            *(Note(f"note: {note}") for note in record["notes"]),
        ]

    def to_json(self) -> dict:
        return self.record


def merge(
    base: str | Path,
    adapters: list[str | Path],
    *,
    out: str | Path,
    weights: list[float] | None = None,
    method: str = "task_arithmetic",
    seed: int = 0,
    dtype: str | None = "auto",
    device: str = "cpu",
    shard_size: str | int = "5GB",
    tokenizer_source: str | None = None,
    force: bool = False,
    command: str | None = None,
    **params: Any,
) -> MergeResult:
    """The command-line shorthand: merge `adapters` (LoRA adapters on `base`, or full fine-tunes)
    into `base` with `method`; `params`: the method's global parameters (e.g. density=0.5)."""
    chosen = registry.get(method)
    declared = {p.name for p in chosen.params}
    unknown = sorted(name for name, value in params.items() if value is not None and name not in declared)
    if unknown:
        raise WorkbenchError(f"merge method {method!r} has no parameter {unknown[0]!r}; "
                             f"it takes {', '.join(sorted(declared)) or 'none'}")
    if not adapters:
        raise WorkbenchError("give at least one --adapter")
    recipe = shorthand_recipe(base, adapters, method, params, weights, tokenizer_source,
                              None if dtype in (None, "auto") else _dtype_name(dtype))
    return merge_recipe(recipe, out=out, seed=seed, device=device, shard_size=shard_size, force=force, command=command)


def merge_config(config: str | Path, *, out: str | Path, seed: int = 0, device: str = "cpu",
                 shard_size: str | int = "5GB", force: bool = False, command: str | None = None) -> MergeResult:
    """`wb merge --config recipe.yml`: run a mergekit recipe, unchanged."""
    return merge_recipe(read_recipe(config), out=out, seed=seed, device=device, shard_size=shard_size, force=force,
                        command=command)


def merge_recipe(recipe: Recipe, *, out: str | Path, seed: int = 0, device: str = "cpu",
                 shard_size: str | int = "5GB", force: bool = False, command: str | None = None) -> MergeResult:
    """Run `recipe` and write a Hugging Face folder at `out` (merge.json included)."""
    started = time.time()
    out = Path(out)
    torch_device = resolve_device(device)
    max_shard = parse_size(shard_size)
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise WorkbenchError(f"--seed must be a whole number in [0, 2**63), got {seed!r}")
    method = registry.get(recipe.merge_method) if recipe.merge_method in registry.REGISTRY else None
    if method is None:
        raise WorkbenchError(f"merge_method {recipe.merge_method!r}: wb does not do it; use one of "
                             f"{', '.join(registry.names())}", recipe.where())
    inputs = _input_paths(recipe)
    check_can_write(out, force)
    check_not_input(out, inputs)
    _check_adapters(recipe)

    models = open_models(recipe)
    plan = plan_merge(recipe, method, models)
    tokenizer = TokenizerPlan.build(recipe, plan, models)
    merger = TensorMerger(plan, method, seed, torch_device, tokenizer)
    with ThreadPoolExecutor(max_workers=1) as pool:  # fingerprints hash while the merge is written
        fingerprints = pool.submit(_fingerprints, list(models.values()))
        with atomic_dir(out, force=force, inputs=inputs) as tmp:
            report = write_checkpoint(tmp, plan_shards(plan.specs(), max_shard), merger, hash_algos=("sha256",),
                                      description="merging")
            _write_config(plan, tokenizer, tmp)
            tokenizer.write(tmp)
            record = _record(recipe, method, plan, tokenizer, list(models.values()), fingerprints.result(), report,
                             merger, seed, torch_device, command, started)
            (tmp / "merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return MergeResult(out, record)


def _check_adapters(recipe: Recipe) -> None:
    """`wb compat`'s check of every `model+lora` pair, from configs and headers, before a tensor is
    read: the adapter's tensors must fit its model (its warnings are printed as notes)."""
    from workbench.weights.compat import check_before, print_notes

    pairs = dict.fromkeys((ref.path, ref.lora) for ref in recipe.referenced_models() if ref.lora is not None)
    print_notes([note for model, adapter in pairs for note in check_before("merge", model, adapter)])


def _dtype_name(name: str) -> str:
    return DTYPE_CONFIG_NAMES[parse_dtype(name)]


def _input_paths(recipe: Recipe) -> list[Path]:
    paths = []
    for ref in recipe.referenced_models():
        paths.extend([ref.path] if ref.lora is None else [ref.path, ref.lora])
    return list(dict.fromkeys(paths))


# ----- the models -----------------------------------------------------------------------------------
@dataclass
class InputModel:
    """One model of the recipe: a checkpoint, maybe with a LoRA adapter applied as it is read."""

    ref: ModelRef
    checkpoint: Checkpoint
    config: dict
    lora: MergeSource | None = None

    @property
    def kind(self) -> str:
        return "full" if self.lora is None else "lora"

    def info(self, name: str):
        return self.checkpoint.info(name)

    def changes(self, name: str) -> bool:
        """Whether this model's tensor `name` differs from its checkpoint's own (a LoRA touches it)."""
        return self.lora is not None and self.lora.touches(name)

    def rows(self, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows [start, stop) of this model's tensor `name`: a new float32 tensor on `device`."""
        replaced = self.lora.replacement(name) if self.lora is not None else None
        stored = self.checkpoint.tensor(name) if replaced is None else replaced
        rows = take_rows(stored, start, stop).to(device=device, dtype=torch.float32, copy=True)
        if self.lora is not None and self.lora.adds_delta(name):
            # DoRA rescales W + s·B@A by norms of W's own rows: it reads base_rows whole before it
            # writes into the same buffer, so the rows themselves serve (no copy)
            self.lora.add_delta(rows, name, start, stop, 1.0, base_rows=rows)
        return rows

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as its checkpoint stores it (read-only, mapped)."""
        return self.checkpoint.tensor(name)


def open_models(recipe: Recipe) -> dict[str, InputModel]:
    """Every model the recipe names, by reference text; a checkpoint is opened once however many
    references share it (each `model+lora` binds its adapter to the model's checkpoint)."""
    from workbench.weights.adapters.lora import is_lora_adapter, read_lora_adapter

    checkpoints: dict[Path, tuple[Checkpoint, dict]] = {}
    models = {}
    for ref in recipe.referenced_models():
        if ref.path not in checkpoints:
            if is_lora_adapter(ref.path) and not (ref.path / "config.json").is_file():
                raise WorkbenchError(f"model {ref.text!r} is a LoRA adapter; name it as BASE+{ref.text}", recipe.where())
            config = read_float_model_config(ref.path)
            checkpoints[ref.path] = open_checkpoint(ref.path), config
        checkpoint, config = checkpoints[ref.path]
        lora = None
        if ref.lora is not None:
            if not is_lora_adapter(ref.lora):
                raise WorkbenchError(f"{ref.text!r}: {ref.lora} is not a PEFT LoRA adapter (no adapter_config.json)",
                                     recipe.where())
            lora = read_lora_adapter(ref.lora).bind(checkpoint, tied_embeddings=bool(config.get("tie_word_embeddings")))
        models[ref.text] = InputModel(ref, checkpoint, config, lora)
    return models


# ----- the plan ---------------------------------------------------------------------------------------
@dataclass
class Input:
    """One model's tensor taking part in one output tensor."""

    model: InputModel
    name: str  # the tensor's name in that model (a slice renumbers layers)


@dataclass
class TensorPlan:
    """How one output tensor is made."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: Input | None
    models: list[Input]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    copy: Input | None = None  # a tensor no model changes (or not floating): copied from this input
    vocabulary: bool = False  # rows are token ids (embeddings, lm_head): a tokenizer union permutes them

    @property
    def reference(self) -> Input:
        """The input whose stored values NaN/inf are judged against: the base, else the first model."""
        return self.base or self.copy or self.models[0]


@dataclass
class MergePlan:
    """Every output tensor's plan, in file order, and what the output's config comes from."""

    tensors: list[TensorPlan]
    donor: InputModel  # config, generation config and the default tokenizer come from it
    layers: int | None  # the output's layer count, where slices changed it
    ignored: list[str] = field(default_factory=list)  # parameters the method does not take, where given

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.shape, t.dtype) for t in self.tensors]


@dataclass
class _Layout:
    """A model's tensor names: per layer index {"<prefix>\0<rest>": name}, and the tensors outside
    the layers, embeddings first (`pre`, mergekit's pre-weights) and the others (`post`)."""

    prefix: str | None
    layers: dict[int, dict[str, str]]
    pre: list[str]
    post: list[str]

    @classmethod
    def of(cls, model: InputModel, where: str | Path) -> _Layout:
        prefixes: set[str] = set()
        layers: dict[int, dict[str, str]] = {}
        pre, post = [], []
        for name in model.checkpoint.names():
            match = LAYER_NAME.match(name)
            if match:
                prefixes.add(match["prefix"])
                layers.setdefault(int(match["index"]), {})[match["prefix"] + "\0" + match["rest"]] = name
            else:
                (pre if PRE_WEIGHT.search(name) else post).append(name)
        prefix = next(iter(prefixes)) if len(prefixes) == 1 else None
        if layers and sorted(layers) != list(range(len(layers))):
            raise WorkbenchError(f"model {model.ref.text!r} numbers its layers with gaps", where)
        return cls(prefix, layers, pre, post)

    @property
    def count(self) -> int:
        return len(self.layers)


def plan_merge(recipe: Recipe, method: MergeMethod, models: dict[str, InputModel]) -> MergePlan:
    """Every output tensor's inputs and parameter values, and the checks that can fail before
    anything is written (a missing tensor, a shape, a parameter)."""
    where = recipe.where()
    slices = recipe.slices or [_whole_model_slice(recipe)]
    donor = models[(recipe.base_model or slices[0].sources[0].model).text]
    layouts = {text: _Layout.of(model, where) for text, model in models.items()}
    _check_parameters(recipe, method)
    planner = _Planner(recipe, method, models, where)
    if recipe.slices is None:
        return MergePlan(_plan_models(planner, slices[0], donor, layouts), donor, None, planner.ignored)
    plans, layers = _plan_slices(planner, slices, layouts)
    return MergePlan(plans, donor, layers, planner.ignored)


def _plan_models(planner: _Planner, piece: OutputSlice, donor: InputModel,
                 layouts: dict[str, _Layout]) -> list[TensorPlan]:
    """`models:`: every tensor of the donor by its own name, layer i at t = i / (n − 1)."""
    counts = {layouts[s.model.text].count for s in piece.sources}
    if len(counts) != 1:
        raise WorkbenchError("every model of a merge must have the same number of layers", planner.where)
    count = counts.pop()
    plans = []
    for name in donor.checkpoint.names():
        match = LAYER_NAME.match(name)
        t = 0.0 if match is None else (int(match["index"]) / (count - 1) if count > 1 else 1.0)
        plans.append(planner.tensor(name, [(s, name) for s in piece.sources], piece, t))
    return plans


def _plan_slices(planner: _Planner, slices: list[OutputSlice],
                 layouts: dict[str, _Layout]) -> tuple[list[TensorPlan], int]:
    """`slices:`: the first slice's embeddings, each slice's layers renumbered in order (t: the
    position in the slice), the last slice's other tensors; and the output's layer count."""
    where = planner.where
    for piece in slices:
        for source in piece.sources:
            layout = layouts[source.model.text]
            if layout.prefix is None:
                raise WorkbenchError(f"slices need one stack of numbered layers; {source.model.text!r} has "
                                     f"{'none' if not layout.layers else 'several'}", where)
            if source.layer_range[1] > layout.count:
                raise WorkbenchError(f"layer_range {list(source.layer_range)} of {source.model.text!r} goes past "
                                     f"its {layout.count} layers", where)
    plans = [planner.tensor(name, [(s, name) for s in slices[0].sources], slices[0], 0.0)
             for name in layouts[slices[0].sources[0].model.text].pre]
    out_layer = 0
    for piece in slices:
        first = piece.sources[0]
        length = first.layer_range[1] - first.layer_range[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for key in layouts[first.model.text].layers[first.layer_range[0] + offset]:
                prefix, rest = key.split("\0")
                inputs = []
                for source in piece.sources:
                    names = layouts[source.model.text].layers[source.layer_range[0] + offset]
                    if key not in names:
                        raise WorkbenchError(f"model {source.model.text!r} has no {prefix}"
                                             f"{source.layer_range[0] + offset}{rest}", where)
                    inputs.append((source, names[key]))
                plans.append(planner.tensor(f"{prefix}{out_layer}{rest}", inputs, piece, t))
            out_layer += 1
    plans += [planner.tensor(name, [(s, name) for s in slices[-1].sources], slices[-1], 0.0)
              for name in layouts[slices[-1].sources[0].model.text].post]
    return plans, out_layer


def _whole_model_slice(recipe: Recipe) -> OutputSlice:
    """`models:` as mergekit reads it: one slice of every layer of every model, the base model
    added at the end when the list does not name it."""
    sources = list(recipe.models or [])
    if len({s.model for s in sources}) != len(sources):
        raise WorkbenchError("a model is listed twice in models", recipe.where())
    if recipe.base_model is not None and all(s.model != recipe.base_model for s in sources):
        sources.append(Source(recipe.base_model, None, {}))
    return OutputSlice(sources)


def _check_parameters(recipe: Recipe, method: MergeMethod) -> None:
    """A per-model setting of a global parameter is refused (mergekit would ignore it)."""
    declared = {p.name: p for p in method.params}
    for where, name, per_model in walk_settings(recipe):
        param = declared.get(name)
        if param is not None and per_model and not param.per_model:
            raise WorkbenchError(f"{where}: {name!r} is a global parameter of {method.name}; give it under "
                                 "parameters:", recipe.where())


class _Planner:
    """Builds one TensorPlan: the base and model inputs, the parameter values, the output dtype."""

    def __init__(self, recipe: Recipe, method: MergeMethod, models: dict[str, InputModel], where: str | Path):
        self.recipe, self.method, self.models, self.where = recipe, method, models, where
        self.ignored: list[str] = []
        self._note_ignored()

    def _note_ignored(self) -> None:
        declared = {p.name for p in self.method.params}
        for where, name, _ in walk_settings(self.recipe):
            if name not in declared and f"{where}.{name}" not in self.ignored:
                self.ignored.append(f"{where}.{name}")

    def tensor(self, out_name: str, inputs: list[tuple[Source, str]], piece: OutputSlice, t: float) -> TensorPlan:
        base_ref = piece.base_model or self.recipe.base_model
        uses_base = self.method.base_model != "unused" and base_ref is not None
        if self.method.base_model == "required" and base_ref is None:
            raise WorkbenchError(f"merge method {self.method.name} needs a base_model", self.where)
        base_input = None
        others: list[tuple[Source, Input]] = []
        vocabulary = self.recipe.tokenizer is not None and all(self._is_vocabulary(s, n) for s, n in inputs)
        for source, name in inputs:
            model = self.models[source.model.text]
            self._check_tensor(model, name, out_name, inputs, vocabulary)
            if uses_base and source.model == base_ref and base_input is None:
                base_input = Input(model, name)
            else:
                others.append((source, Input(model, name)))
        if uses_base and base_input is None:
            raise WorkbenchError(f"base_model {base_ref.text!r} is not among the models of "
                                 f"{'the merge' if self.recipe.slices is None else 'a slice'}", self.where)
        first = base_input or others[0][1]
        info = first.model.info(first.name)
        dtype = self._out_dtype([i for i in ([base_input] if base_input else []) + [o for _, o in others]])
        plan = TensorPlan(out_name, tuple(info.shape), dtype, base_input, [o for _, o in others],
                          [self._model_params(source, o.name, piece, t) for source, o in others],
                          self._global_params(out_name, piece, t), vocabulary=vocabulary)
        if not info.dtype.is_floating_point:
            plan.copy = first
        elif base_input is not None and all(_same_tensor(o, base_input) for o in plan.models):
            plan.copy = base_input  # every task vector is zero: the merge is the base's own tensor
        return plan

    def _is_vocabulary(self, source: Source, name: str) -> bool:
        """Whether tensor `name` of the source's model has one row per token of its vocabulary
        (embeddings, lm_head: mergekit's vocabulary_axis 0), outside the layers."""
        model = self.models[source.model.text]
        if name not in model.checkpoint or LAYER_NAME.match(name):
            return False
        shape = model.info(name).shape
        return len(shape) >= 1 and shape[0] == model.config.get("vocab_size")

    def _check_tensor(self, model: InputModel, name: str, out_name: str, inputs: list[tuple[Source, str]],
                      vocabulary: bool) -> None:
        if name not in model.checkpoint:
            raise WorkbenchError(f"model {model.ref.text!r} lacks {name!r} (another architecture?)", self.where)
        first_source, first_name = inputs[0]
        reference = self.models[first_source.model.text]
        mine, theirs = model.info(name), reference.info(first_name)
        if (mine.shape[1:] if vocabulary else mine.shape) != (theirs.shape[1:] if vocabulary else theirs.shape):
            raise WorkbenchError(f"shape mismatch for {out_name!r}: {list(mine.shape)} in {model.ref.text!r}, "
                                 f"{list(theirs.shape)} in {reference.ref.text!r}", self.where)
        if mine.dtype.is_floating_point != theirs.dtype.is_floating_point:
            raise WorkbenchError(f"tensor {name!r} is {mine.dtype} in {model.ref.text!r} but {theirs.dtype} in "
                                 f"{reference.ref.text!r}", self.where)

    def _out_dtype(self, inputs: list[Input]) -> torch.dtype:
        """out_dtype, else dtype, else the inputs' promoted dtype (mergekit's rule)."""
        named = self.recipe.out_dtype or self.recipe.dtype
        stored = [i.model.info(i.name).dtype for i in inputs]
        if not stored[0].is_floating_point:
            return stored[0]
        if named is not None:
            return getattr(torch, named)
        dtype = stored[0]
        for other in stored[1:]:
            dtype = torch.promote_types(dtype, other)
        return dtype

    def _global_params(self, out_name: str, piece: OutputSlice, t: float) -> dict[str, Any]:
        scopes = [piece.parameters, self.recipe.parameters]
        return {p.name: self._resolve(p, scopes, out_name, t, None) for p in self.method.params if not p.per_model}

    def _model_params(self, source: Source, name: str, piece: OutputSlice, t: float) -> dict[str, Any]:
        own = [s.parameters for s in piece.sources if s.model == source.model]
        scopes = [*own, piece.parameters, self.recipe.parameters]
        return {p.name: self._resolve(p, scopes, name, t, source.model) for p in self.method.params if p.per_model}

    def _resolve(self, param: Param, scopes: list[dict], tensor: str, t: float, model: ModelRef | None) -> Any:
        for scope in scopes:
            if param.name in scope:
                value = evaluate_setting(tensor, scope[param.name], t, param, self.where)
                if value is not None:
                    return value
        if param.required:
            at = f"{model.text}.{tensor}" if model is not None else tensor
            raise WorkbenchError(f"missing parameter {param.name!r} for {at} (merge method {self.method.name})",
                                 self.where)
        return param.default  # declared in range (tests/test_merge_registry.py checks every default)


def _same_tensor(a: Input, b: Input) -> bool:
    """Whether two inputs are the same stored tensor, unchanged by any LoRA."""
    return a.model.checkpoint is b.model.checkpoint and a.name == b.name and not a.model.changes(a.name) \
        and not b.model.changes(b.name)


# ----- writing ----------------------------------------------------------------------------------------
class TensorMerger:
    """The writer's `produce`: one output tensor, as a tensor or row blocks."""

    def __init__(self, plan: MergePlan, method: MergeMethod, seed: int, device: torch.device,
                 tokenizer: TokenizerPlan):
        self.plans = {t.name: t for t in plan.tensors}
        self.method, self.seed, self.device, self.tokenizer = method, seed, device, tokenizer
        self.merged = 0

    def __call__(self, spec: TensorSpec) -> torch.Tensor | Iterator[torch.Tensor]:
        plan = self.plans[spec.name]
        if plan.copy is not None:
            stored = plan.copy.model.stored(plan.copy.name)
            # row blocks even when only copied: the writer's per-block temporaries stay small
            return (take_rows(stored, a, b).to(spec.dtype) for a, b in row_blocks(tuple(stored.shape)))
        self.merged += 1
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, spec.name))
        if plan.vocabulary and self.tokenizer.vocabulary is not None:  # laid out whole in the union vocabulary
            return self._merge(plan, 0, spec.shape[0], generator, self.tokenizer.permuted_inputs(plan, self.device))
        if self.method.row_blocks:
            return (self._merge(plan, a, b, generator) for a, b in row_blocks(spec.shape))
        if isinstance(self.method, StreamedMethod):
            return self._streamed(self.method, plan, row_blocks(spec.shape), generator)
        return self._merge(plan, 0, spec.shape[0] if spec.shape else 1, generator)

    def _streamed(self, method: StreamedMethod, plan: TensorPlan, blocks: list[tuple[int, int]],
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
        """A streamed whole-tensor method's row blocks, in order: it reads the blocks of each of its
        passes itself (fresh inputs every time, one generator for the tensor)."""
        merged = method.merge_blocks(lambda start, stop: self._inputs(plan, start, stop, generator), blocks)
        for start, stop in blocks:
            yield self._result(plan, self._call(plan, next, merged), start, stop)

    def _inputs(self, plan: TensorPlan, start: int, stop: int, generator: torch.Generator,
                tensors: list[torch.Tensor] | None = None) -> TensorInputs:
        """What the method gets for rows [start, stop); `tensors`: the inputs already fetched (the
        base first), else read here."""
        if tensors is None:
            inputs = ([plan.base] if plan.base else []) + plan.models
            tensors = [i.model.rows(i.name, start, stop, self.device) for i in inputs]
        base = tensors.pop(0) if plan.base is not None else None
        return TensorInputs(plan.name, base, tensors, [dict(p) for p in plan.model_params], dict(plan.params),
                            generator, start, stop)

    def _call(self, plan: TensorPlan, function: Any, *args: Any) -> Any:
        """A method's call, its ValueError/RuntimeError as one line naming the method and tensor."""
        try:
            return function(*args)
        except (ValueError, RuntimeError) as err:
            raise WorkbenchError(f"merge method {self.method.name} on {plan.name!r}: {err}") from None

    def _merge(self, plan: TensorPlan, start: int, stop: int, generator: torch.Generator,
               tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Rows [start, stop) merged by the method's `merge_tensor`, rounded once to the output dtype."""
        inputs = self._inputs(plan, start, stop, generator, tensors)
        merged = self._call(plan, self.method.merge_tensor, inputs)
        del inputs, tensors
        return self._result(plan, merged, start, stop)

    def _result(self, plan: TensorPlan, merged: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Merged rows [start, stop) in the output dtype on the CPU, refused where they gained NaN/inf."""
        result = merged.to(plan.dtype, copy=True).cpu()
        del merged
        if not plan.vocabulary or self.tokenizer.vocabulary is None:
            reference = plan.reference
            if gains_non_finite(result, take_rows(reference.model.stored(reference.name), start, stop)):
                raise WorkbenchError(f"merging gave NaN or inf in {plan.name!r} (an input holds NaN/inf, or the sum "
                                     f"overflows {plan.dtype})")
        elif not torch.isfinite(result).all():
            raise WorkbenchError(f"merging gave NaN or inf in {plan.name!r}")
        return result


# ----- tokenizer --------------------------------------------------------------------------------------
@dataclass
class TokenizerPlan:
    """Which tokenizer the output gets. Without tokenizer_source or a tokenizer: block, the donor's
    tokenizer files, copied (mergekit's default); with one, tokenizer_union's vocabulary plan: its
    tokenizer is written and every vocabulary tensor of every model is laid out in its vocabulary
    before the method merges it."""

    source: str
    folder: Path | None  # where copied files come from
    vocabulary: Any = None  # tokenizer_union.VocabularyPlan
    chat_template: str | None = None

    @classmethod
    def build(cls, recipe: Recipe, plan: MergePlan, models: dict[str, InputModel]) -> TokenizerPlan:
        folders = {text: _tokenizer_folder(model) for text, model in models.items()}
        template = None
        if recipe.chat_template is not None:
            from workbench.weights.tokenizer_union import resolve_chat_template

            template = _where(recipe, lambda: resolve_chat_template(recipe.chat_template,
                                                                      [f for f in folders.values() if f]))
        if recipe.tokenizer is None:
            return cls("base", folders[plan.donor.ref.text], None, template)
        from workbench.weights.tokenizer_union import plan_vocabulary

        missing = [text for text, folder in folders.items() if folder is None]
        if missing:
            raise WorkbenchError(f"model {missing[0]!r} has no tokenizer files, which tokenizer "
                                 f"{recipe.tokenizer.source!r} needs", recipe.where())
        base = None if recipe.base_model is None else recipe.base_model.text
        sizes = {text: model.config.get("vocab_size") for text, model in models.items()}  # checked by read_model_config
        vocabulary = _where(recipe, lambda: plan_vocabulary(folders, base, recipe.tokenizer, sizes))
        for tensor in plan.tensors:
            if tensor.vocabulary:
                tensor.shape = (vocabulary.vocab_size, *tensor.shape[1:])
                tensor.copy = None
        return cls(recipe.tokenizer.source, None, vocabulary, template)

    def line(self) -> str:
        if self.vocabulary is not None:
            return self.vocabulary.line()
        return f"tokenizer: {self.source} (from {self.folder})"

    def write(self, out_dir: Path) -> None:
        if self.vocabulary is not None:
            self.vocabulary.write(out_dir, self.chat_template)
            return
        if self.folder is not None:
            for name in TOKENIZER_FILES:
                if (self.folder / name).is_file():
                    (out_dir / name).write_bytes((self.folder / name).read_bytes())
        if self.chat_template is not None:
            _set_chat_template(out_dir, self.chat_template)

    def permuted_inputs(self, plan: TensorPlan, device: torch.device) -> list[torch.Tensor]:
        """The vocabulary tensor `plan` of each of its inputs (the base first), laid out in the
        output vocabulary: float32 on `device`, whole (the tensors of one name)."""
        inputs = ([plan.base] if plan.base else []) + plan.models
        tensors: list[torch.Tensor | None] = [None] * len(self.vocabulary.names)
        for tensor in inputs:
            model, name = tensor.model, tensor.name
            whole = model.rows(name, 0, model.info(name).shape[0], torch.device("cpu")) if model.changes(name) \
                else model.stored(name)
            tensors[self.vocabulary.index(model.ref.text)] = whole
        permuted = self.vocabulary.permute(tensors)
        return [permuted.rows(self.vocabulary.index(t.model.ref.text)).to(device=device, dtype=torch.float32)
                for t in inputs]

    def to_json(self) -> dict:
        chosen = {"source": self.source, "from": None if self.folder is None else str(self.folder)}
        if self.vocabulary is not None:
            chosen.update(self.vocabulary.to_json())
        return {**chosen, "chat_template": self.chat_template, "line": self.line()}


def _where(recipe: Recipe, run: Any) -> Any:
    """run(), its one-line errors naming the recipe where they name no file."""
    try:
        return run()
    except WorkbenchError as err:
        if getattr(err, "file", None) is None:
            raise WorkbenchError(str(err), recipe.where()) from None
        raise


def _tokenizer_folder(model: InputModel) -> Path | None:
    """Where `model`'s tokenizer files are: its LoRA adapter's folder when that carries a tokenizer
    (peft saves the tokenizer an adapter was trained with there), else the model's."""
    for folder in ([model.ref.lora] if model.ref.lora is not None else []) + [model.ref.path]:
        if any((folder / marker).is_file() for marker in TOKENIZER_MARKERS):
            return folder
    return None


def _set_chat_template(out_dir: Path, template: str) -> None:
    """chat_template.jinja holds the template (transformers reads it before tokenizer_config.json's)."""
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_file = out_dir / "tokenizer_config.json"
    if config_file.is_file():
        config = read_json(config_file, "tokenizer_config.json")
        if isinstance(config, dict) and "chat_template" in config:
            del config["chat_template"]
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----- config and record -------------------------------------------------------------------------------
def _write_config(plan: MergePlan, tokenizer: TokenizerPlan, out_dir: Path) -> None:
    """The donor's config.json, with its dtype, layer count and vocabulary size rewritten where the
    merge changed them (byte for byte the donor's otherwise); its generation_config.json."""
    donor = plan.donor.ref.path
    config = dict(plan.donor.config)
    changes: dict[str, Any] = {}
    dtypes = {t.dtype for t in plan.tensors if t.dtype.is_floating_point}
    if len(dtypes) == 1 and dtypes <= set(DTYPE_CONFIG_NAMES):
        name = DTYPE_CONFIG_NAMES[dtypes.pop()]
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            if config.get(key) != name:
                changes[key] = name
    if plan.layers is not None:
        for key in [k for k in LAYER_COUNT_KEYS if k in config]:
            if config[key] != plan.layers:
                changes[key] = plan.layers
    if tokenizer.vocabulary is not None and config.get("vocab_size") != tokenizer.vocabulary.vocab_size:
        changes["vocab_size"] = tokenizer.vocabulary.vocab_size
    if changes:
        (out_dir / "config.json").write_text(json.dumps({**config, **changes}, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    else:
        (out_dir / "config.json").write_bytes((donor / "config.json").read_bytes())
    if (donor / "generation_config.json").is_file():
        (out_dir / "generation_config.json").write_bytes((donor / "generation_config.json").read_bytes())


TRAIN_ARGS_LIMIT = 16 * 2**20  # a train_args.json is a few kB; a larger one is not wb's


def quantized_base_note(adapter: Path) -> str | None:
    """The note for an adapter `wb train` trained on a quantized base (its train_args.json, beside
    adapter_config.json, says so under "quantization"), else None. train_args.json is a record, not an
    input of the merge: absent, unreadable or not what wb writes, it is ignored and gives no note."""
    file = Path(adapter) / "train_args.json"
    try:
        if not file.is_file() or file.stat().st_size > TRAIN_ARGS_LIMIT:
            return None
        record = read_json(file, "train_args.json")
    except (OSError, WorkbenchError):
        return None
    quantization = record.get("quantization") if isinstance(record, dict) else None
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    if type(bits) is not int or bits not in (4, 8):
        return None
    kind = quantization.get("type")
    kind = f" ({kind})" if kind in ("nf4", "fp4", "llm.int8") else ""
    return (f"{adapter} was trained on a {bits}-bit{kind} quantized base (QLoRA): it learned against the "
            "dequantized weights, so merged into this full-precision base it gives a slightly different model "
            "from the one trained (close, not identical)")


def _fingerprints(models: list[InputModel]) -> list[dict[str, str]]:
    """sha256 of every model's weight and config files (and its LoRA adapter's), {relative name: hex}."""
    hashes = []
    for model in models:
        files = [*model.checkpoint.files, model.ref.path / "config.json"]
        entry = file_fingerprints(model.ref.path, files)
        if model.lora is not None:
            entry = {**entry, **{f"lora/{k}": v for k, v in file_fingerprints(model.ref.lora, model.lora.files).items()}}
        hashes.append(entry)
    return hashes


def _record(recipe: Recipe, method: MergeMethod, plan: MergePlan, tokenizer: TokenizerPlan, models: list[InputModel],
            hashes: list[dict[str, str]], report: WriteReport, merger: TensorMerger, seed: int, device: torch.device,
            command: str | None, started: float) -> dict:
    entries = []
    for model, files in zip(models, hashes):
        entry = {**model.ref.to_json(), "kind": model.kind, "files_sha256": files}
        if model.lora is not None:
            entry.update(model.lora.summary())
        entries.append(entry)
    resolved = recipe.to_json()
    notes = [f"{len(plan.ignored)} parameter(s) that {method.name} does not take, ignored as mergekit does: "
             f"{', '.join(plan.ignored)}"] if plan.ignored else []
    notes += [note for model in models if model.ref.lora is not None
              if (note := quantized_base_note(model.ref.lora)) is not None]
    return {
        "command": command,
        "recipe": {"file": None if recipe.file is None else str(recipe.file.absolute()),
                   "sha256": recipe.sha256,
                   "given": recipe.given, "resolved": resolved},
        "method": method.name,
        "reference": method.reference,
        "parameters": resolved["parameters"],
        "weights": [s["parameters"].get("weight") for s in resolved["models"]] if resolved["models"] else None,
        "seed": seed,
        "base": None if recipe.base_model is None else recipe.base_model.text,
        "models": entries,
        # the adapter folders applied (what reads train_args.json beside an adapter looks here)
        "adapters": [{"path": e["lora"], "kind": e["kind"], "model": e["reference"]} for e in entries if e["lora"]],
        "dtype": recipe.out_dtype or recipe.dtype or "auto",
        "output_dtypes": sorted({TORCH_TO_SAFETENSORS[t.dtype] for t in plan.tensors}),
        "device": str(device),
        "tokenizer": tokenizer.to_json(),
        "notes": notes,
        "output": {
            "files": report.files,
            "index_file": report.index_file,
            "tensors": report.tensor_count,
            "tensors_changed": merger.merged,
            "weight_sum": report.weight_sum,
        },
        "versions": versions(("torch",), python=False),
        "created": created(started),
        "duration_s": round(time.time() - started, 3),
    }
