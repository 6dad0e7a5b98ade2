"""Progress bars on a terminal, silence elsewhere (CI logs, pipes, --json)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, description: str, unit: str = "B") -> tqdm:
    """A tqdm bar on stderr that shows only when stderr is a terminal."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )
