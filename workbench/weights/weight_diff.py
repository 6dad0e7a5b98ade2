"""What `wb diff` and `wb recover` share: the resize rule, the add/subtract, fixups, weight_diff.json.

Both commands must compute *exactly* the same thing, element for element: `wb diff` simulates the
recovery with the functions below and records where it would not be bit-exact, so `wb recover`
can rebuild TUNED bit for bit. Every operation here is elementwise (IEEE add/sub/convert, one
rounding each) or a reduction in a fixed order, so the result does not depend on the number of
threads, the CPU's vector width or the device (CPU or CUDA).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import queue
import re
import threading
from pathlib import Path

import torch

from workbench.dtypes import TORCH_TO_SAFETENSORS
from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.jsonfile import read_json
from workbench.io.paths import check_member_name

FORMAT_VERSION = 1
META_FILE = "weight_diff.json"
FIXUPS_FILE = "weight_diff_fixups.safetensors"
RESIZE_RULE = "mean"  # new rows = mean of the existing rows (Alpaca's smart_tokenizer_and_embedding_resize)

# Tensors whose first dimension is the vocabulary: the only ones a resize may grow.
VOCAB_TENSORS = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
    "output_layer.weight",
)
# A non-persistent buffer that transformers >= 4.31 neither saves nor loads; old .bin diffs
# (Alpaca's) still carry it. When only one side has it, it is skipped rather than refused.
ROTARY_BUFFER = "rotary_emb.inv_freq"

_META_KEYS = ("wb_weight_diff_version", "dtype", "resized", "fixups", "base", "tuned")
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- names, shapes, dtypes ---------------------------------------------------------------------
def is_vocab_tensor(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in VOCAB_TENSORS)


def is_rotary_buffer(name: str) -> bool:
    return name.endswith(ROTARY_BUFFER)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, source: Path | None = None) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or dtype not in TORCH_TO_SAFETENSORS:
        raise WorkbenchError(f"{META_FILE} names an unknown dtype {name!r}", source)
    return dtype


def check_same_names(left: list[str], right: list[str], left_label: str, right_label: str, path: Path) -> None:
    """Refuse tensors present on one side only, naming (up to five of) them."""
    left_set, right_set = set(left), set(right)
    missing = [n for n in left if n not in right_set]
    extra = [n for n in right if n not in left_set]
    if missing:
        raise WorkbenchError(f"{len(missing)} tensor(s) in {left_label} are missing from {right_label}: {_few(missing)}", path)
    if extra:
        raise WorkbenchError(f"{len(extra)} tensor(s) in {right_label} are not in {left_label}: {_few(extra)}", path)


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def resized_rows(name: str, base_shape: tuple[int, ...], target_shape: tuple[int, ...], base_label: str,
                 target_label: str, path: Path) -> int | None:
    """None when the shapes agree; the base's row count when the resize rule applies (a vocabulary
    tensor that gained rows); otherwise the shape mismatch is an error naming the tensor."""
    if base_shape == target_shape:
        return None
    grows = (
        is_vocab_tensor(name)
        and len(base_shape) == len(target_shape) >= 1
        and base_shape[1:] == target_shape[1:]
        and 0 < base_shape[0] < target_shape[0]
    )
    if not grows:
        raise WorkbenchError(
            f"tensor {name!r} has shape {list(base_shape)} in {base_label} but {list(target_shape)} in {target_label}", path
        )
    return base_shape[0]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any side is float64; integers and bools keep their own dtype."""
    if any(d == torch.float64 for d in dtypes):
        return torch.float64
    if all(d.is_floating_point for d in dtypes):
        return torch.float32
    return dtypes[-1]


