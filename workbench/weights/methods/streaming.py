"""Whole-tensor methods over row blocks: a few passes that gather whole-tensor statistics (trim
thresholds, L1 norms, norms and angles), then one pass that merges each row block.

A method that needs whole-tensor statistics (`row_blocks` False) but can gather them block by block
subclasses `StreamedMethod` and writes `passes(first, numel, row_size)`: a `Passes` object for one
tensor. The engine calls `merge_blocks(read, blocks)` instead of `merge_tensor`: `read(a, b)`
gives fresh float32 `TensorInputs` of rows [a, b) (the engine's row blocks, a few MiB per model),
and the merged blocks come back in order, so memory stays bounded by a few blocks per model plus
O(1) statistics, whatever the tensor's size. Every block is read once per pass (from the page
cache after the first). `merge_tensor(inputs)` is the same computation on one block, the whole
tensor (the engine's choice where a tokenizer union lays a vocabulary tensor out whole): one
definition, whichever the engine uses.

Tensors of fewer than two dimensions (norms, biases: small) are merged whole, their blocks cut
from the result: some definitions (DELLA's ranks, nuslerp's per-row mode) treat a vector as one row.
A method whose definition needs the whole tensor at once for other reasons (peft's DARE draws its
masks over the whole tensor) says so in `merged_whole`.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch

from workbench.weights.methods.base import MergeMethod, TensorInputs

BlockReader = Callable[[int, int], TensorInputs]


class Passes(ABC):
    """One tensor's merge: `passes` observation passes over every block (`observe`, then
    `finish(pass_index)`), then `merge` on each block in row order. `offset` is the flat index of
    the block's first entry. `observe` must leave its inputs unchanged; `merge` may modify them."""

    passes: int = 0

    def observe(self, pass_index: int, block: TensorInputs, offset: int) -> None:  # noqa: B027
        """Gather this block's share of pass `pass_index`'s statistics."""

    def finish(self, pass_index: int) -> None:  # noqa: B027
        """Turn pass `pass_index`'s gathered statistics into what the next pass needs."""

    @abstractmethod
    def merge(self, block: TensorInputs, offset: int) -> torch.Tensor:
        """The merged float32 rows of this block."""


class StreamedMethod(MergeMethod):
    """A method whose whole-tensor statistics are gathered in passes over row blocks."""

    row_blocks = False

    @abstractmethod
    def passes(self, first: TensorInputs, numel: int, row_size: int) -> Passes:
        """The passes of one tensor of `numel` entries, `row_size` per row; `first` is its first
        block (parameters, generator, device)."""

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        tensor = _reference(inputs)
        row_size = math.prod(tensor.shape[1:]) if tensor.dim() else 1
        plan = self.passes(inputs, tensor.numel(), row_size)
        offset = inputs.start * row_size
        for pass_index in range(plan.passes):
            plan.observe(pass_index, inputs, offset)
            plan.finish(pass_index)
        return plan.merge(inputs, offset)

    def merged_whole(self, first: TensorInputs) -> bool:
        """Whether this tensor is merged in one block, its row blocks cut from the result (`first`:
        its first block): a tensor of fewer than two dimensions."""
        return _reference(first).dim() < 2

    def merge_blocks(self, read: BlockReader, blocks: Sequence[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """The merged row blocks of one tensor, in order, from `read(start, stop)` over `blocks`
        (consecutive, from row 0 to the last row)."""
        first = read(*blocks[0])
        rows = blocks[-1][1]
        if self.merged_whole(first):
            merged = self.merge_tensor(read(0, rows) if len(blocks) > 1 else first)
            del first
            yield from (merged if merged.dim() == 0 else merged[a:b] for a, b in blocks)
            return
        row_size = math.prod(_reference(first).shape[1:])
        plan = self.passes(first, rows * row_size, row_size)
        for pass_index in range(plan.passes):
            for index, (start, stop) in enumerate(blocks):
                plan.observe(pass_index, first if index == 0 else read(start, stop), start * row_size)
            plan.finish(pass_index)  # `observe` leaves its inputs as they were: block 0 serves every pass
        for index, (start, stop) in enumerate(blocks):
            block = first if index == 0 else read(start, stop)
            yield plan.merge(block, start * row_size)
            del block
        del first


def _reference(inputs: TensorInputs) -> torch.Tensor:
    """The tensor whose shape the block has: the base, else the first model."""
    return inputs.base if inputs.base is not None else inputs.models[0]


PIECE = 1 << 22  # entries per piece that a pass handles at once: bounds its temporaries to a few tens of MiB


def row_pieces(offset: int, *tensors: torch.Tensor) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Views of whole rows of `tensors` (same shape), at most PIECE entries at a time, with each
    piece's flat offset; a tensor of fewer than two dimensions is one piece. In-place operations on
    a piece change the tensor."""
    first = tensors[0]
    if first.dim() < 2:
        yield offset, list(tensors)
        return
    row_size = math.prod(first.shape[1:])
    rows = max(1, PIECE // max(1, row_size))
    for start in range(0, first.shape[0], rows):
        yield offset + start * row_size, [t[start:start + rows] for t in tensors]


class Gram:
    """The float64 Gram matrix G[i][j] = Σ xᵢ·xⱼ of n streamed tensors, one piece at a time."""

    def __init__(self, count: int):
        self.matrix = torch.zeros(count, count, dtype=torch.float64)

    def add(self, tensors: list[torch.Tensor], offset: int = 0) -> None:
        for _, pieces in row_pieces(offset, *tensors):
            stacked = torch.stack([p.reshape(-1).to(torch.float64) for p in pieces])
            self.matrix += (stacked @ stacked.T).cpu()


def stream_key(generator: torch.Generator | None, method: str) -> int:
    """One tensor's key for `FlatUniform`, drawn from its generator."""
    if generator is None:
        raise ValueError(f"{method} draws random masks and needs the tensor's seeded generator")
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())


class FlatUniform:
    """U[0, 1) draws indexed by flat position: the draw of entry p of stream (key, index) is the
    same however the tensor is cut into blocks and on whatever device it is merged. The draws come
    in chunks of `SIZE`, each from its own CPU generator seeded by (key, index, chunk)."""

    SIZE = 1 << 14

    def __init__(self, key: int, index: int):
        self.key, self.index = key, index

    def _chunk(self, number: int) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.key}:{self.index}:{number}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return torch.rand(self.SIZE, generator=generator)

    def draws(self, offset: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The draws of entries [offset, offset + numel) in `shape`, on `device`."""
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, device=device)
        first, last = offset // self.SIZE, (offset + count - 1) // self.SIZE
        joined = torch.cat([self._chunk(n) for n in range(first, last + 1)])
        start = offset - first * self.SIZE
        return joined[start:start + count].reshape(shape).to(device)
