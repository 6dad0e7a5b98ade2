"""Output folders and files that appear only when complete.

Every command writes into a temporary sibling of its target (same filesystem, so the final
rename is atomic) and renames it into place at the end. An interrupted or failed run leaves
no target behind; a leftover `.wb-tmp-*` sibling is the only trace and is safe to delete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from workbench.errors import WorkbenchError


def check_can_write(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise WorkbenchError("output exists; pass --force to overwrite it", target)


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`."""
    target = Path(target)
    check_can_write(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".wb-tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | Path, force: bool = False, mode: str = "w") -> Iterator:
    """Yield an open temporary file beside `target`; on success it replaces `target`."""
    target = Path(target)
    check_can_write(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".wb-tmp-{target.name}-", dir=target.parent)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".wb-old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)
