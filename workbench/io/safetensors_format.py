"""The safetensors container, read and laid out by hand.

Parsing the header ourselves (instead of `safe_open`) lets every broken file be refused with a
precise message, gives zero-copy mmap views of tensors, and lets the writer lay out files exactly
as the `safetensors` library does, so files written here are byte-identical to `save_file`'s.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.dtypes import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, element_size
from workbench.errors import WorkbenchError
from workbench.io.jsonfile import parse_json

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# The library sorts tensors by dtype (its enum order, largest first), then by name.
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a safetensors file: byte range relative to the start of the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    slots: list[Slot]  # in file order
    metadata: dict[str, str] | None
    raw: bytes  # the JSON bytes as stored, padding included
    data_start: int  # absolute offset of the first data byte

    @property
    def data_size(self) -> int:
        return max((s.end for s in self.slots), default=0)


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; every tensor must lie inside the file."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WorkbenchError("not a safetensors file: shorter than its 8-byte header length", path)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise WorkbenchError(
                f"safetensors header does not parse: it claims {header_len} bytes in a file of {file_size}", path
            )
        raw = handle.read(header_len)
    parsed = parse_json(raw, "safetensors header does not parse", path)
    if not isinstance(parsed, dict):
        raise WorkbenchError("safetensors header does not parse: not a JSON object", path)
    metadata = _metadata(parsed.pop("__metadata__", None), path)
    data_start = 8 + header_len
    slots = sorted((_slot(name, entry, path) for name, entry in parsed.items()), key=lambda s: (s.begin, s.end))
    _check_ranges(slots, file_size - data_start, path)
    return Header(slots=slots, metadata=metadata, raw=raw, data_start=data_start)


def _metadata(value: object, path: Path) -> dict[str, str] | None:
    """`__metadata__` is a string-to-string map or absent, as the safetensors library requires."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise WorkbenchError("safetensors header does not parse: __metadata__ is not a map of strings", path)
    return value


def _slot(name: str, entry: object, path: Path) -> Slot:
    if not isinstance(entry, dict):
        raise WorkbenchError(f"safetensors header does not parse: tensor {name!r} is not an object", path)
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise WorkbenchError(f"safetensors header does not parse: tensor {name!r} has an unknown dtype {dtype_name!r}", path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _int_list(shape) or any(d < 0 for d in shape):
        raise WorkbenchError(f"safetensors header does not parse: tensor {name!r} has a bad shape {shape!r}", path)
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise WorkbenchError(f"safetensors header does not parse: tensor {name!r} has bad data_offsets {offsets!r}", path)
    dtype, begin, end = SAFETENSORS_DTYPES[dtype_name], offsets[0], offsets[1]
    expected = math.prod(shape) * element_size(dtype)
    if end - begin != expected:
        raise WorkbenchError(
            f"tensor {name!r} has {end - begin} bytes but shape {list(shape)} of {dtype_name} needs {expected}", path
        )
    return Slot(name, dtype, tuple(shape), begin, end)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_ranges(slots: list[Slot], data_size: int, path: Path) -> None:
    position = 0
    for slot in slots:
        if slot.end > data_size:
            raise WorkbenchError(
                f"tensor {slot.name!r} runs past the end of the file (bytes {slot.begin}-{slot.end} of {data_size}); "
                "the file is truncated or damaged",
                path,
            )
        if slot.begin != position:
            raise WorkbenchError(f"tensor {slot.name!r} overlaps or leaves a gap before it in the data", path)
        position = slot.end
    if position != data_size:
        raise WorkbenchError(f"{data_size - position} unexpected bytes after the last tensor", path)


def layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> Header:
    """Lay out a file the way `safetensors.torch.save_file` does (same order, JSON and padding)."""
    ordered = sorted(specs, key=lambda s: (-_DTYPE_RANK.index(TORCH_TO_SAFETENSORS[s[1]]), s[0]))
    entries: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    slots, position = [], 0
    for name, dtype, shape in ordered:
        nbytes = math.prod(shape) * element_size(dtype)
        slots.append(Slot(name, dtype, tuple(shape), position, position + nbytes))
        entries[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return Header(slots=slots, metadata=metadata, raw=raw, data_start=8 + len(raw))


def header_from_raw(raw: bytes, path: Path) -> Header:
    """Rebuild a header from stored JSON bytes (to reproduce a file byte for byte); `path` is the
    file that carried them, named in errors. The bytes are validated as a file's header would be."""
    parsed = parse_json(raw, "recorded safetensors header does not parse", path)
    if not isinstance(parsed, dict):
        raise WorkbenchError("recorded safetensors header does not parse: not a JSON object", path)
    metadata = _metadata(parsed.pop("__metadata__", None), path)
    slots = sorted((_slot(n, e, path) for n, e in parsed.items()), key=lambda s: (s.begin, s.end))
    _check_ranges(slots, max((s.end for s in slots), default=0), path)
    return Header(slots=slots, metadata=metadata, raw=raw, data_start=8 + len(raw))
