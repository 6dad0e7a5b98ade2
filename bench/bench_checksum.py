"""`wb checksum --algo md5` against coreutils `md5sum` over the same multi-shard model (>= 1 GB).

Both run on a warm page cache (each file read once before timing), best of three runs each, so the
comparison is of hashing, not of the disk.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.measure import target

SHARDS = 4
SHARD_ELEMENTS = 70 * 1024 * 1024  # 280 MiB of fp32 per shard, 1.1 GiB in all
REPEATS = 3


def build_model(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    files = []
    for k in range(1, SHARDS + 1):
        path = folder / f"model-{k:05d}-of-{SHARDS:05d}.safetensors"
        save_file({f"layer.{k}.weight": torch.randn(SHARD_ELEMENTS // 4096, 4096, generator=generator)}, path)
        files.append(path)
    return files


def best_time(cmd: list[str], cwd: Path) -> tuple[float, str]:
    times, output = [], ""
    for _ in range(REPEATS):
        start = time.perf_counter()
        output = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - start)
    return min(times), output


def run(work: Path) -> dict:
    if shutil.which("md5sum") is None:
        return {"skipped": "coreutils md5sum is not installed"}
    files = build_model(work / "model")
    for path in files:  # warm the page cache for both contenders
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass
    total_bytes = sum(p.stat().st_size for p in files)
    names = [p.name for p in files]
    md5sum_s, md5sum_out = best_time(["md5sum", *names], work / "model")
    wb_s, wb_out = best_time([sys.executable, "-m", "workbench", "checksum", str(work / "model"), "--algo", "md5"], work)
    if sorted(md5sum_out.splitlines()) != sorted(wb_out.splitlines()):
        raise RuntimeError("wb checksum and md5sum disagree")
    speedup = md5sum_s / wb_s
    return {
        "figures": {
            "total_bytes": total_bytes,
            "shards": SHARDS,
            "md5sum_s": round(md5sum_s, 3),
            "wb_checksum_s": round(wb_s, 3),
            "wb_MB_per_s": round(total_bytes / wb_s / 1e6, 1),
            "speedup_vs_md5sum": round(speedup, 3),
        },
        "targets": {"speedup_vs_md5sum": target(speedup, 1.5, higher_is_better=True)},
    }
