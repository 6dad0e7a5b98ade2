"""`wb diff`: publish TUNED as `TUNED - resize(RAW)`, one row block at a time.

The diff folder is a plain Hugging Face model folder (TUNED's config and tokenizer, sharded
safetensors of `tuned - base`), so Alpaca/KnowLM-style scripts can still use it. Beside it:

- `weight_diff.json`: how the diff was made, RAW's fingerprint (per-file md5, per-tensor sha256
  and sums, weight-sum), TUNED's weight-sum and per-tensor sha256, and, for a safetensors TUNED,
  its exact file headers, so that `wb recover` rebuilds TUNED's weight files byte for byte.
- `weight_diff_fixups.safetensors` (only when needed): the elements where `fl(base + diff)` is not
  bit-identical to TUNED (e.g. fp32 weights that changed sign or magnitude a lot, or a diff stored
  in a narrower dtype), as flat indices and the XOR of the bit patterns. The XOR is relative to
  `base + diff`, so the side file is as useless without RAW as the diff itself.

RAW and TUNED are each read once: the file hashes weight_diff.json records are computed from the
bytes the diff reads, as it reads them (`_InputFileHashes`), not by a second pass over the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import __version__, provenance
from workbench.dtypes import parse_dtype
from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.hashing import FileHasher
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.safetensors_format import layout
from workbench.io.weightsum import float64_sum
from workbench.io.writer import (
    DEFAULT_SHARD_SIZE,
    ShardPlan,
    TensorSpec,
    copy_side_files,
    parse_size,
    plan_shards,
    write_checkpoint,
)
from workbench.outputs import Note, atomic_dir, check_can_write, check_not_input
from workbench.weights.weight_diff import (
    FIXUPS_FILE,
    FORMAT_VERSION,
    RESIZE_RULE,
    TensorDigests,
    add,
    base_rows,
    check_same_names,
    compute_dtype,
    dtype_name,
    encode_header,
    find_fixups,
    fixup_names,
    mean_row,
    resized_rows,
    rows_of,
    subtract,
    write_meta,
)

SPILL_CHUNK_BYTES = 64 * 1024 * 1024
FIXUP_NOTE_SHARE = 0.01  # above this share of elements needing fixups, `wb diff` suggests a wider --dtype
VERSIONED = ("torch", "safetensors")  # weight_diff.json's provenance.versions


@dataclass
class DiffResult:
    out: Path
    dtype: str
    tensors: int
    elements: int
    files: dict[str, dict]
    resized: dict[str, dict]
    fixups: int
    base_weight_sum: float
    tuned_weight_sum: float
    byte_layout_recorded: bool

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "dtype": self.dtype,
            "tensors": self.tensors,
            "elements": self.elements,
            "files": self.files,
            "resized": self.resized,
            "fixups": self.fixups,
            "base_weight_sum": self.base_weight_sum,
            "tuned_weight_sum": self.tuned_weight_sum,
            "byte_layout_recorded": self.byte_layout_recorded,
        }

    def lines(self) -> list[str]:
        size = sum(int(f["size"]) for f in self.files.values())
        shown = [f"wrote {self.out}: {self.tensors} tensors in {len(self.files)} file(s), {size / 1e6:.1f} MB of {self.dtype}"]
        shown += [f"resized RAW's {name}: {entry['old_rows']} -> {entry['new_rows']} rows (new rows = mean of the existing rows)"
                  for name, entry in self.resized.items()]
        share = self.fixups / max(1, self.elements)
        shown.append(f"fixups: {self.fixups} of {self.elements} elements ({share:.4%}) are not exact as base + diff; "
                     "kept in weight_diff_fixups.safetensors" if self.fixups else
                     "fixups: none (base + diff is bit-exact everywhere)")
        if share > FIXUP_NOTE_SHARE:
            shown.append(Note(f"note: {share:.1%} of the elements need fixups; a wider --dtype makes a smaller, cleaner diff"))
        shown.append(f"weight-sum: RAW {self.base_weight_sum:.6f}, TUNED {self.tuned_weight_sum:.6f}")
        if self.byte_layout_recorded:
            shown.append("TUNED's file layout is recorded: wb recover will rebuild its weight files byte for byte")
        return shown


def make_diff(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    command: str | None = None,
) -> DiffResult:
    """Write DIFF = TUNED - resize(RAW) into `out` (atomically) and return what was written.

    `command`: the command line weight_diff.json records (None: this process's, `provenance.command_line`)."""
    out = Path(out)
    diff_dtype = parse_dtype(dtype)
    if diff_dtype is None:
        raise WorkbenchError("wb diff needs an explicit --dtype (float32, float16 or bfloat16)")
    shard_size = parse_size(max_shard_size)
    check_can_write(out, force)
    check_not_input(out, [base, tuned])
    from workbench.weights.compat import check_before, print_notes

    print_notes(check_before("diff", base, tuned))
    raw, tun = open_checkpoint(base), open_checkpoint(tuned)
    check_same_names(tun.names(), raw.names(), "TUNED", "RAW", Path(base))
    resized = {}
    for name, info in tun.infos.items():
        old = resized_rows(name, raw.infos[name].shape, info.shape, "RAW", "TUNED", Path(base))
        if old is not None:
            resized[name] = old
    specs = [
        TensorSpec(name, info.shape, diff_dtype if info.dtype.is_floating_point else info.dtype)
        for name, info in tun.infos.items()
    ]
    with atomic_dir(out, force, inputs=[base, tuned]) as tmp:
        job = _DiffPass(raw, tun, resized, _FixupSpill(tmp), TensorDigests(), TensorDigests(),
                        _InputFileHashes(raw, ("md5",)),
                        _InputFileHashes(tun, ("md5", "sha256") if tun.format == "safetensors" else ()))
        with job.base_digests, job.tuned_digests, job.base_files, job.tuned_files:
            report = write_checkpoint(tmp, plan_shards(specs, shard_size), job.produce, description="diff")
            base_files, tuned_files = job.base_files.digests(), job.tuned_files.digests()
        fixup_report = job.spill.write(tmp)
        copy_side_files(tun.root, tmp)
        meta = _meta(raw, tun, job, diff_dtype, report.files, fixup_report, command, base_files, tuned_files)
        write_meta(tmp, meta)
    elements = sum(math.prod(info.shape) for info in tun.infos.values())
    return DiffResult(
        out=out,
        dtype=dtype_name(diff_dtype),
        tensors=len(specs),
        elements=elements,
        files=report.files,
        resized=meta["resized"],
        fixups=job.spill.total,
        base_weight_sum=job.base_sum,
        tuned_weight_sum=job.tuned_sum,
        byte_layout_recorded=meta["tuned"]["layout"] is not None,
    )


@dataclass
class _DiffPass:
    """Produces each diff tensor block by block, simulating the recovery as it goes."""

    raw: Checkpoint
    tuned: Checkpoint
    resized: dict[str, int]
    spill: _FixupSpill
    base_digests: TensorDigests
    tuned_digests: TensorDigests
    base_files: _InputFileHashes
    tuned_files: _InputFileHashes
    base_sum: float = 0.0
    tuned_sum: float = 0.0
    base_tensor_sums: dict[str, float] = field(default_factory=dict)
    mean_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    def produce(self, spec: TensorSpec):
        name = spec.name
        self.base_files.reading(name)
        self.tuned_files.reading(name)
        base, tuned = self.raw.tensor(name), self.tuned.tensor(name)
        old = self.resized.get(name)
        mean = None
        if old is not None:
            self.mean_dtypes[name] = compute_dtype(base.dtype, tuned.dtype)
            mean = mean_row(base, self.mean_dtypes[name])
        row = math.prod(spec.shape[1:]) if spec.shape else 1
        base_sum = 0.0
        for start, stop in row_blocks(spec.shape):
            tuned_block = rows_of(tuned, start, stop)
            base_block = base_rows(base, start, stop, old, mean)
            diff = subtract(tuned_block, base_block, spec.dtype)
            if tuned.is_floating_point():
                index, xor = find_fixups(add(base_block, diff, tuned.dtype), tuned_block)
                self.spill.append(name, index + start * row, xor)
            raw_part = rows_of(base, start, stop if old is None else min(stop, old))
            self.tuned_digests.update(name, tuned_block)
            self.base_digests.update(name, raw_part)
            self.tuned_sum += float64_sum(tuned_block)
            base_sum += float64_sum(raw_part)
            yield diff
        self.tuned_digests.finish(name)
        self.base_digests.finish(name)
        self.base_tensor_sums[name] = base_sum
        self.base_sum += base_sum


class _InputFileHashes:
    """The hashes of an input's files that weight_diff.json records, computed as the diff reads them.

    The diff reads tensors in its output's order, which is neither RAW's nor TUNED's file order: each
    output shard is laid out by dtype and name and may span several input files, and RAW and TUNED
    may be sharded differently. So each file gets a `FileHasher` (started at the file's first
    tensor) that is advanced, just before a tensor is read, to the end of that tensor's bytes: it
    hashes the file in file order, header included, from the same page-cache pages, alongside the
    diff, and holds no bytes of its own. A `.bin` file is hashed to its end at its first tensor:
    where the pickle puts each tensor's bytes is torch's business, and torch maps the file too, so
    the two still share one read of it."""

    def __init__(self, checkpoint: Checkpoint, algos: tuple[str, ...]):
        self.checkpoint = checkpoint
        self.algos = algos
        self.hashers: dict[Path, FileHasher] = {}
        self.ends = {
            slot.name: header.data_start + slot.end for header in checkpoint.headers.values() for slot in header.slots
        }

    def reading(self, name: str) -> None:
        """Tensor `name` is about to be read: hash its file up to the end of its bytes."""
        if not self.algos:
            return
        hasher = self._hasher(self.checkpoint.infos[name].file)
        hasher.advance(self.ends.get(name, hasher.size))

    def digests(self) -> dict[Path, dict[str, str]]:
        """{file: {algo: hex}} for every file (hashing what is left), or {} when there are no algos."""
        if not self.algos:
            return {}
        return {file: self._hasher(file).hexdigests() for file in self.checkpoint.files}

    def _hasher(self, file: Path) -> FileHasher:
        if file not in self.hashers:
            self.hashers[file] = FileHasher(file, self.algos)
        return self.hashers[file]

    def __enter__(self) -> _InputFileHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        for hasher in self.hashers.values():
            hasher.close()


class _FixupSpill:
    """Fixups go to two scratch files as they are found (memory stays bounded even when a narrow
    --dtype makes most elements fixups) and become one safetensors file at the end."""

    def __init__(self, folder: Path):
        self.index_path = folder / ".fixup_index.tmp"
        self.xor_path = folder / ".fixup_xor.tmp"
        self.index_file = open(self.index_path, "wb")  # noqa: SIM115 - closed in write()
        self.xor_file = open(self.xor_path, "wb")  # noqa: SIM115
        self.entries: dict[str, list] = {}  # name -> [count, index offset, xor offset, xor dtype]
        self.total = 0

    def append(self, name: str, index: torch.Tensor, xor: torch.Tensor) -> None:
        if index.numel() == 0:
            return
        entry = self.entries.setdefault(name, [0, self.index_file.tell(), self.xor_file.tell(), xor.dtype])
        entry[0] += index.numel()
        self.total += index.numel()
        self.index_file.write(index.numpy().tobytes())
        self.xor_file.write(xor.numpy().tobytes())

    def write(self, folder: Path) -> dict | None:
        """Write FIXUPS_FILE (if there is any fixup), drop the scratch files, return the file's report."""
        self.index_file.close()
        self.xor_file.close()
        try:
            if not self.entries:
                return None
            sources: dict[str, tuple[Path, int, torch.dtype]] = {}
            specs = []
            for name, (count, index_offset, xor_offset, xor_dtype) in self.entries.items():
                index_name, xor_name = fixup_names(name)
                sources[index_name] = (self.index_path, index_offset, torch.int64)
                sources[xor_name] = (self.xor_path, xor_offset, xor_dtype)
                specs += [(index_name, torch.int64, (count,)), (xor_name, xor_dtype, (count,))]
            plan = ShardPlan(FIXUPS_FILE, layout(specs, {"format": "pt"}))
            report = write_checkpoint(folder, [plan], lambda spec: _read_spill(spec, sources[spec.name]),
                                      description="fixups")
            return report.files[FIXUPS_FILE]
        finally:
            self.index_path.unlink(missing_ok=True)
            self.xor_path.unlink(missing_ok=True)


def _read_spill(spec: TensorSpec, source: tuple[Path, int, torch.dtype]):
    path, offset, dtype = source
    remaining = spec.nbytes
    with open(path, "rb") as handle:
        handle.seek(offset)
        while remaining > 0:
            chunk = handle.read(min(remaining, SPILL_CHUNK_BYTES))
            remaining -= len(chunk)
            yield torch.frombuffer(bytearray(chunk), dtype=dtype)


def _meta(raw: Checkpoint, tuned: Checkpoint, job: _DiffPass, diff_dtype: torch.dtype,
          diff_files: dict, fixup_file: dict | None, command: str | None, base_files: dict[Path, dict[str, str]],
          tuned_files: dict[Path, dict[str, str]]) -> dict:
    """weight_diff.json; `base_files`/`tuned_files`: {file: {algo: hex}} of RAW's (md5) and, for a
    safetensors TUNED, TUNED's (md5, sha256) files."""
    base_digests = job.base_digests.digests
    tuned_digests = job.tuned_digests.digests
    made = provenance.record(VERSIONED, command)
    return {
        "wb_weight_diff_version": FORMAT_VERSION,
        "created_by": f"wb {__version__}",
        "created": made["created"],
        "provenance": made,
        "dtype": dtype_name(diff_dtype),
        "compute_dtype": "float32 (float64 when either side is float64)",
        "resize_rule": RESIZE_RULE,
        "resized": {
            name: {"old_rows": old, "new_rows": tuned.infos[name].shape[0], "mean_dtype": dtype_name(job.mean_dtypes[name])}
            for name, old in job.resized.items()
        },
        "num_tensors": len(tuned.infos),
        "fixups": {
            "file": FIXUPS_FILE if fixup_file else None,
            "count": job.spill.total,
            "tensors": {name: entry[0] for name, entry in job.spill.entries.items()},
            "file_hashes": fixup_file,
        },
        "diff_files": diff_files,
        "base": {
            "name": raw.root.resolve().name,  # the folder name only: a published file should not carry local paths
            "format": raw.format,
            "files": {raw.relative(f): {"size": f.stat().st_size, "md5": base_files[f]["md5"]} for f in raw.files},
            "weight_sum": job.base_sum,
            "tensors": {
                name: {"shape": list(info.shape), "dtype": dtype_name(info.dtype), "sha256": base_digests[name],
                       "sum": job.base_tensor_sums[name]}
                for name, info in raw.infos.items()
            },
        },
        "tuned": {
            "name": tuned.root.resolve().name,
            "format": tuned.format,
            "weight_sum": job.tuned_sum,
            "tensors": {
                name: {"shape": list(info.shape), "dtype": dtype_name(info.dtype), "sha256": tuned_digests[name]}
                for name, info in tuned.infos.items()
            },
            "layout": _tuned_layout(tuned, tuned_files) if tuned.format == "safetensors" else None,
        },
    }


def _tuned_layout(tuned: Checkpoint, file_hashes: dict[Path, dict[str, str]]) -> dict:
    """What `wb recover` needs to write TUNED's safetensors files byte for byte."""
    files = {}
    for file in tuned.files:
        files[tuned.relative(file)] = {
            "header": encode_header(tuned.headers[file].raw),
            "size": file.stat().st_size,
            **file_hashes[file],
        }
    index = None
    if tuned.index_file is not None:
        index = {"name": tuned.index_file.name, "text": tuned.index_file.read_bytes().decode("utf-8")}
    return {"files": files, "index": index}

