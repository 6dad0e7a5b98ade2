"""The output layer: never over an input, one winner among concurrent runs, no debris, one error line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import outputs
from workbench.errors import WorkbenchError
from workbench.outputs import LOST_RACE, NO_SPACE, atomic_dir, atomic_file, check_not_input

REPO = Path(__file__).resolve().parents[1]


def debris(folder: Path) -> list[str]:
    """Names of `.wb-tmp-*`/`.wb-old-*` entries in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".wb-tmp-", ".wb-old-")))


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def wait_for(path: Path, child: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not path.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert path.exists(), f"the child never got there (rc {child.poll()})"


# ----- OUT is never an input ----------------------------------------------------------------


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
@pytest.mark.parametrize("through_link", [False, True])
def test_output_that_is_an_input_is_refused(tmp_path, model, where, through_link):
    if through_link:
        (tmp_path / "link").symlink_to(model, target_is_directory=True)
    base = tmp_path / "link" if through_link else model
    target = {"equal": base, "inside": base / "diff", "containing": tmp_path}[where]
    before = listing(tmp_path)
    for force in (False, True):
        with pytest.raises(WorkbenchError, match=r"output would overwrite an input .*choose another --out"):
            with atomic_dir(target, force, inputs=[None, model]) as tmp:
                (tmp / "x").write_text("x")
        with pytest.raises(WorkbenchError, match="output would overwrite an input"):
            with atomic_file(target, force, inputs=[model / "model.safetensors" if where == "equal" else model]) as f:
                f.write("x")
    assert listing(tmp_path) == before
    assert (model / "model.safetensors").read_bytes() == b"weights"


def test_input_given_through_a_link_is_caught(tmp_path, model):
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    with pytest.raises(WorkbenchError, match="overwrite an input") as caught:
        check_not_input(model / "new", [tmp_path / "link"])
    assert caught.value.path == str(model / "new")


def test_unrelated_inputs_and_siblings_are_fine(tmp_path, model):
    check_not_input(tmp_path / "model-2", [model, None])  # a name prefix is not containment
    with atomic_dir(tmp_path / "out", inputs=[model, tmp_path / "other"]) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out" / "x").read_text() == "x"


# ----- concurrent writers -------------------------------------------------------------------

WRITER = r"""
import json, sys, time
from pathlib import Path
from workbench import outputs
from workbench.errors import WorkbenchError
target, sync, ident, kind, force, race = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6] == "1"
if race:  # skip the live-writer check so that every writer reaches the final rename
    outputs._clear_stale = lambda target: None
(sync / f"ready-{ident}").touch()
while not (sync / "go").exists():
    time.sleep(0.002)
try:
    if kind == "dir":
        with outputs.atomic_dir(target, force) as tmp:
            (tmp / "half").write_text(ident)
            time.sleep(0.2)
            (tmp / "id").write_text(ident)
    else:
        with outputs.atomic_file(target, force) as handle:
            handle.write(ident + "\n"); handle.flush(); time.sleep(0.2); handle.write(ident)
    print(json.dumps({"id": ident, "ok": True}))
except WorkbenchError as err:
    print(json.dumps({"id": ident, "ok": False, "error": err.line()}))
"""


def run_writers(tmp_path: Path, kind: str, force: bool, race: bool, count: int = 8) -> tuple[Path, list[dict]]:
    """Start `count` writers of one target, release them at once, return their reports."""
    parent, sync = tmp_path / "outs", tmp_path / "sync"
    parent.mkdir()
    sync.mkdir()
    target = parent / "out-1"  # a dash in the name, like real outputs
    args = [str(target), str(sync)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, *args, str(i), kind, str(int(force)), str(int(race))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for i in range(count)
    ]
    try:
        deadline = time.time() + 60
        while len(list(sync.glob("ready-*"))) < count and time.time() < deadline:
            time.sleep(0.01)
        (sync / "go").touch()
        reports = []
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            reports.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return target, reports


def content_of(target: Path, kind: str) -> str:
    """The writer id in a finished output, asserting that it is complete and from one writer."""
    if kind == "dir":
        assert sorted(p.name for p in target.iterdir()) == ["half", "id"]
        ident = (target / "id").read_text()
        assert (target / "half").read_text() == ident
        return ident
    first, second = target.read_text().split("\n")
    assert first == second
    return first


ALLOWED = ("another wb run (pid ", LOST_RACE, "output exists")


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("race", [False, True], ids=["checked", "rename-race"])
def test_exactly_one_of_concurrent_writers_wins(tmp_path, kind, race):
    target, reports = run_writers(tmp_path, kind, force=False, race=race)
    winners = [r["id"] for r in reports if r["ok"]]
    assert len(winners) == 1, reports
    for report in reports:
        if not report["ok"]:
            assert "\n" not in report["error"] and report["error"].startswith(ALLOWED), report
            assert report["error"].endswith(f"({target})")
    assert content_of(target, kind) == winners[0]
    assert debris(target.parent) == []


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("race", [False, True], ids=["checked", "rename-race"])
def test_concurrent_forced_writers_leave_one_complete_output(tmp_path, kind, race):
    target, reports = run_writers(tmp_path, kind, force=True, race=race)
    winners = {r["id"] for r in reports if r["ok"]}
    assert winners, reports
    for report in reports:
        if not report["ok"]:
            assert "\n" not in report["error"] and report["error"].startswith(ALLOWED[:2]), report
    assert content_of(target, kind) in winners
    assert debris(target.parent) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "link-or-check"])
