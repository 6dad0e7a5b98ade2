"""A full fine-tuned model folder as a merge source: its task vector is model − base, every tensor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_model_config
from workbench.io.reader import Checkpoint, open_checkpoint


@dataclass
class FineTune:
    """A full fine-tuned model folder used as an adapter: every tensor replaces the base's.

    A `MergeSource` whose task vector is all replacement: it never adds a low-rank delta."""

    path: Path
    checkpoint: Checkpoint

    kind = "full"

    def touches(self, name: str) -> bool:
        return name in self.checkpoint

    def replacement(self, name: str) -> torch.Tensor | None:
        return self.checkpoint.tensor(name)

    def adds_delta(self, name: str) -> bool:
        """A fine-tune has no low-rank part: all of it is in its replacement tensors."""
        return False

    def add_delta(self, acc: torch.Tensor, name: str, start: int, stop: int, weight: float) -> None:
        """A fine-tune's low-rank delta is zero, so there is nothing to add (and, as `adds_delta`
        is false, the merger never asks)."""

    @property
    def files(self) -> list[Path]:
        return [*self.checkpoint.files, self.path / "config.json"]

    def summary(self) -> dict:
        return {"config": None, "lora_modules": 0, "replaced_tensors": "all"}

    def bind(self, base: Checkpoint) -> FineTune:
        """The same tensors with the same shapes as the base, or an error naming the first difference."""
        mine, theirs = set(self.checkpoint.names()), set(base.names())
        if mine != theirs:
            missing, extra = sorted(theirs - mine), sorted(mine - theirs)
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the base has not"
            raise WorkbenchError(f"fine-tuned model {what} (another architecture?)", self.path)
        for name in base.names():
            a, b = self.checkpoint.info(name), base.info(name)
            if a.shape != b.shape:
                raise WorkbenchError(f"shape mismatch for {name!r}: {list(a.shape)} here, {list(b.shape)} in the base", self.path)
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise WorkbenchError(f"tensor {name!r} is {a.dtype} here but {b.dtype} in the base", self.path)
        return self


def open_fine_tune(path: Path, base: Checkpoint) -> FineTune:
    """The fine-tuned model folder at `path` (a float checkpoint), checked against `base`."""
    read_float_model_config(path)
    return FineTune(path, open_checkpoint(path)).bind(base)


def read_float_model_config(folder: Path) -> dict:
    """A model folder's config.json, refusing quantized checkpoints (their weights are not floats)."""
    config = read_model_config(folder, "config.json and weights")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise WorkbenchError(f"quantized model ({method}) cannot be merged exactly; merge into the float model", folder)
    return config
