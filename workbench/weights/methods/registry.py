"""Every merge method `wb merge` knows, one object each, in `--method`'s order.

A recipe's `merge_method` and `--method`'s choices (`names()`), the streaming decision
(`row_blocks`), the parameters checked and recorded (`params`), how the base is treated
(`base_model`) and merge.json's `reference` all come from here. mergekit's methods come from
`mergekit_methods.MERGEKIT_METHODS`; peft's TIES/DARE variants (`ties.PEFT_METHODS`) follow under
their own `peft_` names. Adding a method: its module in this package and its object in one of those
tuples.
"""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.weights.methods.base import MergeMethod
from workbench.weights.methods.mergekit_methods import MERGEKIT_METHODS
from workbench.weights.methods.ties import PEFT_METHODS

METHODS: tuple[MergeMethod, ...] = (*MERGEKIT_METHODS, *PEFT_METHODS)
REGISTRY: dict[str, MergeMethod] = {method.name: method for method in METHODS}
if len(REGISTRY) != len(METHODS):
    raise RuntimeError("two merge methods share a name")


def names() -> tuple[str, ...]:
    """The method names, as `--method` offers them."""
    return tuple(REGISTRY)


def get(name: str) -> MergeMethod:
    """The method called `name`, or the one-line error listing the known ones."""
    method = REGISTRY.get(name)
    if method is None:
        raise WorkbenchError(f"unknown merge method {name!r}; use one of {', '.join(REGISTRY)}")
    return method
