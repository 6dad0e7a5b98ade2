"""How several task vectors (deltas) of one tensor combine: linear, TIES, DARE.

The definitions follow the TIES-Merging (Yadav et al., 2023) and DARE (Yu et al., 2023) papers as
peft implements them in `peft.utils.merge_utils` (which `add_weighted_adapter` uses on full deltas
for its `*_svd` combination types):

- linear:      Σ wᵢ·τᵢ
- ties:        trim each τᵢ to its top `density` fraction by magnitude (over the whole tensor), elect
               each entry's sign by the sign of Σ trimmed τᵢ, then Σ wᵢ·τᵢ over the agreeing entries
               divided by how many agree (the paper's disjoint mean, weights applied inside it)
- dare_linear: drop each entry with probability 1 − density, rescale survivors by 1/density, Σ wᵢ·τᵢ
- dare_ties:   DARE's drop-and-rescale, then TIES's sign election and disjoint mean

Each function takes whole tensors: the trim threshold and the sign election are over the whole
tensor, so these methods hold one full float32 delta per adapter for the tensor being merged.
DARE's masks come from the `generator` given (see `tensor_seed`), drawn on the CPU in adapter
order, so a seed gives the same model on any device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

METHODS = ("linear", "ties", "dare_linear", "dare_ties")


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's DARE generator: stable across runs, machines and tensor order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries, zero the rest, in place.

    peft and mergekit pick them with topk/argsort; a k-th-value threshold keeps the same entries
    (and every entry tied with the k-th, where topk would choose arbitrarily), in linear time and
    without topk's index tensor (4x faster on a 7B embedding)."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    if keep == 0:
        return tensor.zero_()
    magnitude = tensor.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude.cpu(), magnitude.numel() - keep + 1).values.to(tensor.device)
    return tensor.masked_fill_(magnitude.reshape(tensor.shape) < threshold, 0.0)


def random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density, in place."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=generator)
    return tensor.mul_(mask.to(tensor.device)).div_(density)


def disjoint_mean(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES's sign election ("total": the sign of the summed entries, a zero sum counting as +)
    and the mean of the weighted entries that agree with it, divided by how many agree. The
    same arithmetic as peft's, one adapter at a time, holding no stacked copies."""
    total = torch.zeros_like(tasks[0])
    for task in tasks:
        total += task
    positive = total >= 0
    del total
    mixed = torch.zeros_like(tasks[0])
    agreeing = torch.zeros_like(tasks[0])
    for task, weight in zip(tasks, weights):
        agree = torch.where(positive, task > 0, task < 0)  # sign(task) == elected sign; zeros never agree
        mixed += torch.where(agree, task * weight, 0.0)
        agreeing += agree
    return mixed / agreeing.clamp_(min=1.0)


def combine(
    method: str,
    tasks: list[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The merged task vector of one tensor. `tasks` (float32, same shape) are pruned in place."""
    if method == "linear":
        merged = torch.zeros_like(tasks[0])
        for task, weight in zip(tasks, weights):
            merged += task * weight
        return merged
    if method == "ties":
        return disjoint_mean([magnitude_prune(t, density) for t in tasks], weights)
    if method in ("dare_linear", "dare_ties"):
        if generator is None:
            raise ValueError("DARE needs a seeded generator")
        pruned = [random_prune(t, density, generator) for t in tasks]
        return combine("linear", pruned, weights, density) if method == "dare_linear" else disjoint_mean(pruned, weights)
    raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
