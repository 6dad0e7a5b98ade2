"""Full fine-tuned model folders as merge inputs: their config read as a float model, and the
check that one has the base's tensors (what `wb compat` reports for a fine-tune beside its base)."""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_model_config
from workbench.io.reader import Checkpoint


def check_same_tensors(tuned: Checkpoint, base: Checkpoint, path: Path) -> None:
    """The same tensors with the same shapes and kinds as the base, or an error naming the first difference."""
    mine, theirs = set(tuned.names()), set(base.names())
    if mine != theirs:
        missing, extra = sorted(theirs - mine), sorted(mine - theirs)
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the base has not"
        raise WorkbenchError(f"fine-tuned model {what} (another architecture?)", path)
    for name in base.names():
        a, b = tuned.info(name), base.info(name)
        if a.shape != b.shape:
            raise WorkbenchError(f"shape mismatch for {name!r}: {list(a.shape)} here, {list(b.shape)} in the base", path)
        if a.dtype.is_floating_point != b.dtype.is_floating_point:
            raise WorkbenchError(f"tensor {name!r} is {a.dtype} here but {b.dtype} in the base", path)


def read_float_model_config(folder: Path) -> dict:
    """A model folder's config.json, refusing quantized checkpoints (their weights are not floats)."""
    config = read_model_config(folder, "config.json and weights")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise WorkbenchError(f"quantized model ({method}) cannot be merged exactly; merge into the float model", folder)
    return config
