"""Exact selection by rank: the entries a trim keeps, exactly k of them, ties broken by position.

mergekit 0.1.5 picks kept entries with `argsort`/`topk`: exactly k, but among entries of equal
score in whatever order an unstable sort leaves them (it differs between CPU and GPU, and bf16
deltas have many equal magnitudes). wb ranks entries by one total order, score descending and then
flat index ascending (among equal scores the earlier entry ranks higher), so a trim keeps exactly k
entries and the same ones on any device. On scores without ties both choose the same entries.

The k-th largest score comes from a two-pass radix select on the float32 bit patterns (mapped to
int32 keys whose signed order is the float order): a histogram of the high 16 bits, then of the
low 16 bits inside the one bucket that holds the k-th. The scores arrive in chunks, in any order
within a pass, so a whole-tensor method can stream its input in row blocks: two passes to find its
thresholds, then a last pass in flat order that masks each chunk (`Window.mask`), counting the
ties it has seen so far. Linear time, no index tensor (16M scores: 0.4 s on one core; `kthvalue`
0.7 s, a stable sort 2.8 s), on any device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 22  # scores per chunk of a whole tensor: bounds every temporary to a few tens of MiB
_HALF = 1 << 16
_OFFSET = _HALF // 2  # the high halves of the int32 keys lie in [-2**15, 2**15)


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the float order of float32 values (-0.0 counts as +0.0):
    the bits of a negative float with its 31 value bits flipped. Its own inverse."""
    bits = (chunk.reshape(-1).to(torch.float32) + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _value(key: int) -> float:
    """The float32 value whose key is `key` (the inverse of `_keys`)."""
    key = torch.tensor(key, dtype=torch.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32).item()


def _bucket_of(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry (1-based) and that entry's rank inside it."""
    from_top = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([k], device=from_top.device)).item())
    bucket = histogram.numel() - 1 - index
    above = int(from_top[index].item()) - int(histogram[bucket].item())
    return bucket, k - above


