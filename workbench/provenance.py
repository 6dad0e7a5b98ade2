"""What produced an output: library versions, input fingerprints, the command line.

Every command that writes a record (merge.json, weight_diff.json, RESULTS.json, train_args.json,
import.json, recover.json) takes these three from here, so that the records agree with each other
and `wb compare` can tell when a re-used result was made by other software or other inputs.
Torch-free: the versions are read from package metadata, not by importing the packages.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# The packages whose versions can change a number `wb` writes.
DEFAULT_PACKAGES = ("torch", "transformers", "peft", "safetensors", "accelerate", "lm_eval")


def versions(packages: Iterable[str] = DEFAULT_PACKAGES, *, python: bool = True) -> dict[str, str | None]:
    """{"wb": ..., "python": ..., package: installed version or None}, in that order.

    `python=False` leaves the interpreter out (the records that never had it keep their keys).
    "wb" and "python" among `packages` are answered as themselves, not looked up as distributions.
    """
    found: dict[str, str | None] = {"wb": wb_version()}
    if python:
        found["python"] = platform.python_version()
    for name in packages:
        if name in ("wb", "python"):
            found[name] = wb_version() if name == "wb" else platform.python_version()
            continue
        try:
            found[name] = metadata.version(name)
        except (metadata.PackageNotFoundError, ValueError):  # ValueError: not a distribution name at all
            found[name] = None
    return found


def wb_version() -> str:
    from workbench import __version__

    return __version__


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user could type it again: `wb` and the arguments (this process's, or
    `argv`: an equivalent command built for a call made from Python), shell-quoted."""
    return shlex.join(["wb", *(sys.argv[1:] if argv is None else argv)])


def created(when: float | None = None) -> str:
    """Local time with its UTC offset, as the records write it: 2024-05-01T12:00:00+0200."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when))


def record(packages: Iterable[str] = DEFAULT_PACKAGES, command: str | None = None,
           when: float | None = None) -> dict:
    """{"versions", "command", "created"}: a record's provenance block; `command` None: this process's."""
    return {"versions": versions(packages), "command": command_line() if command is None else command,
            "created": created(when)}


def file_fingerprints(root: Path, files: Iterable[Path], jobs: int | None = None,
                      label: str | None = None) -> dict[str, str]:
    """{name relative to `root` (POSIX): sha256} of `files`, in their order, hashed `jobs` at a time.

    `label`: a progress bar so described (on a terminal only), as `wb checksum` shows.
    """
    from workbench.io.hashing import hash_files

    files = list(files)
    names = [Path(os.path.relpath(file, root)).as_posix() for file in files]
    if label is None:
        return dict(zip(names, hash_files(files, "sha256", jobs or os.cpu_count() or 1)))
    from workbench.progress import progress_bar

    with progress_bar(sum(file.stat().st_size for file in files), label) as bar:
        return dict(zip(names, hash_files(files, "sha256", jobs or os.cpu_count() or 1, bar.update)))


def weight_fingerprints(path: str | Path, jobs: int | None = None) -> dict[str, str]:
    """sha256 of the weight files of a model or adapter folder (or one weight file), by name:
    what `wb checksum --algo sha256` reports, with its progress bar."""
    from workbench.io.layout import find_weight_files

    found = find_weight_files(path)
    return file_fingerprints(found.root, found.files, jobs, label=f"sha256 {Path(path).name}")
