"""Read a PEFT LoRA or DoRA adapter without peft: its config, its tensors, and the delta each makes.

A saved adapter is `adapter_config.json` plus `adapter_model.safetensors` (or `.bin`) whose tensor
names are the wrapped model's: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` for a
Linear, `.lora_embedding_A` / `.lora_embedding_B` for an Embedding, `.lora_magnitude_vector` for
DoRA's magnitude m, and whole tensors for `modules_to_save` (`base_model.model.lm_head.weight`) and
embeddings peft saves beside an embedding LoRA (`...embed_tokens.base_layer.weight`). Whole tensors
replace the base's; LoRA pairs add

    D = scale * B @ A            (Linear, (out, in); transposed for Conv1D / fan_in_fan_out)
    D = scale * (B @ A).T        (Embedding, (vocab, dim), as peft's Embedding.get_delta_weight)

with scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, r and alpha taken from
rank_pattern / alpha_pattern where a pattern matches the module (peft's `get_pattern_key`).

A DoRA pair (use_dora) replaces W by W′ = (m / ‖W + D‖) ⊙ (W + D), so its delta is W′ − W, as peft
0.21's DoraLinearVariant / DoraEmbeddingVariant merge it. The norm is taken per output feature of
W + D in peft's (out, in) orientation: over each row of a Linear, which is row-local, but over
each column of what is stored (in, out) (Conv1D) or (vocab, dim) (Embedding, where m has one value
per embedding dimension), which needs the whole tensor: those norms are computed once per tensor,
in row blocks, from the base the adapter is bound to. W is the base's tensor, or the module's own
base layer where peft saved it beside the pair. Each adapter's norm comes from the unmerged base,
never from what other adapters merged into it (peft's rule too).

Anything whose merge is not "base + delta" or DoRA's rescaling (other variants, quantized training,
inits that rewrote the base weights, ...) is refused by name rather than merged wrongly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.jsonfile import read_json
from workbench.io.reader import Checkpoint, open_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
FLOAT32_MAX = 3.4028234663852886e38

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?$")
# Wrapper infixes peft may leave in the names of whole tensors it saves.
_WRAPPER_INFIX = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")

# Config fields whose presence (a truthy value) means the adapter is not plain, mergeable LoRA.
REFUSED_FIELDS: dict[str, str] = {
    "lora_bias": "a LoRA bias (lora_bias)",
    "use_qalora": "QALoRA (use_qalora), trained against a quantized base",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which acts only after its invocation tokens",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication, which changes the model's layer stack",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "the VeLoRA variant (velora_config)",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config)",
    "kasa_config": "the KaSA variant (kasa_config)",
}

# init_lora_weights values that rewrite the base weights at initialisation: the saved adapter only
# makes sense on that rewritten base (peft can convert them; see path_initial_model_for_weight_conversion).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair and how its delta lands on the base tensor `target`."""

    module: str
    target: str
    a_name: str
    b_name: str
    rank: int
    alpha: float
    scale: float
    embedding: bool
    transposed: bool = False  # delta is (B @ A).T: embeddings, and Conv1D (fan_in_fan_out) layers
    magnitude_name: str | None = None  # DoRA's lora_magnitude_vector, one value per row of B

    @property
    def dora(self) -> bool:
        return self.magnitude_name is not None


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, opened lazily; `bind` checks it against a base and resolves layouts.

    A `MergeSource`: it replaces the tensors it saved whole and adds a delta to the modules it adapts."""

    path: Path
    config: dict
    checkpoint: Checkpoint
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base tensor name -> pair
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor name
    base: Checkpoint | None = None  # set by `bind`
    # DoRA norms over whole columns (Conv1D, Embedding), float32, one vector per base tensor name
    column_norms: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    kind = "lora"

    def touches(self, name: str) -> bool:
        return name in self.modules or name in self.replacements

    def replacement(self, name: str) -> torch.Tensor | None:
        tensor_name = self.replacements.get(name)
        return None if tensor_name is None else self.checkpoint.tensor(tensor_name)

    def adds_delta(self, name: str) -> bool:
        return name in self.modules

    @property
    def needs_base_rows(self) -> bool:
        return any(pair.dora for pair in self.modules.values())

    def add_delta(self, acc: torch.Tensor, name: str, start: int, stop: int, weight: float,
                  base_rows: torch.Tensor | None = None) -> None:
        """acc += weight * (rows [start, stop) of this adapter's delta for base tensor `name`); acc is
        float32 on the merge device. A LoRA pair adds scale·B@A in one fused matrix product and
        ignores `base_rows`; a DoRA pair adds W′ − W, W being `base_rows` (the bound base's rows
        [start, stop), read here when None) or the module's own saved base layer."""
        pair = self.modules[name]
        if pair.dora:
            acc.add_(self._dora_delta(pair, start, stop, acc.device, base_rows), alpha=weight)
            return
        first, second = self._factors(pair, start, stop)
        alpha = weight * pair.scale
        if not abs(alpha) <= FLOAT32_MAX:
            raise WorkbenchError(f"module {pair.module!r}: weight x LoRA scale = {alpha:g} is too large for float32", self.path)
        acc.addmm_(first.to(acc.device, torch.float32), second.to(acc.device, torch.float32), alpha=alpha)

    def _factors(self, pair: LoraModule, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second), as stored, whose product is rows [start, stop) of B @ A (or of its
        transpose)."""
        a, b = self.checkpoint.tensor(pair.a_name), self.checkpoint.tensor(pair.b_name)
        if pair.transposed:  # rows of (B @ A).T are columns of B @ A
            return a[:, start:stop].T, b.T
        return b[start:stop], a

    def _lora_rows(self, pair: LoraModule, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows [start, stop) of D = scale · B @ A (or its transpose), a new float32 tensor; scaled
        after the product, as peft's get_delta_weight does."""
        first, second = self._factors(pair, start, stop)
        return torch.mm(first.to(device, torch.float32), second.to(device, torch.float32)).mul_(pair.scale)

    def _dora_delta(self, pair: LoraModule, start: int, stop: int, device: torch.device,
                    base_rows: torch.Tensor | None) -> torch.Tensor:
        """Rows [start, stop) of W′ − W, W′ = (m / ‖W + D‖) ⊙ (W + D) with the norm and the factor
        in peft's order (DoraLinearVariant.merge_safe)."""
        weight = self._dora_weight_rows(pair, start, stop, device, base_rows)
        adapted = weight + self._lora_rows(pair, start, stop, device)
        magnitude = self.checkpoint.tensor(pair.magnitude_name).to(device, torch.float32)
        if pair.transposed:  # one norm per column, over all rows (Conv1D's output features, embedding dimensions)
            factor = (magnitude / self._column_norm(pair, device)).view(1, -1)
        else:
            factor = (magnitude[start:stop] / torch.linalg.norm(adapted, dim=1)).view(-1, 1)
        return adapted.mul_(factor).sub_(weight)

    def _dora_weight_rows(self, pair: LoraModule, start: int, stop: int, device: torch.device,
                          base_rows: torch.Tensor | None) -> torch.Tensor:
        """Rows [start, stop) of the W a DoRA pair rescales, float32 on `device` (never modify):
        the module's base layer where peft saved it beside the pair (what peft loads and merges
        into), else the base's rows."""
        saved = self.replacements.get(pair.target)
        if saved is not None:
            return self.checkpoint.tensor(saved)[start:stop].to(device, torch.float32)
        if base_rows is not None:
            return base_rows.to(device, torch.float32)
        if self.base is None:
            raise WorkbenchError(f"module {pair.module!r} is DoRA, whose delta needs the base: bind the adapter first", self.path)
        return self.base.tensor(pair.target)[start:stop].to(device, torch.float32)

    def _column_norm(self, pair: LoraModule, device: torch.device) -> torch.Tensor:
        """‖W + D‖ of every column over the whole tensor, computed once per tensor in row blocks
        (norms of blocks combined with hypot, so one block gives exactly torch's norm)."""
        norm = self.column_norms.get(pair.target)
        if norm is None:
            # the stored tensor is (A's columns, B's rows): (in, out) for Conv1D, (vocab, dim) for an Embedding
            shape = (self.checkpoint.info(pair.a_name).shape[1], self.checkpoint.info(pair.b_name).shape[0])
            for start, stop in row_blocks(shape):
                block = self._dora_weight_rows(pair, start, stop, device, None) + self._lora_rows(pair, start, stop, device)
                part = torch.linalg.vector_norm(block, dim=0)
                norm = part if norm is None else torch.hypot(norm, part)
            self.column_norms[pair.target] = norm
        return norm.to(device)

    @property
    def files(self) -> list[Path]:
        return [*self.checkpoint.files, self.path / ADAPTER_CONFIG]

    def summary(self) -> dict:
        """The settings merge.json records for this adapter."""
        keys = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save",
                "rank_pattern", "alpha_pattern", "fan_in_fan_out", "base_model_name_or_path")
        return {
            "config": {k: self.config.get(k) for k in keys},
            "lora_modules": len(self.modules),
            "dora_modules": sum(pair.dora for pair in self.modules.values()),
            "replaced_tensors": sorted(self.replacements),
        }

    def bind(self, base: Checkpoint, tied_embeddings: bool = False) -> LoraAdapter:
        """Check every target against `base` (present, floating, same shape) and settle which
        pairs are transposed. Errors name the module and both shapes."""
        if tied_embeddings:
            self = self.without_tied_head_copy(base)
        bound = {}
        for target, pair in self.modules.items():
            if target not in base:
                hint = ""
                if tied_embeddings and target == "lm_head.weight":
                    hint = "; the base ties lm_head to the input embeddings, so it has no lm_head.weight"
                raise WorkbenchError(
                    f"adapter targets module {pair.module!r} but the base has no tensor {target!r} "
                    f"(adapter made for another base?{hint})", self.path)
            bound[target] = self._orient(pair, base.info(target).shape)
            _check_floating(base, target, self.path)
        for target, tensor_name in self.replacements.items():
            if target not in base:
                raise WorkbenchError(
                    f"adapter carries tensor {tensor_name!r} but the base has no tensor {target!r} "
                    "(adapter made for another base?)", self.path)
            _check_floating(base, target, self.path)
            mine, theirs = self.checkpoint.info(tensor_name).shape, base.info(target).shape
            if mine != theirs:
                raise WorkbenchError(
                    f"shape mismatch for {target!r}: the adapter's {tensor_name!r} is {list(mine)}, "
                    f"the base's is {list(theirs)} (adapter made for another base, or a resized vocabulary?)",
                    self.path)
        return replace(self, modules=bound, base=base)

    def without_tied_head_copy(self, base: Checkpoint) -> LoraAdapter:
        """peft saves a tied output head's copy of the input embedding's adapter tensors (with
        ensure_weight_tying: `lm_head.weight` beside `embed_tokens.weight`, or `lm_head.lora_A/B` =
        the embedding LoRA's B.T / A.T) and needs them to load. On a base that ties the two and has
        no lm_head.weight, the head *is* the embedding: the copy is dropped, the embedding's entry
        merges it."""
        head = "lm_head.weight"
        if head in base:
            return self
        embedding_replaced = any(t.endswith("embed_tokens.weight") for t in self.replacements)
        embedding_adapted = any(p.embedding for p in self.modules.values())
        return replace(
            self,
            modules={t: p for t, p in self.modules.items() if not (t == head and embedding_adapted)},
            replacements={t: n for t, n in self.replacements.items() if not (t == head and embedding_replaced)},
        )

    def _orient(self, pair: LoraModule, base_shape: tuple[int, ...]) -> LoraModule:
        a_shape = self.checkpoint.info(pair.a_name).shape
        b_shape = self.checkpoint.info(pair.b_name).shape
        if pair.embedding:
            candidates = [((a_shape[1], b_shape[0]), True)]
        else:
            normal, flipped = ((b_shape[0], a_shape[1]), False), ((a_shape[1], b_shape[0]), True)
            # peft decides per layer type (Conv1D stores (in, out)); the saved flag reflects that
            # decision, so it wins when both orientations fit (square matrices).
            candidates = [flipped, normal] if self.config.get("fan_in_fan_out") else [normal, flipped]
        for shape, transposed in candidates:
            if tuple(shape) == tuple(base_shape):
                return replace(pair, transposed=transposed)
        raise WorkbenchError(
            f"shape mismatch for {pair.target!r}: the adapter's delta is {list(candidates[0][0])}, "
            f"the base tensor is {list(base_shape)} (adapter made for another base?)", self.path)


