"""mergekit 0.1.5's `passthrough`: one model's tensor as it is, times its optional `scale`. Layer
stacking (`slices` with `layer_range`) is the engine's: it decides which model's layer each output
tensor comes from and hands the method that one tensor, so it streams in row blocks."""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.weights.methods.base import MergeMethod, Param, TensorInputs
from workbench.weights.methods.spherical import MERGEKIT


class Passthrough(MergeMethod):
    """Exactly one input; `scale`, when given, multiplies it."""

    name = "passthrough"
    params = (Param("scale", float, None, per_model=True),)
    base_model = "unused"
    row_blocks = True
    reference = f"{MERGEKIT} merge_methods/passthrough.py"

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        if len(inputs.models) != 1:
            raise WorkbenchError(f"passthrough takes exactly one model per tensor, got {len(inputs.models)} on "
                                 f"{inputs.name}; stack layers with slices")
        scale = inputs.model_params[0]["scale"]
        tensor = inputs.models[0]
        return tensor if scale is None or scale == 1 else tensor.mul_(scale)
