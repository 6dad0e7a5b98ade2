"""A plain (non-editable) `pip install .` carries everything the program reads at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import workbench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_ships_package_data(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True,
    )
    if build.returncode != 0 and "setuptools" in build.stderr and "No module named" in build.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert build.returncode == 0, build.stderr[-2000:]
    # the version is written once (workbench.__version__); psutil is bench/'s, not a run-time dependency
    (info,) = target.glob("wb-*.dist-info")
    metadata = (info / "METADATA").read_text(encoding="utf-8").splitlines()
    assert f"Version: {workbench.__version__}" in metadata and info.name == f"wb-{workbench.__version__}.dist-info"
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata if line.startswith("Requires-Dist: ")]
    assert any(r.startswith("torch") for r in requires)
    assert [r for r in requires if r.startswith("psutil")] == ['psutil>=5.9; extra == "bench"']
    source_data = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "workbench").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    )
    assert source_data, "the package has run-time data files (templates, configs)"
    for relative in source_data:
        assert (target / relative).is_file(), f"{relative} is missing from the installed package"
    # the installed copy runs on its own (not the checkout's)
    probe = subprocess.run(
        [sys.executable, "-c", "import workbench.cli, sys; print(workbench.cli.__file__)"],
        capture_output=True, text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(target))
