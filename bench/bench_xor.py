"""XOR releases: `wb diff --format xor` and `wb recover` on one, against the I/O floor, same run.

The model is bench_recover's synthetic bf16 Llama (>= 2 GB; RAW and TUNED in the same shard
layout, as an XOR release needs). `WB_BENCH_XOR_LAYERS=N` builds it with N decoder layers
instead of 18, for a machine where the full size is too slow (1 layer: about 0.4 GB).

Measured on a warm page cache (every input read once before each contender):

- the floor: a plain Python chunked copy that reads RAW's and TUNED's files once each and writes
  TUNED's bytes once (`python bench/bench_xor.py floor RAW TUNED OUT`), the least any encoder or
  decoder of this format must do;
- encode: `python -m workbench diff --format xor --base RAW --tuned TUNED --out REL`;
- decode: `python -m workbench recover --base RAW --diff REL --out OUT` (auto-detected), whose OUT
  is then compared byte for byte with TUNED.

Both also hash (md5 of RAW's and of TUNED's bytes, for the two lists), which the floor does not:
about 2.8 CPU-seconds per GB of model (RAW's and TUNED's bytes at ~720 MB/s per core), spread over
up to 2 hash threads per file and up to 4 files at a time. Each run's CPU seconds are reported
beside its wall time (on a shared machine the wall says how long, the CPU how much work).
Targets: each speed >= 0.8x the floor's (floor wall / wall >= 0.8).
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import resource
import sys
from pathlib import Path

CHUNK = 16 << 20
LAYERS_ENV = "WB_BENCH_XOR_LAYERS"


@contextlib.contextmanager
def model_layers(layers: int):
    """bench_recover's builder, with another layer count (its module constant, restored after)."""
    from bench import bench_recover

    saved = bench_recover.LAYERS
    bench_recover.LAYERS = layers
    try:
        yield
    finally:
        bench_recover.LAYERS = saved


def floor_copy(raw: Path, tuned: Path, out: Path) -> None:
    """Read RAW's and TUNED's file of each name once, in chunks, and write TUNED's bytes once."""
    out.mkdir(parents=True)
    base_buffer, tuned_buffer = bytearray(CHUNK), bytearray(CHUNK)
    for path in sorted(tuned.iterdir()):
        with open(path, "rb", buffering=0) as source, open(raw / path.name, "rb", buffering=0) as base, \
                open(out / path.name, "wb", buffering=0) as sink:
            while count := source.readinto(tuned_buffer):
                base.readinto(base_buffer)
                sink.write(memoryview(tuned_buffer)[:count])
            while base.readinto(base_buffer):
                pass


def measured(cmd: list[str]) -> dict:
    """run_measured's figures plus the CPU seconds (user + system) the command used: on a machine
    shared with other jobs, the wall time says how long, the CPU time says how much work."""
    from bench.measure import run_measured

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_measured(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    return result


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def run(work: Path) -> dict:
    from bench import bench_recover
    from bench.measure import target

    layers = int(os.environ.get(LAYERS_ENV, bench_recover.LAYERS))
    raw, tuned, rel, out = work / "raw", work / "tuned", work / "rel", work / "out"
    with model_layers(layers):
        bench_recover.build_raw_and_tuned(raw, tuned)
    moved = sum(p.stat().st_size for folder in (raw, tuned) for p in folder.iterdir()) + \
        sum(p.stat().st_size for p in tuned.iterdir())  # read both, write one
    bench_recover.warm(raw, tuned)
    floor = measured([sys.executable, str(Path(__file__).resolve()), "floor", str(raw), str(tuned), str(work / "floor")])
    bench_recover.warm(raw, tuned)
    encode = measured([sys.executable, "-m", "workbench", "diff", "--format", "xor", "--base", str(raw),
                           "--tuned", str(tuned), "--out", str(rel)])
    bench_recover.warm(raw, rel)
    decode = measured([sys.executable, "-m", "workbench", "recover", "--base", str(raw), "--diff", str(rel),
                           "--out", str(out)])
    for label, result in (("floor", floor), ("encode", encode), ("decode", decode)):
        if result["returncode"] != 0:
            raise RuntimeError(f"{label} failed: {result['stderr_tail']}")
    (out / "recover.json").unlink()
    if not same_files(out, tuned):
        raise RuntimeError("wb recover's OUT differs from TUNED")
    imports = measured([sys.executable, "-c", "import workbench.cli, workbench.weights.recover"])
    encode_ratio, decode_ratio = floor["wall_s"] / encode["wall_s"], floor["wall_s"] / decode["wall_s"]
    return {
        "figures": {
            "layers": layers,
            "cpus": os.cpu_count(),
            "bytes_moved": moved,
            "tuned_bytes": sum(p.stat().st_size for p in tuned.iterdir()),
            "floor_wall_s": floor["wall_s"],
            "floor_MB_per_s": round(moved / floor["wall_s"] / 1e6, 1),
            "floor_cpu_s": floor["cpu_s"],
            "encode_wall_s": encode["wall_s"],
            "encode_MB_per_s": round(moved / encode["wall_s"] / 1e6, 1),
            "encode_cpu_s": encode["cpu_s"],
            "encode_peak_rss_anon_mb": encode["peak_rss_anon_mb"],
            "decode_wall_s": decode["wall_s"],
            "decode_MB_per_s": round(moved / decode["wall_s"] / 1e6, 1),
            "decode_cpu_s": decode["cpu_s"],
            "decode_peak_rss_anon_mb": decode["peak_rss_anon_mb"],
            "recover_import_s": imports["wall_s"],  # wb recover's start-up (torch), in decode's wall
            "recover_import_cpu_s": imports["cpu_s"],
            "out_identical_to_tuned": True,
        },
        "targets": {
            "encode_speed_vs_floor": target(encode_ratio, 0.8, higher_is_better=True),
            "decode_speed_vs_floor": target(decode_ratio, 0.8, higher_is_better=True),
        },
    }


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "floor":
        sys.exit("usage: python bench/bench_xor.py floor RAW TUNED OUT")
    floor_copy(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