def test_a_target_that_appears_during_the_write_is_not_replaced(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    with pytest.raises(WorkbenchError, match="output appeared while this run was writing"):
        with atomic_file(tmp_path / "f.json") as handle:
            handle.write("mine")
            (tmp_path / "f.json").write_text("theirs")
    with pytest.raises(WorkbenchError, match="output appeared while this run was writing"):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("mine")
            (tmp_path / "d").mkdir()  # even an empty folder, which plain rename would replace
    assert (tmp_path / "f.json").read_text() == "theirs"
    assert list((tmp_path / "d").iterdir()) == []
    assert debris(tmp_path) == []


def test_forced_write_that_loses_the_rename_keeps_the_other_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v").write_text("old")
    real = outputs._move_aside

    def then_another_run_commits(path):
        old = real(path)
        path.mkdir()
        (path / "v").write_text("theirs")
        return old

    monkeypatch.setattr(outputs, "_move_aside", then_another_run_commits)
    with pytest.raises(WorkbenchError, match="output appeared"):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "v").write_text("mine")
    assert (target / "v").read_text() == "theirs"
    assert debris(tmp_path) == []


def test_failed_forced_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v").write_text("old")
    real, calls = outputs._rename_noreplace, []

    def fails_once(src, dst):
        calls.append(src)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real(src, dst)

    monkeypatch.setattr(outputs, "_rename_noreplace", fails_once)
    with pytest.raises(WorkbenchError, match="cannot write the output: Input/output error"):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "v").write_text("new")
    assert (target / "v").read_text() == "old"
    assert debris(tmp_path) == []


