"""mergekit 0.1.5's spherical methods: `slerp`, `nuslerp`, `multislerp`, `karcher`.

All four treat a tensor (or, for nuslerp's non-flattened modes, each row or column) as one vector
and interpolate on the sphere, so their coefficients come from whole-tensor norms and dot
products: none is row-local as mergekit defines them (slerp too: its angle is between the two
whole flattened tensors; nuslerp's per-row mode is, but the method's default flattens). Each
needs only the inputs' norms and dot products, so one pass over the row blocks gathers them in
float64 (`Products`, `streaming.Gram`) and a second merges each block (`streaming`); the results
equal mergekit's float32 arithmetic within a few ulps. slerp and nuslerp share
`slerp_coefficients` (the interpolation weights of two vectors at angle θ, linear where they are
(anti)parallel).

- slerp: base and one model, `t` from the base (0) to the model (1); norms below 1e-8 count as 1;
  |cos θ| > 0.9995 falls back to linear interpolation.
- nuslerp: two models, t = w₂/(w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6); with a base, of the task vectors
  (base + slerp(τ₁, τ₂)); `nuslerp_flatten` (default) one vector per tensor, else one per row
  (`nuslerp_row_wise`: per column); linear where 1 − cos²θ ≤ 1e-16.
- multislerp: any number of models, barycentric interpolation on the sphere through the tangent
  space at the weighted mean direction, scaled by the weighted mean norm; of τs with a base.
- karcher: the Karcher (Riemannian) mean of every model (the base too when the recipe names one),
  equal weights, at most `max_iter` steps to tolerance `tol`, scaled by the mean norm.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.weights.methods.base import WEIGHT, MergeMethod, Param, TensorInputs, weighted_sum
from workbench.weights.methods.streaming import Gram, Passes, StreamedMethod, row_pieces

MERGEKIT = "mergekit 0.1.5"


def slerp_coefficients(cos: torch.Tensor, t: float, linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin((1 − t)θ)/sin θ, sin(tθ)/sin θ) for θ = acos(cos), and (1 − t, t) where `linear`;
    the unselected branch is kept finite."""
    theta = torch.acos(torch.where(linear, 0, cos))
    sin_theta = torch.sin(theta)
    first = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    second = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return first, second


def count_models(inputs: TensorInputs, method: str, least: int, most: int | None = None) -> None:
    """One error line when the tensor has the wrong number of models besides the base."""
    count = len(inputs.models)
    if count >= least and (most is None or count <= most):
        return
    wanted = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
    raise WorkbenchError(f"{method} takes {wanted} model(s) besides the base, got {count} on {inputs.name}")


