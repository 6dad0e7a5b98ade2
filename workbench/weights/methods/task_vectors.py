"""mergekit 0.1.5's task-vector methods: `linear`, the generalized task arithmetic family
(`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`,
`della_linear`) and `sce`.

The family is one class configured as mergekit's registry configures it
(`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`). For each model i, τᵢ = modelᵢ − base:

1. sparsify τᵢ with its own `density` (none for task_arithmetic):
   - `magnitude` (ties): keep the max(1, ⌊density·n⌋) largest |τᵢ|;
   - `magnitude_outliers` (breadcrumbs): drop the ⌊gamma·n⌋ largest, keep the next ⌊density·n⌋;
   - `random` (dare): keep each entry with probability `density`;
   - `della_magprune` (della): keep each entry with probability density − ε + 2ε·r, r its
     magnitude rank along dim 1 scaled to [0, 1];
   then, with `rescale`, multiply the kept entries by ‖τᵢ‖₁ / ‖kept‖₁ (both ≥ 1e-7; mergekit's
   rescale matches the L1 norm, which is DARE's 1/density only in expectation);
2. weigh: δᵢ = wᵢ·τᵢ;
3. with sign consensus (ties, dare_ties, breadcrumbs_ties, della): keep δᵢ where its sign equals
   the sign of Σδ (a zero sum counts as +, a zero δ never agrees); mixed = Σ kept δᵢ and divisor =
   Σ wᵢ over the kept (0 → 1); without: mixed = Σ δᵢ and divisor = Σ wᵢ (|Σ wᵢ| < 1e-8 → 1);
4. `normalize` divides mixed by the divisor, `lambda` scales it: base + λ·mixed / divisor.

`int8_mask` is accepted and changes nothing: mergekit's mask is a comparison, bool either way.

The family streams (`streaming.StreamedMethod`): the trims find each model's exact threshold in
two histogram passes over the row blocks (`trim.Window`), DARE/DELLA's L1 rescale sums in one, and
a last pass merges each block. Where wb differs from mergekit: among entries of equal magnitude
the trims keep the earliest by flat index (mergekit: whatever its unstable sort leaves); the
random masks come from a stream keyed by the tensor's generator and indexed by flat position
(`streaming.FlatUniform`: the same on any device and for any block size), not from torch's global
generator; `linear`'s weights summing to 0 with `normalize` is an error where mergekit writes
inf/NaN; `sce` holds whole tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.weights.methods.base import WEIGHT, MergeMethod, Param, TensorInputs, weighted_sum
from workbench.weights.methods.streaming import FlatUniform, Passes, StreamedMethod, row_pieces, stream_key
from workbench.weights.methods.trim import Window, ranks_along, top_k_mask

MERGEKIT = "mergekit 0.1.5"
SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "della_magprune")

INT8_MASK = Param("int8_mask", bool, False)
LAMBDA = Param("lambda", float, 1.0)
DENSITY = Param("density", float, 1.0, low=0, high=1, low_inclusive=True, per_model=True)
GAMMA = Param("gamma", float, 0.01, low=0, high=1, low_inclusive=True, per_model=True)
EPSILON = Param("epsilon", float, 0.15, low=0, high=0.5, low_inclusive=True, high_inclusive=False,
                per_model=True)
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: below this either norm, no rescale


class Sparsifier:
    """How one model's τ is sparsified on one tensor: whole-tensor statistics gathered in `passes`
    passes over its rows (`observe`, `finish`), then `apply` to its rows in flat order, a piece
    of whole rows (`streaming.row_pieces`) at a time. This one keeps everything."""

    passes = 0

    def observe(self, pass_index: int, task: torch.Tensor, offset: int) -> None:
        """Gather statistics from one block of τ (left unchanged)."""

    def finish(self, pass_index: int) -> None:
        """Close pass `pass_index`."""

    def apply(self, task: torch.Tensor, offset: int) -> None:
        """Sparsify (and rescale) these rows of τ in place."""


class Dropped(Sparsifier):
    """density 0: nothing survives."""

    def apply(self, task: torch.Tensor, offset: int) -> None:
        task.zero_()


def rescale_factor(total: float, kept: float) -> float:
    """mergekit's L1 rescale, ‖τ‖₁ / ‖kept‖₁, or 1 where either is below 1e-7."""
    return 1.0 if total < RESCALE_EPS or kept < RESCALE_EPS else total / kept