def is_lora_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_lora_adapter(path: str | Path) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder, refusing (by name) whatever cannot be merged exactly."""
    path = Path(path)
    config = read_adapter_config(path)
    refuse_unmergeable(config, path)
    weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise WorkbenchError(f"adapter has no {' or '.join(ADAPTER_WEIGHTS)}", path)
    checkpoint = open_checkpoint(weights)
    adapter = LoraAdapter(path=path, config=config, checkpoint=checkpoint)
    _map_tensors(adapter)
    if not adapter.modules and not adapter.replacements:
        raise WorkbenchError("adapter holds no LoRA tensors", weights)
    return adapter


def refuse_unmergeable(config: dict, path: Path) -> None:
    """Raise for any adapter type whose merge is not base + scale * B @ A, or DoRA's rescaling of it."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise WorkbenchError(f"peft_type {config.get('peft_type')!r} is not LoRA; wb merges LoRA adapters only", path)
    for key, what in REFUSED_FIELDS.items():
        if config.get(key):
            raise WorkbenchError(f"refusing to merge {what}: wb merges only plain LoRA (base + scale * B @ A) and DoRA", path)
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise WorkbenchError(f"refusing to merge trained biases (bias={bias!r}): wb merges only plain LoRA weights", path)
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_REWRITING_INITS):
        raise WorkbenchError(
            f"adapter was initialised with init_lora_weights={config['init_lora_weights']!r}, which rewrites the "
            "base weights; convert it to plain LoRA first (peft: path_initial_model_for_weight_conversion)", path)
    check_numbers(config, path)