class Products:
    """Σx², Σy², Σxy of two streamed tensors in float64, summed over every axis (`dims` None) or
    over the first (`(0,)`), a piece of rows at a time."""

    def __init__(self, dims: tuple[int, ...] | None = None):
        self.dims = dims
        self.xx = self.yy = self.xy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for _, (a, b) in row_pieces(0, x, y):
            a, b = a.to(torch.float64), b.to(torch.float64)
            self.xx = self.xx + self.total(a, a)
            self.yy = self.yy + self.total(b, b)
            self.xy = self.xy + self.total(a, b)

    def total(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.dims is None:
            return torch.dot(a.reshape(-1), b.reshape(-1))
        return (a * b).sum(dim=self.dims)


class Slerp(StreamedMethod):
    """Spherical interpolation from the base to one model, over the whole flattened tensors: one
    pass for the norms and the dot product, then each block is first·base + second·model."""

    name = "slerp"
    params = (Param("t", float, None, required=True),)
    base_model = "required"
    reference = f"{MERGEKIT} merge_methods/slerp.py"

    DOT_THRESHOLD = 0.9995
    EPS = 1e-8

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        count_models(first, self.name, 1, 1)
        return SlerpPasses(float(first.params["t"]))


class SlerpPasses(Passes):
    """slerp's pass: the products; its coefficients from them (norms ≤ 1e-8 count as 1)."""

    passes = 1

    def __init__(self, t: float):
        self.t, self.products = t, Products()
        self.first = self.second = 0.0

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        self.products.add(block.base, block.models[0])

    def finish(self, pass_index: int) -> None:
        p = self.products
        norm_a, norm_b = (math.sqrt(float(v)) for v in (p.xx, p.yy))
        norm_a, norm_b = (n if n > Slerp.EPS else 1.0 for n in (norm_a, norm_b))
        cos = torch.tensor(float(p.xy) / (norm_a * norm_b), dtype=torch.float64).clamp(-1, 1)
        first, second = slerp_coefficients(cos, self.t, cos.abs() > Slerp.DOT_THRESHOLD)
        self.first, self.second = float(first), float(second)

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        return block.models[0].mul_(self.second).add_(block.base, alpha=self.first)


class NuSlerp(StreamedMethod):
    """mergekit's `nuslerp`: slerp of two models (of their task vectors, with a base) at
    t = w₂/(w₁ + w₂). Flattened: one pass for the products of the whole tensors; row-wise (per
    column): one pass for each column's; per row: no pass."""

    name = "nuslerp"
    params = (WEIGHT, Param("nuslerp_row_wise", bool, False), Param("nuslerp_flatten", bool, True))
    base_model = "optional"
    reference = f"{MERGEKIT} merge_methods/nuslerp.py"

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        count_models(first, self.name, 2, 2)
        one, two = (float(p["weight"]) for p in first.model_params)
        total = one + two
        t = 0.5 if abs(total) < 1e-6 else two / total
        return NuSlerpPasses(t, first.params["nuslerp_row_wise"], first.params["nuslerp_flatten"])


class NuSlerpPasses(Passes):
    """nuslerp on one tensor: the vectors are the whole tensor (`flatten`), its first-axis fibres
    (`row_wise`: a matrix's columns) or its last-axis fibres (a matrix's rows: no pass needed)."""

    def __init__(self, t: float, row_wise: bool, flatten: bool):
        self.t, self.row_wise, self.flatten = t, row_wise, flatten
        self.products = Products(None if flatten else (0,)) if flatten or row_wise else None
        self.passes = 0 if self.products is None else 1
        self.first: torch.Tensor | None = None
        self.second: torch.Tensor | None = None

    @staticmethod
    def vectors(block: TensorInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The two models, or their task vectors with a base (new tensors)."""
        if block.base is None:
            return block.models[0], block.models[1]
        return block.models[0] - block.base, block.models[1] - block.base

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        self.products.add(*self.vectors(block))

    def finish(self, pass_index: int) -> None:
        self.first, self.second = nuslerp_coefficients(self.products.xx, self.products.yy, self.products.xy, self.t)

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        v0, v1 = self.vectors(block)
        v0 = v0.contiguous()
        if self.products is None:  # one vector per last-axis fibre: the block holds whole ones
            for _, (a, b) in row_pieces(0, v0, v1):
                a64, b64 = a.to(torch.float64), b.to(torch.float64)
                sums = [(x * y).sum(dim=-1, keepdim=True) for x, y in ((a64, a64), (b64, b64), (a64, b64))]
                first, second = nuslerp_coefficients(*sums, self.t)
                a.mul_(first).add_(b * second)
        else:
            v0.mul_(self.first.to(v0.device)).add_(v1 * self.second.to(v0.device))
        return v0 if block.base is None else v0.add_(block.base)


def nuslerp_coefficients(xx, yy, xy, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """nuslerp's float32 coefficients from float64 products: norms clamped to 1e-7, linear where
    1 − cos²θ ≤ 1e-16."""
    xx, yy, xy = (torch.as_tensor(v, dtype=torch.float64) for v in (xx, yy, xy))
    cos = (xy / (xx.sqrt().clamp(min=1e-7) * yy.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    first, second = slerp_coefficients(cos, t, (1 - cos.square()) <= 1e-16)
    return first.to(torch.float32), second.to(torch.float32)


class MultiSlerp(StreamedMethod):
    """mergekit's `multislerp`: barycentric interpolation of any number of models on the sphere,
    through the tangent space at their weighted mean direction. Every vector it forms is a linear
    combination of the task vectors, so one pass gathers their Gram matrix (float64), mergekit's
    arithmetic runs on the coefficients, and each row block is Σ cᵢ·τᵢ (+ base)."""

    name = "multislerp"
    params = (WEIGHT, Param("normalize_weights", bool, True), Param("eps", float, 1e-8, low=0, low_inclusive=True))
    base_model = "optional"
    reference = f"{MERGEKIT} merge_methods/multislerp.py"

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        count_models(first, self.name, 1)
        weights = torch.tensor([float(p["weight"]) for p in first.model_params], dtype=torch.float64)
        if first.params["normalize_weights"] and len(weights) > 1:
            if weights.sum() == 0:
                raise WorkbenchError(f"multislerp: the weights sum to 0 on {first.name}, which normalize_weights "
                                     "divides by")
            weights = weights / weights.sum()
        return MultiSlerpPasses(weights, first.params["eps"], first.name)


class MultiSlerpPasses(Passes):
    """multislerp on one tensor: the Gram pass, then the coefficients of the result."""

    def __init__(self, weights: torch.Tensor, eps: float, tensor: str):
        self.weights, self.eps, self.tensor = weights, eps, tensor
        self.passes = 1 if len(weights) > 1 else 0
        self.gram = Gram(len(weights))
        self.coefficients = torch.ones(1, dtype=torch.float64)

    @staticmethod
    def tasks(block: TensorInputs) -> list[torch.Tensor]:
        return block.models if block.base is None else [m - block.base for m in block.models]

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        self.gram.add(self.tasks(block))

    def finish(self, pass_index: int) -> None:
        """mergekit's steps on coefficient vectors c (a vector = Σ cᵢ·τᵢ, its squared norm cᵀGc)."""
        g, w, eps = self.gram.matrix, self.weights, self.eps
        norms = g.diagonal().clamp(min=0).sqrt()
        units = torch.diag(1 / (norms + eps))  # row i: the coefficients of unit vector i

        def norm(c: torch.Tensor) -> torch.Tensor:
            return (c @ g @ c).clamp(min=0).sqrt()

        mean = w @ units
        mean_norm = norm(mean)
        if mean_norm < eps:
            if len(w) != 2:
                raise WorkbenchError(f"multislerp: the weighted sum of the models' directions is zero on "
                                     f"{self.tensor} (antipodal inputs with balancing weights); choose other weights")
            self.coefficients = w.clone()
            return
        mean = mean / mean_norm
        dots = units @ g @ mean
        tangents = units - dots.unsqueeze(1) * mean
        tangent = w @ tangents
        tangent_norm = norm(tangent) + eps
        result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        self.coefficients = result * (norms * w).sum()

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        if len(block.models) == 1:
            return block.models[0]
        merged = weighted_sum(self.tasks(block), self.coefficients.tolist())
        return merged if block.base is None else merged.add_(block.base)


class Karcher(StreamedMethod):
    """mergekit's `karcher`: the equal-weight Karcher mean of every input on the unit sphere,
    scaled by the mean of their norms. Every iterate is a combination of the inputs, so one pass
    gathers their Gram matrix (float64), the iterations run on coefficients, and each row block
    is Σ cᵢ·xᵢ."""

    name = "karcher"
    params = (Param("max_iter", int, 10, low=0, low_inclusive=True), Param("tol", float, 1e-5, low=0, low_inclusive=True))
    base_model = "unused"
    reference = f"{MERGEKIT} merge_methods/karcher.py"

    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        count_models(first, self.name, 1)
        return KarcherPasses(len(first.models), int(first.params["max_iter"]), float(first.params["tol"]))


class KarcherPasses(Passes):
    """The Gram pass, then mergekit's `karcher_merge_tensors` on coefficient vectors."""

    def __init__(self, count: int, max_iter: int, tol: float):
        self.max_iter, self.tol = max_iter, tol
        self.passes = 1 if count > 1 else 0
        self.gram = Gram(count)
        self.coefficients = torch.ones(count, dtype=torch.float64)

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:
        self.gram.add(block.models)

    def finish(self, pass_index: int) -> None:
        self.coefficients = karcher_coefficients(self.gram.matrix, self.max_iter, self.tol)

    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        return weighted_sum(block.models, self.coefficients.tolist())


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean of n inputs with equal weights as coefficients over the inputs, from
    their Gram matrix: a vector v = Σ cᵢ·xᵢ has ⟨v, w⟩ = cᵀ·G·d."""
    count = gram.shape[0]
    alphas = torch.full((count,), 1.0 / count, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return torch.zeros(count, dtype=torch.float64)
    units = torch.zeros(len(valid), count, dtype=torch.float64)  # row k: unit vector of input valid[k]
    for k, i in enumerate(valid):
        units[k, i] = 1 / norms[i]
    weights = alphas[valid] / alphas[valid].sum()

    def dot(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return c @ gram @ d

    def norm(c: torch.Tensor) -> torch.Tensor:
        return dot(c, c).clamp(min=0).sqrt()

    mean = weights @ units
    mean_norm = norm(mean)
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(count, dtype=torch.float64)
        for weight, unit in zip(weights, units):
            cos = dot(mean, unit).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - cos * mean)
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    return (alphas * norms).sum() * mean


SPHERICAL_METHODS: tuple[MergeMethod, ...] = (Slerp(), NuSlerp(), MultiSlerp(), Karcher())
