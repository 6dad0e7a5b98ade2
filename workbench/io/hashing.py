"""File hashes in `md5sum -c` format, computed in parallel with large reads, and hashes computed
while a file is being written (`StreamHasher`) or read in another order (`FileHasher`)."""

from __future__ import annotations

import hashlib
import mmap
import queue
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.paths import check_member_name

ALGOS = ("md5", "sha256")
HEX_LENGTH = {32: "md5", 64: "sha256"}
READ_CHUNK = 16 * 1024 * 1024
_LINE = re.compile(r"^(?:\\)?([0-9a-fA-F]{32}|[0-9a-fA-F]{64}) [ *](.+)$")


def hash_file(path: Path, algos: Iterable[str] = ("md5",), on_bytes=None) -> dict[str, str]:
    """Hash one file in one read pass; hashlib releases the GIL, so threads hash in parallel."""
    hashers = {algo: hashlib.new(algo) for algo in algos}
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            for hasher in hashers.values():
                hasher.update(view[:count])
            if on_bytes is not None:
                on_bytes(count)
    return {algo: hasher.hexdigest() for algo, hasher in hashers.items()}


def hash_files(paths: list[Path], algo: str, jobs: int, on_bytes=None) -> list[str]:
    """Hex digests of `paths`, in order, `jobs` files at a time."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda p: hash_file(p, (algo,), on_bytes)[algo], paths))


def format_lines(entries: dict[str, str]) -> str:
    """`<hex>  <name>` lines, as md5sum/sha256sum write them (text mode)."""
    return "".join(f"{digest}  {name}\n" for name, digest in entries.items())


def parse_checksum_file(path: Path) -> tuple[str, dict[str, str]]:
    """Read an md5sum/sha256sum list; the algorithm is told by the length of the hashes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read checksum list: {exc}", path) from None
    entries: dict[str, str] = {}
    algos = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line.strip())
        if not match:
            raise WorkbenchError(f"line {number} is not '<hex>  <file>'", path)
        digest, name = match.groups()
        algos.add(HEX_LENGTH[len(digest)])
        entries[check_member_name(name.strip(), f"line {number} names a file", path)] = digest.lower()
    if not entries:
        raise WorkbenchError("checksum list is empty", path)
    if len(algos) > 1:
        raise WorkbenchError("checksum list mixes md5 and sha256 hashes", path)
    return algos.pop(), entries


class StreamHasher:
    """Hashes bytes on background threads (one per algorithm: md5 and sha256 of one file run side
    by side) while the caller goes on writing them."""

    def __init__(self, algos: Iterable[str]):
        self.hashers = {algo: hashlib.new(algo) for algo in algos}
        self._queues: list[queue.Queue[tuple[bytes | memoryview, _Countdown | None] | None]] = []
        self._threads = []
        for hasher in self.hashers.values():
            pending: queue.Queue[tuple[bytes | memoryview, _Countdown | None] | None] = queue.Queue(maxsize=8)
            self._queues.append(pending)
            self._threads.append(threading.Thread(target=self._run, args=(hasher, pending), daemon=True))
        for thread in self._threads:
            thread.start()

    def update(self, data: bytes | memoryview, hashed: Callable[[], None] | None = None) -> None:
        """Queue `data` for every algorithm. `hashed()`, if given, runs once all of them have hashed
        it: a caller that reuses its buffers (`wb diff --format xor`) may then refill this one."""
        countdown = _Countdown(len(self._queues), hashed) if hashed is not None else None
        if countdown is not None and not self._queues:
            hashed()
        for pending in self._queues:
            pending.put((data, countdown))

    def hexdigests(self) -> dict[str, str]:
        for pending in self._queues:
            pending.put(None)
        for thread in self._threads:
            thread.join()
        return {algo: hasher.hexdigest() for algo, hasher in self.hashers.items()}

    @staticmethod
    def _run(hasher, pending: queue.Queue) -> None:
        while (item := pending.get()) is not None:
            data, countdown = item
            hasher.update(data)
            if countdown is not None:
                countdown.tick()


