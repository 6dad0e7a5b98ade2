"""`make gpu-check`: the demo pipeline on a CUDA GPU, with its figures; a clear note where there is none.

Runs `wb demo --device cuda` with bf16 training: `wb train` (bf16) on the GPU, `wb merge --device cuda`,
`wb recover --device cuda`, and batched `wb eval` on the GPU (`--batch-size auto`); then the training
variants on the demo's base and data, same records and steps: LoRA, 4-bit QLoRA (bitsandbytes) and DPO
continuing the demo's SFT adapter; and `wb eval --backend vllm` of the base where vLLM is importable. It prints each step's time, training tokens/s and peak GPU memory,
evaluation time, questions per second and the ROUGE-L of base and fine-tuned, and writes them to
OUT/gpu_check.json. Without CUDA it says so and exits 0 (`--device cpu` runs the same script on the CPU,
to check it before a GPU is lent).

    python -m bench.gpu_check [--out bench/out/gpu-check] [--base FOLDER_OR_HUB_ID] [--data-dir DIR ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
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


VARIANT_RECORDS = 64  # identity records each training variant trains on (one epoch)


def preference_file(identity: Path, out: Path) -> Path:
    """Preference pairs from the demo's identity records: the answer is chosen, another record's rejected."""
    records = json.loads(identity.read_text(encoding="utf-8"))[:VARIANT_RECORDS]
    answers = sorted({r["output"] for r in records})
    pairs = [{"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["output"],
              "rejected": answers[(answers.index(r["output"]) + 1) % len(answers)]} for r in records]
    path = out / "identity_pref.json"
    path.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    return path


def train_variants(out: Path, base: str, device: str, dtype: str) -> dict:
    """LoRA, 4-bit QLoRA and DPO (from the demo's SFT adapter) on the same records: each one's metrics.json."""
    identity = next(out.rglob("identity_train.json"))
    common = ["--base", base, "--device", device, "--dtype", dtype, "--epochs", "1", "--max-samples",
              str(VARIANT_RECORDS), "--batch-size", "4", "--grad-accum", "2", "--logging-steps", "2", "--force"]
    runs = {
        "lora": ["--data", str(identity)],
        "qlora_4bit": ["--data", str(identity), "--quantization-bit", "4"],
        "dpo": ["--stage", "dpo", "--adapter", str(out / "train"), "--data", str(preference_file(identity, out)),
                "--lr", "5e-5"],
    }
    found = {}
    for name, extra in runs.items():
        folder = out / f"variant-{name}"
        done = subprocess.run([sys.executable, "-m", "workbench", "train", *common, *extra, "--out", str(folder)],
                              check=False)
        if done.returncode != 0:
            found[name] = {"failed": done.returncode}
            continue
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        found[name] = {key: metrics.get(key) for key in ("tokens_per_s", "peak_gpu_memory_gb", "train_runtime_s",
                                                         "steps", "final_loss", "rewards/margins",
                                                         "rewards/accuracies")}
    return found


def questions_per_second(out: Path) -> dict:
    """Benchmark questions scored per second of each demo evaluation (its whole duration, generation included)."""
    rates = {}
    for label in ("base", "tuned"):
        results = json.loads((out / "eval" / f"{label}.json").read_text(encoding="utf-8"))
        leaves = [name for name in results.get("n-samples", {}) if name not in results.get("group_subtasks", {})]
        questions = sum(results["n-samples"][name].get("effective", 0) for name in leaves)
        rates[label] = {"questions": questions, "duration_s": results["provenance"]["duration_s"],
                        "questions_per_s": round(questions / results["provenance"]["duration_s"], 2)}
    return rates


def vllm_eval(out: Path, base: str, data_dirs: list[str]) -> dict:
    """`wb eval --backend vllm` of the demo's base on its benchmark folders, where vLLM is importable."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed here"}
    if not data_dirs:
        return {"skipped": "no --data-dir given"}
    results = out / "eval" / "base-vllm.json"
    command = [sys.executable, "-m", "workbench", "eval", "--model", base, "--backend", "vllm", "--device", "cuda",
               *[arg for folder in data_dirs for arg in ("--data-dir", folder)], "--out", str(results), "--force"]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        return {"failed": done.returncode}
    found = json.loads(results.read_text(encoding="utf-8"))
    hf = json.loads((out / "eval" / "base.json").read_text(encoding="utf-8"))
    return {"duration_s": found["provenance"]["duration_s"],
            "groups_acc": {name: scores.get("acc,none") for name, scores in (found.get("groups") or {}).items()},
            "hf_groups_acc": {name: scores.get("acc,none") for name, scores in (hf.get("groups") or {}).items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-check"))
    parser.add_argument("--base", help="model folder or hub id (default: the demo's SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", action="append", default=[], help="MMLU/C-Eval/CMMLU folder to evaluate too")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: run the same checks on the CPU (fp32), to try the script without a GPU")
    args = parser.parse_args(argv)
    device = cuda_summary() if args.device == "cuda" else f"CPU (torch {torch.__version__})"
    if device is None:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, {build}); nothing to check.")
        return 0
    from workbench.demo.run import DemoSettings, run_demo
    from workbench.errors import WorkbenchError

    print(f"gpu-check on {device}")
    try:
        dtype = "bf16" if args.device == "cuda" else "fp32"
        run_demo(base=args.base, out=args.out, data_dir=args.data_dir, device=args.device, force=True,
                 settings=DemoSettings(dtype=dtype))
    except WorkbenchError as exc:
        print(f"gpu-check: FAILED: {exc.line()}", file=sys.stderr)
        return 1
    base = json.loads((args.out / "demo.json").read_text(encoding="utf-8"))["base"]
    result = {"device": device, **figures(args.out), "questions_per_s": questions_per_second(args.out),
              "train_variants": train_variants(args.out, base, args.device, dtype),
              "vllm_eval": vllm_eval(args.out, base, args.data_dir) if args.device == "cuda" else {"skipped": "cpu"}}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    train = result["train"]
    print(f"\ngpu-check figures ({device}):")
    print(f"  train (bf16): {train['tokens_per_s']} tokens/s, {train['steps']} steps in {train['train_runtime_s']} s, "
          f"peak GPU memory {train['peak_gpu_memory_gb']} GiB")
    for name in ("merge", "recover"):
        print(f"  {name} --device cuda: {result['steps_s'].get(name)} s (process wall time)")
    for label, entry in result["eval"].items():
        print(f"  eval {label} on {entry['device']} ({entry['dtype']}): {entry['duration_s']} s, ROUGE-L {entry['rouge-l']}")
    for label, rate in result["questions_per_s"].items():
        print(f"  eval {label}: {rate['questions']} questions in {rate['duration_s']} s, {rate['questions_per_s']}/s")
    for name, variant in result["train_variants"].items():
        print(f"  train {name}: {variant}")
    print(f"  eval --backend vllm: {result['vllm_eval']}")
    print(f"  whole demo: {result['total_s']} s; figures in {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
