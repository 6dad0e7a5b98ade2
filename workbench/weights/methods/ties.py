"""peft's TIES and DARE: `peft_ties`, `peft_dare_linear`, `peft_dare_ties`.

The definitions of `peft.utils.merge_utils` (which `add_weighted_adapter` uses on full deltas for its
`*_svd` combination types), kept under their own names beside mergekit's `ties` / `dare_*` (whose
sign election weighs the deltas and whose mean divides by the agreeing weights, so the same words
give other numbers):

- peft_ties:        trim each τᵢ to its top `density` fraction by magnitude (over the whole tensor),
                    elect each entry's sign by the sign of Σ trimmed τᵢ, then Σ wᵢ·τᵢ over the
                    agreeing entries divided by how many agree (the paper's disjoint mean)
- peft_dare_linear: drop each entry with probability 1 − density, rescale survivors by 1/density, Σ wᵢ·τᵢ
- peft_dare_ties:   DARE's drop-and-rescale, then TIES's sign election and disjoint mean

τᵢ = modelᵢ − base. As in peft, only the models that touch a tensor take part in its merge: a model
whose tensor is the base's own adds nothing and draws no random mask (to peft_ties such a τ is all
zeros, which never agree with an elected sign: the same numbers). Trimming keeps exactly
k = int(density · numel) entries; of entries tied at the threshold, the earlier ones by flat index
(`trim.Window`; peft's topk chooses among them arbitrarily).

The three stream as `streaming.StreamedMethod`s. peft_ties finds each τ's exact threshold in two
histogram passes over the row blocks (`task_vectors.ByMagnitude`, mergekit's ties' trim), after which the trim, the sign election and
the mean are entry by entry, so it holds a few row blocks per model, never a whole τ. DARE's masks
come from the tensor's generator, drawn on the CPU over the whole tensor in model order (peft's
draws), so the DARE variants merge whole tensors; a seed gives the same model on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.weights.methods.base import WEIGHT, Param, TensorInputs, weighted_sum
from workbench.weights.methods.streaming import Passes, StreamedMethod
from workbench.weights.methods.task_vectors import ByMagnitude, SparsifiedPasses, Sparsifier

DENSITY = Param("density", float, 0.5, low=0, high=1)  # the fraction of each τ kept, in (0, 1]
SPARSIFY = ("magnitude", "random")
PEFT_REFERENCE = "peft 0.21 utils/merge_utils.py ({})"


@dataclass(frozen=True)
class PeftTaskArithmetic(StreamedMethod):
    """Sparsify each τᵢ to `density` (`magnitude`: its top entries; `random`: DARE's drop and
    rescale), then the disjoint mean of the agreeing signs (`sign_election`) or the plain weighted sum."""

    name: str
    sparsify: str
    sign_election: bool

    params = (WEIGHT, DENSITY)
    base_model = "required"

    def __post_init__(self) -> None:
        if self.sparsify not in SPARSIFY:
            raise ValueError(f"sparsify must be one of {', '.join(SPARSIFY)}, not {self.sparsify!r}")

    @property
    def reference(self) -> str:
        return PEFT_REFERENCE.format(self.name.removeprefix("peft_"))

    def merged_whole(self, first: TensorInputs) -> bool:
        """DARE's masks are drawn over the whole tensor, model after model (peft's order)."""
        return self.sparsify == "random" or super().merged_whole(first)

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        if self.sparsify == "random":
            return DarePasses(self.sign_election)
        density = first.params["density"]
        keep = numel if density >= 1 else int(density * numel)
        return PeftTiesPasses([Sparsifier() if keep >= numel else ByMagnitude(numel, 0, keep, False, first.base.device)
                               for _ in first.models])


class PeftTiesPasses(SparsifiedPasses):
    """One tensor of peft_ties: each τ's top-k window over two histogram passes (mergekit's ties'
    trim, without its minimum of one entry), then per block the trimmed τs' disjoint mean, plus the base."""

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        if not block.models:
            return block.base.clone()
        tasks = self.sparsified(block, offset)
        return disjoint_mean(tasks, [p["weight"] for p in block.model_params]).add_(block.base)


class DarePasses(Passes):
    """One whole tensor of peft_dare_*: the touching models' τs dropped and rescaled, then their
    disjoint mean (`sign_election`) or weighted sum, plus the base."""

    def __init__(self, sign_election: bool):
        self.sign_election = sign_election

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        base, density = block.base, block.params["density"]
        touching = [i for i, model in enumerate(block.models) if not torch.equal(model, base)]
        if not touching:
            return base.clone()
        if block.generator is None:
            raise ValueError("random sparsification (DARE) needs a seeded generator")
        pruned = [random_prune(block.models[i].sub_(base), density, block.generator) for i in touching]
        weights = [block.model_params[i]["weight"] for i in touching]
        merged = disjoint_mean(pruned, weights) if self.sign_election else weighted_sum(pruned, weights)
        return merged.add_(base)


def random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density, in place."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=generator)
    return tensor.mul_(mask.to(tensor.device)).div_(density)


def disjoint_mean(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES's sign election ("total": the sign of the summed entries, a zero sum counting as +)
    and the mean of the weighted entries that agree with it, divided by how many agree. The
    same arithmetic as peft's, one model at a time, holding no stacked copies."""
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


PEFT_METHODS: tuple[PeftTaskArithmetic, ...] = (
    PeftTaskArithmetic("peft_ties", sparsify="magnitude", sign_election=True),
    PeftTaskArithmetic("peft_dare_linear", sparsify="random", sign_election=False),
    PeftTaskArithmetic("peft_dare_ties", sparsify="random", sign_election=True),
)