class ByMagnitude(Sparsifier):
    """The entries at positions [skip, skip + keep) of |τ|'s descending order (`trim.Window`):
    ties' top k (skip 0), breadcrumbs' window below the outliers."""

    def __init__(self, numel: int, skip: int, keep: int, rescale: bool, device: torch.device):
        self.window = Window(numel, skip, keep, device, sums=rescale)
        self.passes, self.rescale = self.window.passes, rescale
        self.factor = 1.0

    def observe(self, pass_index: int, task: torch.Tensor, offset: int) -> None:
        self.window.observe(pass_index, task.abs())

    def finish(self, pass_index: int) -> None:
        self.window.finish(pass_index)
        if self.rescale and pass_index == self.passes - 1:
            self.factor = rescale_factor(self.window.total_sum, self.window.kept_sum)

    def apply(self, task: torch.Tensor, offset: int) -> None:
        task.mul_(self.window.mask(task.abs()))
        if self.factor != 1.0:
            task.mul_(self.factor)


class AtRandom(Sparsifier):
    """DARE: keep each entry with probability `density` (a draw of the tensor's `FlatUniform`
    stream below it); with `rescale`, one pass first for the L1 norms of τ and of the kept."""

    def __init__(self, density: float, stream: FlatUniform, rescale: bool):
        self.density, self.stream, self.rescale = density, stream, rescale
        self.passes = 1 if rescale else 0
        self.total = self.kept = 0.0
        self.factor = 1.0

    def probability(self, task: torch.Tensor) -> torch.Tensor | float:
        return self.density

    def keep(self, task: torch.Tensor, offset: int) -> torch.Tensor:
        return self.stream.draws(offset, task.shape, task.device) < self.probability(task)

    def observe(self, pass_index: int, task: torch.Tensor, offset: int) -> None:
        magnitude = task.abs()
        self.total += magnitude.sum(dtype=torch.float64).item()
        self.kept += magnitude.mul_(self.keep(task, offset)).sum(dtype=torch.float64).item()

    def finish(self, pass_index: int) -> None:
        self.factor = rescale_factor(self.total, self.kept)

    def apply(self, task: torch.Tensor, offset: int) -> None:
        task.mul_(self.keep(task, offset))
        if self.factor != 1.0:
            task.mul_(self.factor)


class Della(AtRandom):
    """DELLA's MagPrune: keep probability density − ε + 2ε·(rank − 1)/(cols − 1), the magnitudes
    ranked along dim 1 (a vector is one row; the merge gets vectors whole). One column: `density`,
    where mergekit divides 0 by 0."""

    def __init__(self, density: float, epsilon: float, stream: FlatUniform, rescale: bool):
        super().__init__(density, stream, rescale)
        self.epsilon = epsilon

    def probability(self, task: torch.Tensor) -> torch.Tensor:
        rows = task.unsqueeze(0) if task.dim() < 2 else task
        cols = rows.shape[1]
        if cols > 1:
            position = ((ranks_along(rows.abs(), 1) - 1) / (cols - 1)).clamp_(0, 1)
        else:
            position = torch.full(rows.shape, 0.5, device=task.device)
        return position.mul_(2 * self.epsilon).add_(self.density - self.epsilon).reshape(task.shape)


@dataclass(frozen=True)
class TaskVectorMerge(StreamedMethod):
    """mergekit's `GeneralizedTaskArithmeticMerge`: sparsify each τ, weigh, (sign-elect,) sum,
    normalize, scale by λ. One instance per registered configuration. Its passes over a tensor:
    none for task_arithmetic and for DARE/DELLA without rescale (their masks are a function of the
    flat index), one for DARE/DELLA's L1 norms, two for the magnitude trims' exact thresholds."""

    name: str
    sparsification: str | None
    sign_consensus: bool
    default_normalize: bool
    default_rescale: bool

    base_model = "required"

    def __post_init__(self) -> None:
        if self.sparsification not in (None, *SPARSIFICATIONS):
            raise ValueError(f"unknown sparsification {self.sparsification!r}")

    @property
    def row_blocks(self) -> bool:  # type: ignore[override]
        """Only plain task arithmetic is row-local: every trim and the rescale are whole-tensor."""
        return self.sparsification is None

    @property
    def random(self) -> bool:
        """Whether it draws from `inputs.generator` (DARE, DELLA)."""
        return self.sparsification in ("random", "della_magprune")

    @property
    def params(self) -> tuple[Param, ...]:  # type: ignore[override]
        extra = {"magnitude_outliers": (GAMMA,), "della_magprune": (EPSILON,)}.get(self.sparsification or "", ())
        return (WEIGHT, DENSITY, *extra, INT8_MASK, Param("normalize", bool, self.default_normalize),
                Param("rescale", bool, self.default_rescale), LAMBDA)

    @property
    def reference(self) -> str:  # type: ignore[override]
        return f"{MERGEKIT} merge_methods/generalized_task_arithmetic.py ({self.name})"

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        key = stream_key(first.generator, self.name) if self.random and first.models else 0
        sparsifiers = [self.sparsifier(own, first, numel, FlatUniform(key, index))
                       for index, own in enumerate(first.model_params)]
        return TaskVectorPasses(self, sparsifiers)

    def sparsifier(self, own: dict, first: TensorInputs, numel: int, stream: FlatUniform) -> Sparsifier:
        """One model's sparsification on one tensor (mergekit's `sparsify`): density ≥ 1 keeps it
        whole, unrescaled."""
        density, how, rescale = own["density"], self.sparsification, first.params["rescale"]
        if how is None or density >= 1:
            return Sparsifier()
        if density <= 0 or numel == 0:
            return Dropped()
        if how == "magnitude":
            return ByMagnitude(numel, 0, max(1, int(density * numel)), rescale, first.base.device)
        if how == "magnitude_outliers":
            target = int(density * numel)
            below = max(0, numel - target - int(own["gamma"] * numel))
            return ByMagnitude(numel, numel - below - target, target, rescale, first.base.device)
        if how == "random":
            return AtRandom(density, stream, rescale)
        epsilon = own["epsilon"]
        if not (density - epsilon > 0 and density + epsilon < 1):
            raise WorkbenchError(f"della: density ± epsilon must lie in (0, 1), got density {density:g} and "
                                 f"epsilon {epsilon:g} on {first.name}")
        return Della(density, epsilon, stream, rescale)


