"""The "weight-sum" integrity check: the sum of every element of every tensor, in float64.

Stanford Alpaca and KnowLM publish such a sum for their recovered models. Summing in float64, in
row blocks, keeps the figure stable to ~1e-12 relative and the memory bounded by one block.
"""

from __future__ import annotations

import math

import torch

from workbench.io.blocks import BLOCK_ELEMENTS
from workbench.io.reader import Checkpoint


def float64_sum(tensor: torch.Tensor) -> float:
    """The float64 sum of every element, over blocks of BLOCK_ELEMENTS of the flat view: a 16 MB
    float64 buffer the allocator reuses, instead of a fresh full-size one."""
    flat = tensor.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), BLOCK_ELEMENTS):
        total += float(flat[start:start + BLOCK_ELEMENTS].to(torch.float64).sum())
    return total


def checkpoint_weight_sum(checkpoint: Checkpoint, on_bytes=None) -> float:
    total = 0.0
    for name, tensor in checkpoint.iter_tensors():
        total += float64_sum(tensor)
        if on_bytes is not None:
            on_bytes(checkpoint.infos[name].nbytes)
    return total


def gains_non_finite(result: torch.Tensor, source: torch.Tensor) -> bool:
    """True when `result` holds NaN or inf and `source`, what it was computed from, holds none: the
    sign of a damaged or crafted input (a merge or a recovery must not invent them). The float32 sum
    is the fast test (finite whenever every entry is, short of sums near 3e38); only a non-finite
    sum pays for the exact one."""
    if math.isfinite(float(result.sum(dtype=torch.float32))):
        return False
    return not bool(torch.isfinite(result).all()) and bool(torch.isfinite(source).all())
