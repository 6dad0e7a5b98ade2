"""What `wb merge` asks of an adapter applied to a model as it is read (a recipe's `model+lora`).

A source gives every base tensor it touches a task vector τ = (replacement − base) where it
replaces the tensor whole, plus a delta where it adds one (either part may be absent; a LoRA
module saved whole and adapted adds both). The merger sees adapters only through `MergeSource`; a
new adapter kind is a module here whose class has these members (full fine-tunes are models of the
recipe, read as they are, not sources).

A plain LoRA delta (scale·B@A) does not depend on the base; a DoRA delta does,
W′ − W = (m / ‖W + s·B@A‖) ⊙ (W + s·B@A) − W, so `add_delta` takes the base's float32 rows
(`base_rows`) and a source says `needs_base_rows` when any of its deltas uses them. A source
bound to a base can always read those rows itself (`base_rows=None`); an engine that already holds
them on the merge device passes them and saves the second read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class MergeSource(Protocol):
    """One `--adapter` of `wb merge`, bound to the base (its tensors checked against the base's)."""

    path: Path
    kind: str  # merge.json's "kind": "lora", "full"

    def touches(self, name: str) -> bool:
        """Whether this source changes base tensor `name` at all (replaces it or adds a delta)."""
        ...

    def replacement(self, name: str) -> torch.Tensor | None:
        """The whole tensor that replaces base tensor `name` (read-only, as stored), or None."""
        ...

    def adds_delta(self, name: str) -> bool:
        """Whether this source adds a delta to base tensor `name` (LoRA, DoRA)."""
        ...

    @property
    def needs_base_rows(self) -> bool:
        """Whether some delta of this source depends on the base's rows (DoRA): an engine that
        holds them should pass them to `add_delta` as `base_rows`."""
        ...

    def add_delta(self, acc: torch.Tensor, name: str, start: int, stop: int, weight: float,
                  base_rows: torch.Tensor | None = None) -> None:
        """acc += weight × rows [start, stop) of this source's delta for base tensor `name`; acc is
        float32 on the merge device. `base_rows`: rows [start, stop) of the base tensor this source
        is bound to, float32 on the merge device, or None (the source reads them where it needs
        them); it may be `acc` itself while acc holds exactly those rows (it is read whole before
        acc is written). Called only where `adds_delta(name)` is true."""
        ...

    @property
    def files(self) -> list[Path]:
        """The files merge.json fingerprints: weights and config."""
        ...

    def summary(self) -> dict:
        """The settings merge.json records for this source, beside its path, kind and weight."""
        ...
