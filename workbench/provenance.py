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
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# The packages whose versions can change a number `wb` writes.
DEFAULT_PACKAGES = ("torch", "transformers", "peft", "safetensors", "accelerate", "lm_eval")


def versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """{"wb": ..., "python": ..., package: installed version or None}."""
    found: dict[str, str | None] = {"wb": wb_version(), "python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def wb_version() -> str:
    from workbench import __version__

    return __version__


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user could type it again: `wb` and the arguments, shell-quoted."""
    return shlex.join(["wb", *(sys.argv[1:] if argv is None else argv)])


def file_fingerprints(root: Path, files: Iterable[Path], jobs: int | None = None) -> dict[str, str]:
    """{name relative to `root` (POSIX): sha256} of `files`, hashed `jobs` at a time."""
    from workbench.io.hashing import hash_files

    files = list(files)
    names = [Path(os.path.relpath(file, root)).as_posix() for file in files]
    return dict(zip(names, hash_files(files, "sha256", jobs or os.cpu_count() or 1)))


def weight_fingerprints(path: Path) -> dict[str, str]:
    """sha256 of the weight files of a model or adapter folder (or one weight file), by name."""
    from workbench.io.layout import find_weight_files

    found = find_weight_files(path)
    return file_fingerprints(found.root, found.files)
