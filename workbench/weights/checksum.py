"""`wb checksum`: per-file hashes in `md5sum -c` format, and the float64 weight-sum."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.hashing import ALGOS, hash_files
from workbench.io.layout import find_weight_files
from workbench.progress import progress_bar


@dataclass
class ChecksumResult:
    algo: str
    files: dict[str, str]  # relative name -> hex digest
    weight_sum: float | None

    def to_json(self) -> dict:
        return {"algo": self.algo, "files": self.files, "weight_sum": self.weight_sum}


def checksum(
    path: Path,
    algo: str = "md5",
    all_files: bool = False,
    weight_sum: bool = False,
    jobs: int | None = None,
) -> ChecksumResult:
    """Hash the weight files of `path` (every file with `all_files`), names relative to `path`."""
    if algo not in ALGOS:
        raise WorkbenchError(f"unknown hash {algo!r}; use md5 or sha256")
    path = Path(path)
    if all_files:
        if not path.is_dir():
            raise WorkbenchError("--all-files needs a folder", path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        names = [f.relative_to(path).as_posix() for f in files]
    else:
        found = find_weight_files(path)
        files, names = found.files, found.names
    total = sum(f.stat().st_size for f in files)
    with progress_bar(total, f"{algo} {path.name}") as bar:
        digests = hash_files(files, algo, jobs or os.cpu_count() or 1, on_bytes=bar.update)
    total_sum = _weight_sum(path) if weight_sum else None
    return ChecksumResult(algo=algo, files=dict(zip(names, digests)), weight_sum=total_sum)


def _weight_sum(path: Path) -> float:
    # torch is imported only here: plain hashing starts without it.
    from workbench.io.reader import open_checkpoint
    from workbench.io.weightsum import checkpoint_weight_sum

    with open_checkpoint(path) as checkpoint, progress_bar(checkpoint.total_bytes, "weight-sum") as bar:
        return checkpoint_weight_sum(checkpoint, on_bytes=bar.update)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
