"""`wb recover`: OUT = resize(RAW) + DIFF, one row block at a time, checked before it appears.

Two kinds of DIFF are accepted:

- made by `wb diff` (it has `weight_diff.json`): RAW is checked tensor by tensor against the
  recorded fingerprint (names, shapes, then the sha256 of each tensor as it is read), the fixups
  are applied, and the result is checked bit for bit: a safetensors TUNED's files are rewritten
  with their recorded headers and their md5/sha256 compared with the recorded ones; a `.bin`
  TUNED's tensors are compared by sha256 one by one.
- made by another tool (Alpaca, KnowLM, FastChat: a plain folder of `tuned - raw`, `.bin` or
  safetensors, fp32 or fp16): added in float32 and cast to the diff's dtype (or `--dtype`).

Every failed check raises before OUT is renamed into place, so a failure leaves no OUT. Beside
TUNED's files OUT gets `recover.json`: the versions, the command line, the inputs' fingerprints
(what the pass verified: RAW's tensors against weight_diff.json, whose sha256 is recorded) and
OUT's own file hashes (from the writer, no second read), and the settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import provenance
from workbench.dtypes import parse_dtype, resolve_device
from workbench.errors import CheckFailed, WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.hashing import check_against_list, parse_checksum_file, sha256_file
from workbench.io.jsonfile import parse_json
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.weightsum import float64_sum, gains_non_finite
from workbench.io.writer import (
    DEFAULT_SHARD_SIZE,
    ShardPlan,
    TensorSpec,
    WriteReport,
    copy_side_files,
    parse_size,
    plan_shards,
    plans_from_headers,
    write_checkpoint,
)
from workbench.outputs import atomic_dir, check_can_write, check_not_input
from workbench.weights.weight_diff import (
    FIXUPS_FILE,
    META_FILE,
    TensorDigests,
    add,
    apply_fixups,
    base_rows,
    check_same_names,
    compute_dtype,
    decode_header,
    dtype_from_name,
    dtype_name,
    fixup_names,
    is_rotary_buffer,
    mean_row,
    read_meta,
    resized_rows,
    rows_of,
)

THE_BASE = "the base this diff was made from"
RECORD_FILE = "recover.json"
VERSIONED = ("torch", "safetensors")  # recover.json's versions


@dataclass
class RecoverResult:
    out: Path
    source: str  # "wb diff" or "other tool"
    device: str
    tensors: int
    files: dict[str, dict]
    weight_sum: float
    expected: float | None
    atol: float
    tuned_weight_sum: float | None
    fixups_applied: int
    byte_identical: bool | None
    tensors_exact: bool | None
    resized: dict[str, dict]
    skipped: list[str]
    checksums: dict | None

    @property
    def difference(self) -> float | None:
        return None if self.expected is None else self.weight_sum - self.expected

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "source": self.source,
            "device": self.device,
            "tensors": self.tensors,
            "weight_sum": self.weight_sum,
            "expected": self.expected,
            "difference": self.difference,
            "atol": self.atol,
            "tuned_weight_sum": self.tuned_weight_sum,
            "files": self.files,
            "fixups_applied": self.fixups_applied,
            "byte_identical": self.byte_identical,
            "tensors_exact": self.tensors_exact,
            "resized": self.resized,
            "skipped": self.skipped,
            "checksums": self.checksums,
        }

    def lines(self) -> list[str]:
        size = sum(int(f["size"]) for f in self.files.values())
        shown = [f"recovered {self.tensors} tensors into {self.out} ({len(self.files)} weight file(s), {size / 1e6:.1f} MB) "
                 f"from {'a wb diff' if self.source == 'wb diff' else 'a diff made by another tool (no weight_diff.json)'}"]
        shown += [f"resized RAW's {name}: {entry['old_rows']} -> {entry['new_rows']} rows (new rows = mean of the existing rows)"
                  for name, entry in self.resized.items()]
        if self.skipped:
            shown.append(f"skipped {len(self.skipped)} rotary_emb.inv_freq buffer(s) present on one side only "
                         "(transformers recomputes them)")
        if self.fixups_applied:
            shown.append(f"fixups applied: {self.fixups_applied}")
        if self.byte_identical:
            shown.append("weight files: byte-identical to TUNED's (md5 and sha256 checked against weight_diff.json)")
        elif self.tensors_exact:
            shown.append("tensors: bit-identical to TUNED's (sha256 of each tensor checked against weight_diff.json)")
        if self.checksums:
            shown.append(f"checksums: {len(self.checksums['files'])} file(s) OK ({self.checksums['algo']})")
        line = f"weight-sum: {self.weight_sum:.6f}"
        if self.expected is not None:
            line += f" (expected {self.expected:.6f}, difference {self.difference:+.3g}, atol {self.atol:g}): OK"
        elif self.tuned_weight_sum is not None:
            line += (f" (TUNED's, recorded by wb diff: {self.tuned_weight_sum:.6f}, "
                     f"difference {self.weight_sum - self.tuned_weight_sum:+.3g})")
        return [*shown, line]


@dataclass
class _Job:
    """How one OUT tensor is made and checked."""

    name: str
    shape: tuple[int, ...]
    exact_dtype: torch.dtype  # what base + diff is rounded to (TUNED's dtype for a wb diff)
    out_dtype: torch.dtype  # what OUT stores (differs only with an explicit --dtype)
    old_rows: int | None = None  # RAW's rows when the resize rule applies
    mean_dtype: torch.dtype | None = None
    base_dtype: torch.dtype | None = None  # the recorded RAW dtype, its sha256 and sum
    base_sha256: str | None = None
    base_sum: float | None = None
    tuned_sha256: str | None = None  # checked per tensor when the files' bytes are not compared


@dataclass
class _Plan:
    jobs: dict[str, _Job]
    shards: list[ShardPlan]
    index: str | None = None
    layout_files: dict[str, dict] | None = None  # recorded TUNED files to compare byte for byte
    fixups: Checkpoint | None = None
    resized: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    tuned_weight_sum: float | None = None


def recover(
    base: str | Path,
    diff: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    expect_sum: float | None = None,
    atol: float = 1e-2,
    checksums: str | Path | None = None,
    device: str = "cpu",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    command: str | None = None,
) -> RecoverResult:
    """Rebuild TUNED from RAW and DIFF into `out`; every check passes before `out` appears.

    A float diff only: an XOR release is `xor_release.recover_xor`'s (`wb recover` chooses between
    them). `command`: the command line recover.json records (None: this process's,
    `provenance.command_line`)."""
    out, base, diff = Path(out), Path(base), Path(diff)
    out_dtype = parse_dtype(dtype)
    torch_device = resolve_device(device)
    shard_size = parse_size(max_shard_size)
    check_can_write(out, force)
    check_not_input(out, [base, diff, checksums])
    checksum_list = parse_checksum_file(Path(checksums)) if checksums is not None else None
    from workbench.weights.compat import check_before, print_notes

    print_notes(check_before("recover", base, diff))
    raw, delta = open_checkpoint(base), open_checkpoint(diff)
    diff_dir = diff if diff.is_dir() else diff.parent
    meta = read_meta(diff_dir)
    meta_sha256 = sha256_file(diff_dir / META_FILE) if meta is not None else None
    if meta is not None:
        plan = _plan_wb_diff(raw, delta, meta, diff_dir, out_dtype, shard_size, base)
    else:
        plan = _plan_other_diff(raw, delta, out_dtype, shard_size, base)
    job = _RecoverPass(raw, delta, plan, torch_device, base, out)
    with atomic_dir(out, force, inputs=[base, diff, checksums]) as tmp:
        with TensorDigests() as job.digests:
            report = write_checkpoint(tmp, plan.shards, job.produce, index=plan.index, description="recover")
        job.raise_mismatch()
        copy_side_files(diff_dir, tmp)
        failures = _byte_failures(plan, report)
        if expect_sum is not None and abs(report.weight_sum - expect_sum) > atol:
            failures.append(
                f"weight-sum {report.weight_sum:.6f} differs from the expected {expect_sum:.6f} "
                f"by {report.weight_sum - expect_sum:+.6g} (atol {atol:g})"
            )
        checked = check_against_list(checksum_list, report.files, tmp, failures) if checksum_list else None
        if failures:
            raise CheckFailed(failures, out)
        exact_checked = any(j.tuned_sha256 for j in plan.jobs.values())
        result = RecoverResult(
            out=out,
            source="wb diff" if meta is not None else "other tool",
            device=str(torch_device),
            tensors=len(plan.jobs),
            files=report.files,
            weight_sum=report.weight_sum,
            expected=expect_sum,
            atol=atol,
            tuned_weight_sum=plan.tuned_weight_sum,
            fixups_applied=job.fixups_applied,
            byte_identical=True if plan.layout_files else None,
            tensors_exact=True if (plan.layout_files or exact_checked) else None,
            resized=plan.resized,
            skipped=plan.skipped,
            checksums=checked,
        )
        settings = {"dtype": dtype_name(out_dtype) if out_dtype is not None else None, "device": str(torch_device),
                    "max_shard_size": shard_size, "expect_sum": expect_sum, "atol": atol}
        inputs = _inputs(raw, delta, base, diff, meta_sha256, checksums)
        record = _record(result, report, inputs, settings, command)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _inputs(raw: Checkpoint, delta: Checkpoint, base: Path, diff: Path, meta_sha256: str | None,
            checksums: str | Path | None) -> dict:
    """What the pass knows of its inputs without reading them again: a wb diff's weight_diff.json by
    its sha256, and RAW as checked against it (the sha256 of every tensor, as the diff records it)."""
    return {
        "base": {"path": str(base.resolve()), "format": raw.format, "tensors": len(raw.infos),
                 "verified": f"every tensor's sha256, against {META_FILE}" if meta_sha256 else None},
        "diff": {"path": str(diff.resolve()), "format": delta.format, "weight_diff_sha256": meta_sha256},
        "checksums": str(Path(checksums).resolve()) if checksums is not None else None,
    }


def _record(result: RecoverResult, report: WriteReport, inputs: dict, settings: dict, command: str | None) -> dict:
    """recover.json: the inputs, OUT's weight files as the writer hashed them, the settings and checks."""
    return {
        "source": result.source,
        "inputs": inputs,
        "output": {
            "files": report.files,
            "index_file": report.index_file,
            "tensors": result.tensors,
            "weight_sum": report.weight_sum,
            "byte_identical": result.byte_identical,
            "tensors_exact": result.tensors_exact,
            "fixups_applied": result.fixups_applied,
            "checksums": result.checksums,
        },
        "settings": settings,
        **provenance.record(VERSIONED, command),
    }


