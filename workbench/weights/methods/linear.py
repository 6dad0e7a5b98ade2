"""linear: base + Σ wᵢ·τᵢ, task arithmetic, evaluated one row block at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from workbench.weights.methods.base import WEIGHTS, MergeBlock, MergeMethod


def weighted_sum(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·τᵢ, a new tensor."""
    merged = torch.zeros_like(tasks[0])
    for task, weight in zip(tasks, weights):
        merged += task * weight
    return merged


class Linear(MergeMethod):
    """Σ wᵢ·τᵢ: each output row needs only the same row of every input, so it streams."""

    name = "linear"
    params = (WEIGHTS,)
    row_blocks = True

    def combine(self, tasks: list[torch.Tensor], weights: Sequence[float], options: Mapping[str, Any],
                generator: torch.Generator | None = None) -> torch.Tensor:
        return weighted_sum(tasks, weights)

    def merge(self, block: MergeBlock) -> torch.Tensor:
        """The same sum with no τ formed: each adapter is added straight into one reused float32
        buffer (a LoRA delta as one fused product). When exactly one adapter replaces the tensor and
        its weight is 1, start from its tensor instead: the same sum, and exactly what peft's
        modules_to_save (or a lone fine-tune) gives."""
        replacing = [i for i in range(len(block.sources)) if block.replacement(i) is not None]
        anchor = replacing[0] if len(replacing) == 1 and block.weights[replacing[0]] == 1.0 else None
        first = block.base if anchor is None else block.replacement(anchor)
        acc = block.scratch(first.shape)
        acc.copy_(first)
        for i, weight in enumerate(block.weights):
            if i in replacing and i != anchor:
                task = block.fetch(block.replacement(i)) - block.fetch(block.base)
                acc.add_(task, alpha=weight)
            block.add_delta(i, acc, weight)
        return acc
