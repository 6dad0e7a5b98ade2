"""`wb diff` against the I/O floor, on the synthetic bf16 Llama of bench_recover (2.1 GB at full size).

Built first, not timed: RAW and TUNED (bench_recover's builder). Then, in the same run, on warm
files, each contender runs as its own process and is measured for wall time, CPU seconds and
peak RssAnon:

- the floor: read RAW and TUNED once each (16 MiB reads) and write one file of the diff's size
  (`python bench/bench_diff.py floor RAW TUNED OUT BYTES`) -- what any tool that reads both inputs
  and writes the diff must spend, with no arithmetic and no hashing;
- `python -m workbench diff --base RAW --tuned TUNED --out DIFF`, which also hashes every input file
  (weight_diff.json's fingerprints), every output file and every tensor.

`WB_BENCH_DIFF_LAYERS` builds a model with fewer decoder layers (default: bench_recover's 18), for
machines where the full size is too slow; `WB_BENCH_DIFF_REPEATS` runs each contender that many
times and keeps the fastest (default 1).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
from pathlib import Path
from unittest import mock

READ_CHUNK = 16 * 1024 * 1024


def build_inputs(raw: Path, tuned: Path, layers: int) -> int:
    """bench_recover's RAW and TUNED with `layers` decoder layers; returns RAW's tensor bytes."""
    from bench import bench_recover

    with mock.patch.object(bench_recover, "LAYERS", layers):
        return bench_recover.build_raw_and_tuned(raw, tuned)


def diff_bytes(tuned: Path) -> int:
    """The size of `wb diff`'s default output for TUNED: float tensors stored as float32, in 5GB shards."""
    import torch

    from workbench.io.reader import open_checkpoint
    from workbench.io.writer import DEFAULT_SHARD_SIZE, TensorSpec, plan_shards

    with open_checkpoint(tuned) as checkpoint:
        specs = [TensorSpec(name, info.shape, torch.float32 if info.dtype.is_floating_point else info.dtype)
                 for name, info in checkpoint.infos.items()]
    return sum(plan.header.data_start + plan.header.data_size for plan in plan_shards(specs, DEFAULT_SHARD_SIZE))


def floor(raw: str, tuned: str, out: str, size: str) -> None:
    """The floor contender: every input file read once, `size` bytes written once."""
    buffer = bytearray(READ_CHUNK)
    for folder in (Path(raw), Path(tuned)):
        for path in sorted(folder.iterdir()):
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
    remaining = int(size)
    view = memoryview(buffer)
    with open(out, "wb", buffering=0) as handle:
        while remaining > 0:
            remaining -= handle.write(view[:min(remaining, READ_CHUNK)])


def fastest(cmd: list[str], out: Path, repeats: int) -> dict:
    """The fastest of `repeats` measured runs of `cmd`, each after `out` is removed and the disk is
    synced (so that no run pays for the previous one's write-back), with its CPU seconds (user +
    sys) and the load average it started under: on a shared machine, wall time alone misleads."""
    from bench.measure import run_measured

    best = None
    for _ in range(repeats):
        if out.is_dir():
            shutil.rmtree(out)
        out.unlink(missing_ok=True)
        os.sync()
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = run_measured(cmd)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result["returncode"] != 0:
            raise RuntimeError(f"{' '.join(cmd[1:4])} failed: {result['stderr_tail']}")
        result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
        result["load_1min"] = round(load, 2)
        if best is None or result["wall_s"] < best["wall_s"]:
            best = result
    return best


def run(work: Path) -> dict:
    from bench import bench_recover
    from bench.measure import target

    layers = int(os.environ.get("WB_BENCH_DIFF_LAYERS", bench_recover.LAYERS))
    repeats = max(1, int(os.environ.get("WB_BENCH_DIFF_REPEATS", "1")))
    raw, tuned, diff, copy = work / "raw", work / "tuned", work / "diff", work / "floor.out"
    raw_bytes = build_inputs(raw, tuned, layers)
    size = diff_bytes(tuned)
    bench_recover.warm(raw, tuned)
    floor_run = fastest([sys.executable, str(Path(__file__).resolve()), "floor", str(raw), str(tuned), str(copy),
                         str(size)], copy, repeats)
    copy.unlink()
    ours = fastest([sys.executable, "-m", "workbench", "diff", "--base", str(raw), "--tuned", str(tuned),
                    "--out", str(diff)], diff, repeats)
    written = sum(p.stat().st_size for p in diff.glob("*.safetensors"))
    ratio = ours["wall_s"] / floor_run["wall_s"]
    return {
        "figures": {
            "layers": layers,
            "raw_bytes": raw_bytes,
            "input_bytes": sum(p.stat().st_size for f in (raw, tuned) for p in f.glob("*.safetensors")),
            "diff_bytes": written,
            "floor_wall_s": floor_run["wall_s"],
            "floor_cpu_s": floor_run["cpu_s"],
            "floor_peak_rss_anon_mb": floor_run["peak_rss_anon_mb"],
            "floor_load_1min": floor_run["load_1min"],
            "wb_diff_wall_s": ours["wall_s"],
            "wb_diff_cpu_s": ours["cpu_s"],
            "wb_diff_peak_rss_anon_mb": ours["peak_rss_anon_mb"],
            "wb_diff_load_1min": ours["load_1min"],
            "cpus": os.cpu_count(),
            "wall_over_floor": round(ratio, 4),
        },
        "targets": {"wall_over_floor": target(ratio, 1.5)},
    }


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "floor":
        sys.exit("usage: python bench/bench_diff.py floor RAW TUNED OUT BYTES")
    floor(*sys.argv[2:])
