"""`make gpu-check`: the demo pipeline on a CUDA GPU, with its figures; a clear note where there is none.

Runs `wb demo --device cuda` with bf16 training: `wb train` (bf16) on the GPU, `wb merge --device cuda`,
`wb recover --device cuda`, and batched `wb eval` on the GPU (`--batch-size auto`), then prints each
step's time, training tokens/s and peak GPU memory, evaluation time and the ROUGE-L of base and
fine-tuned, and writes them to OUT/gpu_check.json. Without CUDA it says so and exits 0.

    python -m bench.gpu_check [--out bench/out/gpu-check] [--base FOLDER_OR_HUB_ID] [--data-dir DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def cuda_summary() -> str | None:
    """"<name>, <memory> GiB, CUDA <version>" of device 0, or None without a usable CUDA device."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"


def figures(out: Path) -> dict:
    """What a GPU run is judged by, read from the files the demo's commands wrote into `out`."""
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    train = json.loads((out / "train" / "metrics.json").read_text(encoding="utf-8"))
    evals = {label: json.loads((out / "eval" / f"{label}.json").read_text(encoding="utf-8")) for label in ("base", "tuned")}
    return {
        "total_s": demo["total_s"],
        "steps_s": {step["name"]: step["seconds"] for step in demo["steps"]},
        "train": {key: train.get(key) for key in ("tokens_per_s", "train_runtime_s", "steps", "peak_gpu_memory_gb",
                                                 "train_loss")},
        "eval": {label: {"device": r["provenance"]["device"], "dtype": r["provenance"]["dtype"],
                         "duration_s": r["provenance"]["duration_s"],
                         "rouge-l": (r.get("generation") or {}).get("metrics", {}).get("rouge-l")}
                 for label, r in evals.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-check"))
    parser.add_argument("--base", help="model folder or hub id (default: the demo's SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", action="append", default=[], help="MMLU/C-Eval/CMMLU folder to evaluate too")
    args = parser.parse_args(argv)
    device = cuda_summary()
    if device is None:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, {build}); nothing to check.")
        return 0
    from workbench.demo.run import DemoSettings, run_demo
    from workbench.errors import WorkbenchError

    print(f"gpu-check on {device}")
    try:
        run_demo(base=args.base, out=args.out, data_dir=args.data_dir, device="cuda", force=True,
                 settings=DemoSettings(dtype="bf16"))
    except WorkbenchError as exc:
        print(f"gpu-check: FAILED: {exc.line()}", file=sys.stderr)
        return 1
    result = {"device": device, **figures(args.out)}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    train = result["train"]
    print(f"\ngpu-check figures ({device}):")
    print(f"  train (bf16): {train['tokens_per_s']} tokens/s, {train['steps']} steps in {train['train_runtime_s']} s, "
          f"peak GPU memory {train['peak_gpu_memory_gb']} GiB")
    for name in ("merge", "recover"):
        print(f"  {name} --device cuda: {result['steps_s'].get(name)} s (process wall time)")
    for label, entry in result["eval"].items():
        print(f"  eval {label} on {entry['device']} ({entry['dtype']}): {entry['duration_s']} s, ROUGE-L {entry['rouge-l']}")
    print(f"  whole demo: {result['total_s']} s; figures in {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
