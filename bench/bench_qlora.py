"""Peak memory of `wb train` with LoRA against 4-bit QLoRA (`--quantization-bit 4`), same model, data and steps.

The bench model is the tests' tiny Llama scaled up until its weights dominate a training process's
memory (hidden 1536, 12 layers, intermediate 4096: 313 M parameters, 1.25 GB in fp32); 12 alpaca
records, cutoff 64, batch 2: 6 optimizer steps. It is built first, not measured. Each contender is one
`wb train` child process on the CPU with one torch thread, LoRA and QLoRA in the same run, sampled
every 20 ms. Two peaks are measured: RSS (anonymous + file-backed pages) is the one the target reads,
because on the CPU an fp32 base is trained straight from the memory-mapped safetensors: its weights are
file-backed pages that every step touches, so RssAnon alone (bench/measure.py's figure) would leave the
LoRA run's weights out; RssAnon is reported beside it. The memory of a process that only imports what
`wb train` imports (torch, transformers, peft, bitsandbytes) is measured too.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import target

HIDDEN, LAYERS, INTERMEDIATE = 1536, 12, 4096
RECORDS, BATCH, CUTOFF, LR = 12, 2, 64, 1e-3
WORDS = "the capital of France is Paris the capital of Italy is Rome simple and elegant answer four".split()
IMPORTS = "import torch, transformers, peft, bitsandbytes, workbench.train.run"


def build(work: Path) -> tuple[Path, Path, int]:
    """The base model folder (fp32 safetensors), an alpaca JSON file, and the parameter count."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_model, make_tokenizer, save_layout, state_dict_for_files

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=0, hidden=HIDDEN, layers=LAYERS, intermediate=INTERMEDIATE)
    parameters = sum(p.numel() for p in model.parameters())
    base = save_layout(state_dict_for_files(model), work / "base", dtype=torch.float32, config=model.config,
                       tokenizer=tokenizer)
    del model
    rng = random.Random(0)
    rows = [{"instruction": " ".join(rng.choices(WORDS, k=8)), "input": "",
             "output": " ".join(rng.choices(WORDS, k=20))} for _ in range(RECORDS)]
    data = work / "data.json"
    data.write_text(json.dumps(rows))
    return base, data, parameters


def run(work_dir: Path) -> dict:
    base, data, parameters = build(work_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    imports = _peaks([sys.executable, "-c", IMPORTS], env)
    _check(imports, "the imports")
    runs = {}
    for name, extra in (("lora", []), ("qlora", ["--quantization-bit", "4"])):
        out = work_dir / name
        measured = _peaks([sys.executable, "-m", "workbench", "train", "--base", str(base), "--data", str(data),
                                 "--out", str(out), "--epochs", "1", "--batch-size", str(BATCH), "--grad-accum", "1",
                                 "--cutoff-len", str(CUTOFF), "--lr", str(LR), "--logging-steps", "1",
                                 "--save-steps", "1000", "--device", "cpu", *extra], env)
        _check(measured, f"wb train ({name})")
        metrics = json.loads((out / "metrics.json").read_text())
        runs[name] = {"peak_rss_mb": measured["peak_rss_mb"], "peak_rss_anon_mb": measured["peak_rss_anon_mb"],
                      "wall_s": measured["wall_s"],
                      "steps": metrics["steps"], "train_tokens": metrics["train_tokens"],
                      "tokens_per_s": metrics["tokens_per_s"], "final_loss": metrics["final_loss"],
                      "quantization": json.loads((out / "train_args.json").read_text())["quantization"]}
    lora, qlora, floor = runs["lora"]["peak_rss_mb"], runs["qlora"]["peak_rss_mb"], imports["peak_rss_mb"]
    ratio = qlora / lora
    anon = runs["qlora"]["peak_rss_anon_mb"] / runs["lora"]["peak_rss_anon_mb"]
    return {
        "figures": {
            "model": f"Llama hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}: {parameters:,} "
                     f"parameters ({parameters * 4 / 2**20:,.0f} MiB fp32); LoRA r8 all-linear, fp32 compute, CPU, "
                     "1 thread",
            "data": f"{RECORDS} alpaca records, cutoff {CUTOFF}, batch {BATCH}, 1 epoch",
            "measured": "peak RSS (anonymous + file-backed) of each `wb train` process, n=1 run each, same run, "
                        "MiB; peak RssAnon beside it",
            "lora_peak_mb": lora,
            "qlora_peak_mb": qlora,
            "qlora_over_lora": round(ratio, 4),
            "qlora_over_lora_rss_anon": round(anon, 4),
            "imports_only_peak_mb": floor,
            "above_imports_qlora_over_lora": round((qlora - floor) / (lora - floor), 4),
            "runs": runs,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "targets": {"qlora_peak_memory_ratio": target(ratio, 0.5)},
    }


def _peaks(cmd: list[str], env: dict, interval: float = 0.02) -> dict:
    """{"peak_rss_mb", "peak_rss_anon_mb", "wall_s", "returncode", "stderr_tail"} of one run of `cmd`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    status = Path(f"/proc/{proc.pid}/status")
    peak = {"VmRSS:": 0, "RssAnon:": 0}
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key = line.split(maxsplit=1)[0] if line else ""
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
        time.sleep(interval)
    stderr = proc.stderr.read() if proc.stderr else ""
    return {"peak_rss_mb": round(peak["VmRSS:"] / 1024, 1), "peak_rss_anon_mb": round(peak["RssAnon:"] / 1024, 1),
            "wall_s": round(time.perf_counter() - start, 3), "returncode": proc.returncode,
            "stderr_tail": stderr[-2000:]}


def _check(measured: dict, name: str) -> None:
    if measured["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {measured['stderr_tail']}")
