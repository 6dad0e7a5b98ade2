"""mergekit 0.1.5's `nearswap`: take the model's value where it is near the base's. Each entry
moves from the base a toward the model b by w = clamp(t / max(|a − b|, 1e-6), 0, 1): entries closer
than t become b, the others move by t. Entry by entry, so it streams in row blocks."""

from __future__ import annotations

import torch

from workbench.weights.methods.base import MergeMethod, Param, TensorInputs
from workbench.weights.methods.spherical import MERGEKIT, count_models


class NearSwap(MergeMethod):
    """Base and exactly one model; `t` is required, as in mergekit."""

    name = "nearswap"
    params = (Param("t", float, None, low=0, low_inclusive=True, required=True),)
    base_model = "required"
    row_blocks = True
    reference = f"{MERGEKIT} merge_methods/nearswap.py"

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        count_models(inputs, self.name, 1, 1)
        a, b = inputs.base, inputs.models[0]
        weight = (inputs.params["t"] / (a - b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
        return weight * b + (1 - weight) * a
