"""Helpers of tests/test_hostile.py: sandboxes that notice every stray write, a strict check of a
`wb` run's outcome, hypothesis strategies that damage valid files, and the valid files themselves.

The contract checked: whatever bytes a file `wb` reads holds, the command ends in success (exit
0) or in a WorkbenchError (exit 1, one `error: ` line on stderr, after `FAILED: ` lines for a
failed check), never another exception or a traceback, and it changes nothing outside its OUT.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import stat
import struct
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from workbench.cli import wb

# -- sandboxes -------------------------------------------------------------------------------------
# Inputs live DEPTH folders below the sandbox root, so that a crafted `../` (TRAVERSAL levels at
# most, plus one per stacked mutation, from OUT's temporary sibling or from any input folder)
# still lands inside the root, where the snapshot sees it: tests may run as root, and a crafted
# name must never reach the real file system. (Strays beside the sandbox, in the temporary
# folder and in / are looked for too.)
DEPTH = 11
TRAVERSAL = 7
MARK = "wbescape"  # in every name a crafted path tries to create
HASH_LIMIT = 1 << 20  # files up to this size are compared by content too


# Every file a command opens (or tries to), from the interpreter's "open" audit event: hashing or
# parsing a file outside the command's inputs is caught even when it leaves no trace on disk.
_OPENED: list[str] | None = None


def _audit(name: str, args: tuple) -> None:
    if name != "open" or _OPENED is None:
        return
    try:
        path = args[0]
        if not isinstance(path, int):
            _OPENED.append(os.path.abspath(os.fsdecode(path)))
    except Exception:  # noqa: BLE001 - an audit hook must never raise
        pass


sys.addaudithook(_audit)


@dataclass(frozen=True)
class Entry:
    kind: str  # file, dir, link, other
    size: int
    mtime_ns: int
    digest: str | None  # sha256 of a small file; the target of a link


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under root (links not followed): type, size, mtime_ns, and a hash when small."""
    entries: dict[str, Entry] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = Entry("link", info.st_size, info.st_mtime_ns, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                # a folder's mtime moves when a temporary sibling comes and goes: existence only
                entries[rel] = Entry("dir", 0, 0, None)
            elif stat.S_ISREG(info.st_mode):
                digest = None
                if info.st_size <= HASH_LIMIT:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[rel] = Entry("file", info.st_size, info.st_mtime_ns, digest)
            else:
                entries[rel] = Entry("other", 0, info.st_mtime_ns, None)
    return entries


class Sandbox:
    """A fresh folder per example: `home` holds the inputs, `root` is what the snapshot covers."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wb-hostile-")).resolve()
        self.home = self.root.joinpath(*(f"d{i}" for i in range(DEPTH)))
        self.home.mkdir(parents=True)
        self.outs: list[Path] = []
        self.readable: list[Path] = []
        self._before: dict[str, Entry] | None = None
        self._tmp_before: set[str] = set()

    # building the inputs
    def path(self, *parts: str) -> Path:
        return self.home.joinpath(*parts)

    def substitute(self, data: bytes) -> bytes:
        """Crafted absolute paths are written as {ROOT}/... and {HOME}/...: always inside the sandbox."""
        return data.replace(b"{ROOT}", str(self.root).encode()).replace(b"{HOME}", str(self.home).encode())

    def copy(self, source: Path, *parts: str) -> Path:
        target = self.path(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
        return target

    def write(self, data: bytes, *parts: str) -> Path:
        target = self.path(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.substitute(data))
        return target

    # watching the run
    def out(self, *parts: str) -> Path:
        """A path the command may create (its OUT); nothing else may appear."""
        path = self.path(*parts)
        self.outs.append(path)
        return path

    def may_read(self, *paths: Path) -> None:
        """Inputs the command may open (files, or folders and everything below them); OUT counts too."""
        self.readable += [Path(os.path.realpath(p)) for p in paths]

    def freeze(self) -> None:
        self._before = snapshot(self.root)
        self._tmp_before = _strays()

    def check(self, result, forbidden: tuple[str, ...] = ("/etc/passwd", "/etc/shadow")) -> None:
        """The outcome is clean (check_outcome), then check_untouched and check_reads."""
        check_outcome(result)
        self.check_untouched(result.argv)
        self.check_reads(result, forbidden)

    def check_reads(self, result, forbidden: tuple[str, ...] = ("/etc/passwd", "/etc/shadow")) -> None:
        """Inside the sandbox, only may_read() inputs and OUT (with its temporary siblings) were opened."""
        allowed = self.readable + [Path(os.path.realpath(o)) for o in self.outs]
        tmp_prefixes = [f".wb-tmp-{o.name}" for o in self.outs] + [f".wb-old-{o.name}" for o in self.outs]
        strays = []
        for opened in dict.fromkeys(result.opened):
            if "\x00" in opened:
                continue  # cannot be opened at all
            real = Path(os.path.realpath(opened))
            if str(real) in forbidden or opened in forbidden:
                strays.append(opened)
                continue
            if not real.is_relative_to(self.root):
                continue  # the interpreter's own files
            if any(real == a or real.is_relative_to(a) for a in allowed):
                continue
            if any(part.startswith(tuple(tmp_prefixes)) for part in real.relative_to(self.root).parts):
                continue
            strays.append(opened if str(real) == opened else f"{opened} (-> {real})")
        assert not strays, f"`wb {' '.join(result.argv)}` opened files that are not its inputs: {strays[:5]}"

    def check_untouched(self, command: list[str]) -> None:
        """Inputs unchanged, and every new path is OUT or inside it (no `.wb-tmp-*` debris either)."""
        assert self._before is not None, "freeze() the sandbox before running"
        after = snapshot(self.root)
        outs = [o.relative_to(self.root).as_posix() for o in self.outs]

        def in_out(rel: str) -> bool:
            return any(rel == o or rel.startswith(o + "/") for o in outs)

        changed = sorted(rel for rel, entry in self._before.items() if not in_out(rel) and after.get(rel) != entry)
        assert not changed, f"`wb {' '.join(command)}` changed or removed inputs: {changed[:5]}"
        created = sorted(rel for rel in after if rel not in self._before and not in_out(rel))
        assert not created, f"`wb {' '.join(command)}` created files outside its OUT: {created[:5]}"
        escaped = _strays() - self._tmp_before
        assert not escaped, f"`wb {' '.join(command)}` wrote outside the sandbox: {sorted(escaped)[:5]}"

    def close(self) -> None:
        def unlock(func, path, _exc):  # a command may leave a read-only file or folder behind
            os.chmod(path, 0o700)
            func(path)

        shutil.rmtree(self.root, onerror=unlock)
        for stray in _strays() - self._tmp_before:
            path = Path(stray)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _strays() -> set[str]:
    """Paths with MARK in their name beside the sandboxes, in the temporary folder and in /."""
    found = set()
    for folder in {Path(tempfile.gettempdir()), Path(tempfile.gettempdir()).resolve(), Path("/")}:
        try:
            found |= {str(folder / name) for name in os.listdir(folder) if MARK in name}
        except OSError:
            pass
    return found


# -- running wb and judging the outcome ------------------------------------------------------------
RUN_SECONDS = 120  # a hostile file must not make wb hang
MEMORY_HEADROOM = 6 << 30  # nor allocate without bound: address space allowed beyond the current use
# CUDA's driver reserves far more address space than it uses, so the bound is left off where a GPU
# is visible (or with WB_HOSTILE_NO_RLIMIT=1); the time bound still holds there.
LIMIT_MEMORY = not Path("/dev/nvidiactl").exists() and os.environ.get("WB_HOSTILE_NO_RLIMIT", "") in ("", "0")


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang(f"wb did not finish within {RUN_SECONDS} s")


def _vm_size() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_wb(args: list[str | Path], cwd: Path | None = None):
    """`wb ARGS` in-process (exceptions caught into result.exception), time- and memory-bounded."""
    argv = [str(a) for a in args]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    global _OPENED
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    old_cwd = os.getcwd()
    opened: list[str] = []
    try:
        if cwd is not None:
            os.chdir(cwd)
        if LIMIT_MEMORY:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        signal.alarm(RUN_SECONDS)
        _OPENED = opened
        result = CliRunner().invoke(wb, argv, catch_exceptions=True)
    finally:
        _OPENED = None
        signal.alarm(0)
        if LIMIT_MEMORY:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
    result.argv = argv
    result.opened = opened
    return result


def where(exc: BaseException) -> str:
    """'file:line in function' of the innermost frame, and of the innermost workbench frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    text = f"{_short(last.filename)}:{last.lineno} in {last.name}"
    ours = [f for f in frames if "/workbench/" in f.filename]
    if ours and ours[-1] is not last:
        text += f" (from {_short(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name})"
    return text


def _short(filename: str) -> str:
    if "/workbench/" in filename:
        return "workbench/" + filename.rsplit("/workbench/", 1)[1]
    if "/site-packages/" in filename:
        return filename.rsplit("/site-packages/", 1)[1]
    return filename


_GIST_CUT = re.compile(r"[(:'\"]")  # an error's gist: its words before any name, quote or path


def check_outcome(result) -> None:
    """Success, or a clean WorkbenchError: exit 1 with exactly one `error: ` line, the last on stderr.

    An unexpected exception is re-raised as it was (with a note naming the command), so that
    pytest shows where it came from and hypothesis tells distinct bugs apart by their origin."""
    exc = result.exception
    command = "wb " + " ".join(result.argv)
    if exc is not None and not isinstance(exc, SystemExit):
        exc.add_note(f"raised by `{command}` (exit {result.exit_code}) at {where(exc)}; "
                     "a hostile input must end in a WorkbenchError")
        raise exc
    stdout, stderr = result.stdout, result.stderr
    if currently_in_test_context():  # for --hypothesis-show-statistics: how far the damage got
        last = stderr.strip().splitlines()[-1] if result.exit_code and stderr.strip() else "ok"
        gist = " ".join(_GIST_CUT.split(last.removeprefix("error: "))[0].split()[:6])
        event(f"exit {result.exit_code}: {gist}")
    assert "Traceback (most recent call last)" not in stdout + stderr, f"`{command}` printed a traceback:\n{stderr[-3000:]}"
    if result.exit_code == 0:
        return
    assert result.exit_code == 1, f"`{command}` exited {result.exit_code} (expected 0, or 1 with one error line):\n{stderr[-2000:]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"`{command}` exited 1 with {len(errors)} `error: ` lines on stderr:\n{stderr[-2000:]}"
    assert lines[-1] == errors[0], f"`{command}`: the `error: ` line is not the last line of stderr:\n{stderr[-2000:]}"


# -- hypothesis strategies: hostile JSON -------------------------------------------------------------
class Blob(bytes):
    """A generated file whose repr, in a falsifying example, says how it differs from the valid
    file it was made from (the one changed run of bytes, with some context) instead of dumping it."""

    reference: bytes | None = None

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' printer: ahead of how the value was built
        printer.text(repr(self))

    def __repr__(self) -> str:
        data, ref = bytes(self), self.reference
        if ref is None or len(data) <= 200:
            return f"Blob({data!r})" if len(data) <= 600 else f"Blob({len(data)} bytes: {data[:400]!r} ... {data[-120:]!r})"
        if data == ref:
            return f"Blob(the valid file, unchanged, {len(data)} bytes)"
        prefix = 0
        while prefix < min(len(data), len(ref)) and data[prefix] == ref[prefix]:
            prefix += 1
        suffix = 0
        while suffix < min(len(data), len(ref)) - prefix and data[-1 - suffix] == ref[-1 - suffix]:
            suffix += 1
        was, now = ref[prefix:len(ref) - suffix], data[prefix:len(data) - suffix]
        context = ref[max(0, prefix - 60):prefix]
        return (f"Blob({len(data)} bytes; the valid file ({len(ref)} bytes) with bytes {prefix}..{len(ref) - suffix} "
                f"{_clip(was)} replaced by {_clip(now)}, after {_clip(context)})")


def _clip(data: bytes, limit: int = 300) -> str:
    return repr(data) if len(data) <= limit else f"{data[:limit // 2]!r}...({len(data)} bytes)...{data[-limit // 4:]!r}"


def blob(data: bytes, reference: bytes | None = None) -> Blob:
    made = Blob(data)
    made.reference = reference
    return made


def blobs(strategy, reference: bytes | None = None):
    """`strategy`'s bytes as Blobs, described against the valid `reference` they were made from."""
    return strategy.map(lambda data: blob(data, reference))


HOSTILE_INTS = [0, -1, 1, 2, 3, 7, -7, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63, 10**30,
                -10**30, 10**400]
HOSTILE_DIMS = [0, 1, 2, 3, 4, -1, -2, -4, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, 1.0, 2.5, "4", None,
                True, [4]]
HOSTILE_FLOATS = [0.5, -0.0, 1.5, -2.5, 1e-300, 1e308, -1e308, math.nan, math.inf, -math.inf]
DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
               "F8_E5M2", "F4", "Q4_0", "C64", "f32", "float32", "bfloat16", "float16", "int64", "bool", "uint8",
               "float8_e4m3fn", "complex64", "torch.float32", "Tensor", "__class__", "quint8"]
