"""What a command leaves behind: the files it writes and the lines it prints.

Files (below): output folders and files that appear only when complete, and never over an input.

Every command writes into a temporary sibling of its target (same filesystem, so the final
rename is atomic) named `.wb-tmp-<name>-<pid>-<random>` and renames it into place at the end
with a no-replace rename, so that of several runs writing the same target without --force
exactly one wins and the others fail with one line instead of silently replacing it.

An interrupted run can leave its temporary behind. The pid in the name lets the next run to
the same target tell a dead writer (remove its debris, say so) from a live one (refuse: two
runs are writing the same output). Pids are only meaningful on one machine and in one pid
namespace: two hosts (or containers) writing the same network folder can't see each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from workbench.errors import WorkbenchError

TMP_PREFIX = ".wb-tmp-"
OLD_PREFIX = ".wb-old-"
LOST_RACE = "output appeared while this run was writing it (another run?); nothing was replaced"
NO_SPACE = "no space left on the device while writing"

_NEW_STYLE = re.compile(r"^(\d+)-[0-9a-f]{12}$")  # <pid>-<random>: what this module writes
_MKDTEMP_STYLE = re.compile(r"^[a-z0-9_]{8}$")  # what tempfile.mkdtemp/mkstemp wrote before
_OLD_ASIDE = re.compile(r"^(\d+)(?:-[0-9a-f]{12})?$")  # .wb-old-<name>-<pid>[-<random>]
_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}

PathLike = str | os.PathLike[str]


# ----- what a command prints ----------------------------------------------------------------
class Note(str):
    """A line of a result that is printed on stderr, not stdout.

    What a command prints: the contract between each command's result and `workbench.cli.emit`.

    Each command's one public function returns a result with

    - `lines()`: the text `wb` prints without `--json`, one line per item, in order; a `Note` goes to
      stderr (about the run or its files: "wrote OUT", a warning), every other line to stdout;
    - `to_json()`: the one JSON object `wb` prints with `--json` (and no lines); None prints nothing
      (a process that does not report: `wb train` on a rank other than 0);
    - optionally `error()`: the failure the command ends with (a `CheckFailed`), raised after the result
      is printed, or None.

    The modules decide what is printed and whether a check failed; the CLI only prints it.
    """

    __slots__ = ()


# ----- public checks ------------------------------------------------------------------------


def check_can_write(target: Path, force: bool) -> None:
    """Refuse an existing target (a dangling symlink counts) unless --force was given."""
    if _lexists(Path(target)) and not force:
        raise WorkbenchError("output exists; pass --force to overwrite it", target)


def check_not_input(target: PathLike, inputs: Iterable[PathLike | None]) -> None:
    """Refuse a target that is, lies inside, or contains an input.

    Writing there would overwrite the input, or --force would delete it with the old output.
    Symlinks are resolved on both sides, so a link to an input is caught too.
    """
    out = _resolved(Path(target))
    for given in inputs:
        if given is None:
            continue
        source = _resolved(Path(given))
        if out == source or source in out.parents or out in source.parents:
            raise WorkbenchError(f"output would overwrite an input ({given}); choose another --out", target)


# ----- the context managers -----------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(
    target: PathLike, force: bool = False, *, inputs: Iterable[PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target`."""
    with _staged(Path(target), force, inputs, directory=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(
    target: PathLike, force: bool = False, mode: str = "w", *, inputs: Iterable[PathLike | None] = ()
) -> Iterator[IO[Any]]:
    """Yield an open temporary file beside `target`; on success it becomes `target`."""
    with _staged(Path(target), force, inputs, directory=False) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle


@contextlib.contextmanager
def _staged(target: Path, force: bool, inputs: Iterable[PathLike | None], directory: bool) -> Iterator[Path]:
    """The shared life cycle: check, clear stale debris, stage, commit or clean up, one error line."""
    check_not_input(target, inputs)
    with _translated(target):
        _clear_stale(target)
    check_can_write(target, force)
    _check_kind(target, directory)
    created = _missing_parents(target)
    tmp: Path | None = None
    try:
        with _translated(target):
            tmp = _make_temp(target, directory)
        try:
            yield tmp
        except OSError as err:
            translated = _block_error(err, target, tmp)
            if translated is None:
                raise
            raise translated from err
        with _translated(target):
            _commit(tmp, target, force)
        tmp = None
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        _remove_empty(created)
        raise


# ----- staging -------------------------------------------------------------------------------


def _check_kind(target: Path, directory: bool) -> None:
    """Refuse to --force a folder over a file or a file over a folder: surely the wrong path."""
    if directory and target.exists() and not target.is_dir():
        raise WorkbenchError("output is a file, expected a folder", target)
    if not directory and target.is_dir():
        raise WorkbenchError("output is a folder, expected a file", target)


def _missing_parents(target: Path) -> list[Path]:
    """The parent folders that do not exist yet, deepest first, so a failed run can remove them."""
    missing: list[Path] = []
    parent = target.absolute().parent
    while not _lexists(parent):
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise WorkbenchError("a parent of the output is a file, not a folder", parent)
    return missing


def _make_temp(target: Path, directory: bool) -> Path:
    """Create the temporary sibling (and any missing parents) with the usual permissions.

    os.mkdir/os.open apply the umask themselves, so outputs get 0777/0666 & ~umask. A
    concurrent failed run may remove a parent it created just after we created it: retry.
    """
    for attempt in range(5):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                os.close(os.open(tmp, flags, 0o666))
            return tmp
        except (FileExistsError, FileNotFoundError):
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


# ----- committing ----------------------------------------------------------------------------


def _commit(tmp: Path, target: Path, force: bool) -> None:
    """Rename `tmp` into place without ever replacing what another run put there.

    With force the existing target is first moved aside (so the final rename can still be a
    no-replace one) and deleted only once the new output is in place; if that rename loses,
    the old output goes back if its place is still free, and both temporaries are removed.
    """
    old = _move_aside(target) if force else None
    try:
        _rename_noreplace(tmp, target)
    except FileExistsError:
        _remove(tmp)
        _discard_aside(old, target)
        raise WorkbenchError(LOST_RACE, target) from None
    except BaseException:
        _discard_aside(old, target)
        raise
    if old is not None:
        _remove(old)


def _move_aside(target: Path) -> Path | None:
    """Rename the current target to a `.wb-old-*` sibling; None when there is none (any more)."""
    if not _lexists(target):
        return None
    old = target.with_name(f"{OLD_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        os.rename(target, old)
    except FileNotFoundError:  # another --force run moved it first
        return None
    return old


def _discard_aside(old: Path | None, target: Path) -> None:
    """After a failed commit: put the old output back if nobody took its place, else delete it."""
    if old is None:
        return
    try:
        _rename_noreplace(old, target)
    except OSError:
        _remove(old)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that raises FileExistsError instead of replacing `dst`.

    renameat2(RENAME_NOREPLACE) where the kernel, libc and filesystem support it (atomic);
    else a hard link for files (also atomic) and, for folders, an existence check followed by
    rename: another run can slip in between the two, then rename merges into nothing (it fails
    on a non-empty folder) or replaces an empty folder: a small race, only on such systems.
    """
    if _renameat2_noreplace(src, dst):
        return
    if src.is_dir() and not src.is_symlink():
        if _lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        try:
            os.rename(src, dst)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from err
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as err:  # no hard links here (some FUSE, FAT, SMB): check, then rename
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if _lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from err
        os.rename(src, dst)
        return
    os.unlink(src)


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """Try renameat2(RENAME_NOREPLACE); False when this system can't, so the caller falls back."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(dst))
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (glibc >= 2.28), or None on other systems."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# ----- stale temporaries ---------------------------------------------------------------------


def _clear_stale(target: Path) -> None:
    """Deal with `.wb-tmp-`/`.wb-old-` siblings of `target` left by earlier runs.

    A dead writer's temporary is removed (and a moved-aside old output put back if the target
    is missing); a live writer means two runs are writing this output now, which is refused.
    Names without a pid (older wb versions) can't be judged, so they are only reported. The
    name itself may contain dashes: `.wb-tmp-out-` also prefixes `out-2`'s temporaries, so the
    rest must match `<pid>-<random>` exactly.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        for prefix, pattern in ((TMP_PREFIX, _NEW_STYLE), (OLD_PREFIX, _OLD_ASIDE)):
            lead = f"{prefix}{target.name}-"
            if entry.name.startswith(lead):
                _judge_stale(entry, entry.name[len(lead):], pattern, target, prefix == OLD_PREFIX)


def _judge_stale(entry: Path, rest: str, pattern: re.Pattern[str], target: Path, aside: bool) -> None:
    """Remove, refuse or report one leftover sibling (see _clear_stale)."""
    match = pattern.match(rest)
    if match is None:
        if not aside and _MKDTEMP_STYLE.match(rest):
            _note(f"{entry} may be left by an interrupted run of an older wb; delete it if no run is writing")
        return
    pid = int(match.group(1))
    if pid == os.getpid():
        return  # this process's own, in use
    if _writer_alive(pid, entry):
        raise WorkbenchError(f"another wb run (pid {pid}) is writing this output now", target)
    if aside and not _lexists(target):
        try:
            _rename_noreplace(entry, target)
            _note(f"restored {target} from {entry} left by an interrupted --force run")
            return
        except OSError:
            if not _lexists(target):  # can't restore it, nothing replaced it: keep the only copy
                _note(f"{entry} holds the output of an earlier run; rename it back to {target.name}")
                return
    if _remove(entry):
        _note(f"removed {entry} left by an interrupted run")


def _writer_alive(pid: int, entry: Path) -> bool:
    """Whether `pid` runs and can be the writer of `entry` (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    with contextlib.suppress(OSError):
        # started after the leftover was last written (a reused pid, e.g. after a reboot); the
        # margin covers the coarse start time and small clock steps
        if started > entry.lstat().st_mtime + 60:
            return False
    return state not in ("Z", "X")


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state, start time as a Unix time) from Linux /proc; None elsewhere or when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# ----- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(target: Path) -> Iterator[None]:
    """Turn an OSError from our own file operations into one WorkbenchError line."""
    try:
        yield
    except OSError as err:
        raise _os_error(err, target) from err


def _os_error(err: OSError, target: Path) -> WorkbenchError:
    """The one line that says what went wrong with the output location."""
    if err.errno in _NO_SPACE_ERRNOS:
        return WorkbenchError(NO_SPACE, target)
    if err.errno in _DENIED_ERRNOS:
        return WorkbenchError(f"cannot write here: {err.strerror}", target)
    if err.errno == errno.ENOTDIR:
        return WorkbenchError("a parent of the output is a file, not a folder", target)
    return WorkbenchError(f"cannot write the output: {err.strerror or err}", target)


def _block_error(err: OSError, target: Path, tmp: Path) -> WorkbenchError | None:
    """Translate an OSError raised while the caller wrote the output; None: not about the output.

    A full disk is always about the output (a write has no file name); other errors only when
    they name a path inside the temporary, so a failure to read an input keeps its own message.
    """
    if err.errno in _NO_SPACE_ERRNOS:
        return WorkbenchError(NO_SPACE, target)
    staged = tmp.absolute()
    for name in (err.filename, err.filename2):
        if isinstance(name, (str, os.PathLike)):
            named = Path(os.path.abspath(name))
            if named == staged or staged in named.parents:
                return _os_error(err, target)
    return None


def _remove(path: Path) -> bool:
    """Delete a file, symlink or folder tree; True when it is gone. Never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return True
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        if _lexists(path):
            _note(f"could not remove {path}; delete it by hand")
            return False
    return True


def _remove_empty(folders: list[Path]) -> None:
    """rmdir the folders (deepest first) that a failed run created, where still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _resolved(path: Path) -> Path:
    """The real path; for a path that doesn't exist yet, its real parent plus its name."""
    try:
        if _lexists(path):
            return path.resolve()
        return path.absolute().parent.resolve() / path.name
    except (OSError, RuntimeError):  # a symlink loop: compare as written
        return path.absolute()


def _lexists(path: Path) -> bool:
    """Exists, counting a dangling symlink (which a rename would not replace either)."""
    return os.path.lexists(path)


def _note(message: str) -> None:
    click.echo(f"note: {message}", err=True)
