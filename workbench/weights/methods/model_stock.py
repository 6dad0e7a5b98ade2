"""mergekit 0.1.5's `model_stock` (Model Stock, Jang et al. 2024): move the base toward the average
of the fine-tunes by t = N·cos θ / (1 + (N − 1)·cos θ), cos θ the mean pairwise cosine of their task
vectors (one per tensor, or per row with `filter_wise`); t = 0 (the base) where the denominator
vanishes (|·| < 1e-6).

Per tensor (the default) the cosines are over the whole tensor: one pass gathers the task
vectors' Gram matrix (float64), then each row block is t·average + (1 − t)·base. `filter_wise`
is row-local (a vector is one row)."""

from __future__ import annotations

import math

import torch

from workbench.weights.methods.base import Param, TensorInputs
from workbench.weights.methods.spherical import MERGEKIT, count_models
from workbench.weights.methods.streaming import Gram, Passes, StreamedMethod


class ModelStock(StreamedMethod):
    """Base and at least two models; no per-model parameters."""

    name = "model_stock"
    params = (Param("filter_wise", bool, False),)
    base_model = "required"
    reference = f"{MERGEKIT} merge_methods/model_stock.py"

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        count_models(first, self.name, 2)
        return FilterWise() if first.params["filter_wise"] else PerTensor(len(first.models))


def interpolation(cos: torch.Tensor, count: int) -> torch.Tensor:
    """t = N·cos / (1 + (N − 1)·cos), 0 where the denominator is below 1e-6."""
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, count * cos / torch.where(singular, 1, denominator))


def stock(base: torch.Tensor, models: list[torch.Tensor], t: torch.Tensor | float) -> torch.Tensor:
    """t·(mean of the models) + (1 − t)·base."""
    return t * (sum(models) / len(models)) + (1 - t) * base


class PerTensor(Passes):
    """One cosine per tensor, from the task vectors' Gram matrix."""

    passes = 1

    def __init__(self, count: int):
        self.gram, self.t = Gram(count), 0.0

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        self.gram.add([m - block.base for m in block.models])

    def finish(self, pass_index: int) -> None:
        g = self.gram.matrix
        count = g.shape[0]
        cosines = [max(-1.0, min(1.0, float(g[i, j]) / max(math.sqrt(g[i, i]) * math.sqrt(g[j, j]), 1e-6)))
                   for i in range(count) for j in range(i + 1, count)]
        self.t = float(interpolation(torch.tensor(sum(cosines) / len(cosines), dtype=torch.float64), count))

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        return stock(block.base, block.models, self.t)


class FilterWise(Passes):
    """One cosine per last-axis fibre (a matrix's rows; a vector is one): no pass."""

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        base, models = block.base, block.models
        shape = base.shape
        if base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
        offsets = [m - base for m in models]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        t = interpolation(torch.stack(cosines).mean(dim=0).unsqueeze(-1), len(models))
        return stock(base, models, t).reshape(shape)