PATH_STRINGS = (
    [("../" * k) + f"{MARK}-{k}.safetensors" for k in range(1, TRAVERSAL + 1)]
    + [f"sub/{'../' * k}{MARK}-s{k}.safetensors" for k in (2, 3, TRAVERSAL)]
    + ["{ROOT}/" + MARK + "-abs.safetensors", "{HOME}/" + MARK + "-home.safetensors", "{ROOT}/" + MARK + "-dir/",
       "{ROOT}", "{HOME}",
       "", ".", "..", "/", "./", "sub/x.safetensors", "./model.safetensors", "model.safetensors",
       "model-00001-of-00002.safetensors", "config.json", "weight_diff.json", "adapter_config.json",
       "x\x00.safetensors", "\x00", "a" * 300 + ".safetensors", "con", "x\\..\\y.safetensors",
       "x\n.safetensors", " model.safetensors", "model.safetensors ", "~/" + MARK, "$HOME/" + MARK,
       "model.safetensors/..", "../lure.safetensors", "{HOME}/lure.safetensors"]
)
OTHER_STRINGS = ["", " ", "nan", "NaN", "inf", "-1", "1e999", "0x10", "true", "null", "None", "{}", "[]", "é", "💥",
                 "\u202e", "\n", "\t", "A" * 5000, "%s%n", "{0}", "<script>", "LORA", "lora", "IA3",
                 "none", "all", "all-linear", ".*", "(", "[", "*", "(?P<x", "a{99999}", "(a+)+$", "\\", "q_proj",
                 "v_proj", "lm_head", "embed_tokens", "pissa", "loftq", "eva"]