def check_numbers(config: dict, path: Path) -> None:
    """r and rank_pattern values are whole numbers >= 1, alpha values finite numbers, pattern keys
    valid regular expressions: torch would take alpha=NaN as 1 and merge silently wrong."""
    config_file = path / ADAPTER_CONFIG
    _check_rank(config.get("r", 8), "r", config_file)
    _check_alpha(config.get("lora_alpha", 8), "lora_alpha", config_file)
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise WorkbenchError(f"{key} must be an object mapping module patterns to numbers", config_file)
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                raise WorkbenchError(f"{key} has an invalid regular expression {pattern!r}: {exc}", config_file) from None
            check(value, f"{key}[{pattern!r}]", config_file)
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config.get(key, False), bool):
            raise WorkbenchError(f"{key} must be true or false, not {config[key]!r}", config_file)


MAX_RANK = 2**31 - 1  # a rank is a tensor dimension


def _check_rank(value: object, where: str, config_file: Path) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANK:
        raise WorkbenchError(f"{where} must be a whole number from 1 to {MAX_RANK}, not {_short(value)}", config_file)


def _check_alpha(value: object, where: str, config_file: Path) -> None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX
    if not finite:  # `abs(x) <= max` is False for NaN and, unlike math.isfinite, never overflows on a huge int
        raise WorkbenchError(f"{where} must be a finite number in float32's range, not {_short(value)}", config_file)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """peft's `get_pattern_key`: the first key that matches the end of `module` at a dot boundary
    (keys are regular expressions), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) of `module` under `config`, as peft's LoraLayer.update_layer sets them."""
    rank = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, alpha, scale


