"""mergekit 0.1.5's `arcee_fusion`: keep the model's changes only where they matter most.

Importance of each entry = |p − b| · KL(softmax(p) ‖ softmax(b)), the KL divergence taken along the
last axis (one value per row, 1e-8 added to both distributions); the model's change is kept where
importance ≥ median + 1.5·(q3 − q1) of all the tensor's importances, else the base stays.

mergekit takes the quartiles from a sorted sample of 1,000,000 entries drawn at random (unseeded)
when the tensor is larger; wb takes the exact quartiles of every entry (the same index rule,
⌊q·(n − 1)⌋ of the sorted importances, `trim.Ranks`), so it is deterministic and equals mergekit
exactly up to 1,000,000 entries. Two passes find the quartiles, then each row block is merged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.weights.methods.base import TensorInputs
from workbench.weights.methods.spherical import MERGEKIT, count_models
from workbench.weights.methods.streaming import Passes, StreamedMethod
from workbench.weights.methods.trim import Ranks


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|p − b| times the row's KL(softmax(p) ‖ softmax(b))."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs_().mul_(divergence)


def quartile_ranks(numel: int) -> list[int]:
    """The 1-based descending ranks of mergekit's q1, median and q3: its float32 positions
    ⌊q·(n − 1)⌋ of the ascending order."""
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (numel - 1)).long().tolist()
    return [numel - position for position in positions]


class ArceeFusion(StreamedMethod):
    """Base and exactly one model; no parameters."""

    name = "arcee_fusion"
    params = ()
    base_model = "required"
    reference = f"{MERGEKIT} merge_methods/arcee_fusion.py"

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        count_models(first, self.name, 1, 1)
        return FusionPasses(numel, first.base.device)


class FusionPasses(Passes):
    """Two passes over the importances for the exact quartiles, then the masked merge."""

    passes = Ranks.passes

    def __init__(self, numel: int, device: torch.device):
        self.ks = quartile_ranks(numel)
        self.ranks = Ranks(self.ks, device)
        self.threshold = 0.0

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        self.ranks.observe(pass_index, importance(block.models[0], block.base))

    def finish(self, pass_index: int) -> None:
        self.ranks.finish(pass_index)
        if pass_index == self.passes - 1:
            q1, median, q3 = (torch.tensor(self.ranks.value[k]) for k in self.ks)
            self.threshold = float(median + 1.5 * (q3 - q1))  # in float32, as mergekit

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        base, model = block.base, block.models[0]
        keep = importance(model, base) >= self.threshold
        return model.sub_(base).mul_(keep).add_(base)
