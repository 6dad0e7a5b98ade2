"""XOR releases (OpenAssistant's `xor_codec.py` format): `wb diff --format xor` and `wb recover`.

A release is a flat folder of payload files, each named like the TUNED file it rebuilds:

    payload = TUNED's file XOR RAW's file of the same name, byte by byte, over TUNED's length
              (RAW's file zero-padded where it is shorter, truncated where it is longer;
              a file RAW does not have is stored as it is: XOR with nothing),

optionally gzipped (a payload is gzip exactly when it starts with gzip's magic bytes 1f 8b; a name
proves nothing), plus two `md5sum` lists: `base.md5` (the RAW files XORed against) and `result.md5`
(the files the payload rebuilds). `wb diff --format xor` adds `weight_diff.json`
({"format": "xor", ...}: provenance, the lists' names, per-file sizes and gzip flags). A folder
without it is read as OpenAssistant publishes it: the payload as xor_codec wrote it and the two
lists (from the model card) saved beside it as `base.md5` and `result.md5`.

Decoding is byte-exact and works only against RAW files bit-identical to the publisher's, so RAW is
checked first (every listed file present, with its recorded size), then hashed as it is read: the
first file that differs stops the run, named. Every file is one streaming pass (RAW and the payload
read once in CHUNK_BYTES pieces, hashed on background threads while the next piece is XORed and
written); files run `jobs` at a time. OUT is compared with `result.md5` (and `--checksums`) before
it is renamed into place; it gets a `recover.json` record. Torch-free: the bytes are XORed by numpy.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import queue
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy

from workbench import __version__, provenance
from workbench.errors import CheckFailed, WorkbenchError
from workbench.io.hashing import (
    StreamHasher,
    check_against_list,
    format_lines,
    hash_file,
    parse_checksum_file,
    sha256_file,
)
from workbench.io.jsonfile import read_json
from workbench.io.layout import WEIGHT_SUFFIXES
from workbench.io.paths import check_member_name, safe_join
from workbench.outputs import Note, atomic_dir, check_can_write, check_not_input
from workbench.progress import progress_bar

META_FILE = "weight_diff.json"  # the same name as a float diff's record; "format": "xor" tells them apart
RECORD_FILE = "recover.json"  # what `wb recover` writes into OUT, as for a float diff
BASE_LIST = "base.md5"
RESULT_LIST = "result.md5"
FORMAT = "xor"
FORMAT_VERSION = 1
RULE = ("payload = tuned XOR base over the tuned file's length: base zero-padded where shorter, truncated where "
        "longer; no base file: stored as it is; gzip exactly when the payload starts with 1f 8b")
GZIP_MAGIC = b"\x1f\x8b"
GZIP_LEVEL = 6  # zlib's default: most of level 9's ratio on XOR payloads at several times the speed
CHUNK_BYTES = 2 << 20
SLOTS = 4  # chunks in flight per file: one being XORed, the others being hashed
MAX_JOBS = 4  # files at a time (each uses up to three cores: XOR and I/O, and two hash streams)
UNRECORDED_GZIP_SLACK = 1 << 30  # without recorded sizes a gzip payload decodes to at most base + 1 GiB
MAX_RECORDED_SIZE = 1 << 50
CLEAR_REFUSED = (*WEIGHT_SUFFIXES, ".gguf")  # weight files that would be published in the clear
VERSIONED = ("numpy",)  # the versions recorded: numpy does the XOR


# -- results -----------------------------------------------------------------------------------------
@dataclass
class XorReleaseResult:
    out: Path
    files: dict[str, dict]  # name -> {"size", "payload_size", "gzip", "base_size"}
    base_files: int
    lists: dict[str, str]

    @property
    def stored_as_is(self) -> list[str]:
        return [name for name, f in self.files.items() if f["base_size"] is None]

    def to_json(self) -> dict:
        return {"out": str(self.out), "format": FORMAT, "files": self.files, "base_files": self.base_files,
                "lists": self.lists, "stored_as_is": self.stored_as_is}

    def lines(self) -> list[str]:
        payload = sum(f["payload_size"] for f in self.files.values())
        zipped = sum(1 for f in self.files.values() if f["gzip"])
        shown: list[str] = [
            f"wrote {self.out}: XOR release of {len(self.files)} file(s), {payload / 1e6:.1f} MB of payload "
            f"(gzip: {zipped} of {len(self.files)}), each TUNED file XOR RAW's file of the same name",
            f"lists: {self.lists['base']} ({self.base_files} of RAW's files), "
            f"{self.lists['result']} ({len(self.files)} of TUNED's files)",
        ]
        if self.stored_as_is:
            shown.append(Note(f"note: stored as they are (RAW has no file of that name): {', '.join(self.stored_as_is)}"))
        for name, f in self.files.items():
            if f["base_size"] is not None and f["size"] > f["base_size"]:
                shown.append(Note(f"note: {name}: its last {f['size'] - f['base_size']:,} bytes lie beyond RAW's file "
                                  "and are stored as they are (XOR with zero padding)"))
        shown.append(f"wb recover --base RAW --diff {self.out} --out OUT rebuilds TUNED byte for byte, given RAW's "
                     f"files as {self.lists['base']} lists them")
        return shown


@dataclass
class XorRecoverResult:
    out: Path
    files: dict[str, dict]  # name -> {"size", <algo>: hex, "gzip", "xor"}
    algo: str
    base_files: int
    lists: dict[str, str]
    checksums: dict | None
    record: str | None  # RECORD_FILE, or None where TUNED's own file of that name is in OUT

    def to_json(self) -> dict:
        return {"out": str(self.out), "source": "xor release", "files": self.files, "algo": self.algo,
                "base_files_checked": self.base_files, "lists": self.lists, "byte_identical": True,
                "checksums": self.checksums, "record": self.record}

    def lines(self) -> list[str]:
        size = sum(f["size"] for f in self.files.values())
        zipped = sum(1 for f in self.files.values() if f["gzip"])
        plain = [name for name, f in self.files.items() if not f["xor"]]
        shown: list[str] = [
            f"recovered {len(self.files)} file(s) into {self.out} ({size / 1e6:.1f} MB) from an XOR release "
            f"(gzip payloads: {zipped})",
            f"base: {self.base_files} file(s) of RAW match {self.lists['base']} ({self.algo})",
            f"files: byte-identical to TUNED's ({self.algo} of every file checked against {self.lists['result']})",
        ]
        if plain:
            shown.append(f"stored as they are in the release (no base file): {', '.join(plain)}")
        if self.checksums:
            shown.append(f"checksums: {len(self.checksums['files'])} file(s) OK ({self.checksums['algo']})")
        if self.record is None:
            shown.append(Note(f"note: OUT's {RECORD_FILE} is the one TUNED had; this run's record is not written"))
        return shown


# -- detection -----------------------------------------------------------------------------------------
def is_xor_release(diff: Path) -> bool:
    """Whether DIFF is an XOR release: its weight_diff.json says "format": "xor"; or it has none and
    holds both lists, or weight files none of which starts like a weight file (XORed or gzipped bytes:
    OpenAssistant's payload). Reads weight_diff.json and at most 16 bytes of each weight file."""
    diff = Path(diff)
    if not diff.is_dir():
        return False
    if (diff / META_FILE).is_file():
        try:
            meta = read_json(diff / META_FILE, META_FILE)
        except WorkbenchError:
            return False  # the float reader says what is wrong with it
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    if (diff / BASE_LIST).is_file() and (diff / RESULT_LIST).is_file():
        return True
    weights = sorted(p for p in diff.iterdir() if p.suffix in CLEAR_REFUSED and p.is_file())
    return bool(weights) and not any(_starts_like_weights(p) for p in weights[:32])


def _starts_like_weights(path: Path) -> bool:
    """A safetensors header (length, then '{'), a zip (torch.save) or a pickle (legacy torch.save)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
        size = path.stat().st_size
    except OSError:
        return True  # unreadable: not evidence of a payload
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return True
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


# -- the one-file pass --------------------------------------------------------------------------------
class _Stopped(Exception):
    """Another file failed: this one stops without reporting."""


@dataclass
class _Pass:
    """One file: OUT = SIDE XOR BASE over SIDE's length, BASE hashed whole, the plain side hashed too.

    SIDE is TUNED's file when encoding (the plain side is SIDE) and the payload when decoding (the
    plain side is what is written)."""

    name: str
    side: Path
    base: Path | None
    dest: Path
    read_gzip: bool
    write_gzip: bool
    plain_is_output: bool
    plain_algos: tuple[str, ...]
    base_algo: str
    limit: int | None = None  # the most bytes SIDE may yield (decode: a gzip bomb stops here)
    limit_reason: str = ""


@dataclass
class _Done:
    side_bytes: int
    base_bytes: int
    gzip: bool  # the payload's: read as gzip (decode), written as gzip (encode)
    plain: dict[str, str]
    base: str | None


class _Slot:
    """Three chunk buffers, handed back to the free queue when every `StreamHasher` fed from them
    has hashed them (`hand_out(users)`, then one `release` per user)."""

    def __init__(self, free: queue.Queue):
        self.side, self.base, self.out = bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)
        self._free = free
        self._pending = 0
        self._lock = threading.Lock()

    def hand_out(self, users: int) -> None:
        self._pending = users

    def release(self) -> None:
        with self._lock:
            self._pending -= 1
            done = self._pending == 0
        if done:
            self._free.put(self)


_LOCAL = threading.local()


def _thread_slots() -> queue.Queue:
    """This worker thread's free chunk buffers: allocated once per thread and reused file after file
    (a pass that failed may not have given all of them back: then new ones)."""
    held = getattr(_LOCAL, "slots", None)
    if held is None or held[0] != CHUNK_BYTES or held[1].qsize() != SLOTS:
        free: queue.Queue = queue.Queue()
        for _ in range(SLOTS):
            free.put(_Slot(free))
        _LOCAL.slots = held = (CHUNK_BYTES, free)
    return held[1]


def _run_pass(job: _Pass, stop: threading.Event, advance: Callable[[int], None]) -> _Done:
    free = _thread_slots()
    plain_hash = StreamHasher(job.plain_algos)
    base_hash = StreamHasher([job.base_algo])
    try:
        with contextlib.ExitStack() as stack:
            side = _open_side(job, stack)
            base = stack.enter_context(open(job.base, "rb", buffering=0)) if job.base is not None else None
            writer = _Writer(job, stack)
            side_bytes = base_bytes = 0
            while True:
                if stop.is_set():
                    raise _Stopped
                slot = free.get()
                count = _read_side(side, slot.side, job)
                if count == 0:
                    free.put(slot)
                    break
                side_bytes += count
                if job.limit is not None and side_bytes > job.limit:
                    raise WorkbenchError(f"payload {job.name} decodes to more than {job.limit:,} bytes "
                                         f"({job.limit_reason}); refusing it", job.side)
                matched = _fill(base, memoryview(slot.base)[:count]) if base is not None else 0
                base_bytes += matched
                _xor_into(slot, count, matched)
                out = memoryview(slot.out)[:count]
                slot.hand_out(1 + (matched > 0))
                plain_hash.update(out if job.plain_is_output else memoryview(slot.side)[:count], slot.release)
                if matched:
                    base_hash.update(memoryview(slot.base)[:matched], slot.release)
                writer.write(out)
                advance(count + matched)
            if base is not None:
                base_bytes += _hash_rest(base, free, base_hash, stop, advance)
            writer.close()
    finally:
        plain, base_digest = plain_hash.hexdigests(), base_hash.hexdigests()
    return _Done(side_bytes, base_bytes, job.read_gzip or job.write_gzip, plain,
                 base_digest[job.base_algo] if job.base is not None else None)


def _hash_rest(base: IO[bytes], free: queue.Queue, base_hash: StreamHasher, stop: threading.Event,
               advance: Callable[[int], None]) -> int:
    """Hash the rest of a base longer than the file it was XORed with: its list entry covers it whole."""
    total = 0
    while True:
        if stop.is_set():
            raise _Stopped
        slot = free.get()
        count = _fill(base, memoryview(slot.base))
        if count == 0:
            free.put(slot)
            return total
        total += count
        slot.hand_out(1)
        base_hash.update(memoryview(slot.base)[:count], slot.release)
        advance(count)


def _xor_into(slot: _Slot, count: int, matched: int) -> None:
    side, base, out = (numpy.frombuffer(b, numpy.uint8) for b in (slot.side, slot.base, slot.out))
    numpy.bitwise_xor(side[:matched], base[:matched], out=out[:matched])
    out[matched:count] = side[matched:count]  # beyond the base: XOR with zero padding


def _open_side(job: _Pass, stack: contextlib.ExitStack) -> IO[bytes]:
    raw = stack.enter_context(open(job.side, "rb", buffering=0))
    if not job.read_gzip:
        return raw
    return stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))


def _read_side(side: IO[bytes], buffer: bytearray, job: _Pass) -> int:
    """The next chunk of SIDE; a damaged gzip stream is one error naming the payload."""
    try:
        return _fill(side, memoryview(buffer))
    except EOFError:
        raise WorkbenchError(f"payload {job.name} is a truncated gzip stream (it ends before gzip's end marker)",
                             job.side) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise WorkbenchError(f"payload {job.name} is not a valid gzip stream: {exc}", job.side) from None


def _fill(handle: IO[bytes], view: memoryview) -> int:
    """Read until `view` is full or the file ends; the count read."""
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            break
        done += count
    return done


class _Writer:
    """The destination file, plain or gzip, created at the first write (or empty at close)."""

    def __init__(self, job: _Pass, stack: contextlib.ExitStack):
        self.job = job
        self.stack = stack.enter_context(contextlib.ExitStack())
        self.handle: IO[bytes] | None = None

    def write(self, data: memoryview) -> None:
        if self.handle is None:
            self._open()
        self.handle.write(data)

    def close(self) -> None:
        if self.handle is None:
            self._open()
        self.stack.close()  # the gzip stream first, then its file

    def _open(self) -> None:
        raw = self.stack.enter_context(open(self.job.dest, "wb", buffering=0))
        if self.job.write_gzip:
            self.handle = self.stack.enter_context(
                gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0))
        else:
            self.handle = raw


def _run_all(tasks: list[Callable[[threading.Event], object]], jobs: int) -> list:
    """Run tasks `jobs` at a time; the first failure (in task order) stops the others and is raised."""
    stop = threading.Event()

    def guarded(task: Callable[[threading.Event], object]):
        try:
            return task(stop)
        except BaseException:
            stop.set()
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures: list[Future] = []
    try:
        futures = [pool.submit(guarded, task) for task in tasks]
        wait_all(futures)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        failure = future.exception()
        if failure is not None and not isinstance(failure, _Stopped):
            raise failure
    return [future.result() for future in futures]


def _jobs() -> int:
    return max(1, min(MAX_JOBS, (os.cpu_count() or 1) // 2))


# -- wb diff --format xor -------------------------------------------------------------------------------
def make_xor_release(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    compress: bool = False,
    command: str | None = None,
) -> XorReleaseResult:
    """Write an XOR release of TUNED against RAW into `out` (atomically).

    Every top-level file of TUNED (hidden files aside) becomes a payload file of the same name: its
    bytes XOR RAW's file of that name (or stored as they are where RAW has none, refused for weight
    files, which would then be published in the clear). `compress`: gzip every payload (xor_codec's
    --compress). `command`: the command line weight_diff.json records (None: this process's)."""
    out, base, tuned = Path(out), Path(base), Path(tuned)
    for folder, label in ((base, "RAW"), (tuned, "TUNED")):
        if not folder.is_dir():
            raise WorkbenchError(f"an XOR release is made file by file from two folders; {label} is not a folder", folder)
    check_can_write(out, force)
    check_not_input(out, [base, tuned])
    names = _folder_files(tuned, "TUNED")
    if not names:
        raise WorkbenchError("TUNED has no files to publish", tuned)
    for name in names:
        if name in (META_FILE, BASE_LIST, RESULT_LIST):
            raise WorkbenchError(f"TUNED has a file named {name}, which an XOR release uses for itself", tuned / name)
    bases = {name: base / name if (base / name).is_file() else None for name in names}
    for name, counterpart in bases.items():
        if counterpart is None and name.endswith(CLEAR_REFUSED):
            raise WorkbenchError(
                f"RAW has no file named {name}: TUNED's would be published in the clear; an XOR release needs RAW and "
                "TUNED in the same file layout (same shard names), else publish a float diff (wb diff)", tuned / name)
    if not any(bases.values()):
        raise WorkbenchError("RAW has none of TUNED's files: there is nothing to XOR against", base)
    with atomic_dir(out, force, inputs=[base, tuned]) as tmp:
        total = sum((tuned / n).stat().st_size + (b.stat().st_size if b else 0) for n, b in bases.items())
        with progress_bar(total, "xor encode") as bar:
            tasks = [_encode_task(name, tuned / name, bases[name], tmp / name, compress, bar.update)
                     for name in names]
            done: list[_Done] = _run_all(tasks, _jobs())
        files = {
            name: {"size": d.side_bytes, "payload_size": (tmp / name).stat().st_size, "gzip": d.gzip,
                   "base_size": d.base_bytes if bases[name] is not None else None}
            for name, d in zip(names, done)
        }
        base_md5 = {name: d.base for name, d in zip(names, done) if d.base is not None}
        (tmp / BASE_LIST).write_text(format_lines(base_md5), encoding="utf-8")
        (tmp / RESULT_LIST).write_text(format_lines({n: d.plain["md5"] for n, d in zip(names, done)}), encoding="utf-8")
        meta = _release_meta(base, tuned, files, command)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return XorReleaseResult(out=out, files=files, base_files=len(base_md5), lists=dict(meta["lists"]))


def _encode_task(name: str, side: Path, base: Path | None, dest: Path, compress: bool,
                 advance: Callable[[int], None]) -> Callable[[threading.Event], _Done]:
    job = _Pass(name=name, side=side, base=base, dest=dest, read_gzip=False,
                write_gzip=compress or _payload_head(side, base) == GZIP_MAGIC,
                plain_is_output=False, plain_algos=("md5",), base_algo="md5")
    return lambda stop: _run_pass(job, stop, advance)


def _payload_head(side: Path, base: Path | None) -> bytes:
    """A payload's first two bytes. A plain payload that would start with gzip's magic is gzipped
    instead, so that in a release made by wb the magic bytes always tell the truth."""
    with open(side, "rb") as handle:
        head = handle.read(2)
    pad = b""
    if base is not None:
        with open(base, "rb") as handle:
            pad = handle.read(len(head))
    pad = pad.ljust(len(head), b"\0")
    return bytes(a ^ b for a, b in zip(head, pad))


def _release_meta(base: Path, tuned: Path, files: dict[str, dict], command: str | None) -> dict:
    made = provenance.record(VERSIONED, command)
    return {
        "format": FORMAT,
        "wb_xor_release_version": FORMAT_VERSION,
        "created_by": f"wb {__version__}",
        "created": made["created"],
        "provenance": made,
        "codec": "xor_codec",
        "rule": RULE,
        "lists": {"base": BASE_LIST, "result": RESULT_LIST},
        "base": {"name": base.resolve().name, "files": sum(1 for f in files.values() if f["base_size"] is not None)},
        "tuned": {"name": tuned.resolve().name, "files": len(files), "size": sum(f["size"] for f in files.values())},
        "files": files,
    }


def _folder_files(folder: Path, label: str) -> list[str]:
    """The top-level files of a folder (symlinks to files count: the hub cache), hidden ones aside, sorted."""
    names = []
    for entry in sorted(os.listdir(folder)):
        if entry.startswith("."):
            continue
        if (folder / entry).is_file():
            names.append(check_member_name(entry, f"{label} has a file named", folder))
    return names


# -- wb recover on an XOR release ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One file of the result, as the lists and weight_diff.json describe it."""

    name: str
    digest: str  # from the result list
    base_digest: str | None  # from the base list; None: stored as it is
    size: int | None = None  # recorded by weight_diff.json
    payload_size: int | None = None
    gzip: bool | None = None
    base_size: int | None = None


@dataclass
class _Release:
    folder: Path
    lists: dict[str, str]
    list_paths: dict[str, Path]
    result_algo: str
    base_algo: str
    entries: list[_Entry]
    base_only: dict[str, str]  # listed RAW files no payload file needs, checked all the same
    meta_sha256: str | None = None
    list_sha256: dict[str, str] = field(default_factory=dict)


def recover_xor(
    base: str | Path,
    diff: str | Path,
    out: str | Path,
    *,
    checksums: str | Path | None = None,
    force: bool = False,
    command: str | None = None,
) -> XorRecoverResult:
    """Rebuild TUNED from RAW and an XOR release into `out`; every check passes before `out` appears.

    `checksums`: an extra md5sum/sha256sum list of OUT's files. `command`: the command line
    recover.json records (None: this process's)."""
    out, base, diff = Path(out), Path(base), Path(diff)
    if not diff.is_dir():
        raise WorkbenchError("an XOR release is a folder of payload files and two md5 lists", diff)
    if not base.is_dir():
        raise WorkbenchError("an XOR release is decoded file by file against a folder; RAW is not a folder", base)
    check_can_write(out, force)
    check_not_input(out, [base, diff, checksums])
    extra = parse_checksum_file(Path(checksums)) if checksums is not None else None
    release = _read_release(diff)
    _check_base_present(release, base)
    algos = tuple(dict.fromkeys([release.result_algo] + ([extra[0]] if extra else [])))
    with atomic_dir(out, force, inputs=[base, diff, checksums]) as tmp:
        total = sum(_expected_bytes(release, base, e) for e in release.entries) + \
            sum((base / name).stat().st_size for name in release.base_only)
        with progress_bar(total, "xor decode") as bar:
            tasks = [_base_only_task(release, base, name, digest, bar.update)
                     for name, digest in release.base_only.items()]
            tasks += [_decode_task(release, base, entry, tmp, algos, bar.update) for entry in release.entries]
            done = _run_all(tasks, _jobs())[len(release.base_only):]
        files = {
            entry.name: {"size": d.side_bytes, **d.plain, "gzip": d.gzip, "xor": d.base is not None}
            for entry, d in zip(release.entries, done)
        }
        checked = None
        if extra is not None:
            failures: list[str] = []
            checked = check_against_list(extra, files, tmp, failures)
            if failures:
                raise CheckFailed(failures, out)
        record = None if RECORD_FILE in files else RECORD_FILE
        result = XorRecoverResult(out=out, files=files, algo=release.result_algo,
                                  base_files=len(release.base_only) + sum(1 for e in release.entries if e.base_digest),
                                  lists=release.lists, checksums=checked, record=record)
        if record is not None:
            text = json.dumps(_record(result, release, base, diff, checksums, command), indent=2, ensure_ascii=False)
            (tmp / RECORD_FILE).write_text(text + "\n", encoding="utf-8")
    return result


def _read_release(diff: Path) -> _Release:
    """The release's lists and record, checked against each other and against the payload folder."""
    meta_path = diff / META_FILE
    meta = _read_meta(meta_path) if meta_path.is_file() else None
    lists = {"base": BASE_LIST, "result": RESULT_LIST} if meta is None else meta["lists"]
    paths = {kind: safe_join(diff, name, f"{META_FILE} names a {kind} list", meta_path) for kind, name in lists.items()}
    for kind, path in paths.items():
        if not path.is_file():
            raise WorkbenchError(
                f"an XOR release needs its {kind} list {lists[kind]} (md5sum lines of the {kind}'s files) "
                "beside its payload; there is none"
                + ("" if meta else f": save the model card's lists as {BASE_LIST} and {RESULT_LIST}"), diff)
    base_algo, base_list = parse_checksum_file(paths["base"])
    result_algo, result_list = parse_checksum_file(paths["result"])
    own = {META_FILE, *lists.values()}
    held = [name for name in _folder_files(diff, "the release") if name not in own]
    for name in held:
        if name not in result_list:
            raise WorkbenchError(f"the release holds {name!r}, which {lists['result']} does not list", diff / name)
    for name in result_list:
        if name not in held:
            raise WorkbenchError(f"{lists['result']} names {name!r}, which the release does not hold", paths["result"])
    recorded = meta["files"] if meta is not None else {}
    if meta is not None and set(recorded) != set(result_list):
        odd = sorted(set(recorded) ^ set(result_list))[0]
        raise WorkbenchError(f"{META_FILE} does not match {lists['result']}: only one of them names {odd!r}", meta_path)
    entries = []
    for name, digest in result_list.items():
        entry = _Entry(name=name, digest=digest, base_digest=base_list.get(name), **recorded.get(name, {}))
        if meta is not None and (entry.base_size is None) != (entry.base_digest is None):
            raise WorkbenchError(f"{META_FILE} does not match {lists['base']} about {name!r} (XORed or stored as it is)",
                                 meta_path)
        _check_payload_file(entry, diff, meta_path)
        entries.append(entry)
    return _Release(
        folder=diff, lists=dict(lists), list_paths=paths, result_algo=result_algo, base_algo=base_algo,
        entries=entries, base_only={n: d for n, d in base_list.items() if n not in result_list},
        meta_sha256=sha256_file(meta_path) if meta is not None else None,
        list_sha256={kind: sha256_file(path) for kind, path in paths.items()},
    )


def _read_meta(path: Path) -> dict:
    """weight_diff.json of an XOR release: what recover uses of it, each value checked."""
    meta = read_json(path, META_FILE, allow_nan=False, problem=f"{META_FILE} does not parse")
    if not isinstance(meta, dict):
        raise WorkbenchError(f"{META_FILE} is not a JSON object", path)
    if meta.get("format") != FORMAT:
        if "wb_weight_diff_version" in meta:
            raise WorkbenchError(f"{META_FILE} describes a float diff, not an XOR release; drop --format xor", path)
        raise WorkbenchError(f'{META_FILE} does not say "format": "xor"; this is not an XOR release', path)
    if meta.get("wb_xor_release_version") != FORMAT_VERSION:
        raise WorkbenchError(f"{META_FILE} has XOR release version {meta.get('wb_xor_release_version')!r}; "
                             f"this wb reads version {FORMAT_VERSION}", path)
    lists = meta.get("lists")
    if not isinstance(lists, dict) or set(lists) != {"base", "result"}:
        raise WorkbenchError(f'{META_FILE} does not parse: "lists" must name a "base" and a "result" list', path)
    clean = {kind: check_member_name(lists[kind], f"{META_FILE} names a {kind} list", path) for kind in ("base", "result")}
    if clean["base"] == clean["result"] or META_FILE in clean.values():
        raise WorkbenchError(f'{META_FILE} does not parse: "lists" must name two files other than {META_FILE}', path)
    files = meta.get("files")
    if not isinstance(files, dict):
        raise WorkbenchError(f'{META_FILE} does not parse: "files" is not an object', path)
    checked = {}
    for name, entry in files.items():
        clean_name = check_member_name(name, f"{META_FILE} names a file", path)
        checked[clean_name] = _checked_file_entry(entry, name, path)
    return {"lists": clean, "files": checked}


def _checked_file_entry(entry: object, name: str, path: Path) -> dict:
    where = f'{META_FILE} does not parse: "files"[{name!r}]'
    if not isinstance(entry, dict):
        raise WorkbenchError(f"{where} is not an object", path)

    def size(key: str, optional: bool = False) -> int | None:
        value = entry.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RECORDED_SIZE:
            raise WorkbenchError(f"{where}.{key} is not a byte count", path)
        return value

    if not isinstance(entry.get("gzip"), bool):
        raise WorkbenchError(f"{where}.gzip is not true or false", path)
    checked = {"size": size("size"), "payload_size": size("payload_size"), "gzip": entry["gzip"],
               "base_size": size("base_size", optional=True)}
    if not checked["gzip"] and checked["size"] != checked["payload_size"]:
        raise WorkbenchError(f"{where}: a plain payload's size must be the file's size", path)
    return checked


def _check_payload_file(entry: _Entry, diff: Path, meta_path: Path) -> None:
    """What can be told of a payload file without decoding it: its size and gzip's magic bytes."""
    payload = diff / entry.name
    size = payload.stat().st_size
    if entry.payload_size is not None and size != entry.payload_size:
        raise WorkbenchError(f"payload {entry.name} has {size:,} bytes, {META_FILE} records "
                             f"{entry.payload_size:,}: the download is incomplete or damaged", payload)
    if entry.gzip is not None and _is_gzip(payload) != entry.gzip:
        found = "is not" if entry.gzip else "is"
        raise WorkbenchError(f"payload {entry.name} {found} gzip (by its first bytes), {META_FILE} records the "
                             "opposite: the release is damaged", payload)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


SAME_CONVERSION = ("the base must come from the same conversion as the publisher's (same files, byte for byte: "
                   "the same tool, versions and dtype)")


def _check_base_present(release: _Release, base: Path) -> None:
    """Before any byte is decoded: every RAW file the base list names exists, with its recorded size."""
    sizes = {e.name: e.base_size for e in release.entries}
    for name in [*release.base_only, *(e.name for e in release.entries if e.base_digest)]:
        path = safe_join(base, name, f"{release.lists['base']} names a file", release.list_paths["base"])
        if not path.is_file():
            raise WorkbenchError(f"RAW lacks {name}, which {release.lists['base']} lists; {SAME_CONVERSION}", base)
        recorded = sizes.get(name)
        if recorded is not None and path.stat().st_size != recorded:
            raise WorkbenchError(f"RAW's {name} has {path.stat().st_size:,} bytes, the publisher's had {recorded:,}; "
                                 f"{SAME_CONVERSION}", path)


def _expected_bytes(release: _Release, base: Path, entry: _Entry) -> int:
    side = entry.size if entry.size is not None else (release.folder / entry.name).stat().st_size
    return side + ((base / entry.name).stat().st_size if entry.base_digest else 0)


def _base_mismatch(release: _Release, base: Path, name: str, expected: str, found: str) -> WorkbenchError:
    algo = release.base_algo
    return WorkbenchError(f"RAW's {name} differs from the file this release was made against ({algo} expected "
                          f"{expected}, found {found}); {SAME_CONVERSION}", base / name)


def _base_only_task(release: _Release, base: Path, name: str, digest: str,
                    advance: Callable[[int], None]) -> Callable[[threading.Event], None]:
    def task(stop: threading.Event) -> None:
        if stop.is_set():
            raise _Stopped
        found = hash_file(base / name, (release.base_algo,), advance)[release.base_algo]
        if found != digest:
            raise _base_mismatch(release, base, name, digest, found)

    return task


def _decode_task(release: _Release, base: Path, entry: _Entry, tmp: Path, algos: tuple[str, ...],
                 advance: Callable[[int], None]) -> Callable[[threading.Event], _Done]:
    payload = release.folder / entry.name
    compressed = _is_gzip(payload)
    base_file = base / entry.name if entry.base_digest else None
    if entry.size is not None:
        limit, reason = entry.size, f"{META_FILE} records {entry.size:,}"
    elif compressed:
        limit = (base_file.stat().st_size if base_file else 0) + UNRECORDED_GZIP_SLACK
        reason = "its base file's size plus 1 GiB, without a recorded size"
    else:
        limit, reason = None, ""
    job = _Pass(name=entry.name, side=payload, base=base_file, dest=tmp / entry.name, read_gzip=compressed,
                write_gzip=False, plain_is_output=True, plain_algos=algos, base_algo=release.base_algo,
                limit=limit, limit_reason=reason)

    def task(stop: threading.Event) -> _Done:
        done = _run_pass(job, stop, advance)
        if entry.base_digest is not None and done.base != entry.base_digest:
            raise _base_mismatch(release, base, entry.name, entry.base_digest, done.base)
        if entry.size is not None and done.side_bytes != entry.size:
            raise WorkbenchError(f"payload {entry.name} decodes to {done.side_bytes:,} bytes, {META_FILE} records "
                                 f"{entry.size:,}: the release is damaged", payload)
        found = done.plain[release.result_algo]
        if found != entry.digest:
            raise WorkbenchError(f"decoded {entry.name} does not match {release.lists['result']} ({release.result_algo} "
                                 f"expected {entry.digest}, found {found}): the payload is damaged", payload)
        return done

    return task


def _record(result: XorRecoverResult, release: _Release, base: Path, diff: Path, checksums: str | Path | None,
            command: str | None) -> dict:
    """recover.json: the inputs (the release's record and lists by sha256), OUT's files, the settings."""
    return {
        "source": "xor release",
        "inputs": {
            "base": {"path": str(base.resolve()), "files_checked": result.base_files,
                     "verified": f"every listed file's {release.base_algo}, against {release.lists['base']}"},
            "diff": {"path": str(diff.resolve()), "format": FORMAT, "weight_diff_sha256": release.meta_sha256,
                     "lists": {kind: {"name": release.lists[kind], "sha256": release.list_sha256[kind]}
                               for kind in ("base", "result")}},
            "checksums": str(Path(checksums).resolve()) if checksums is not None else None,
        },
        "output": {"files": result.files, "byte_identical": True, "checksums": result.checksums},
        "settings": {"format": FORMAT, "jobs": _jobs(), "chunk_bytes": CHUNK_BYTES},
        **provenance.record(VERSIONED, command),
    }
