"""Full fine-tuned model folders as merge inputs: their config read as a float model (merge's plan
checks their tensors against the base's, tensor by tensor)."""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_model_config


def read_float_model_config(folder: Path) -> dict:
    """A model folder's config.json, refusing quantized checkpoints (their weights are not floats)."""
    config = read_model_config(folder, "config.json and weights")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise WorkbenchError(f"quantized model ({method}) cannot be merged exactly; merge into the float model", folder)
    return config
