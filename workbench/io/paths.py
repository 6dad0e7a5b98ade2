"""Names read from files, joined to the folder they belong to, and kept inside it.

A downloaded index, `weight_diff.json` or checksum list names files; an attacker who writes it
chooses those names. `safe_join` is the one place where such a name becomes a path: it refuses
absolute names, `..` components, NUL bytes, backslashes and drive letters *by the name's text*,
before any filesystem call. Containment is about the name, not about where a symlink points:
the Hugging Face cache's `snapshots/<rev>/model.safetensors` is a symlink into `../../blobs/`,
and that is the normal case, not an escape.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from workbench.errors import WorkbenchError

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_member_name(name: object, what: str, source: str | Path) -> str:
    """`name` as a clean relative POSIX name, or a WorkbenchError naming `source` (the file that said it)."""
    if not isinstance(name, str) or not name:
        raise WorkbenchError(f"{what} is not a file name: {name!r}", source)
    problem = _problem(name)
    if problem:
        raise WorkbenchError(f"{what} {name!r}, which {problem}; refusing it", source)
    return PurePosixPath(name).as_posix()


def safe_join(folder: Path, name: object, what: str, source: str | Path) -> Path:
    """`folder / name` for a name read from `source`, refused unless it stays inside `folder`."""
    return Path(folder) / check_member_name(name, what, source)


def _problem(name: str) -> str | None:
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or _DRIVE.match(name):
        return "is an absolute path"
    parts = PurePosixPath(name).parts
    if any(part == ".." for part in parts):
        return "leaves its folder (..)"
    if not parts or all(part == "." for part in parts):
        return "names the folder itself"
    return None


def hub_snapshot(folder: Path) -> tuple[str, str] | None:
    """(`org/name`, revision) for a folder `.../models--org--name/snapshots/<rev>` (huggingface_hub's
    cache layout), else None: the name a hub-cache model goes by in configs and adapters."""
    parts = folder.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1), parts[-1]
    return None