class _Countdown:
    """Runs `then()` on the `count`-th tick, from whichever thread ticks last."""

    def __init__(self, count: int, then: Callable[[], None]):
        self._left = count
        self._then = then
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._then()


class FileHasher:
    """Hashes one file front to back on background threads (one per algorithm), as far as the
    caller has asked so far.

    For a caller that reads the file in an order of its own (`wb diff` reads tensors in the order
    of its output, through memory maps): `advance(offset)` before it reads bytes below `offset`
    has the hashers go on through the file up to there, from a mapping of the file, so that they
    read the very page-cache pages the caller is reading, while it works on them. Each byte is read
    from the disk once and hashed once, in file order, whatever order the caller visits the file
    in; nothing is copied, and the caller never waits for a hash before `hexdigests()`, which hashes
    whatever is left. Use it as a context manager: leaving the block stops the threads."""

    def __init__(self, path: Path, algos: Iterable[str]):
        self.path = path
        self._map = _map_read_only(path) if path.stat().st_size else None  # mmap refuses an empty file
        self.size = len(self._map) if self._map is not None else 0
        self._target = 0
        self._stopped = False
        self._changed = threading.Condition()
        self._algos = tuple(algos)
        self._digests: dict[str, str] = {}
        self._threads = [threading.Thread(target=self._follow, args=(algo,), name=f"wb-hash {algo} {path.name}", daemon=True)
                         for algo in self._algos]
        for thread in self._threads:
            thread.start()

    def advance(self, offset: int) -> None:
        """Have bytes [0, offset) hashed (soon: this does not wait)."""
        with self._changed:
            if offset > self._target:
                self._target = min(offset, self.size)
                self._changed.notify_all()

    def hexdigests(self) -> dict[str, str]:
        """Hash the rest of the file, wait for it, and return {algo: hex digest}."""
        self.advance(self.size)
        self._join()
        return {algo: self._digests[algo] for algo in self._algos}

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._join()

    def __enter__(self) -> FileHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()
        if self._map is not None:
            self._map.close()
            self._map = None

    def _follow(self, algo: str) -> None:
        hasher = hashlib.new(algo)
        position = 0
        with memoryview(self._map if self._map is not None else b"") as view:
            while position < self.size:
                with self._changed:
                    while self._target <= position and not self._stopped:
                        self._changed.wait()
                    target = self._target
                while position < target and not self._stopped:
                    end = min(target, position + READ_CHUNK)
                    hasher.update(view[position:end])
                    position = end
                if self._stopped:
                    return
        self._digests[algo] = hasher.hexdigest()


def check_against_list(checksum_list: tuple[str, dict[str, str]], hashed: dict[str, dict], folder: Path,
                       failures: list[str]) -> dict:
    """Compare a written folder's files with an md5sum/sha256sum list (`parse_checksum_file`'s, so
    its names already stay inside the folder): the hashes a pass computed while writing (`hashed`:
    {name: {algo: hex}}) where it has them, else the file hashed here. Appends one line per failure;
    returns {"algo", "files": {name: "ok" | "mismatch" | "missing"}}."""
    algo, expected = checksum_list
    states: dict[str, str] = {}
    for name, digest in expected.items():
        path = folder / name
        if name in hashed:
            found = str(hashed[name][algo])
        elif path.is_file():
            found = hash_file(path, (algo,))[algo]
        else:
            states[name] = "missing"
            failures.append(f"{name}: missing from OUT")
            continue
        states[name] = "ok" if found == digest else "mismatch"
        if found != digest:
            failures.append(f"{name}: {algo} mismatch (expected {digest}, found {found})")
    return {"algo": algo, "files": states}


def _map_read_only(path: Path) -> mmap.mmap:
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def sha256_file(path: Path) -> str:
    """The sha256 of one file (inputs' fingerprints in provenance records)."""
    return hash_file(path, ("sha256",))["sha256"]