# -- planning ------------------------------------------------------------------------------------
def _plan_wb_diff(raw: Checkpoint, delta: Checkpoint, meta: dict, diff_dir: Path, out_dtype: torch.dtype | None,
                  shard_size: int, base_path: Path) -> _Plan:
    """Check RAW and DIFF against weight_diff.json and lay OUT out as TUNED was."""
    recorded_base, recorded_tuned = meta["base"]["tensors"], meta["tuned"]["tensors"]
    check_same_names(list(recorded_base), raw.names(), THE_BASE, "RAW", base_path)
    for name, entry in recorded_base.items():
        if list(raw.infos[name].shape) != entry["shape"]:
            raise WorkbenchError(
                f"RAW is not {THE_BASE}: tensor {name!r} has shape {list(raw.infos[name].shape)} in RAW, "
                f"{entry['shape']} in {THE_BASE}",
                base_path,
            )
    check_same_names(list(recorded_tuned), delta.names(), META_FILE, "DIFF", diff_dir)
    for name, entry in recorded_tuned.items():
        if list(delta.infos[name].shape) != entry["shape"]:
            raise WorkbenchError(f"DIFF does not match its {META_FILE}: tensor {name!r} has shape "
                                 f"{list(delta.infos[name].shape)}, recorded {entry['shape']}", diff_dir)
        tuned_dtype = dtype_from_name(entry["dtype"])
        stored = dtype_from_name(meta["dtype"]) if tuned_dtype.is_floating_point else tuned_dtype
        if delta.infos[name].dtype != stored:
            raise WorkbenchError(f"DIFF does not match its {META_FILE}: tensor {name!r} is stored as "
                                 f"{dtype_name(delta.infos[name].dtype)}, expected {dtype_name(stored)}", diff_dir)
    jobs: dict[str, _Job] = {}
    for name, entry in recorded_tuned.items():
        tuned_dtype = dtype_from_name(entry["dtype"])
        base_entry = recorded_base[name]
        resize = meta["resized"].get(name)
        jobs[name] = _Job(
            name=name,
            shape=tuple(entry["shape"]),
            exact_dtype=tuned_dtype,
            out_dtype=out_dtype if (out_dtype is not None and tuned_dtype.is_floating_point) else tuned_dtype,
            old_rows=resize["old_rows"] if resize else None,
            mean_dtype=dtype_from_name(resize["mean_dtype"]) if resize else None,
            base_dtype=dtype_from_name(base_entry["dtype"]),
            base_sha256=base_entry["sha256"],
            base_sum=base_entry.get("sum"),
        )
    plan = _Plan(jobs=jobs, shards=[], resized=meta["resized"], tuned_weight_sum=meta["tuned"].get("weight_sum"))
    layout = meta["tuned"].get("layout")
    same_dtypes = all(j.out_dtype == j.exact_dtype for j in jobs.values())
    if layout is not None and same_dtypes:
        meta_file = diff_dir / META_FILE
        plan.shards = plans_from_headers(
            {name: decode_header(f["header"], meta_file) for name, f in layout["files"].items()}, meta_file)
        _check_layout(plan.shards, jobs, meta_file)
        plan.index = layout["index"]["text"] if layout.get("index") else None
        if plan.index is not None:
            _check_index_text(plan.index, plan.shards, meta_file)
        plan.layout_files = layout["files"]
    else:
        if same_dtypes:  # a .bin TUNED: no file bytes to compare, so compare each tensor
            for name, job in jobs.items():
                job.tuned_sha256 = recorded_tuned[name]["sha256"]
        plan.shards = plan_shards([TensorSpec(j.name, j.shape, j.out_dtype) for j in jobs.values()], shard_size)
    if meta["fixups"].get("count"):
        plan.fixups = _open_fixups(diff_dir, meta)
    return plan


