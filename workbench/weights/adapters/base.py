"""What `wb merge` asks of a merge source, whatever its kind, and how a folder becomes one.

A source gives every base tensor it touches a task vector τ = (replacement − base) where it
replaces the tensor whole, plus a low-rank delta where it adds one (either part may be absent; a
LoRA module saved whole and adapted adds both). The merger sees sources only through
`MergeSource`; a new adapter kind is a module here whose class has these members, and one branch
in `open_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

    from workbench.io.reader import Checkpoint


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
        """Whether this source adds a low-rank delta to base tensor `name`."""
        ...

    def add_delta(self, acc: torch.Tensor, name: str, start: int, stop: int, weight: float) -> None:
        """acc += weight × rows [start, stop) of this source's delta for base tensor `name`; acc is
        float32 on the merge device. Called only where `adds_delta(name)` is true."""
        ...

    @property
    def files(self) -> list[Path]:
        """The files merge.json fingerprints: weights and config."""
        ...

    def summary(self) -> dict:
        """The settings merge.json records for this source, beside its path, kind and weight."""
        ...


def open_source(path: Path, base: Checkpoint, tied_embeddings: bool) -> MergeSource:
    """The source at `path` bound to `base`: a PEFT LoRA folder, else a full fine-tuned model folder."""
    # imported here, not above: an adapter kind's module may import this one
    from workbench.weights.adapters.finetune import open_fine_tune
    from workbench.weights.adapters.lora import is_lora_adapter, read_lora_adapter

    if is_lora_adapter(path):
        return read_lora_adapter(path).bind(base, tied_embeddings=tied_embeddings)
    if (path / "config.json").is_file():
        return open_fine_tune(path, base)
    raise WorkbenchError("not a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)", path)
