"""Every merge method `wb merge` knows, one object each, in `--method`'s order.

`--method`'s choices (`names()`), the streaming decision (`row_blocks`), the settings checked and
the keys merge.json records (`params()`) all come from here. Adding a method: its module in this
package (or one more configuration of an existing class) and one line in `METHODS`.
"""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.weights.methods.base import MergeMethod, Param
from workbench.weights.methods.linear import Linear
from workbench.weights.methods.ties import GeneralizedTaskArithmetic

METHODS: tuple[MergeMethod, ...] = (
    Linear(),
    GeneralizedTaskArithmetic("ties", sparsify="magnitude", sign_election=True),
    GeneralizedTaskArithmetic("dare_linear", sparsify="random", sign_election=False),
    GeneralizedTaskArithmetic("dare_ties", sparsify="random", sign_election=True),
)
REGISTRY: dict[str, MergeMethod] = {method.name: method for method in METHODS}


def names() -> tuple[str, ...]:
    """The method names, as `--method` offers them."""
    return tuple(REGISTRY)


def get(name: str) -> MergeMethod:
    """The method called `name`, or the one-line error listing the known ones."""
    method = REGISTRY.get(name)
    if method is None:
        raise WorkbenchError(f"unknown merge method {name!r}; use one of {', '.join(REGISTRY)}")
    return method


def params() -> tuple[Param, ...]:
    """Every parameter some method declares, in first-declared order: merge.json records each
    (null for a method that does not declare it)."""
    found: dict[str, Param] = {}
    for method in METHODS:
        for param in method.params:
            found.setdefault(param.name, param)
    return tuple(found.values())