def chunks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """`tensor`'s entries in flat order, CHUNK at a time."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK]


class Ranks:
    """The k-th largest of streamed scores, for each k in `ks` (1-based), exactly: `value[k]`,
    `above[k]` (how many are larger), `equal[k]` (how many equal it) and, with `sums`, `top_sum(k)`
    (the sum of the k largest). Feed every chunk to `observe(0, chunk)`, call `finish(0)`, then
    the same for pass 1."""

    passes = 2

    def __init__(self, ks: list[int], device: torch.device, sums: bool = False):
        self.ks, self.sums = sorted(set(ks)), sums
        self.value: dict[int, float] = {}
        self.above: dict[int, int] = {}
        self.equal: dict[int, int] = {}
        self._greater_sum: dict[int, float] = {}
        self._high = torch.zeros(_HALF, dtype=torch.int64, device=device)
        self._high_sums = torch.zeros(_HALF, dtype=torch.float64, device=device) if sums else None
        self._buckets: dict[int, tuple[int, int]] = {}
        self._low: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def observe(self, pass_index: int, scores: torch.Tensor) -> None:
        """Count these scores (any shape, any order within the pass)."""
        for chunk in chunks(scores):
            self._observe(pass_index, chunk)

    def _observe(self, pass_index: int, chunk: torch.Tensor) -> None:
        keys = _keys(chunk)
        weights = chunk.reshape(-1).to(torch.float64) if self.sums else None
        if pass_index == 0:
            self._high += torch.bincount((keys >> 16) + _OFFSET, minlength=_HALF)
            if weights is not None:
                self._high_sums += torch.bincount((keys >> 16) + _OFFSET, weights=weights, minlength=_HALF)
            return
        high, low = keys >> 16, keys & 0xFFFF
        for bucket, (counts, sums) in self._low.items():
            index = torch.where(high == bucket - _OFFSET, low, _HALF)  # outside the bucket: one extra bin
            counts += torch.bincount(index, minlength=_HALF + 1)[:_HALF]
            if sums is not None:
                sums += torch.bincount(index, weights=weights, minlength=_HALF + 1)[:_HALF]

    def finish(self, pass_index: int) -> None:
        if pass_index == 0:
            total = int(self._high.sum().item())
            for k in self.ks:
                if not 1 <= k <= total:
                    raise ValueError(f"k={k} outside 1..{total}")
                self._buckets[k] = _bucket_of(self._high, k)
                bucket = self._buckets[k][0]
                if bucket not in self._low:
                    sums = torch.zeros(_HALF, dtype=torch.float64, device=self._high.device) if self.sums else None
                    self._low[bucket] = (torch.zeros(_HALF, dtype=torch.int64, device=self._high.device), sums)
            return
        for k in self.ks:
            bucket, rank = self._buckets[k]
            counts, sums = self._low[bucket]
            low, _ = _bucket_of(counts, rank)
            self.value[k] = _value(((bucket - _OFFSET) << 16) | low)
            self.above[k] = (k - rank) + int(counts[low + 1:].sum().item())
            self.equal[k] = int(counts[low].item())
            if sums is not None:
                self._greater_sum[k] = float(self._high_sums[bucket + 1:].sum().item()) + float(sums[low + 1:].sum().item())

    def total_sum(self) -> float:
        """The sum of every score (after pass 0)."""
        return float(self._high_sums.sum().item())

    def top_sum(self, k: int) -> float:
        """The sum of the k largest scores (0 for k = 0)."""
        if k == 0:
            return 0.0
        return self._greater_sum[k] + (k - self.above[k]) * self.value[k]


class _Ties:
    """The entries equal to `value` whose ordinal among them (flat order) lies in [first, stop),
    chunk by chunk in flat order."""

    def __init__(self, value: float, first: int, stop: int, count: int):
        self.value, self.first, self.stop = value, max(0, first), min(stop, count)
        self.whole = self.first == 0 and self.stop == count
        self.seen = 0

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        equal = scores == self.value
        if self.whole:
            return equal
        count = int(equal.sum().item())
        if count == 0 or self.seen >= self.stop or self.seen + count <= self.first:
            self.seen += count
            return torch.zeros_like(equal)
        ordinal = equal.cumsum(0) - 1 + self.seen
        self.seen += count
        return equal & (ordinal >= self.first) & (ordinal < self.stop)


class Window:
    """The entries at positions [skip, skip + keep) of the descending order (score descending, then
    flat index ascending) of `numel` streamed scores: exactly min(keep, numel − skip) of them.
    `passes` histogram passes (`observe`, `finish`), then `mask(chunk)` on the chunks in flat order.
    With `sums`, `kept_sum` and `total_sum` (the sums of the kept and of all scores) after them."""

    def __init__(self, numel: int, skip: int, keep: int, device: torch.device, sums: bool = False):
        self.skip = skip
        self.stop = skip + max(0, min(keep, numel - skip))
        self.ranks = Ranks([k for k in (self.stop, skip) if k >= 1], device, sums) if self.stop > skip else None
        self.passes = 0 if self.ranks is None else Ranks.passes
        self._ties: list[_Ties] = []

    def observe(self, pass_index: int, chunk: torch.Tensor) -> None:
        self.ranks.observe(pass_index, chunk)

    def finish(self, pass_index: int) -> None:
        self.ranks.finish(pass_index)
        if pass_index == self.passes - 1:
            self._ties = self._tie_groups()

    def _tie_groups(self) -> list[_Ties]:
        r, stop, skip = self.ranks, self.stop, self.skip
        same = skip >= 1 and r.value[skip] == r.value[stop]
        groups = [_Ties(r.value[stop], skip - r.above[skip] if same else 0, stop - r.above[stop], r.equal[stop])]
        if skip >= 1 and not same:
            groups.append(_Ties(r.value[skip], skip - r.above[skip], r.equal[skip], r.equal[skip]))
        return groups

    @property
    def kept_sum(self) -> float:
        return 0.0 if self.ranks is None else self.ranks.top_sum(self.stop) - self.ranks.top_sum(self.skip)

    @property
    def total_sum(self) -> float:
        return 0.0 if self.ranks is None else self.ranks.total_sum()

    def mask(self, chunk: torch.Tensor) -> torch.Tensor:
        """The kept entries of the next chunk in flat order, a bool tensor of its shape."""
        if self.ranks is None:
            return torch.zeros(chunk.shape, dtype=torch.bool, device=chunk.device)
        scores = chunk.reshape(-1)
        r = self.ranks
        kept = scores > r.value[self.stop]
        if self.skip >= 1:
            kept &= scores < r.value[self.skip]
        for group in self._ties:
            kept |= group.mask(scores)
        return kept.reshape(chunk.shape)


def window_mask(scores: torch.Tensor, skip: int, keep: int) -> torch.Tensor:
    """A bool mask (shape of `scores`) of the entries at positions [skip, skip + keep) of the
    descending order of a whole tensor. `window_mask(s, 0, k)` is the top k."""
    window = Window(scores.numel(), skip, keep, scores.device)
    for pass_index in range(window.passes):
        for chunk in chunks(scores):
            window.observe(pass_index, chunk)
        window.finish(pass_index)
    return torch.cat([window.mask(chunk) for chunk in chunks(scores)] or [scores.new_zeros(0, dtype=torch.bool)]
                     ).reshape(scores.shape)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of the k largest entries of `scores` (ties: the earlier flat index)."""
    return window_mask(scores, 0, k)


def kth_largest(scores: torch.Tensor, k: int) -> float:
    """The k-th largest (1-based) of the finite float `scores`, exactly."""
    ranks = Ranks([k], scores.device)
    for pass_index in range(Ranks.passes):
        for chunk in chunks(scores):
            ranks.observe(pass_index, chunk)
        ranks.finish(pass_index)
    return ranks.value[k]


def ranks_along(scores: torch.Tensor, dim: int, rows: int = 4096) -> torch.Tensor:
    """Each entry's 1-based ascending rank along `dim` (ties: the earlier index ranks lower), as
    float32, computed over at most `rows` slices of dim 0 at a time."""
    moved = scores.movedim(dim, -1)
    ranks = torch.empty(moved.shape, dtype=torch.float32, device=scores.device)
    counting = torch.arange(1, moved.shape[-1] + 1, dtype=torch.float32, device=scores.device)
    for start in range(0, moved.shape[0], rows):
        order = torch.argsort(moved[start:start + rows], dim=-1, stable=True)
        ranks[start:start + rows].scatter_(-1, order, counting.expand(order.shape))
    return ranks.movedim(-1, dim)
