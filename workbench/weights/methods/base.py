"""What a merge method is: a name, declared parameters, a way to be evaluated, and its arithmetic.

A method is one `MergeMethod` object (the registry holds one per name). It declares

- `name`: what `--method` takes and merge.json records;
- `params`: its `Param`s (type, default, range, per model or not). `wb merge` checks the values
  against them, passes the method its own, and records in merge.json those the method declares
  (the others as null);
- `row_blocks`: True when the merged rows [a, b) depend only on rows [a, b) of the base and of the
  task vectors, so the merger hands the method one row block (a few MiB) at a time; False when it
  needs whole-tensor statistics and gets whole tensors (one full float32 τ per adapter);
- `combine(tasks, weights, options, generator)`: the merged task vector from the participating
  adapters' task vectors.

`merge(block)` evaluates base + combine(τ) for one `MergeBlock`; a method may override it to get the
same value more cheaply (linear adds each adapter straight into one buffer, never forming a τ).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.weights.adapters.base import MergeSource


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: `--NAME` on the command line, NAME in merge.json.

    `low`/`high` bound the value (inclusive or not); a float must also be finite. A per-model
    parameter takes one value per `--adapter` (default: `default` for each)."""

    name: str
    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = False
    high_inclusive: bool = True
    per_model: bool = False

    def check(self, value: Any, models: int) -> Any:
        """`value` checked against the declaration (None: the default); per-model values as a list of
        `type`, one per model. Raises a one-line WorkbenchError naming the option."""
        if not self.per_model:
            value = self.default if value is None else value
            if not self.allows(value):
                raise WorkbenchError(f"--{self.name} must be {self.expected(plural=False)}, got {value}")
            return value
        values = [self.default] * models if value is None else list(value)
        if len(values) != models:
            raise WorkbenchError(f"--{self.name} has {len(values)} value(s) for {models} adapter(s)")
        if not all(self.allows(v) for v in values):
            raise WorkbenchError(f"--{self.name} must be {self.expected(plural=True)}")
        return [self.type(v) for v in values]

    def allows(self, value: Any) -> bool:
        if self.type is float and not math.isfinite(value):
            return False
        if self.low is not None and not (value >= self.low if self.low_inclusive else value > self.low):
            return False
        return self.high is None or (value <= self.high if self.high_inclusive else value < self.high)

    def expected(self, plural: bool) -> str:
        """What a valid value is, in words: "in (0, 1]", ">= 0", "finite numbers"."""
        if self.low is not None and self.high is not None:
            return f"in {'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}"
        if self.low is not None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        if self.high is not None:
            return f"{'<=' if self.high_inclusive else '<'} {self.high:g}"
        what = "finite number" if self.type is float else self.type.__name__
        return f"{what}s" if plural else f"a {what}"


# The per-model weights every method takes (merge.json also records each adapter's own).
WEIGHTS = Param("weights", float, 1.0, per_model=True)


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's generator: stable across runs, machines and tensor order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def take_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `tensor` (a scalar is its own one row)."""
    return tensor if tensor.dim() == 0 else tensor[start:stop]


@dataclass
class MergeBlock:
    """What a method merges at a time: rows [start, stop) of base tensor `name` (all its rows, for a
    whole-tensor method) and the sources that touch it, with their weights, in --adapter order.

    Adapter i's task vector on these rows is (its replacement − base) where it replaces the tensor,
    plus its low-rank delta where it adds one."""

    name: str
    start: int
    stop: int
    base: torch.Tensor  # the base's rows as stored: maybe the read-only mapped view, never modify
    sources: list[MergeSource]
    weights: list[float]
    options: Mapping[str, Any]  # the method's checked non-per-model parameters
    generator: torch.Generator | None  # one per tensor, for a method that declares `seed`
    device: torch.device
    scratch: Callable[[torch.Size], torch.Tensor]  # a float32 buffer reused between blocks

    def fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        """float32 on the merge device (maybe `tensor` itself: never modify it)."""
        return tensor.to(device=self.device, dtype=torch.float32)

    def replacement(self, i: int) -> torch.Tensor | None:
        """These rows of adapter i's replacement tensor, as stored, or None where it has none."""
        tensor = self.sources[i].replacement(self.name)
        return None if tensor is None else take_rows(tensor, self.start, self.stop)

    def add_delta(self, i: int, acc: torch.Tensor, weight: float) -> None:
        """acc += weight × adapter i's low-rank delta on these rows (nothing where it adds none)."""
        source = self.sources[i]
        if source.adds_delta(self.name):
            source.add_delta(acc, self.name, self.start, self.stop, weight)

    def task(self, i: int, base: torch.Tensor) -> torch.Tensor:
        """Adapter i's full task vector on these rows, a new float32 tensor; `base` = fetch(self.base)."""
        replacement = self.replacement(i)
        task = torch.zeros_like(base) if replacement is None else self.fetch(replacement) - base
        self.add_delta(i, task, 1.0)
        return task


class MergeMethod(ABC):
    """One merge method. Subclasses set `name`, `params` and `row_blocks` and write `combine`."""

    name: str
    params: tuple[Param, ...]
    row_blocks: bool = False

    @abstractmethod
    def combine(self, tasks: list[torch.Tensor], weights: Sequence[float], options: Mapping[str, Any],
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The merged task vector of one block from the participating adapters' float32 task
        vectors (same shape, --adapter order), which it may modify in place."""

    def merge(self, block: MergeBlock) -> torch.Tensor:
        """base + combine(τ) on the block, float32 on the merge device."""
        base = block.fetch(block.base)
        tasks = [block.task(i, base) for i in range(len(block.sources))]
        merged = self.combine(tasks, block.weights, block.options, block.generator)
        del tasks
        return merged.add_(base)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check(self, values: Mapping[str, Any], models: int) -> dict[str, Any]:
        """{name: checked value} of every declared parameter, from `values` (missing: the default)."""
        return {p.name: p.check(values.get(p.name), models) for p in self.params}

    def options(self, checked: Mapping[str, Any]) -> dict[str, Any]:
        """The non-per-model values of `checked`: what `combine` gets as `options`."""
        return {p.name: checked[p.name] for p in self.params if not p.per_model}

    def generator(self, name: str, options: Mapping[str, Any]) -> torch.Generator | None:
        """For a method that declares `seed`: tensor `name`'s CPU generator (`tensor_seed`), so a
        seed gives the same model on any device and in any tensor order."""
        if "seed" not in options:
            return None
        return torch.Generator().manual_seed(tensor_seed(options["seed"], name))

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"