class SparsifiedPasses(Passes):
    """One tensor's τᵢ = modelᵢ − base, each sparsified by its model's `Sparsifier`: their passes
    (the most any of them needs), then `sparsified(block)` in each merge; subclasses combine them."""

    def __init__(self, sparsifiers: list[Sparsifier]):
        self.sparsifiers = sparsifiers
        self.passes = max((s.passes for s in sparsifiers), default=0)

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        for model, sparsifier in zip(block.models, self.sparsifiers):
            if pass_index < sparsifier.passes:
                for piece_offset, (rows, base) in row_pieces(offset, model, block.base):
                    sparsifier.observe(pass_index, rows - base, piece_offset)

    def finish(self, pass_index: int) -> None:
        for sparsifier in self.sparsifiers:
            if pass_index < sparsifier.passes:
                sparsifier.finish(pass_index)

    def sparsified(self, block: TensorInputs, offset: int) -> list[torch.Tensor]:
        """This block's sparsified τs, in place of the models' rows (in flat order, as the
        trims' `Window.mask` counts ties)."""
        tasks = []
        for model, sparsifier in zip(block.models, self.sparsifiers):
            task = model.sub_(block.base).contiguous()
            for piece_offset, (rows,) in row_pieces(offset, task):
                sparsifier.apply(rows, piece_offset)
            tasks.append(task)
        return tasks


class TaskVectorPasses(SparsifiedPasses):
    """One tensor of a `TaskVectorMerge`: its models' sparsifiers' passes, then per block
    base + λ·Σ(kept wᵢ·τᵢ)/divisor."""

    def __init__(self, method: TaskVectorMerge, sparsifiers: list[Sparsifier]):
        super().__init__(sparsifiers)
        self.method = method

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        base = block.base
        if not block.models:
            return base.clone()
        weights = [float(p["weight"]) for p in block.model_params]
        deltas = [task.mul_(weight) for task, weight in zip(self.sparsified(block, offset), weights)]
        if self.method.sign_consensus:
            mixed, divisor = sign_consensus(deltas, weights)
        else:
            mixed = weighted_sum(deltas, [1.0] * len(deltas))
            total = sum(weights)
            divisor = 1.0 if abs(total) < 1e-8 else total
        del deltas
        if block.params["normalize"]:
            mixed /= divisor
        if block.params["lambda"] != 1:
            mixed *= block.params["lambda"]
        return mixed.add_(base)


def sign_consensus(deltas: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES's election on the weighted deltas (mergekit's `get_mask`, method "sum"): the elected
    sign is that of Σδ (≥ 0: +); (Σ agreeing δ, Σ agreeing w with 0 → 1). Row-local, so it runs a
    piece of rows at a time: its temporaries stay small on a whole tensor."""
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for _, (mixed_rows, divisor_rows, *rows) in row_pieces(0, mixed, divisor, *deltas):
        elected = elected_signs(rows)
        for delta, weight in zip(rows, weights):
            agree = agreement(delta, elected)
            mixed_rows.addcmul_(delta, agree)
            divisor_rows.add_(agree, alpha=weight)
    divisor[divisor == 0] = 1
    return mixed, divisor


def elected_signs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """+1 where Σ tensors ≥ 0, else −1 (float32)."""
    total = weighted_sum(tensors, [1.0] * len(tensors))
    return torch.where(total >= 0, 1.0, -1.0)


def agreement(delta: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """1.0 where delta's sign is the elected one (a zero never agrees), else 0.0."""
    return (delta * elected > 0).to(delta.dtype)


