"""`wb diff --lora-rank R`: publish TUNED − RAW as a PEFT LoRA adapter (lossy, small, mergeable).

Every tensor of TUNED is compared with RAW's bit for bit; identical tensors are left out. What
changed becomes, per module (`<module>.<param>` names the tensor):

- a **Linear LoRA** pair for a 2-D `<module>.weight`: Δ = TUNED − RAW in float32, its truncated
  SVD Δ ≈ U·S·Vᵀ (`torch.linalg.svd`, full_matrices=False), split evenly as B = U·√S (out, r) and
  A = √S·Vᵀ (r, in), saved as `base_model.model.<module>.lora_B.weight` / `.lora_A.weight`;
- with --embed-lora, an **embedding LoRA** for an input embedding (`embed_tokens`, ...): peft's
  delta is (B·A)ᵀ, so Δᵀ (dim, vocab) is factorized: `.lora_embedding_B` (dim, r) and
  `.lora_embedding_A` (r, vocab); the output head (`lm_head`) then gets a Linear pair;
- a module **saved whole** (peft's `modules_to_save`) for everything else that changed: norms,
  biases (peft has no exact way to carry a bias delta beside a LoRA pair, so a module whose bias
  changed is saved whole, weight included), input embeddings and output heads without
  --embed-lora. Its tensors are TUNED's, bit for bit, in TUNED's dtype, saved under peft's names
  `base_model.model.<module>.<param>`.

The rank of a tensor is R, capped at min(out, in) (the factorization is then exact, and no
smaller than Δ itself); with --rank-by-energy F, the smallest r whose singular values keep
Σ_{i<r} s_i² ≥ F·Σ s_i², capped the same way. adapter_config.json has `lora_alpha` = `r` and an
`alpha_pattern` equal to `rank_pattern`, so every scale alpha/r is 1.

A randomized SVD (`torch.svd_lowrank`) is 30-50x faster on CPU, but on a flat spectrum (a full
fine-tune's noise) its error was 0.15-0.6 % above the optimum at rank 64 on 2048x5632 (measured
with niter 2-6, oversampling 10-32), so the exact SVD is the only one used: the error is the
optimum for the rank (Eckart-Young), never worse than mergekit-extract-lora's.

One tensor at a time: Δ, its SVD and the residual (checked in row blocks) are the only large
temporaries; the factors go to a scratch file as they are made, and the adapter is written from
it at the end, because its header needs every rank before the first byte.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import __version__, provenance
from workbench.dtypes import parse_dtype, resolve_device
from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.jsonfile import read_json
from workbench.io.paths import hub_snapshot
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.safetensors_format import layout
from workbench.io.writer import MODEL_SIDE_FILES, ShardPlan, TensorSpec, write_checkpoint
from workbench.outputs import Note, atomic_dir, check_can_write, check_not_input
from workbench.progress import progress_bar
from workbench.weights.adapters.lora import ADAPTER_CONFIG, PEFT_PREFIX, pattern_value
from workbench.weights.weight_diff import check_same_names, dtype_name, is_rotary_buffer, rows_of

ADAPTER_FILE = "adapter_model.safetensors"
RECORD_FILE = "extract_lora.json"
FORMAT_VERSION = 1
SVD = "torch.linalg.svd(full_matrices=False) in float32; B = U*sqrt(S), A = sqrt(S)*Vh"
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
OUTPUT_HEADS = ("lm_head", "embed_out")
TIED_HEAD = "lm_head"  # the output head's module where a checkpoint ties it to the input embeddings
TOKENIZER_FILES = tuple(name for name in MODEL_SIDE_FILES if name not in ("config.json", "generation_config.json"))
VERSIONED = ("torch", "safetensors")
SCRATCH_FILE = ".lora_factors.tmp"
LORA, EMBEDDING_LORA, WHOLE = "lora", "embedding_lora", "whole"


@dataclass
class ExtractResult:
    """What `extract_lora` wrote: OUT, and its record (also OUT/extract_lora.json)."""

    out: Path
    record: dict

    def lines(self) -> list[str]:
        record = self.record
        shown = [_tensor_line(name, entry) for name, entry in record["tensors"].items()]
        shown += [f"{module}: saved whole (modules_to_save): {', '.join(entry['changed'])} changed"
                  for module, entry in record["saved_whole"].items()]
        shown.append(self._summary())
        worst = record["worst"]
        if worst is not None:
            entry = record["tensors"][worst]
            shown.append(f"worst: {worst}, relative error {entry['relative_error']:.3e} "
                         f"(kept energy {entry['kept_energy']:.4%})")
        capped = [name for name, entry in record["tensors"].items() if entry["capped"]]
        if capped:
            shown.append(Note(f"note: rank {record['rank']} is above min(out, in) for {len(capped)} tensor(s) "
                              f"({capped[0]}{', ...' if len(capped) > 1 else ''}): capped there, where the "
                              "factorization is exact and no smaller than the delta"))
        return shown

    def _summary(self) -> str:
        record = self.record
        ranks = sorted({entry["rank"] for entry in record["tensors"].values()})
        if not ranks:
            rank_text = "no LoRA pairs"
        elif len(ranks) == 1:
            rank_text = f"LoRA rank {ranks[0]} on {len(record['tensors'])} tensor(s)"
        else:
            rank_text = f"LoRA ranks {ranks[0]}..{ranks[-1]} on {len(record['tensors'])} tensor(s)"
        size = record["adapter"]["files"][ADAPTER_FILE]["size"]
        return (f"wrote {self.out}: {rank_text}, {len(record['saved_whole'])} module(s) saved whole, "
                f"{record['unchanged']} tensor(s) unchanged and left out; {size / 1e6:.1f} MB, factors in "
                f"{record['dtype']}")

    def to_json(self) -> dict:
        return {"out": str(self.out), **self.record}


def _tensor_line(name: str, entry: dict) -> str:
    capped = " (capped at min(out, in))" if entry["capped"] else ""
    kind = ", embedding LoRA" if entry["kind"] == EMBEDDING_LORA else ""
    return (f"{name}: rank {entry['rank']}{capped}{kind}, relative error {entry['relative_error']:.3e}, "
            f"kept energy {entry['kept_energy']:.4%}")


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    rank: int,
    rank_by_energy: float | None = None,
    embed_lora: bool = False,
    dtype: str = "float32",
    device: str = "auto",
    force: bool = False,
    command: str | None = None,
) -> ExtractResult:
    """Write TUNED − RAW as a PEFT LoRA adapter folder at `out` (atomically) and return its record.

    `command`: the command line extract_lora.json records (None: this process's)."""
    out = Path(out)
    store = parse_dtype(dtype)
    if store is None:
        raise WorkbenchError("wb diff --lora-rank needs an explicit --dtype (float32, float16 or bfloat16)")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise WorkbenchError(f"--lora-rank must be a whole number >= 1, not {rank!r}")
    if rank_by_energy is not None and not 0.0 < rank_by_energy <= 1.0:
        raise WorkbenchError(f"--rank-by-energy must be in (0, 1], not {rank_by_energy!r}")
    torch_device = resolve_device(device)
    check_can_write(out, force)
    check_not_input(out, [base, tuned])
    raw, tun = open_checkpoint(base), open_checkpoint(tuned)
    names = _paired_names(raw, tun, Path(tuned))
    settings = _Settings(rank, rank_by_energy, embed_lora, store, torch_device)
    with atomic_dir(out, force, inputs=[base, tuned]) as tmp:
        spill = _FactorSpill(tmp / SCRATCH_FILE)
        try:
            plan = _Extraction(raw, tun, names, settings, spill).run()
            if not plan.factors:
                raise WorkbenchError("TUNED is bit-identical to RAW: there is no difference to extract" if not plan.whole
                                     else "no weight that a LoRA pair carries changed (only modules saved whole: "
                                     f"{', '.join(sorted(plan.whole)[:3])}), and peft refuses an adapter without LoRA "
                                     "pairs; publish it with wb diff without --lora-rank", tuned)
            tied_head = plan.tie_head(tun) if tied_embeddings(raw, tun) else None
            specs = plan.specs(tun, spill)
            report = write_checkpoint(tmp, [ShardPlan(ADAPTER_FILE, layout(specs, {"format": "pt"}))],
                                      lambda spec: plan.produce(spec, tun, spill), description="writing adapter")
        finally:
            spill.close()
        reference = base_reference(raw)
        config = adapter_config(plan, tun, reference, tied_head)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copied = [name for name in TOKENIZER_FILES if _copy(tun.root / name, tmp / name)]
        record = _record(plan, settings, raw, tun, Path(tuned), reference, report.files, copied, command)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ExtractResult(out, record)


# -- what changed, and what it becomes ------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    rank: int
    rank_by_energy: float | None
    embed_lora: bool
    store: torch.dtype
    device: torch.device


@dataclass
class _Factored:
    """One LoRA pair made: its module, kind and figures (the factors themselves are in the spill)."""

    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    capped: bool
    relative_error: float
    kept_energy: float


@dataclass
class _Plan:
    """Everything the adapter will hold, known once every tensor has been read."""

    store: torch.dtype  # the factors' dtype
    factors: dict[str, _Factored] = field(default_factory=dict)  # TUNED tensor name -> pair
    whole: dict[str, list[str]] = field(default_factory=dict)  # module saved whole -> its changed tensors
    whole_tensors: list[str] = field(default_factory=list)  # TUNED tensors saved whole, in TUNED's order
    unchanged: int = 0  # TUNED tensors left out of the adapter
    # adapter tensor -> (the adapter or TUNED tensor it repeats, transposed): a tied output head
    repeats: dict[str, tuple[str, bool]] = field(default_factory=dict)

    def specs(self, tuned: Checkpoint, spill: _FactorSpill) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        specs = []
        for pair in self.factors.values():
            (a_name, b_name), (a_shape, b_shape) = lora_names(pair.module, pair.kind), factor_shapes(pair)
            specs += [(a_name, self.store, a_shape), (b_name, self.store, b_shape)]
        specs += [(PEFT_PREFIX + name, tuned.infos[name].dtype, tuned.infos[name].shape) for name in self.whole_tensors]
        for name, (source, transposed) in self.repeats.items():
            dtype, shape = spill.entries[source][2:] if source in spill.entries else \
                (tuned.infos[source].dtype, tuned.infos[source].shape)
            specs.append((name, dtype, tuple(reversed(shape)) if transposed else shape))
        return specs

    def tie_head(self, tuned: Checkpoint) -> str | None:
        """Where the checkpoint ties its output head to a changed input embedding (no head tensor of
        its own), repeat the embedding's adapter tensors for the head, as peft's save_pretrained does
        with ensure_weight_tying: its loader looks for them. Returns the head's module name."""
        embeddings = [module for module in [*self.whole, *(pair.module for pair in self.factors.values())]
                      if module.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS]
        if len(embeddings) != 1 or f"{TIED_HEAD}.weight" in tuned:
            return None
        embedding = embeddings[0]
        if embedding in self.whole:
            self.repeats[f"{PEFT_PREFIX}{TIED_HEAD}.weight"] = (f"{embedding}.weight", False)
        else:  # peft ties the head's Linear pair to the embedding's: lora_A = B_emb.T, lora_B = A_emb.T
            a_name, b_name = lora_names(embedding, EMBEDDING_LORA)
            head_a, head_b = lora_names(TIED_HEAD, LORA)
            self.repeats.update({head_a: (b_name, True), head_b: (a_name, True)})
        return TIED_HEAD

    def produce(self, spec: TensorSpec, tuned: Checkpoint, spill: _FactorSpill) -> Iterable[torch.Tensor]:
        """A factor from the spill, or a tensor saved whole from TUNED, in row blocks."""
        source, transposed = self.repeats.get(spec.name, (spec.name, False))
        if source in spill.entries:
            factor = spill.read(source)
            return [factor.T.contiguous() if transposed else factor]
        tensor = tuned.tensor(source.removeprefix(PEFT_PREFIX))
        return (rows_of(tensor, start, stop) for start, stop in row_blocks(spec.shape))


def lora_names(module: str, kind: str) -> tuple[str, str]:
    """peft's saved names of a pair's A and B tensors."""
    if kind == EMBEDDING_LORA:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def factor_shapes(pair: _Factored) -> tuple[tuple[int, int], tuple[int, int]]:
    """(A's shape, B's shape): Linear (r, in) and (out, r); embedding (r, vocab) and (dim, r)."""
    rows, cols = pair.shape
    if pair.kind == EMBEDDING_LORA:
        rows, cols = cols, rows
    return (pair.rank, cols), (rows, pair.rank)


def _paired_names(raw: Checkpoint, tuned: Checkpoint, source: Path) -> list[str]:
    """TUNED's tensor names, once RAW is known to hold the same tensors in the same shapes.

    Rotary `inv_freq` buffers (saved by old transformers, never loaded) are not weights: skipped."""
    tuned_names = [name for name in tuned.names() if not is_rotary_buffer(name)]
    check_same_names(tuned_names, [name for name in raw.names() if not is_rotary_buffer(name)], "TUNED", "RAW", source)
    for name in tuned_names:
        mine, theirs = raw.infos[name].shape, tuned.infos[name].shape
        if mine != theirs:
            raise WorkbenchError(
                f"tensor {name!r} is {list(mine)} in RAW but {list(theirs)} in TUNED: a LoRA adapter needs equal "
                "shapes (for a resized vocabulary use wb diff without --lora-rank, which resizes RAW)", source)
    return tuned_names


def module_of(name: str) -> tuple[str, str]:
    """(module, parameter) of a tensor name: `model.norm.weight` -> (`model.norm`, `weight`)."""
    module, dot, param = name.rpartition(".")
    if not dot or not module:
        raise WorkbenchError(f"tensor {name!r} belongs to no module; a PEFT adapter cannot carry it")
    return module, param


def lora_kind(name: str, shape: tuple[int, ...], embed_lora: bool) -> str:
    """What a changed tensor becomes when its module is not saved whole for another reason."""
    module, param = module_of(name)
    leaf = module.rsplit(".", 1)[-1]
    if param != "weight" or len(shape) != 2:
        return WHOLE
    if leaf in INPUT_EMBEDDINGS:
        return EMBEDDING_LORA if embed_lora else WHOLE
    if leaf in OUTPUT_HEADS and not embed_lora:
        return WHOLE
    return LORA


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (dtype, shape and bytes): -0.0 differs from 0.0, a NaN equals itself."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class _Extraction:
    """The one pass over the inputs: compare, factorize, spill; one tensor at a time."""

    def __init__(self, raw: Checkpoint, tuned: Checkpoint, names: list[str], settings: _Settings, spill: _FactorSpill):
        self.raw, self.tuned, self.names, self.settings, self.spill = raw, tuned, names, settings, spill
        self.plan = _Plan(settings.store)

    def run(self) -> _Plan:
        whole_modules = self._modules_saved_whole()
        candidates = [name for name in self.names
                      if lora_kind(name, self.tuned.infos[name].shape, self.settings.embed_lora) != WHOLE
                      and module_of(name)[0] not in whole_modules]
        with progress_bar(sum(self.tuned.infos[name].nbytes for name in candidates), "extracting") as bar:
            for name in candidates:
                self._factor_if_changed(name)
                bar.update(self.tuned.infos[name].nbytes)
        self._settle_whole(whole_modules)
        return self.plan

    def _modules_saved_whole(self) -> dict[str, list[str]]:
        """Modules with a changed tensor that no LoRA pair can carry (norms, biases, embeddings
        without --embed-lora, ...), found before any SVD so that their weights are not factorized."""
        whole: dict[str, list[str]] = defaultdict(list)
        for name in self.names:
            if lora_kind(name, self.tuned.infos[name].shape, self.settings.embed_lora) == WHOLE and self._changed(name):
                whole[module_of(name)[0]].append(name)
        return whole

    def _changed(self, name: str) -> bool:
        base, tuned = self.raw.tensor(name), self.tuned.tensor(name)
        if same_bytes(base, tuned):
            return False
        for label, tensor in (("RAW", base), ("TUNED", tuned)):
            if not tensor.is_floating_point():
                raise WorkbenchError(f"tensor {name!r} differs between RAW and TUNED and is {tensor.dtype} in {label}: "
                                     "only floating-point weights can be published as a LoRA adapter", self.tuned.root)
        return True

    def _factor_if_changed(self, name: str) -> None:
        if not self._changed(name):
            return
        delta = self._delta(name)
        if not bool(delta.any()):  # only signs of zeros differ: nothing a merge would change
            return
        kind = lora_kind(name, tuple(delta.shape), self.settings.embed_lora)
        matrix = delta.T.contiguous() if kind == EMBEDDING_LORA else delta
        del delta
        pair = factorize(matrix, self.settings.rank, self.settings.rank_by_energy, self.settings.store)
        if not math.isfinite(pair.relative_error):
            raise WorkbenchError(f"tensor {name!r}: its LoRA factors overflow {dtype_name(self.settings.store)}; "
                                 "choose a wider --dtype", self.tuned.root)
        module = module_of(name)[0]
        a_name, b_name = lora_names(module, kind)
        self.spill.append(a_name, pair.a)
        self.spill.append(b_name, pair.b)
        self.plan.factors[name] = _Factored(module, kind, tuple(self.tuned.infos[name].shape), pair.rank, pair.capped,
                                            pair.relative_error, pair.kept_energy)

    def _delta(self, name: str) -> torch.Tensor:
        device = self.settings.device
        delta = self.tuned.tensor(name).to(device, torch.float32, copy=True)  # never in place on the mapped file
        delta -= self.raw.tensor(name).to(device, torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise WorkbenchError(f"tensor {name!r}: TUNED - RAW holds NaN or inf (a damaged input?)", self.tuned.root)
        return delta

    def _settle_whole(self, whole_modules: dict[str, list[str]]) -> None:
        """Every tensor of a module saved whole goes in (peft loads a module's tensors together);
        what is neither factorized nor saved whole is left out."""
        self.plan.whole = dict(whole_modules)
        self.plan.whole_tensors = [name for name in self.names if module_of(name)[0] in whole_modules]
        self.plan.unchanged = len(self.names) - len(self.plan.factors) - len(self.plan.whole_tensors)


# -- the factorization -----------------------------------------------------------------------------
@dataclass
class Factors:
    b: torch.Tensor  # (out, r), in the storage dtype, on the CPU
    a: torch.Tensor  # (r, in)
    rank: int
    capped: bool  # the requested rank was above min(out, in)
    relative_error: float  # ||delta - B @ A||_F / ||delta||_F, of the stored factors
    kept_energy: float  # sum_{i<r} s_i^2 / sum s_i^2


def factorize(delta: torch.Tensor, rank: int, energy: float | None, store: torch.dtype) -> Factors:
    """The truncated SVD of a float32 matrix `delta` (out, in), split evenly between B and A.

    `energy`: pick the smallest rank keeping that fraction of sum(s^2), capped by `rank`."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    energies = s.to(torch.float64).square()
    total = float(energies.sum())
    capped = rank > s.numel()
    chosen = min(rank, s.numel())
    if energy is not None:
        cumulative = energies.cumsum(0)
        needed = int(torch.searchsorted(cumulative, torch.tensor([energy * total], dtype=torch.float64,
                                                                  device=cumulative.device))[0]) + 1
        chosen = min(chosen, needed)
    root = s[:chosen].sqrt()
    b = (u[:, :chosen] * root).to(store)
    a = (root[:, None] * vh[:chosen]).to(store)
    del u, vh
    kept = float(energies[:chosen].sum()) / total if total > 0 else 1.0
    error = relative_error(delta, b, a)
    return Factors(b.cpu(), a.cpu(), chosen, capped, error, kept)


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """||delta - B @ A||_F / ||delta||_F with the factors as stored, in float32 row blocks."""
    a32 = a.to(delta.device, torch.float32)
    b32 = b.to(delta.device, torch.float32)
    residual = reference = 0.0
    for start, stop in row_blocks(tuple(delta.shape)):
        rows = delta[start:stop]
        reference += float(torch.linalg.vector_norm(rows, dtype=torch.float64)) ** 2
        left = torch.addmm(rows, b32[start:stop], a32, alpha=-1.0)
        residual += float(torch.linalg.vector_norm(left, dtype=torch.float64)) ** 2
    return math.sqrt(residual / reference) if reference > 0 else 0.0


class _FactorSpill:
    """Factors go to a scratch file in OUT's temporary as they are made (memory holds one pair),
    and are read back when the adapter is written."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "w+b")  # noqa: SIM115 - closed by close()
        # adapter tensor name -> (offset, bytes, dtype, shape)
        self.entries: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}

    def append(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.entries[name] = (self.handle.tell(), data.nbytes, tensor.dtype, tuple(tensor.shape))
        self.handle.write(memoryview(data).cast("B"))

    def read(self, name: str) -> torch.Tensor:
        offset, nbytes, dtype, shape = self.entries[name]
        self.handle.flush()
        self.handle.seek(offset)
        return torch.frombuffer(bytearray(self.handle.read(nbytes)), dtype=dtype).reshape(shape)

    def close(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


# -- adapter_config.json -------------------------------------------------------------------------
def adapter_config(plan: _Plan, tuned: Checkpoint, reference: dict, tied_head: str | None) -> dict:
    """The PEFT LoraConfig that loads this adapter: scale alpha/r = 1 for every module."""
    ranks = {pair.module: pair.rank for pair in plan.factors.values()}
    common = max(Counter(ranks.values()).items(), key=lambda item: (item[1], item[0]))[0] if ranks else 1
    pattern = {module: value for module, value in ranks.items() if value != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": reference["base_model_name_or_path"],
        "revision": reference["revision"],
        "r": common,
        "lora_alpha": common,
        "rank_pattern": rank_patterns(pattern, ranks, common),
        "alpha_pattern": rank_patterns(pattern, ranks, common),
        "target_modules": target_modules(list(ranks), (module_of(name)[0] for name in tuned.names())),
        "modules_to_save": sorted(plan.whole) or None,
        "ensure_weight_tying": tied_head is not None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def rank_patterns(pattern: dict[str, int], ranks: dict[str, int], default: int) -> dict[str, int]:
    """`rank_pattern` keyed by full module names, as peft writes them itself; peft matches keys as
    regular expressions at a dot boundary (`get_pattern_key`), where a `.` of a name matches any
    character, so the plain names are checked to resolve to each module's own rank, and escaped
    where they would not."""
    for candidate in (pattern, {re.escape(module): value for module, value in pattern.items()}):
        if all(pattern_value(candidate, module, default) == rank for module, rank in ranks.items()):
            return candidate
    raise AssertionError("escaped module names always match only their own module")


def target_modules(adapted: list[str], modules: Iterable[str]) -> list[str]:
    """A module's short name (`q_proj`) where every module of that name is adapted, else the full
    names: peft matches a target by equality or as a `.`-suffix of the module name."""
    by_leaf: dict[str, set[str]] = defaultdict(set)
    for module in modules:
        by_leaf[module.rsplit(".", 1)[-1]].add(module)
    mine: dict[str, set[str]] = defaultdict(set)
    for module in adapted:
        mine[module.rsplit(".", 1)[-1]].add(module)
    chosen: list[str] = []
    for leaf in sorted(mine):
        chosen += [leaf] if mine[leaf] == by_leaf[leaf] else sorted(mine[leaf])
    return chosen


def tied_embeddings(raw: Checkpoint, tuned: Checkpoint) -> bool:
    """Whether the model ties its output head to its input embeddings (config.json says so)."""
    for root in (tuned.root, raw.root):
        if (root / "config.json").is_file():
            config = read_json(root / "config.json", "config.json")
            if isinstance(config, dict):
                text = config.get("text_config")
                tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings") if isinstance(text, dict) else None)
                return tie is True
    return False


def base_reference(raw: Checkpoint) -> dict:
    """`base_model_name_or_path` (and `revision`): the repository id of a hub-cache snapshot
    (`models--org--name/snapshots/<rev>`), else RAW's folder as an absolute path."""
    folder = raw.root.absolute()
    snapshot = hub_snapshot(folder)
    if snapshot:
        return {"base_model_name_or_path": snapshot[0], "revision": snapshot[1], "path": str(folder)}
    return {"base_model_name_or_path": str(folder), "revision": None, "path": str(folder)}


def _copy(source: Path, target: Path) -> bool:
    if not source.is_file():
        return False
    target.write_bytes(source.read_bytes())
    return True


# -- extract_lora.json ---------------------------------------------------------------------------
def _record(plan: _Plan, settings: _Settings, raw: Checkpoint, tuned: Checkpoint, tuned_path: Path, reference: dict,
            files: dict, copied: list[str], command: str | None) -> dict:
    tensors = {
        name: {"module": pair.module, "kind": pair.kind, "shape": list(pair.shape), "rank": pair.rank,
               "capped": pair.capped, "relative_error": pair.relative_error, "kept_energy": pair.kept_energy}
        for name, pair in plan.factors.items()
    }
    worst = max(plan.factors, key=lambda name: plan.factors[name].relative_error, default=None)
    return {
        "wb_extract_lora_version": FORMAT_VERSION,
        "created_by": f"wb {__version__}",
        "provenance": provenance.record(VERSIONED, command),
        "base": {"path": reference["path"], "format": raw.format, "tensors": len(raw.infos),
                 "base_model_name_or_path": reference["base_model_name_or_path"], "revision": reference["revision"]},
        "tuned": {"path": str(tuned_path.absolute()), "format": tuned.format, "tensors": len(tuned.infos)},
        "rank": settings.rank,
        "rank_by_energy": settings.rank_by_energy,
        "embed_lora": settings.embed_lora,
        "dtype": dtype_name(settings.store),
        "device": str(settings.device),
        "svd": SVD,
        "tensors": tensors,
        "saved_whole": {module: {"changed": names, "tensors": [n for n in plan.whole_tensors
                                                               if module_of(n)[0] == module]}
                        for module, names in plan.whole.items()},
        "unchanged": plan.unchanged,
        "worst": worst,
        "adapter": {"files": files, "side_files": copied},
    }