def _check_layout(shards: list[ShardPlan], jobs: dict[str, _Job], meta_file: Path) -> None:
    """The recorded headers must lay out exactly the recorded tensors, with their shapes and dtypes."""
    slots = {slot.name: slot for shard in shards for slot in shard.header.slots}
    if sorted(slots) != sorted(jobs) or sum(len(s.header.slots) for s in shards) != len(slots):
        raise WorkbenchError(f"{META_FILE} is inconsistent: its file layout does not hold the recorded tensors", meta_file)
    for name, slot in slots.items():
        if (slot.shape, slot.dtype) != (jobs[name].shape, jobs[name].exact_dtype):
            raise WorkbenchError(f"{META_FILE} is inconsistent: its file layout gives {name!r} another shape or dtype",
                                 meta_file)


def _check_index_text(text: str, shards: list[ShardPlan], meta_file: Path) -> None:
    """The recorded index must map each tensor to the file the layout puts it in."""
    index = parse_json(text, f"{META_FILE} does not parse: its recorded index", meta_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    expected = {slot.name: shard.filename for shard in shards for slot in shard.header.slots}
    if weight_map != expected:
        raise WorkbenchError(f"{META_FILE} is inconsistent: its recorded index does not match its file layout", meta_file)


def _open_fixups(diff_dir: Path, meta: dict) -> Checkpoint:
    path = diff_dir / FIXUPS_FILE
    if not path.is_file():
        raise WorkbenchError(f"{META_FILE} records {meta['fixups']['count']} fixups but {FIXUPS_FILE} is missing", diff_dir)
    fixups = open_checkpoint(path)
    for name in meta["fixups"].get("tensors", {}):
        for part in fixup_names(name):
            if part not in fixups:
                raise WorkbenchError(f"{FIXUPS_FILE} lacks {part!r}", path)
    return fixups


def _checked_fixups(fixups: Checkpoint, name: str, job: _Job) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor's fixups, refused unless they are sorted flat indices inside it with XORs of its width."""
    index_name, xor_name = fixup_names(name)
    index, xor = fixups.tensor(index_name), fixups.tensor(xor_name)
    numel = math.prod(job.shape)
    width = job.exact_dtype.itemsize
    ok = (
        index.dtype == torch.int64 and index.dim() == 1 and xor.dim() == 1 and index.numel() == xor.numel()
        and not xor.is_floating_point() and xor.dtype != torch.bool and xor.element_size() == width
    )
    if ok and index.numel():
        ok = int(index[0]) >= 0 and int(index[-1]) < numel and bool((index[1:] > index[:-1]).all())
    if not ok:
        raise WorkbenchError(f"fixups of {name!r} are malformed (indices must be sorted, inside the tensor)",
                             fixups.files[0])
    return index, xor


def _plan_other_diff(raw: Checkpoint, delta: Checkpoint, out_dtype: torch.dtype | None, shard_size: int,
                     base_path: Path) -> _Plan:
    """A diff from another tool: same tensors as RAW (after the resize rule), added in float32."""
    raw_names, diff_names = set(raw.names()), set(delta.names())
    skipped = sorted(n for n in raw_names ^ diff_names if is_rotary_buffer(n))
    check_same_names([n for n in delta.names() if n not in skipped], [n for n in raw.names() if n not in skipped],
                     "DIFF", "RAW", base_path)
    jobs: dict[str, _Job] = {}
    resized: dict[str, dict] = {}
    for name, info in delta.infos.items():
        if name in skipped:
            continue
        raw_info = raw.infos[name]
        if raw_info.dtype.is_floating_point != info.dtype.is_floating_point:
            raise WorkbenchError(f"tensor {name!r} is {dtype_name(info.dtype)} in DIFF but {dtype_name(raw_info.dtype)} "
                                 "in RAW; a weight diff adds like to like", delta.root)
        old = resized_rows(name, raw_info.shape, info.shape, "RAW", "DIFF", base_path)
        dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        jobs[name] = _Job(name=name, shape=info.shape, exact_dtype=dtype, out_dtype=dtype, old_rows=old)
        if old is not None:
            jobs[name].mean_dtype = compute_dtype(raw_info.dtype, dtype)
            resized[name] = {"old_rows": old, "new_rows": info.shape[0], "mean_dtype": dtype_name(jobs[name].mean_dtype)}
    shards = plan_shards([TensorSpec(j.name, j.shape, j.out_dtype) for j in jobs.values()], shard_size)
    return _Plan(jobs=jobs, shards=shards, resized=resized, skipped=skipped)


# -- the pass ------------------------------------------------------------------------------------
class _RecoverPass:
    """Produces OUT's tensors block by block for the writer, checking RAW and the result as it goes."""

    def __init__(self, raw: Checkpoint, delta: Checkpoint, plan: _Plan, device: torch.device, base_path: Path,
                 out: Path):
        self.raw, self.delta, self.plan, self.device = raw, delta, plan, device
        self.base_path, self.out = base_path, out
        self.digests: TensorDigests | None = None
        self.fixups_applied = 0

    def produce(self, spec: TensorSpec):
        self.raise_mismatch()
        job = self.plan.jobs[spec.name]
        base, diff = self.raw.tensor(job.name), self.delta.tensor(job.name)
        mean = mean_row(base, job.mean_dtype) if job.old_rows is not None else None
        index, xor = self._fixups(job.name)
        row = math.prod(job.shape[1:]) if job.shape else 1
        for start, stop in row_blocks(job.shape):
            base_block = base_rows(base, start, stop, job.old_rows, mean)
            result = self._add(base_block, rows_of(diff, start, stop), job.exact_dtype)
            if index is not None:
                self.fixups_applied += apply_fixups(result, index, xor, start * row)
            if result.is_floating_point() and gains_non_finite(result, base_block):
                raise WorkbenchError(f"recovered tensor {job.name!r} has NaN or infinite values where RAW has none; "
                                     "the diff is damaged", self.delta.root)
            if job.base_sha256 is not None:
                raw_part = rows_of(base, start, stop if job.old_rows is None else min(stop, job.old_rows))
                self.digests.update("base/" + job.name, raw_part.to(job.base_dtype))
            if job.tuned_sha256 is not None:
                self.digests.update("tuned/" + job.name, result)
            yield result if result.dtype == job.out_dtype else result.to(job.out_dtype)
        if job.base_sha256 is not None:
            self.digests.finish("base/" + job.name, job.base_sha256)
        if job.tuned_sha256 is not None:
            self.digests.finish("tuned/" + job.name, job.tuned_sha256)

    def _add(self, base: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return add(base, diff, dtype)
        return add(base.to(self.device), diff.to(self.device), dtype).cpu()

    def _fixups(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.plan.fixups is None or fixup_names(name)[0] not in self.plan.fixups:
            return None, None
        return _checked_fixups(self.plan.fixups, name, self.plan.jobs[name])

    def raise_mismatch(self) -> None:
        """Turn the first sha256 mismatch the digest thread found into the error it means."""
        if not self.digests.mismatches:
            return
        key, expected, found = self.digests.mismatches[0]
        kind, name = key.split("/", 1)
        hashes = f"sha256 expected {expected[:16]}…, found {found[:16]}…"
        if kind == "base":
            job = self.plan.jobs[name]
            sums = f"; weight-sum expected {job.base_sum:.6f}, found {float64_sum(self.raw.tensor(name)):.6f}"
            dtype = self.raw.infos[name].dtype
            hint = "" if dtype == job.base_dtype else f"; RAW has it in {dtype_name(dtype)}, the diff was made from {dtype_name(job.base_dtype)}"
            raise WorkbenchError(f"RAW is not {THE_BASE}: tensor {name!r} differs ({hashes}{sums}{hint})", self.base_path)
        raise WorkbenchError(f"recovered tensor {name!r} is not bit-identical to TUNED ({hashes}); DIFF is damaged", self.out)


# -- checks after writing --------------------------------------------------------------------------
def _byte_failures(plan: _Plan, report: WriteReport) -> list[str]:
    if not plan.layout_files:
        return []
    failures = []
    for name, recorded in plan.layout_files.items():
        found = report.files[name]
        if (found["size"], found["md5"], found["sha256"]) != (recorded["size"], recorded["md5"], recorded["sha256"]):
            failures.append(f"{name}: not byte-identical to TUNED's (md5 expected {recorded['md5']}, found {found['md5']})")
    return failures
