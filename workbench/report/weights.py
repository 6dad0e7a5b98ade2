"""Relative weight change ‖ΔW‖/‖W‖ per layer and module, streamed one tensor (block) at a time.

Both checkpoints are opened through the io layer, so tensors are read-only views of mapped files;
squared norms are accumulated in float64 over blocks of at most `io.blocks.BLOCK_ELEMENTS` elements,
which bounds memory by a few blocks whatever the model size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.io.blocks import BLOCK_ELEMENTS
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.weightsum import float64_sum
from workbench.progress import progress_bar
from workbench.provenance import weight_fingerprints
from workbench.report.load import load_side_record

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")
_PARAM_SUFFIXES = (".weight", ".bias")


@dataclass
class ModelWeights:
    """A checkpoint's identity: where it is, the sha256 of each weight file, its float64 weight-sum
    (filled in by the first comparison's pass over its tensors)."""

    name: str
    path: Path
    files: dict[str, str]
    weight_sum: float | None
    format: str
    tensors: int
    record: tuple[str, dict[str, Any]] | None  # merge.json / weight_diff.json found beside it


@dataclass
class Norms:
    delta_sq: float = 0.0
    base_sq: float = 0.0

    def add(self, other: Norms) -> None:
        self.delta_sq += other.delta_sq
        self.base_sq += other.base_sq

    @property
    def relative(self) -> float | None:
        """‖ΔW‖/‖W‖, or None where ‖W‖ is zero (a relative change is undefined there)."""
        if self.base_sq == 0.0:
            return None
        return (self.delta_sq / self.base_sq) ** 0.5


@dataclass
class WeightComparison:
    base: ModelWeights
    tuned: ModelWeights
    layers: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    cells: dict[tuple[int, str], Norms] = field(default_factory=dict)
    others: dict[str, Norms] = field(default_factory=dict)  # tensors outside the layer stack
    total: Norms = field(default_factory=Norms)
    only_base: list[str] = field(default_factory=list)
    only_tuned: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def parse_weight_spec(text: str) -> tuple[str, Path]:
    """`NAME=PATH` or a bare `PATH` (named after its folder)."""
    name, sep, path_text = text.partition("=")
    if not sep:
        name, path_text = "", text
    path = Path(path_text)
    if not path_text or not path.exists():
        raise WorkbenchError("--weights: no such checkpoint", path_text or text)
    if not name:
        resolved = path.resolve()
        name = (resolved if resolved.is_dir() else resolved.parent).name
    return name, path


def layer_and_module(tensor_name: str) -> tuple[int | None, str]:
    """`model.layers.3.self_attn.q_proj.weight` -> (3, "q_proj"); `lm_head.weight` -> (None, "lm_head")."""
    stem = tensor_name
    for suffix in _PARAM_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _LAYER.search(stem)
    if match is None:
        return None, stem
    return int(match.group(1)), match.group(2).rsplit(".", 1)[-1]


def tensor_norms(base: torch.Tensor, tuned: torch.Tensor) -> Norms:
    """Σ(tuned − base)² and Σbase² in float64, block by block."""
    flat_base, flat_tuned = base.reshape(-1), tuned.reshape(-1)
    norms = Norms()
    for start in range(0, flat_base.numel(), BLOCK_ELEMENTS):
        b = flat_base[start:start + BLOCK_ELEMENTS].to(torch.float64)
        t = flat_tuned[start:start + BLOCK_ELEMENTS].to(torch.float64)
        norms.delta_sq += float(torch.sum((t - b) ** 2))
        norms.base_sq += float(torch.sum(b * b))
    return norms


def fingerprint(name: str, path: Path) -> ModelWeights:
    """sha256 of every weight file, as `wb checksum --algo sha256` reports them. The weight-sum is
    not taken here: `compare_weights` takes it in its own pass over the tensors."""
    files = weight_fingerprints(path)
    with open_checkpoint(path) as ckpt:
        fmt, tensors = ckpt.format, len(ckpt)
    return ModelWeights(name, path, files, None, fmt, tensors, load_side_record(path))


def compare_weights(base: ModelWeights, tuned: ModelWeights) -> WeightComparison:
    """Walk the tensors both checkpoints hold and sum the squared norms per (layer, module)."""
    comparison = WeightComparison(base, tuned)
    with open_checkpoint(base.path) as base_ckpt, open_checkpoint(tuned.path) as tuned_ckpt:
        common = [name for name in base_ckpt.names() if name in tuned_ckpt]
        if not common:
            raise WorkbenchError(
                f"no tensor names in common with {base.path}; an adapter must be merged first (wb merge)", tuned.path
            )
        comparison.only_base = [n for n in base_ckpt.names() if n not in tuned_ckpt]
        comparison.only_tuned = [n for n in tuned_ckpt.names() if n not in base_ckpt]
        sums: tuple[dict[str, float], dict[str, float]] = ({}, {})
        _accumulate(comparison, base_ckpt, tuned_ckpt, common, sums)
        for model, ckpt, tensor_sums in ((base, base_ckpt, sums[0]), (tuned, tuned_ckpt, sums[1])):
            if model.weight_sum is None:
                model.weight_sum = _weight_sum(ckpt, tensor_sums)
    return comparison


def _weight_sum(ckpt: Checkpoint, tensor_sums: dict[str, float]) -> float:
    """The float64 weight-sum, added tensor by tensor in file order as `wb checksum --weight-sum`
    adds it (so the two agree to the last bit); tensors the norm pass skipped are summed here."""
    total = 0.0
    for name in ckpt.names():
        total += tensor_sums[name] if name in tensor_sums else float64_sum(ckpt.tensor(name))
    return total


def _accumulate(comparison: WeightComparison, base_ckpt: Checkpoint, tuned_ckpt: Checkpoint, names: list[str],
                sums: tuple[dict[str, float], dict[str, float]]) -> None:
    """One pass over the tensors both hold: squared norms per (layer, module), and each tensor's
    float64 sum for the weight-sums while its pages are in hand."""
    total_bytes = sum(base_ckpt.infos[n].nbytes for n in names)
    with progress_bar(total_bytes, f"ΔW {comparison.tuned.name}") as bar:
        for name in names:
            base_info, tuned_info = base_ckpt.infos[name], tuned_ckpt.infos[name]
            bar.update(base_info.nbytes)
            if base_info.shape != tuned_info.shape:
                comparison.reshaped.append((name, base_info.shape, tuned_info.shape))
                continue
            if not (base_info.dtype.is_floating_point and tuned_info.dtype.is_floating_point):
                continue
            base_tensor, tuned_tensor = base_ckpt.tensor(name), tuned_ckpt.tensor(name)
            sums[0][name], sums[1][name] = float64_sum(base_tensor), float64_sum(tuned_tensor)
            norms = tensor_norms(base_tensor, tuned_tensor)
            comparison.total.add(norms)
            layer, module = layer_and_module(name)
            if layer is None:
                comparison.others.setdefault(module, Norms()).add(norms)
                continue
            if layer not in comparison.layers:
                comparison.layers.append(layer)
            if module not in comparison.modules:
                comparison.modules.append(module)
            comparison.cells.setdefault((layer, module), Norms()).add(norms)
    comparison.layers.sort()


def weight_comparisons(pairs: list[tuple[str, str]]) -> list[WeightComparison]:
    """One comparison per `(BASE=PATH, TUNED=PATH)` pair; a checkpoint used twice is hashed once."""
    fingerprints: dict[tuple[str, Path], ModelWeights] = {}

    def model(spec: str) -> ModelWeights:
        name, path = parse_weight_spec(spec)
        key = (name, path.resolve())
        if key not in fingerprints:
            fingerprints[key] = fingerprint(name, path)
        return fingerprints[key]

    return [compare_weights(model(base), model(tuned)) for base, tuned in pairs]
