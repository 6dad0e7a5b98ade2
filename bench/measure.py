"""Run a command and measure its wall time and peak anonymous memory (RssAnon).

RssAnon is what a process allocated for itself; pages of memory-mapped files are page cache and
are not counted, which is exactly the distinction a streaming tool's memory claim rests on.
Children are summed (a launcher's subprocesses count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def _rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.02) -> dict:
    """{"wall_s", "peak_rss_anon_mb", "returncode", "stderr_tail"} of one run of `cmd`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            pids = [proc.pid] + [c.pid for c in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        peak = max(peak, sum(_rss_anon_kb(pid) for pid in pids))
        time.sleep(interval)
    stderr = proc.stderr.read() if proc.stderr else ""
    wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 3),
        "peak_rss_anon_mb": round(peak / 1024, 1),
        "returncode": proc.returncode,
        "stderr_tail": stderr[-2000:],
    }


def check(measured: dict, name: str) -> dict:
    """`measured`, or a RuntimeError with the tail of its stderr when the run failed."""
    if measured["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {measured['stderr_tail']}")
    return measured


def alternate_train_runs(work_dir: Path, peer: str, peer_command: list[str],
                         wb_command: Callable[[Path], list[str]], names: tuple[str, str],
                         attempts: int = 2) -> dict[str, list[dict]]:
    """{peer: [...], "wb": [...]}: `attempts` runs of each training contender, alternating (peer, wb, peer,
    wb), each in its own process with one thread, so that a burst of load from other work does not decide.

    The peer runs `peer_command + [OUT, RESULT.json]` and writes its train_runtime_s, train_tokens and
    tokens_per_s to RESULT.json; wb runs `wb train` + `wb_command(OUT)`, and they come from OUT/metrics.json.
    `names` name the two in errors. Each run's entry adds its wall_s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    runs: dict[str, list[dict]] = {peer: [], "wb": []}
    for attempt in range(attempts):
        out, result = work_dir / f"{peer}-{attempt}", work_dir / f"{peer}-{attempt}.json"
        measured = check(run_measured([*peer_command, str(out), str(result)], env=env), names[0])
        runs[peer].append({**json.loads(result.read_text()), "wall_s": measured["wall_s"]})
        out = work_dir / f"wb-{attempt}"
        command = [sys.executable, "-m", "workbench", "train", *wb_command(out)]
        measured = check(run_measured(command, env=env), names[1])
        metrics = json.loads((out / "metrics.json").read_text())
        runs["wb"].append({key: metrics[key] for key in ("train_runtime_s", "train_tokens", "tokens_per_s")}
                          | {"wall_s": measured["wall_s"]})
    return runs


def best_tokens_per_s(runs: dict[str, list[dict]]) -> dict[str, float]:
    """The better run of each contender counts."""
    return {name: max(r["tokens_per_s"] for r in entries) for name, entries in runs.items()}


def target(value: float, limit: float, higher_is_better: bool = False) -> dict:
    met = value >= limit if higher_is_better else value <= limit
    return {"value": round(value, 4), "target": ("≥ " if higher_is_better else "≤ ") + str(limit), "met": met}


def compare_checkpoints(ours: Path, theirs: Path) -> dict:
    """How many tensors of two outputs differ bit-wise (dtype included), and by how much at most."""
    from workbench.io.reader import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    if set(a.names()) != set(b.names()):
        raise RuntimeError(f"outputs hold different tensors: {sorted(set(a.names()) ^ set(b.names()))[:3]}")
    worst, unequal = 0.0, 0
    for name in a.names():
        x, y = a.tensor(name), b.tensor(name)
        if x.dtype != y.dtype or not x.equal(y):
            unequal += 1
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {"tensors": len(a), "tensors_not_bitwise_equal": unequal, "max_abs_diff": worst}
