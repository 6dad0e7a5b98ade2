"""How every streaming command cuts a tensor into row blocks: one constant, one helper.

`row_blocks(shape)` gives [start, stop) row ranges of at most `BLOCK_ELEMENTS` elements (one row
at least). The rows per block follow from the shape and the limit only, never from the dtype, so
`wb diff` and `wb recover` cut a tensor identically (the fixed summation order of `mean_row`, and
so the bits of a recovered model, depend on that cut: do not change it). A scalar is one block
(0, 1); a tensor with no rows is one empty block (0, 0).

2M elements keeps every float64 temporary at 16 MB, under glibc's mmap threshold: a freed block
is reused from the heap instead of being page-faulted in afresh for the next one.

Torch-free: shapes in, ranges out.
"""

from __future__ import annotations

import math

BLOCK_ELEMENTS = 2 * 1024 * 1024


def row_blocks(shape: tuple[int, ...], max_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_elements` elements each (at least one row)."""
    if not shape:
        return [(0, 1)]
    rows = max(1, max_elements // max(1, math.prod(shape[1:])))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)] or [(0, 0)]
