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
whose tensor is the base's own adds nothing and draws no random mask. Trimming keeps exactly
k = int(density · numel) entries; of entries tied at the threshold, the earlier ones (`trim`'s
order; peft's topk chooses among them arbitrarily). peft_ties streams: its per-τ threshold comes
from two passes of histograms over the row blocks (`ExactTrim`), after which the trim, the sign
election and the mean are entry by entry, so it holds a few row blocks per model, never a whole τ.
DARE's masks come from the tensor's generator, drawn on the CPU over the whole tensor in model order
(peft's draws), so the DARE variants take whole tensors; a seed gives the same model on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.weights.methods.base import WEIGHT, MergeMethod, Param, TensorInputs
from workbench.weights.methods.trim import top_k_mask

DENSITY = Param("density", float, 0.5, low=0, high=1)  # the fraction of each τ kept, in (0, 1]
SPARSIFY = ("magnitude", "random")
PEFT_REFERENCE = "peft 0.21 utils/merge_utils.py ({})"


@dataclass(frozen=True)
class PeftTaskArithmetic(MergeMethod):
    """Sparsify each τᵢ to `density` (`magnitude`: its top entries; `random`: DARE's drop and
    rescale), then the disjoint mean of the agreeing signs (`sign_election`) or the plain weighted sum."""

    name: str
    sparsify: str
    sign_election: bool

    params = (WEIGHT, DENSITY)
    base_model = "required"
    row_blocks = False

    def __post_init__(self) -> None:
        if self.sparsify not in SPARSIFY:
            raise ValueError(f"sparsify must be one of {', '.join(SPARSIFY)}, not {self.sparsify!r}")

    @property
    def reference(self) -> str:
        return PEFT_REFERENCE.format(self.name.removeprefix("peft_"))

    @property
    def statistic_passes(self) -> int:  # type: ignore[override]
        """peft_ties streams: two passes find each τ's exact k-th magnitude (`ExactTrim`), then
        the merge keeps, sign-elects and averages row block by row block. DARE's masks are drawn
        whole, model after model (peft's order), so DARE takes whole tensors."""
        return 2 if self.sparsify == "magnitude" else 0

    def gather(self, inputs: TensorInputs, state: list[ExactTrim] | None, pass_index: int) -> list[ExactTrim]:
        trims = state if state is not None else [ExactTrim(inputs.params["density"]) for _ in inputs.models]
        for trim, model in zip(trims, inputs.models):
            trim.gather(magnitude_keys(model.sub_(inputs.base)), pass_index)
        return trims

    def settle(self, state: list[ExactTrim], pass_index: int) -> list[ExactTrim]:
        for trim in state:
            trim.settle(pass_index)
        return state

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        base, density = inputs.base, inputs.params["density"]
        if inputs.state is not None:  # streamed peft_ties: the thresholds are known
            tasks = [model.sub_(base) for model in inputs.models]
            pruned = [trim.apply(task) for trim, task in zip(inputs.state, tasks)]
            weights = [p["weight"] for p in inputs.model_params]
            return disjoint_mean(pruned, weights).add_(base)
        touching = [i for i, model in enumerate(inputs.models) if not torch.equal(model, base)]
        if not touching:
            return base.clone()
        tasks = [inputs.models[i].sub_(base) for i in touching]
        weights = [inputs.model_params[i]["weight"] for i in touching]
        if self.sparsify == "magnitude":
            pruned = [magnitude_prune(task, density) for task in tasks]
        else:
            if inputs.generator is None:
                raise ValueError("random sparsification (DARE) needs a seeded generator")
            pruned = [random_prune(task, density, inputs.generator) for task in tasks]
        merged = disjoint_mean(pruned, weights) if self.sign_election else weighted_sum(pruned, weights)
        return merged.add_(base)


def weighted_sum(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·τᵢ, a new tensor."""
    merged = torch.zeros_like(tasks[0])
    for task, weight in zip(tasks, weights):
        merged.add_(task, alpha=weight)
    return merged


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly the k = int(density * numel) largest-magnitude entries, zero the rest, in place
    (`trim.top_k_mask`: of entries tied at the k-th magnitude, the earlier ones)."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    if keep == 0:
        return tensor.zero_()
    return tensor.masked_fill_(~top_k_mask(tensor.abs(), keep), 0.0)


def magnitude_keys(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor| as int64 keys whose order is the magnitudes' order: the float32 bit patterns of
    non-negative floats (-0.0 becomes +0.0) order as integers, in [0, 2**31)."""
    return tensor.abs().view(torch.int32).to(torch.int64)


@dataclass
class ExactTrim:
    """One τ's top-k selection (k = int(density · numel)), found over row blocks: pass 0 counts
    the high 16 bits of every magnitude key, which gives the bucket of the k-th largest; pass 1
    counts the low 16 bits inside that bucket, which gives the k-th key itself. The merge then keeps
    every entry above it and, of the entries equal to it, the first ones in row order up to k in
    all: what `magnitude_prune` keeps on the whole tensor, holding two histograms instead."""

    density: float
    numel: int = 0
    keep: int = 0
    high: torch.Tensor | None = None
    bucket: int = 0
    rank: int = 0  # the k-th's rank (from the top, 1-based) inside its bucket
    low: torch.Tensor | None = None
    threshold: int = 0
    room: int = 0  # how many entries equal to the threshold are kept
    seen: int = 0  # entries equal to the threshold met so far by `apply`

    def gather(self, keys: torch.Tensor, pass_index: int) -> None:
        flat = keys.reshape(-1)
        if pass_index == 0:
            self.numel += flat.numel()
            counts = torch.bincount(flat >> 16, minlength=1 << 15).cpu()
            self.high = counts if self.high is None else self.high + counts
        elif self.trims():
            inside = flat[(flat >> 16) == self.bucket] & 0xFFFF
            counts = torch.bincount(inside, minlength=1 << 16).cpu()
            self.low = counts if self.low is None else self.low + counts

    def settle(self, pass_index: int) -> None:
        if pass_index == 0:
            self.keep = int(self.density * self.numel) if self.density < 1 else self.numel
            if self.trims():
                index, before = _from_top(self.high, self.keep)
                self.bucket, self.rank = self.high.numel() - 1 - index, self.keep - before
        elif self.trims():
            index, before = _from_top(self.low, self.rank)
            self.threshold = self.bucket << 16 | (self.low.numel() - 1 - index)
            self.room = self.rank - before

    def trims(self) -> bool:
        """Whether some but not all entries are kept."""
        return 0 < self.keep < self.numel

    def apply(self, task: torch.Tensor) -> torch.Tensor:
        """These rows of τ with the entries outside the top k zeroed, in place (rows in order)."""
        if self.keep >= self.numel:
            return task
        if self.keep == 0:
            return task.zero_()
        keys = magnitude_keys(task).reshape(-1)
        kept = keys > self.threshold
        tied = keys == self.threshold
        ordinal = tied.cumsum(0) + self.seen
        kept |= tied & (ordinal <= self.room)
        self.seen = int(ordinal[-1]) if ordinal.numel() else self.seen
        return task.masked_fill_(~kept.reshape(task.shape), 0.0)


def _from_top(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """(index from the top of the bucket holding the k-th largest, how many lie in the buckets above)."""
    from_top = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([k])).item())
    return index, int(from_top[index - 1]) if index else 0


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
