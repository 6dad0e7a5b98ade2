"""What a merge method is: a name, declared parameters, how it treats the base, and its arithmetic.

A method is one `MergeMethod` object (the registry holds one per name). It declares

- `name`: what a recipe's `merge_method` (or `--method`) says and merge.json records;
- `params`: its `Param`s, mergekit's names and defaults: per-model ("tensor parameters" of each
  model: weight, density, epsilon, ...) or global (normalize, lambda, rescale, t, ...). Any value
  may come from a gradient or a filter in a recipe: the engine resolves every value per tensor and
  hands the method plain numbers;
- `base_model`: "required", "optional" or "unused", as mergekit's method treats `base_model`;
- `row_blocks`: True when output rows [a, b) depend only on rows [a, b) of every input, so the
  engine hands `merge_tensor` one row block (a few MiB) at a time; False when it needs whole-tensor
  statistics (a trim threshold, a sign election, a norm);
- `reference`: which definition this is (merge.json records it), e.g.
  "mergekit 0.1.5 merge_methods/generalized_task_arithmetic.py (ties)";
- `merge_tensor(inputs)`: the merged float32 tensor from one `TensorInputs`.

A whole-tensor method whose statistics can be gathered row block by row block (a trim threshold
from histograms, a norm from partial sums) streams all the same: it subclasses
`streaming.StreamedMethod` and writes `passes(first, numel, row_size)`, a `streaming.Passes` for
one tensor (`passes` observation passes over every block, then `merge` on each block in row order).
The engine then calls `merge_blocks(read, blocks)`, where `read(a, b)` gives fresh `TensorInputs`
of rows [a, b), and writes the merged blocks as they come: memory stays a few row blocks per model,
whatever the tensor's size, for the price of reading the inputs once more per pass. Its
`merge_tensor` is the same computation on the whole tensor as one block. Any other whole-tensor
method gets whole tensors (the tensors of one name, nothing more).

What the engine guarantees (and the methods rely on): `inputs.models` never holds the base model's
tensor when the method uses a base (mergekit drops base_model from the model list for those
methods); when `base_model` is "unused", `inputs.base` is None and every model the recipe lists is
in `inputs.models`. Methods that need more than tensors (passthrough with slices, tokenizer union)
are the engine's; a method sees only `TensorInputs`.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

BASE_MODEL_POLICIES = ("required", "optional", "unused")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: NAME in a recipe's `parameters` (`--param NAME=VALUE` on
    the command line), NAME in merge.json.

    `low`/`high` bound the value (inclusive or not); a float must also be finite. `per_model`: a
    value per model (mergekit's tensor parameters of each model); else one value for the merge.
    `required`: no default; a recipe must give it (mergekit's `required=True`)."""

    name: str
    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = False
    high_inclusive: bool = True
    per_model: bool = False
    required: bool = False

    def allows(self, value: Any) -> bool:
        """Whether `value` is of this parameter's type and in its range."""
        if self.type is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type is int and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and not (value >= self.low if self.low_inclusive else value > self.low):
            return False
        return self.high is None or (value <= self.high if self.high_inclusive else value < self.high)

    def expected(self, plural: bool) -> str:
        """What a valid value is, in words: "in (0, 1]", ">= 0", "finite numbers", "a bool"."""
        if self.type is bool:
            return "true or false"
        if self.low is not None and self.high is not None:
            return f"in {'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}"
        if self.low is not None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        if self.high is not None:
            return f"{'<=' if self.high_inclusive else '<'} {self.high:g}"
        what = "finite number" if self.type is float else self.type.__name__
        return f"{what}s" if plural else f"a {what}"


# The per-model `weight`: required wherever mergekit 0.1.5 declares it (it has no default there);
# the command line's `--weights` gives it, 1.0 per adapter unless told.
WEIGHT = Param("weight", float, None, per_model=True, required=True)


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's generator: stable across runs, machines and tensor order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def take_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `tensor` (a scalar is its own one row)."""
    return tensor if tensor.dim() == 0 else tensor[start:stop]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·xᵢ, a new tensor (of the first's dtype and device)."""
    total = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        total.add_(tensor, alpha=weight)
    return total


@dataclass
class TensorInputs:
    """What a method merges at a time: one output tensor (or rows [start, stop) of it, for a
    row-block or streamed method), every input float32 on the merge device."""

    name: str                           # the output tensor's name
    base: torch.Tensor | None           # None when the method has no base model
    models: list[torch.Tensor]          # one per participating non-base model, recipe order, same shape
    model_params: list[dict[str, Any]]  # per entry of `models`: its per-model parameter values for THIS tensor
    params: dict[str, Any]              # global parameter values for THIS tensor
    generator: torch.Generator | None   # seeded per tensor (tensor_seed(seed, name)); the only randomness allowed
    start: int = 0                      # the rows [start, stop) these are; whole tensors: 0, rows
    stop: int | None = None


class MergeMethod(ABC):
    """One merge method. Subclasses set `name`, `params`, `base_model`, `row_blocks` and
    `reference` and write `merge_tensor`."""

    name: str
    params: tuple[Param, ...]
    base_model: str = "required"
    row_blocks: bool = False
    reference: str

    @abstractmethod
    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        """The merged float32 tensor (same shape as the inputs). May modify inputs.models in place."""

    def param(self, name: str) -> Param | None:
        """The declared parameter called `name`, or None."""
        return next((p for p in self.params if p.name == name), None)

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"
