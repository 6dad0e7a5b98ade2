"""File hashes in `md5sum -c` format, computed in parallel with large reads."""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from collections.abc import Iterable
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
    """Hashes bytes on a background thread while the caller goes on writing them."""

    def __init__(self, algos: Iterable[str]):
        self.hashers = {algo: hashlib.new(algo) for algo in algos}
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def update(self, data: bytes | memoryview) -> None:
        self._queue.put(data)

    def hexdigests(self) -> dict[str, str]:
        self._queue.put(None)
        self._thread.join()
        return {algo: hasher.hexdigest() for algo, hasher in self.hashers.items()}

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            for hasher in self.hashers.values():
                hasher.update(data)


def sha256_file(path: Path) -> str:
    """The sha256 of one file (inputs' fingerprints in provenance records)."""
    return hash_file(path, ("sha256",))["sha256"]