class Linear(MergeMethod):
    """mergekit's `linear`: Σ wᵢ·modelᵢ / Σ wᵢ (or the plain weighted sum without `normalize`), of
    whole models, the base among them if the recipe names one; row by row."""

    name = "linear"
    params = (WEIGHT, Param("normalize", bool, True))
    base_model = "unused"
    row_blocks = True
    reference = f"{MERGEKIT} merge_methods/linear.py"

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        weights = [float(p["weight"]) for p in inputs.model_params]
        merged = weighted_sum(inputs.models, weights)
        if inputs.params["normalize"]:
            total = sum(weights)
            if total == 0:
                raise WorkbenchError(f"linear: the weights sum to 0 on {inputs.name}, which normalize divides by")
            merged /= total
        return merged


class SCE(MergeMethod):
    """mergekit's `sce` (Select, Calculate, Erase): keep the `select_topk` fraction of entries with
    the largest variance across the τs (of those with nonzero variance), weigh each τ by its mean
    square over the tensor, erase the entries whose sign disagrees with Σ τ, and take the
    weighted mean of the rest. No per-model weights."""

    name = "sce"
    params = (INT8_MASK, Param("select_topk", float, 1.0, low=0, high=1, low_inclusive=True))
    base_model = "required"
    row_blocks = False
    reference = f"{MERGEKIT} merge_methods/sce.py"

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        base = inputs.base
        if not inputs.models:
            return base.clone()
        tasks = [model.sub_(base).contiguous() for model in inputs.models]
        select = inputs.params["select_topk"]
        if select < 1:
            selected = variance_selection(tasks, select)
            for task in tasks:
                task.mul_(selected)
        weights = energy_weights(tasks)
        mixed = torch.zeros_like(base)
        for _, (mixed_rows, *rows) in row_pieces(0, mixed, *tasks):
            elected = elected_signs(rows)
            total = torch.zeros_like(mixed_rows)
            for task, weight in zip(rows, weights):
                erased = agreement(task, elected).mul_(weight)
                mixed_rows.addcmul_(task, erased)
                total += erased
            mixed_rows.div_(total.clamp_(min=1e-6))
        return mixed.add_(base)


def variance_selection(tasks: list[torch.Tensor], density: float) -> torch.Tensor:
    """SCE's selection: the top ⌊nonzero·density⌋ entries by variance across the τs (population
    variance), as a float mask; density 0 selects nothing."""
    if density <= 0:
        return torch.zeros_like(tasks[0])
    variance = torch.empty_like(tasks[0])
    for _, (out, *rows) in row_pieces(0, variance, *tasks):  # entry by entry: no stacked copy of every τ
        out.copy_(torch.var(torch.stack(rows), dim=0, unbiased=False))
    k = int(torch.count_nonzero(variance) * density)  # mergekit's count × float, in float32
    if k == 0:
        return torch.zeros_like(variance)
    return top_k_mask(variance, k).to(variance.dtype)


def energy_weights(tasks: list[torch.Tensor]) -> list[torch.Tensor]:
    """SCE's weight of each τ: its mean square over the sum of them (uniform when that is < 1e-6)."""
    energies = [task.square().mean() for task in tasks]
    total = float(sum(energy.item() for energy in energies))
    if abs(total) < 1e-6:
        return [torch.tensor(1.0 / len(tasks), device=tasks[0].device)] * len(tasks)
    return [energy / total for energy in energies]


TASK_VECTOR_METHODS: tuple[MergeMethod, ...] = (
    Linear(),
    TaskVectorMerge("task_arithmetic", None, False, default_normalize=False, default_rescale=False),
    TaskVectorMerge("ties", "magnitude", True, default_normalize=True, default_rescale=False),
    TaskVectorMerge("dare_linear", "random", False, default_normalize=False, default_rescale=True),
    TaskVectorMerge("dare_ties", "random", True, default_normalize=False, default_rescale=True),
    TaskVectorMerge("breadcrumbs", "magnitude_outliers", False, default_normalize=False, default_rescale=False),
    TaskVectorMerge("breadcrumbs_ties", "magnitude_outliers", True, default_normalize=False, default_rescale=False),
    TaskVectorMerge("della", "della_magprune", True, default_normalize=True, default_rescale=True),
    TaskVectorMerge("della_linear", "della_magprune", False, default_normalize=False, default_rescale=True),
    SCE(),
)