def rows_of(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor if tensor.dim() == 0 else tensor[start:stop]


# -- the arithmetic ------------------------------------------------------------------------------
def subtract(tuned: torch.Tensor, base: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """tuned - base, computed in compute_dtype and stored in out_dtype (integers wrap, bools xor)."""
    if tuned.dtype == torch.bool:
        return torch.bitwise_xor(tuned, base.to(torch.bool))
    if not tuned.is_floating_point():
        return torch.sub(tuned, base.to(tuned.dtype))
    tuned, base = _promoting(tuned, base, compute_dtype(tuned.dtype, base.dtype, out_dtype))
    return torch.sub(tuned, base).to(out_dtype)


def add(base: torch.Tensor, diff: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """base + diff, computed in compute_dtype and rounded once to out_dtype; always a new tensor."""
    if out_dtype == torch.bool:
        return torch.bitwise_xor(base.to(torch.bool), diff.to(torch.bool))
    if not out_dtype.is_floating_point:
        return torch.add(base.to(out_dtype), diff.to(out_dtype))
    base, diff = _promoting(base, diff, compute_dtype(base.dtype, diff.dtype, out_dtype))
    return torch.add(base, diff).to(out_dtype)


def _promoting(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands that make torch compute in `acc`: once one of them is `acc`, the other is promoted
    inside the kernel (bf16/fp16 -> fp32 -> fp64 are exact), which saves a full-size copy."""
    if a.dtype != acc and b.dtype != acc:
        a = a.to(acc)
    return a, b


def mean_row(tensor: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The mean of all rows, shape (1, ...), in `acc`: summed in float64 in a fixed order (pairwise
    within a block, blocks in turn, elementwise adds only) so every machine gets the same bits."""
    total = torch.zeros(tensor.shape[1:], dtype=torch.float64)
    for start, stop in row_blocks(tuple(tensor.shape)):  # the cut diff and recover share
        block = tensor[start:stop].to(torch.float64)
        while block.shape[0] > 1:
            half = block.shape[0] // 2
            folded = block[:half] + block[half:2 * half]
            block = torch.cat([folded, block[2 * half:]]) if block.shape[0] % 2 else folded
        total += block[0]
    return (total / tensor.shape[0]).to(acc).unsqueeze(0)


def base_rows(base: torch.Tensor, start: int, stop: int, old_rows: int | None, mean: torch.Tensor | None) -> torch.Tensor:
    """Rows [start, stop) of resize(base): RAW's own rows, then copies of the mean row."""
    if old_rows is None or stop <= old_rows:
        return rows_of(base, start, stop)
    assert mean is not None
    tail = mean.expand(stop - max(start, old_rows), *mean.shape[1:])
    if start >= old_rows:
        return tail
    return torch.cat([base[start:old_rows].to(mean.dtype), tail])


# -- fixups: the elements where base + diff is not bit-exact --------------------------------------
def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as a flat signed integer tensor of the same width."""
    return tensor.contiguous().reshape(-1).view(_BITS[tensor.element_size()])


def find_fixups(recovered: torch.Tensor, tuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (int64) where `recovered` differs from `tuned` bit-wise, and the XOR that turns
    one into the other. The XOR is relative to base + diff, so it reveals nothing without RAW."""
    have, want = bits(recovered), bits(tuned)
    index = torch.nonzero(have != want).reshape(-1)
    return index, torch.bitwise_xor(have[index], want[index])


def apply_fixups(out: torch.Tensor, index: torch.Tensor, xor: torch.Tensor, offset: int) -> int:
    """XOR the fixups whose flat index lies in this block (which starts at flat `offset`) into
    `out` (a new, contiguous tensor); returns how many were applied."""
    end = offset + out.numel()
    lo, hi = (int(i) for i in torch.searchsorted(index, torch.tensor([offset, end], dtype=index.dtype)))
    if lo == hi:
        return 0
    flat = out.view(-1).view(_BITS[out.element_size()])
    positions = index[lo:hi] - offset
    flat[positions] = torch.bitwise_xor(flat[positions], xor[lo:hi].to(flat.dtype))
    return hi - lo


def fixup_names(name: str) -> tuple[str, str]:
    return f"{name}.fixup_index", f"{name}.fixup_xor"


# -- per-tensor digests, on a background thread --------------------------------------------------
class TensorDigests:
    """sha256 of each tensor's bytes (C order), hashed on a background thread (hashlib releases
    the GIL) while the caller computes the next block. `finish(name, expected)` queues a
    comparison; mismatches appear in `mismatches` a little later (checked by the caller)."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.mismatches: list[tuple[str, str, str]] = []  # name, expected, found
        self._hashers: dict[str, hashlib._Hash] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        self._queue.put((name, tensor.contiguous().reshape(-1).view(torch.uint8).numpy(), None))

    def finish(self, name: str, expected: str | None = None) -> None:
        self._queue.put((name, None, expected))

    def close(self) -> dict[str, str]:
        self._queue.put(None)
        self._thread.join()
        return self.digests

    def __enter__(self) -> TensorDigests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, data, expected = item
            hasher = self._hashers.setdefault(name, hashlib.sha256())
            if data is not None:
                hasher.update(data)
                continue
            found = self._hashers.pop(name).hexdigest()
            self.digests[name] = found
            if expected is not None and found != expected:
                self.mismatches.append((name, expected, found))


# -- weight_diff.json --------------------------------------------------------------------------
def encode_header(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_header(text: str, source: Path) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise WorkbenchError(f"{META_FILE} does not parse: a recorded header is not base64", source) from None


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_meta(diff_dir: Path) -> dict | None:
    """The parsed and validated weight_diff.json of a diff folder, or None for another tool's diff.

    A diff is downloaded from strangers: every value recover uses is checked here (types, ranges,
    names inside the folder) so that the rest of recover can trust it.
    """
    path = diff_dir / META_FILE
    if not path.is_file():
        return None
    meta = read_json(path, META_FILE, allow_nan=False, problem=f"{META_FILE} does not parse")
    missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise WorkbenchError(f"{META_FILE} lacks {', '.join(missing)}", path)
    if meta["wb_weight_diff_version"] != FORMAT_VERSION:
        raise WorkbenchError(
            f"{META_FILE} has version {meta['wb_weight_diff_version']!r}; this wb reads version {FORMAT_VERSION}", path
        )
    _MetaCheck(path).check(meta)
    return meta


class _MetaCheck:
    """Type and range checks of weight_diff.json, each failure one error naming the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> WorkbenchError:
        return WorkbenchError(f"{META_FILE} does not parse: {where} {what}", self.path)

    def obj(self, value: object, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "is not an object")
        return value

    def count(self, value: object, where: str, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(where, f"is not a whole number >= {minimum}")
        return value

    def hexdigest(self, value: object, where: str, length: int) -> None:
        if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
            raise self.fail(where, f"is not a {length}-digit hex digest")

    def dtype(self, value: object, where: str) -> None:
        if not isinstance(value, str):
            raise self.fail(where, "is not a dtype name")
        dtype_from_name(value, self.path)

    def check(self, meta: dict) -> None:
        self.dtype(meta["dtype"], "dtype")
        base = self.tensors(self.obj(meta["base"], "base"), "base")
        tuned_side = self.obj(meta["tuned"], "tuned")
        tuned = self.tensors(tuned_side, "tuned")
        if set(base) != set(tuned):
            raise self.fail("base.tensors and tuned.tensors", "name different tensors")
        for key in ("weight_sum",):
            if tuned_side.get(key) is not None and not isinstance(tuned_side[key], (int, float)):
                raise self.fail(f"tuned.{key}", "is not a number")
        for name, entry in self.obj(meta["resized"], "resized").items():
            self.resize(name, self.obj(entry, f"resized[{name!r}]"), base, tuned)
        for name in tuned:
            if name not in meta["resized"] and base[name]["shape"] != tuned[name]["shape"]:
                raise self.fail(f"tensor {name!r}", "has different base and tuned shapes but no resize entry")
        fixups = self.obj(meta["fixups"], "fixups")
        self.count(fixups.get("count", 0), "fixups.count")
        for name, count in self.obj(fixups.get("tensors", {}), "fixups.tensors").items():
            if name not in tuned:
                raise self.fail(f"fixups.tensors[{name!r}]", "is not a recorded tensor")
            self.count(count, f"fixups.tensors[{name!r}]")
        if tuned_side.get("layout") is not None:
            self.layout(self.obj(tuned_side["layout"], "tuned.layout"))

    def tensors(self, side: dict, label: str) -> dict:
        tensors = self.obj(side.get("tensors"), f"{label}.tensors")
        for name, entry in tensors.items():
            where = f"{label}.tensors[{name!r}]"
            entry = self.obj(entry, where)
            shape = entry.get("shape")
            if not isinstance(shape, list):
                raise self.fail(f"{where}.shape", "is not a list")
            for dim in shape:
                self.count(dim, f"{where}.shape")
            self.dtype(entry.get("dtype"), f"{where}.dtype")
            self.hexdigest(entry.get("sha256"), f"{where}.sha256", 64)
            if entry.get("sum") is not None and not isinstance(entry["sum"], (int, float)):
                raise self.fail(f"{where}.sum", "is not a number")
        return tensors

    def resize(self, name: str, entry: dict, base: dict, tuned: dict) -> None:
        where = f"resized[{name!r}]"
        if name not in tuned:
            raise self.fail(where, "is not a recorded tensor")
        old = self.count(entry.get("old_rows"), f"{where}.old_rows", minimum=1)
        new = self.count(entry.get("new_rows"), f"{where}.new_rows", minimum=1)
        self.dtype(entry.get("mean_dtype"), f"{where}.mean_dtype")
        base_shape, tuned_shape = base[name]["shape"], tuned[name]["shape"]
        if not (base_shape and tuned_shape and base_shape[0] == old < new == tuned_shape[0]
                and base_shape[1:] == tuned_shape[1:]):
            raise self.fail(where, f"does not fit the recorded shapes {base_shape} and {tuned_shape}")

    def layout(self, layout: dict) -> None:
        files = self.obj(layout.get("files"), "tuned.layout.files")
        if not files:
            raise self.fail("tuned.layout.files", "is empty")
        for name, entry in files.items():
            check_member_name(name, f"{META_FILE} names an output file", self.path)
            where = f"tuned.layout.files[{name!r}]"
            entry = self.obj(entry, where)
            if not name.endswith(".safetensors"):
                raise self.fail(where, "is not a .safetensors file name")
            if not isinstance(entry.get("header"), str):
                raise self.fail(f"{where}.header", "is not a string")
            self.count(entry.get("size"), f"{where}.size")
            self.hexdigest(entry.get("md5"), f"{where}.md5", 32)
            self.hexdigest(entry.get("sha256"), f"{where}.sha256", 64)
        index = layout.get("index")
        if index is not None:
            index = self.obj(index, "tuned.layout.index")
            if index.get("name") != "model.safetensors.index.json" or not isinstance(index.get("text"), str):
                raise self.fail("tuned.layout.index", "is not model.safetensors.index.json with its text")