HOSTILE_STRINGS = DTYPE_NAMES + PATH_STRINGS + OTHER_STRINGS

scalars = st.one_of(
    st.sampled_from(HOSTILE_INTS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(HOSTILE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
)
hostile_keys = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=8))
hostile_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(hostile_keys, children, max_size=3)),
    max_leaves=8,
)

# whole documents a JSON file may be replaced with (some are not JSON, some are too deep to parse)
RAW_DOCUMENTS = [b"", b" ", b"null", b"0", b"-1", b"1e999", b"NaN", b"Infinity", b'"text"', b"[]", b"{}", b"[{}]",
                 b"{", b"}", b'{"a":', b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"\x00" * 16, b"\xc3\x28",
                 b"[" * 100_000, b'{"a":' * 50_000, b"[" * 100_000 + b"]" * 100_000, b'{"a": 1, "a": 2}',
                 b'{"\\ud800": 1}', b'"\\ud800"', b"1" * 5000]


def json_paths(doc, prefix: tuple = ()) -> list[tuple]:
    """Every node's path (keys and indices), the root first."""
    paths = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            paths += json_paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            paths += json_paths(value, prefix + (index,))
    return paths


def get_at(doc, path: tuple):
    for part in path:
        doc = doc[part]
    return doc


def set_at(doc, path: tuple, value):
    if not path:
        return value
    get_at(doc, path[:-1])[path[-1]] = value
    return doc


@st.composite
def tweaked(draw, value):
    """A value near the given one: same type, off by a little or a lot."""
    if isinstance(value, bool):
        return draw(st.sampled_from([not value, int(value), str(value).lower(), None]))
    if isinstance(value, int):
        return draw(st.sampled_from([value + 1, value - 1, -value, -value - 1, value * 2, value * 2**32, value + 2**63,
                                     float(value), value + 0.5, str(value), [value], None, math.nan]))
    if isinstance(value, float):
        return draw(st.sampled_from([-value, value * 1e300, math.nan, math.inf, -math.inf, int(value) if math.isfinite(value) else 0,
                                     str(value), value + 1]))
    if isinstance(value, str):
        return draw(st.one_of(st.sampled_from(["", value + "x", value[:-1], value * 2, value.upper(), value.lower(),
                                               "../" + value, "/" + value, value + "\x00", " " + value, value.replace(".", "/")]),
                              st.sampled_from(HOSTILE_STRINGS)))
    if isinstance(value, list):
        choices = [[], value[:-1], value + value[-1:], value[::-1], [value], value + [None], dict(enumerate(value))]
        return draw(st.sampled_from(choices))
    if isinstance(value, dict):
        return draw(st.sampled_from([{}, list(value.values()), list(value), json.dumps(value)]))
    return draw(hostile_values)


@st.composite
def mutated_doc(draw, doc, extra_strings: list[str] = (), max_mutations: int = 3):
    """`doc` with 1..max_mutations nodes replaced, tweaked, deleted, renamed or added to."""
    doc = copy.deepcopy(doc)
    values = st.one_of(hostile_values, st.sampled_from(list(extra_strings))) if extra_strings else hostile_values
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = json_paths(doc)
        path = draw(st.sampled_from(paths))
        node = get_at(doc, path)
        ops = ["replace", "tweak"]
        if path:
            ops.append("delete")
            if isinstance(path[-1], str):
                ops.append("rename")
        if isinstance(node, dict):
            ops.append("add")
        op = draw(st.sampled_from(ops))
        if op == "replace":
            doc = set_at(doc, path, draw(values))
        elif op == "tweak":
            doc = set_at(doc, path, draw(tweaked(node)))
        elif op == "delete":
            del get_at(doc, path[:-1])[path[-1]]
        elif op == "rename":
            parent = get_at(doc, path[:-1])
            new_key = draw(st.one_of(st.sampled_from(PATH_STRINGS + list(extra_strings)), hostile_keys))
            items = [(new_key if k == path[-1] else k, v) for k, v in parent.items()]
            parent.clear()
            parent.update(items)
        else:
            node[draw(hostile_keys)] = draw(values)
    return doc


