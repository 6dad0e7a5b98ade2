"""Process-level output safety through the real `wb` command: concurrent writers to one OUT, and a
run killed mid-write then run again (tests/test_outputs.py covers the output layer itself)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

WB = [sys.executable, "-m", "workbench"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A base and a tuned 'model' of one 32 MB tensor: big enough that a write takes a while."""
    root = tmp_path_factory.mktemp("big")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 4096, generator=generator)
    for name, tensor in (("base", weight), ("tuned", weight + 0.01)):
        (root / name).mkdir()
        save_file({"w": tensor}, root / name / "model.safetensors")
    return root / "base", root / "tuned"


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".wb-tmp-", ".wb-old-")))


def test_concurrent_diffs_to_one_out_exactly_one_wins(models, tmp_path):
    base, tuned = models
    out = tmp_path / "diff"
    runs = [subprocess.Popen([*WB, "diff", "--base", base, "--tuned", tuned, "--out", out],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1, 1, 1], results
    for code, stderr in results:
        assert "Traceback" not in stderr
        if code == 1:
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert (out / "weight_diff.json").is_file() and debris(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_recover_leaves_a_temporary_the_next_run_removes(models, tmp_path, sig):
    base, tuned = models
    diff, out = tmp_path / "diff", tmp_path / "out"
    assert subprocess.run([*WB, "diff", "--base", base, "--tuned", tuned, "--out", diff]).returncode == 0
    run = subprocess.Popen([*WB, "recover", "--base", base, "--diff", diff, "--out", out],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not debris(tmp_path) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if run.poll() is not None:
        pytest.skip("recover finished before it could be interrupted on this machine")
    run.send_signal(sig)
    run.wait(timeout=60)
    assert not out.exists()
    left = debris(tmp_path)
    again = subprocess.run([*WB, "recover", "--base", base, "--diff", diff, "--out", out],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    if left:  # SIGKILL always leaves one; SIGTERM may not, as Python's default handler exits at once
        assert "left by an interrupted run" in again.stderr
    assert debris(tmp_path) == [] and (out / "model.safetensors").is_file()
