"""`wb diff --lora-rank 64` against `mergekit-extract-lora --max-rank 64` on the same RAW and TUNED,
in the same run, on the same warm files: wall time, CPU time (user + system, from getrusage of the
reaped child: on a shared machine the steadier figure) and peak RssAnon of each process tree, and the
relative error ||Δ − B·A|| / ||Δ|| of every LoRA pair each adapter holds (computed here, the same
way for both, from the adapter files).

RAW and TUNED are bench_recover's (a synthetic bf16 Llama; TUNED = RAW + noise, so every tensor
changed and every delta has a flat spectrum: the costliest case for exact SVDs). Both store their
factors in bf16 (mergekit stores the model's dtype), so the adapters are alike in size.

Each contender runs one exact SVD per Linear weight (126 of them at 2048 x 2048..5632 for the
full 18 layers); on a small shared CPU that is many minutes each, so WB_BENCH_LORA_LAYERS=N
builds only the first N layers (the figures then say how many were measured).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

from bench import bench_recover

RANK = 64
LAYERS_ENV = "WB_BENCH_LORA_LAYERS"
PREFIX = "base_model.model."


@contextlib.contextmanager
def layers(count: int) -> Iterator[None]:
    """bench_recover's builder, with its layer count set to `count` while it runs."""
    saved = bench_recover.LAYERS
    bench_recover.LAYERS = count
    try:
        yield
    finally:
        bench_recover.LAYERS = saved


def adapter_errors(raw: Path, tuned: Path, adapter: Path) -> dict[str, float]:
    """{base tensor: ||Δ − B·A||_F / ||Δ||_F} for every Linear LoRA pair in `adapter` (scale 1)."""
    import torch

    from workbench.io.reader import open_checkpoint

    base, fine = open_checkpoint(raw), open_checkpoint(tuned)
    pairs = open_checkpoint(adapter / "adapter_model.safetensors")
    errors = {}
    for name in pairs.names():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        a = pairs.tensor(name).float()
        b = pairs.tensor(f"{PREFIX}{module}.lora_B.weight").float()
        delta = fine.tensor(f"{module}.weight").float() - base.tensor(f"{module}.weight").float()
        errors[f"{module}.weight"] = float(torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta))
    return errors


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(work: Path) -> dict:
    from bench.measure import run_measured, target

    count = int(os.environ.get(LAYERS_ENV, bench_recover.LAYERS))
    raw, tuned = (work / "raw").absolute(), (work / "tuned").absolute()
    with layers(count):
        raw_bytes = bench_recover.build_raw_and_tuned(raw, tuned)
    ours_out, theirs_out = work / "wb-lora", (work / "mergekit-lora").absolute()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # mergekit asks the hub whether a path is a repo
    contenders = {
        "wb": [sys.executable, "-m", "workbench", "diff", "--base", str(raw), "--tuned", str(tuned),
               "--out", str(ours_out), "--lora-rank", str(RANK), "--dtype", "bfloat16", "--device", "cpu"],
        "mergekit": [str(Path(sys.executable).parent / "mergekit-extract-lora"), "--model", str(tuned),
                     "--base-model", str(raw), "--out-path", str(theirs_out), "--max-rank", str(RANK), "--quiet"],
    }
    results = {}
    for name, command in contenders.items():
        bench_recover.warm(raw, tuned)
        before = _children_cpu_s()
        results[name] = run_measured(command, env=env)
        results[name]["cpu_s"] = round(_children_cpu_s() - before, 1)
        if results[name]["returncode"] != 0:
            raise RuntimeError(f"{name} failed: {results[name]['stderr_tail']}")
    ours, theirs = adapter_errors(raw, tuned, ours_out), adapter_errors(raw, tuned, theirs_out)
    if set(ours) != set(theirs):
        raise RuntimeError(f"the adapters adapt different tensors: {sorted(set(ours) ^ set(theirs))[:3]}")
    worst_ours, worst_theirs = max(ours.values()), max(theirs.values())
    wall_ratio = results["wb"]["wall_s"] / results["mergekit"]["wall_s"]
    cpu_ratio = results["wb"]["cpu_s"] / results["mergekit"]["cpu_s"]
    memory_ratio = results["wb"]["peak_rss_anon_mb"] / results["mergekit"]["peak_rss_anon_mb"]
    error_ratio = max(ours[name] / theirs[name] for name in ours)
    return {
        "figures": {
            "layers": count,
            "raw_bytes": raw_bytes,
            "rank": RANK,
            "lora_pairs": len(ours),
            "wb_wall_s": results["wb"]["wall_s"],
            "wb_cpu_s": results["wb"]["cpu_s"],
            "wb_peak_rss_anon_mb": results["wb"]["peak_rss_anon_mb"],
            "wb_adapter_bytes": (ours_out / "adapter_model.safetensors").stat().st_size,
            "wb_worst_relative_error": worst_ours,
            "mergekit_wall_s": results["mergekit"]["wall_s"],
            "mergekit_cpu_s": results["mergekit"]["cpu_s"],
            "mergekit_peak_rss_anon_mb": results["mergekit"]["peak_rss_anon_mb"],
            "mergekit_adapter_bytes": (theirs_out / "adapter_model.safetensors").stat().st_size,
            "mergekit_worst_relative_error": worst_theirs,
            "wall_ratio": round(wall_ratio, 4),
            "cpu_ratio": round(cpu_ratio, 4),
            "peak_anon_ratio": round(memory_ratio, 4),
            "worst_error_ratio_per_tensor": round(error_ratio, 6),
        },
        "targets": {  # both run one exact SVD per weight; wb adds the residual check of each pair (~1 %)
            "wall_ratio": target(wall_ratio, 1.1),
            "cpu_ratio": target(cpu_ratio, 1.1),
            "peak_anon_ratio": target(memory_ratio, 1.0),
            "worst_error_ratio_per_tensor": target(error_ratio, 1.0 + 1e-3),
        },
    }