def read_adapter_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise WorkbenchError(f"not a PEFT adapter (no {ADAPTER_CONFIG})", path)
    config = read_json(file, "adapter config")
    if not isinstance(config, dict):
        raise WorkbenchError("adapter config is not a JSON object", file)
    return config


def _map_tensors(adapter: LoraAdapter) -> None:
    """Sort the adapter's tensors into LoRA pairs (by base tensor) and whole replacement tensors."""
    halves: dict[tuple[str, bool], dict[str, str]] = {}
    magnitudes: dict[str, str] = {}  # module -> its DoRA magnitude vector's tensor name
    for name in adapter.checkpoint.names():
        bare = name.removeprefix(PEFT_PREFIX)
        match = _LINEAR_KEY.match(bare) or _EMBEDDING_KEY.match(bare)
        dora = _MAGNITUDE_KEY.match(bare)
        if dora:
            if dora["module"] in magnitudes:
                raise WorkbenchError(f"module {dora['module']!r} has two DoRA magnitude vectors", adapter.path)
            magnitudes[dora["module"]] = name
        elif match:
            embedding = match.re is _EMBEDDING_KEY
            halves.setdefault((match["module"], embedding), {})[match["ab"]] = name
        elif ".lora_" in bare or bare.startswith("lora_"):
            raise WorkbenchError(f"tensor {name!r} is not a LoRA A/B matrix (a LoRA variant?); refusing", adapter.path)
        else:
            target = _WRAPPER_INFIX.sub("", bare)
            if target in adapter.replacements:
                raise WorkbenchError(f"adapter holds two tensors for {target!r}", adapter.path)
            adapter.replacements[target] = name
    for (module, embedding), pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise WorkbenchError(f"module {module!r} has no lora_{missing} tensor (damaged adapter?)", adapter.path)
        a_info, b_info = adapter.checkpoint.info(pair["A"]), adapter.checkpoint.info(pair["B"])
        if len(a_info.shape) != 2 or len(b_info.shape) != 2:
            raise WorkbenchError(
                f"module {module!r} has {len(a_info.shape)}-d LoRA matrices (a convolution?); wb merges "
                "Linear and Embedding LoRA only", adapter.path)
        rank, alpha, scale = lora_scale(adapter.config, module)
        if not abs(scale) <= FLOAT32_MAX:
            raise WorkbenchError(f"module {module!r}: the LoRA scale {alpha:g} / r is too large for float32",
                                 adapter.path / ADAPTER_CONFIG)
        if a_info.shape[0] != rank or b_info.shape[1] != rank:
            raise WorkbenchError(
                f"module {module!r}: lora_A is {list(a_info.shape)} and lora_B is {list(b_info.shape)} "
                f"but the config gives it rank {rank}", adapter.path)
        target = f"{module}.weight"
        adapter.modules[target] = LoraModule(
            module=module, target=target, a_name=pair["A"], b_name=pair["B"],
            rank=rank, alpha=alpha, scale=scale, embedding=embedding,
            magnitude_name=_magnitude(adapter, module, magnitudes.pop(module, None), b_info.shape[0]))
    if magnitudes:
        module = next(iter(magnitudes))
        raise WorkbenchError(f"module {module!r} has a DoRA magnitude vector but no lora_A/lora_B (damaged adapter?)",
                             adapter.path)