def dumps(doc, indent: int | None = None) -> bytes:
    return json.dumps(doc, indent=indent, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def hostile_json_file(draw, doc, extra_strings: list[str] = (), indent: int | None = 2):
    """The bytes of a JSON file derived from the valid `doc`: mutated nodes (mostly), or the valid
    text truncated, with flipped bytes, or replaced by a raw hostile document."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "mutate", "truncate", "flip", "raw"]))
    if kind == "mutate":
        return dumps(draw(mutated_doc(doc, extra_strings)), indent)
    text = dumps(doc, indent)
    if kind == "truncate":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "flip":
        return flipped(draw, text)
    return draw(st.sampled_from(RAW_DOCUMENTS))


def flipped(draw, data: bytes, region: int | None = None) -> bytes:
    """`data` with 1-4 bytes xor-ed (positions in the first `region` bytes when given)."""
    data = bytearray(data)
    end = len(data) if region is None else min(region, len(data))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(0, end - 1)))
        if data:
            data[position] ^= draw(st.sampled_from([0x01, 0x80, 0xFF, 0x20, 0x7F, 0x10]))
    return bytes(data)


# -- hypothesis strategies: hostile binary files ----------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: bytes, body: bytes, pad: bool = True, length: int | None = None) -> bytes:
    if pad:
        header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + body


@st.composite
def hostile_safetensors(draw, valid: bytes):
    """A safetensors file derived from `valid`: its JSON header mutated (dtypes, shapes, offsets,
    __metadata__), its length field forged, truncated, flipped, extended or replaced."""
    header, body = split_safetensors(valid)
    (length,) = struct.unpack("<Q", valid[:8])
    kind = draw(st.sampled_from(["header", "header", "shape", "shape", "offsets", "dtype", "metadata", "length",
                                 "truncate", "flip", "flip-header", "append", "raw-header"]))
    if kind == "header":
        doc = draw(mutated_doc(header, DTYPE_NAMES))
        return join_safetensors(dumps(doc), body, pad=draw(st.booleans()))
    if kind in ("shape", "offsets", "dtype", "metadata"):  # aimed at one field of one tensor
        doc = copy.deepcopy(header)
        name = draw(st.sampled_from(sorted(k for k in doc if k != "__metadata__")))
        if kind == "shape":
            doc[name]["shape"] = draw(st.lists(st.one_of(st.sampled_from(HOSTILE_DIMS), st.integers(-3, 6)), max_size=4))
        elif kind == "offsets":
            begin, end = doc[name]["data_offsets"]
            offset = st.one_of(st.sampled_from([begin, end, begin - 1, end + 1, -1, -begin, 0, 2**63, 2**64, 10**30, len(body),
                                                float(end), str(end), None]), st.integers(-8, len(body) + 8))
            doc[name]["data_offsets"] = draw(st.lists(offset, min_size=0, max_size=3))
        elif kind == "dtype":
            doc[name]["dtype"] = draw(st.one_of(st.sampled_from(DTYPE_NAMES), hostile_values))
        else:
            doc["__metadata__"] = draw(st.one_of(hostile_values, st.dictionaries(hostile_keys, hostile_values, max_size=3)))
        return join_safetensors(dumps(doc), body, pad=draw(st.booleans()))
    if kind == "length":
        forged = draw(st.one_of(st.sampled_from([0, 1, 2, 7, 8, length - 1, length + 1, length + 8, len(valid) - 8,
                                                 len(valid), 100_000_000, 100_000_001, 2**32, 2**63, 2**64 - 1]),
                                st.integers(0, 2**64 - 1)))
        return struct.pack("<Q", max(0, min(forged, 2**64 - 1))) + valid[8:]
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flip":
        return flipped(draw, valid)
    if kind == "flip-header":
        return flipped(draw, valid, region=8 + length)
    if kind == "append":
        return valid + draw(st.sampled_from([b"\x00", b" " * 8, b"\x00" * 4096, valid]))
    raw = draw(st.sampled_from(RAW_DOCUMENTS))
    return join_safetensors(raw, body, pad=draw(st.booleans()))


@st.composite
def hostile_binary(draw, valid: bytes, header_end: int):
    """A binary file (GGUF) damaged mostly in its first `header_end` bytes: flipped bytes, forged
    little-endian integers, overwritten runs, truncation anywhere."""
    kind = draw(st.sampled_from(["flip", "flip", "int", "int", "overwrite", "truncate", "truncate-header", "append"]))
    if kind == "flip":
        return flipped(draw, valid, region=header_end)
    if kind == "int":
        data = bytearray(valid)
        position = draw(st.integers(4, header_end - 8))
        width = draw(st.sampled_from([4, 8]))
        value = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 0xFF, 2**31 - 1, 2**31, 2**32 - 1]),
                               st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]) if width == 8 else st.just(2**32 - 1),
                               st.integers(0, 2 ** (8 * width) - 1)))
        data[position : position + width] = value.to_bytes(width, "little")
        return bytes(data)
    if kind == "overwrite":
        data = bytearray(valid)
        position = draw(st.integers(0, header_end - 1))
        run = draw(st.binary(min_size=1, max_size=16))
        data[position : position + len(run)] = run
        return bytes(data)
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "truncate-header":
        return valid[: draw(st.integers(0, header_end))]
    return valid + draw(st.binary(min_size=1, max_size=64))


# -- valid inputs ----------------------------------------------------------------------------------
VOCAB, HIDDEN, KV, INTER = 32, 16, 8, 32


def llama_state(seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """The tensors of a 1-layer Llama (hidden 16), seeded random, built without transformers."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1, offset=0.0):
        return (offset + scale * torch.randn(shape, generator=generator)).contiguous()

    layer = "model.layers.0."
    return {
        "model.embed_tokens.weight": rand(vocab, HIDDEN),
        layer + "input_layernorm.weight": rand(HIDDEN, offset=1.0),
        layer + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
        layer + "self_attn.k_proj.weight": rand(KV, HIDDEN),
        layer + "self_attn.v_proj.weight": rand(KV, HIDDEN),
        layer + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
        layer + "post_attention_layernorm.weight": rand(HIDDEN, offset=1.0),
        layer + "mlp.gate_proj.weight": rand(INTER, HIDDEN),
        layer + "mlp.up_proj.weight": rand(INTER, HIDDEN),
        layer + "mlp.down_proj.weight": rand(HIDDEN, INTER),
        "model.norm.weight": rand(HIDDEN, offset=1.0),
        "lm_head.weight": rand(vocab, HIDDEN),
    }


def llama_config(vocab: int = VOCAB, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": dtype, "hidden_act": "silu",
    }


def assorted_state() -> dict[str, torch.Tensor]:
    """One tensor of each kind a header may describe: dtypes, a scalar, an empty and a 3-d tensor."""
    generator = torch.Generator().manual_seed(7)
    return {
        "a.f32": torch.randn(3, 4, generator=generator),
        "b.bf16": torch.randn(5, generator=generator).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2, generator=generator).to(torch.float16),
        "d.f64.scalar": torch.tensor(1.25, dtype=torch.float64),
        "e.i64": torch.tensor([1, -2, 3], dtype=torch.int64),
        "f.bool": torch.tensor([True, False, True, True]),
        "g.u8.empty": torch.zeros(0, 4, dtype=torch.uint8),
        "h.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    }


def write_model(folder: Path, state: dict[str, torch.Tensor], config: dict | None, shards: int = 1,
                dtype: torch.dtype | None = None) -> Path:
    """A HF folder: model.safetensors, or `shards` files and model.safetensors.index.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    names = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[k::shards]}
            save_file(part, str(folder / filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, filename))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tuned_state(base: dict[str, torch.Tensor], added_rows: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """A "fine-tuned" copy: nudged, with `added_rows` new vocabulary rows."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        tuned = tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
        if added_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            tuned = torch.cat([tuned, tuned[:added_rows] * 0.5 + 0.01])
        out[name] = tuned.contiguous()
    return out


ADAPTER_TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def adapter_config() -> dict:
    """An adapter_config.json as peft writes it, with every field wb reads set."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "base", "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "target_modules": ADAPTER_TARGETS, "modules_to_save": ["lm_head"],
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 4.0}, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def adapter_state(seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model."

    def rand(*shape):
        return (0.05 * torch.randn(shape, generator=generator)).contiguous()

    return {
        prefix + "layers.0.self_attn.q_proj.lora_A.weight": rand(4, HIDDEN),
        prefix + "layers.0.self_attn.q_proj.lora_B.weight": rand(HIDDEN, 4),
        prefix + "layers.0.self_attn.v_proj.lora_A.weight": rand(2, HIDDEN),
        prefix + "layers.0.self_attn.v_proj.lora_B.weight": rand(KV, 2),
        prefix + "embed_tokens.lora_embedding_A": rand(4, VOCAB),
        prefix + "embed_tokens.lora_embedding_B": rand(HIDDEN, 4),
        "base_model.model.lm_head.weight": rand(VOCAB, HIDDEN),
    }


def write_adapter(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(), indent=2))
    save_file(adapter_state(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


# `wb eval` results files, in the shape tests/test_report.py documents (lm-eval keys + wb's blocks)
def results_doc(name: str, acc: float, with_generation: bool = True) -> dict:
    subjects = {"abstract_algebra": "stem", "world_religions": "humanities"}
    results, n_samples, configs = {}, {}, {}
    for i, (subject, category) in enumerate(subjects.items()):
        task = f"mmlu_{subject}"
        results[task] = {"name": task, "alias": f"  - {subject}", "sample_len": 10, "acc,none": acc + 0.05 * i,
                         "acc_stderr,none": 0.15}
        n_samples[task] = {"original": 100, "effective": 10}
        configs[task] = {"task": task, "dataset_path": "hails/mmlu_no_train", "dataset_name": subject,
                         "test_split": "test", "num_fewshot": 0}
        results[f"mmlu_{category}"] = {"name": f"mmlu_{category}", "alias": f" - {category}", "sample_len": 10,
                                       "acc,none": acc + 0.05 * i, "acc_stderr,none": 0.15}
    results["mmlu"] = {"name": "mmlu", "alias": "mmlu", "sample_len": 20, "acc,none": acc, "acc_stderr,none": 0.1}
    results["arc_easy"] = {"name": "arc_easy", "alias": "arc_easy", "sample_len": 10, "acc,none": 0.5,
                           "acc_stderr,none": "N/A", "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.1}
    group_subtasks = {"mmlu": ["mmlu_stem", "mmlu_humanities"], "mmlu_stem": ["mmlu_abstract_algebra"],
                      "mmlu_humanities": ["mmlu_world_religions"], "arc_easy": []}
    tasks = list(results)
    doc = {
        "wb_results_version": 1, "name": name, "results": results,
        "groups": {k: results[k] for k in ("mmlu", "mmlu_stem", "mmlu_humanities")},
        "group_subtasks": group_subtasks, "n-shot": dict.fromkeys(tasks, 0), "n-samples": n_samples,
        "versions": {t: 1.0 for t in tasks}, "configs": configs,
        "higher_is_better": {t: {"acc": True, "acc_norm": True} for t in tasks},
        "generation": None, "samples_file": f"{name}.samples.jsonl",
        "provenance": {
            "model": f"/models/{name}", "adapter": None, "model_files": {"model.safetensors": "ab" * 32},
            "adapter_files": {}, "dtype": "float32", "device": "cpu",
            "versions": {"wb": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "lm_eval": "0.4.13"},
            "command": f"wb eval --model /models/{name} --tasks mmlu,arc_easy --limit 10",
            "started": "2025-01-02T03:04:05+00:00", "duration_s": 12.5,
            "settings": {"tasks": ["mmlu", "arc_easy"], "num_fewshot": 0, "limit": 10, "data_dir": None,
                         "gen_data": "data/ads.jsonl" if with_generation else None, "batch_size": "auto",
                         "chat_template": None, "max_new_tokens": 64},
        },
    }
    if with_generation:
        doc["generation"] = {"data": "data/ads.jsonl", "data_sha256": "cd" * 32, "n": 3, "max_new_tokens": 64,
                             "metrics": {"rouge-1": 25.0 + acc, "rouge-2": 15.0, "rouge-l": 20.0, "bleu-4": 10.0},
                             "stderr": {"rouge-1": 1.5, "rouge-2": 1.5, "rouge-l": 1.5, "bleu-4": 1.5},
                             "predictions_file": f"{name}.predictions.jsonl"}
    return doc


def prediction_rows(name: str) -> list[dict]:
    return [{"id": f"ad-{i}", "prompt": f"类型#裙*颜色#黑色 {i}", "reference": f"这条黑色条纹裙 {i}",
             "prediction": f"{name} says {i} <b>", "rouge-1": 20.0 + i, "rouge-2": 10.0, "rouge-l": 15.0 + i,
             "bleu-4": 5.0} for i in range(3)]


def sample_rows(name: str) -> list[dict]:
    return [{"task": "mmlu_abstract_algebra", "doc_id": i, "doc_hash": hashlib.sha256(f"doc{i}".encode()).hexdigest(),
             "acc": float(i % 2)} for i in range(3)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(dumps(row) + b"\n" for row in rows)


def write_results(folder: Path, name: str, acc: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.predictions.jsonl").write_bytes(jsonl(prediction_rows(name)))
    (folder / f"{name}.samples.jsonl").write_bytes(jsonl(sample_rows(name)))
    path = folder / f"{name}.json"
    path.write_bytes(dumps(results_doc(name, acc), indent=2))
    return path


def train_docs() -> dict[str, object]:
    """The files of a `wb train` output folder that `wb report --train` reads (JSON docs; the log as rows)."""
    log = [{"step": step, "total_steps": 6, "loss": 3.0 / step**0.5, "lr": 2e-4, "epoch": step / 3,
            "tokens_per_s": 1500.0 + step, "elapsed_s": step * 0.5, **({"eval_loss": 2.0 / step} if step % 3 == 0 else {})}
           for step in range(1, 7)]
    return {
        "train_args.json": {"base": "/models/base", "data": ["data/ads.jsonl"], "learning_rate": 2e-4,
                            "lora": {"r": 8, "alpha": 16, "target": ["q_proj", "v_proj"]},
                            "versions": {"torch": "2.13.0", "peft": "0.21.2"}, "data_sha256": {"data/ads.jsonl": "ef" * 32}},
        "trainer_log.jsonl": log,
        "metrics.json": {"train_loss": 1.234, "eval_loss": 0.987, "train_runtime_s": 10.0, "tokens_per_s": 1510.5,
                         "steps": 6, "final_loss": 1.1},
        "adapter_config.json": {"peft_type": "LORA", "r": 8, "lora_alpha": 16},
    }


def write_train_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, doc in train_docs().items():
        (folder / name).write_bytes(jsonl(doc) if name.endswith(".jsonl") else dumps(doc, indent=2))
    (folder / "adapter_model.safetensors").write_bytes(b"stand-in bytes")
    return folder


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer Llama GGUF (hidden 16, F32 tensors) with a byte-level BPE tokenizer and a chat
    template: small enough to import in a fraction of a second."""
    import gguf
    import numpy as np
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens: list[str] = [""] * len(backend["model"]["vocab"])
    for token, index in backend["model"]["vocab"].items():
        tokens[index] = token
    for added in backend["added_tokens"]:
        tokens += [""] * max(0, added["id"] + 1 - len(tokens))
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    hidden, heads, kv_heads, inter = 16, 2, 1, 32
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(5)
    writer.add_pad_token_id(3)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "blk.0.attn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
              "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_norm.weight": (hidden,), "blk.0.ffn_gate.weight": (inter, hidden),
              "blk.0.ffn_up.weight": (inter, hidden), "blk.0.ffn_down.weight": (hidden, inter),
              "output_norm.weight": (hidden,), "output.weight": (len(tokens), hidden)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_data_offset(path: Path) -> int:
    """Where a GGUF file's tensor data starts: everything before it is header."""
    import gguf

    return int(gguf.GGUFReader(str(path)).data_offset)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()