def test_force_replaces_a_folder_and_a_symlink_without_debris(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_dir(target, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("k")
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    with atomic_dir(link, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert not link.is_symlink() and [p.name for p in link.iterdir()] == ["new"]
    assert (elsewhere / "keep").read_text() == "k"
    assert debris(tmp_path) == []


# ----- interrupted runs ---------------------------------------------------------------------

HOLDER = r"""
import sys, time
from pathlib import Path
from workbench.outputs import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half").write_text("partial")
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


def start_holder(target: Path, flag: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(flag)], cwd=REPO)
    wait_for(flag, child)
    return child


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_next_run_removes_a_killed_runs_temporary(tmp_path, capsys, sig):
    target = tmp_path / "outs" / "out"
    child = start_holder(target, tmp_path / "flag")
    try:
        assert debris(target.parent) and debris(target.parent)[0].startswith(f".wb-tmp-out-{child.pid}-")
        os.kill(child.pid, sig)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    left = debris(target.parent)
    capsys.readouterr()
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("yes")
    assert (target / "done").read_text() == "yes"
    assert debris(target.parent) == []
    err = capsys.readouterr().err
    for name in left:  # the default SIGTERM handler skips cleanup, so SIGTERM leaves one too
        assert f"note: removed {target.parent / name} left by an interrupted run" in err


def test_a_live_writer_of_the_same_target_is_refused(tmp_path):
    target = tmp_path / "out"
    child = start_holder(target, tmp_path / "flag")
    try:
        with pytest.raises(WorkbenchError, match=rf"another wb run \(pid {child.pid}\) is writing this output now"):
            with atomic_dir(target, force=True):
                pass
        with atomic_dir(tmp_path / "out-2") as tmp:  # a different name that the same prefix starts
            (tmp / "x").write_text("x")
    finally:
        child.kill()
        child.wait(timeout=30)
    assert (tmp_path / "out-2" / "x").exists() and not target.exists()


def test_names_with_dashes_and_old_style_names(tmp_path, capsys):
    pid = dead_pid()
    other = tmp_path / f".wb-tmp-out-2-{pid}-0123456789ab"  # belongs to "out-2", not "out"
    other.mkdir()
    legacy = tmp_path / ".wb-tmp-out-k3j_x9a2"  # mkdtemp style: no pid, can't tell if in use
    legacy.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    err = capsys.readouterr().err
    assert other.exists() and legacy.exists()
    assert f"note: {legacy} may be left by an interrupted run of an older wb" in err
    assert str(other) not in err
    with atomic_dir(tmp_path / "out-2") as tmp:
        (tmp / "x").write_text("x")
    assert not other.exists()
    assert f"note: removed {other}" in capsys.readouterr().err


def test_a_reused_pid_does_not_block_the_output(tmp_path, capsys):
    if not Path("/proc/1/stat").exists():
        pytest.skip("needs Linux /proc to tell a reused pid")
    stale = tmp_path / ".wb-tmp-out-1-0123456789ab"  # pid 1 runs, but started after this was written
    stale.mkdir()
    os.utime(stale, (1000, 1000))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and "note: removed" in capsys.readouterr().err
    stale.mkdir()  # the same pid with a fresh timestamp: a live writer
    with pytest.raises(WorkbenchError, match=r"another wb run \(pid 1\)"):
        with atomic_dir(tmp_path / "out", force=True):
            pass
    assert stale.exists()


def test_an_interrupted_forced_run_gets_the_old_output_back(tmp_path, capsys):
    aside = tmp_path / f".wb-old-out-{dead_pid()}-0123456789ab"
    aside.mkdir()
    (aside / "v").write_text("previous")
    with pytest.raises(WorkbenchError, match="output exists"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "v").read_text() == "previous"
    assert "note: restored" in capsys.readouterr().err
    assert debris(tmp_path) == []


# ----- failures leave nothing behind, in one line -------------------------------------------


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_failed_run_removes_the_parents_it_created(tmp_path, kind):
    (tmp_path / "keep").mkdir()
    for target in (tmp_path / "a" / "b" / "out", tmp_path / "keep" / "b" / "out"):
        with pytest.raises(ValueError):
            with (atomic_dir(target) if kind == "dir" else atomic_file(target)):
                raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert list((tmp_path / "keep").iterdir()) == []


def test_successful_run_keeps_the_parents(tmp_path):
    with atomic_file(tmp_path / "a" / "b" / "out.json") as handle:
        handle.write("{}")
    assert (tmp_path / "a" / "b" / "out.json").read_text() == "{}"


def test_file_where_a_folder_is_meant_and_vice_versa(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text("x")
    (tmp_path / "file").write_text("f")
    for force in (False, True):
        with pytest.raises(WorkbenchError, match="output exists" if not force else "output is a folder, expected a file"):
            with atomic_file(tmp_path / "folder", force) as handle:
                handle.write("y")
        with pytest.raises(WorkbenchError, match="output exists" if not force else "output is a file, expected a folder"):
            with atomic_dir(tmp_path / "file", force):
                pass
    assert (tmp_path / "folder" / "x").read_text() == "x" and (tmp_path / "file").read_text() == "f"
    assert debris(tmp_path) == []


def test_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("f")
    with pytest.raises(WorkbenchError, match="a parent of the output is a file, not a folder"):
        with atomic_dir(tmp_path / "f" / "sub" / "out"):
            pass
    with pytest.raises(WorkbenchError, match="a parent of the output is a file, not a folder"):
        with atomic_file(tmp_path / "f" / "out.json") as handle:
            handle.write("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (tmp_path / "f").read_text() == "f"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_an_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for target in (locked / "out", locked / "sub" / "out"):
            with pytest.raises(WorkbenchError, match="cannot write here: Permission denied"):
                with atomic_dir(target):
                    pass
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_permission_errors_become_one_line(tmp_path, monkeypatch):
    def denied(target, directory):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(outputs, "_make_temp", denied)
    with pytest.raises(WorkbenchError) as caught:
        with atomic_file(tmp_path / "new" / "out.json") as handle:
            handle.write("x")
    assert caught.value.line() == f"cannot write here: Permission denied ({tmp_path / 'new' / 'out.json'})"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_full_disk(tmp_path, kind):
    target = tmp_path / "new" / "out"
    with pytest.raises(WorkbenchError) as caught:
        with (atomic_dir(target) if kind == "dir" else atomic_file(target)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.line() == f"{NO_SPACE} ({target})"
    assert list(tmp_path.iterdir()) == []


def test_other_errors_inside_the_block(tmp_path):
    with pytest.raises(FileNotFoundError):  # about an input: keeps its own type and message
        with atomic_dir(tmp_path / "out"):
            open(tmp_path / "missing-input")
    with pytest.raises(WorkbenchError, match="cannot write the output: No such file or directory"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "no" / "such").write_text("x")  # about the output itself
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_usual_permissions(tmp_path):
    for mask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
        previous = os.umask(mask)
        try:
            with atomic_dir(tmp_path / f"d{mask}"):
                pass
            with atomic_file(tmp_path / f"f{mask}", mode="wb") as handle:
                handle.write(b"x")
        finally:
            os.umask(previous)
        assert (tmp_path / f"d{mask}").stat().st_mode & 0o777 == folder_mode
        assert (tmp_path / f"f{mask}").stat().st_mode & 0o777 == file_mode


def test_a_dangling_symlink_counts_as_an_existing_output(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(WorkbenchError, match="output exists"):
        with atomic_file(link) as handle:
            handle.write("x")
    assert link.is_symlink()
    with atomic_file(link, force=True) as handle:
        handle.write("x")
    assert not link.is_symlink() and link.read_text() == "x"
    assert not (tmp_path / "gone").exists() and debris(tmp_path) == []
