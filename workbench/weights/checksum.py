"""`wb checksum`: per-file hashes in `md5sum -c` format, and the float64 weight-sum."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.hashing import ALGOS, format_lines, hash_files
from workbench.io.layout import find_weight_files
from workbench.outputs import Note, atomic_file
from workbench.progress import progress_bar


@dataclass
class ChecksumResult:
    algo: str
    files: dict[str, str]  # relative name -> hex digest
    weight_sum: float | None
    output: Path | None = None  # the list file written, if any

    def to_json(self) -> dict:
        return {"algo": self.algo, "files": self.files, "weight_sum": self.weight_sum}

    def lines(self) -> list[str]:
        """The list itself (or, when it went to a file, where it went), then the weight-sum: whichever
        is not the list goes to stderr, so that stdout stays a list that `md5sum -c` reads."""
        if self.output is None:
            shown: list[str] = format_lines(self.files).split("\n")[:-1]  # the lines -o would write
        else:
            shown = [Note(f"wrote {len(self.files)} {self.algo} hashes to {self.output}")]
        if self.weight_sum is not None:
            line = f"weight-sum: {self.weight_sum:.6f}"
            shown.append(Note(line) if self.output is None else line)
        return shown


def checksum(
    path: Path,
    algo: str = "md5",
    all_files: bool = False,
    weight_sum: bool = False,
    jobs: int | None = None,
    output: Path | None = None,
    force: bool = False,
) -> ChecksumResult:
    """Hash the weight files of `path` (every file with `all_files`), names relative to `path`.

    `output`: also write the list there, atomically, in `md5sum -c` format (replacing a file only
    with `force`, and never one of the files hashed)."""
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
    result = ChecksumResult(algo=algo, files=dict(zip(names, digests)), weight_sum=total_sum)
    if output is not None:
        _write_list(path, Path(output), result, force)
    return result


def _write_list(path: Path, output: Path, result: ChecksumResult, force: bool) -> None:
    root = path if path.is_dir() else path.parent  # a list inside the folder is fine; over a hashed file is not
    with atomic_file(output, force=force, inputs=[root / name for name in result.files]) as handle:
        handle.write(format_lines(result.files))
    result.output = output


def _weight_sum(path: Path) -> float:
    # torch is imported only here: plain hashing starts without it.
    from workbench.io.reader import open_checkpoint
    from workbench.io.weightsum import checkpoint_weight_sum

    with open_checkpoint(path) as checkpoint, progress_bar(checkpoint.total_bytes, "weight-sum") as bar:
        return checkpoint_weight_sum(checkpoint, on_bytes=bar.update)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