def _magnitude(adapter: LoraAdapter, module: str, name: str | None, out_features: int) -> str | None:
    """The checked name of `module`'s DoRA magnitude vector: present exactly when use_dora, 1-d with
    one finite value per row of lora_B (the output features in peft's (out, in) orientation)."""
    use_dora = adapter.config.get("use_dora", False)
    if name is None:
        if use_dora:
            raise WorkbenchError(f"module {module!r} has no lora_magnitude_vector, but the config says use_dora "
                                 "(DoRA; damaged adapter?)", adapter.path)
        return None
    if not use_dora:
        raise WorkbenchError(f"module {module!r} has a DoRA magnitude vector (lora_magnitude_vector) but the config "
                             "does not say use_dora; refusing to guess which merge it needs", adapter.path)
    info = adapter.checkpoint.info(name)
    if tuple(info.shape) != (out_features,) or not info.dtype.is_floating_point:
        raise WorkbenchError(
            f"module {module!r}: its DoRA magnitude vector is {info.dtype} {list(info.shape)}, but its lora_B gives "
            f"{out_features} output features, so it must be float [{out_features}] (damaged adapter?)", adapter.path)
    if not bool(torch.isfinite(adapter.checkpoint.tensor(name)).all()):
        raise WorkbenchError(f"module {module!r}: its DoRA magnitude vector holds NaN or inf (damaged adapter?)",
                             adapter.path)
    return name


def _check_floating(base: Checkpoint, target: str, path: Path) -> None:
    dtype = base.info(target).dtype
    if not dtype.is_floating_point:
        raise WorkbenchError(f"base tensor {target!r} is {dtype} (a quantized base?); only float weights merge exactly", path)
