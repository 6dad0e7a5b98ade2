"""Every mergekit 0.1.5 method `wb merge` runs, in issue 13's order: `MERGEKIT_METHODS`, which the
registry includes. Each is a `base.MergeMethod` giving mergekit's numbers for the same inputs and
parameters (see each module for the definition and where wb differs)."""

from __future__ import annotations

from workbench.weights.methods.arcee_fusion import ArceeFusion
from workbench.weights.methods.base import MergeMethod
from workbench.weights.methods.model_stock import ModelStock
from workbench.weights.methods.nearswap import NearSwap
from workbench.weights.methods.passthrough import Passthrough
from workbench.weights.methods.spherical import SPHERICAL_METHODS
from workbench.weights.methods.task_vectors import TASK_VECTOR_METHODS

MERGEKIT_METHODS: tuple[MergeMethod, ...] = (
    *TASK_VECTOR_METHODS,
    ModelStock(),
    *SPHERICAL_METHODS,
    NearSwap(),
    Passthrough(),
    ArceeFusion(),
)
