"""The significance test behind every "change" in a report.

As lm-eval's `scripts/model_comparator.py`: for two scores with standard errors se1 and se2,
Z = (a1 - a2) / sqrt(se1² + se2²), and the two-sided p-value is 2·(1 - Φ(|Z|)) = erfc(|Z|/√2).
Here a1 is the compared model and a2 the baseline, so a positive Z means the compared model scored higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workbench.report.load import is_number

SIGNIFICANCE_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


@dataclass(frozen=True)
class Change:
    """The difference of a model's score from the baseline's, and the z-test on it when stderrs exist."""

    diff: float
    se: float | None = None
    z: float | None = None
    p: float | None = None

    @property
    def mark(self) -> str:
        return significance_mark(self.p)


def z_test(value: float, se: float | None, base_value: float, base_se: float | None) -> Change:
    """Change of `value` against `base_value`; z and p only when both standard errors are known."""
    diff = value - base_value
    if not (is_number(se) and is_number(base_se)):
        return Change(diff)
    pooled = math.sqrt(se**2 + base_se**2)
    if pooled == 0.0:
        return Change(diff, se=0.0)
    z = diff / pooled
    return Change(diff, se=pooled, z=z, p=math.erfc(abs(z) / math.sqrt(2.0)))


def significance_mark(p: float | None) -> str:
    """`***` p < 0.001, `**` p < 0.01, `*` p < 0.05, nothing otherwise or when untested."""
    if p is None:
        return ""
    for level, mark in SIGNIFICANCE_LEVELS:
        if p < level:
            return mark
    return ""
