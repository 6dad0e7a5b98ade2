"""Peak memory of `wb train` with LoRA against 4-bit QLoRA (`--quantization-bit 4`), same model, data and steps.

The bench model is the tests' tiny Llama scaled up until its weights dominate a training process's
memory (hidden 1536, 12 layers, intermediate 4096: 313 M parameters, 1.25 GB in fp32); 12 alpaca
records, cutoff 64, batch 2: 6 optimizer steps. It is built first, not measured. Each contender is one
`wb train` child process on the CPU with one torch thread, LoRA and QLoRA in the same run, its
/proc/PID/status sampled every 20 ms. RSS (anonymous + file-backed pages) is the figure, not RssAnon
alone (bench/measure.py's): on the CPU an fp32 base is trained straight from the memory-mapped
safetensors, so the LoRA run's weights are file-backed pages that every step touches; RssAnon and
RssFile are reported beside it. Two peaks of each: the whole run's, and the training phase's (from
the child's `training:` line on stderr to its exit: the steps and the save). The target is judged on
the training phase, the memory a run needs while it trains; the whole-run peak is reported too, and
for QLoRA it is the load's, when quantizing reads the whole fp32 file through its mapping. The memory
of a process that only imports what `wb train` imports (torch, transformers, peft, bitsandbytes) is
measured too.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
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
        if measured["training"] is None:
            raise RuntimeError(f"wb train ({name}) printed no `training:` line: {measured['stderr_tail']}")
        metrics = json.loads((out / "metrics.json").read_text())
        runs[name] = {"whole_run": measured["whole_run"], "training": measured["training"],
                      "wall_s": measured["wall_s"],
                      "steps": metrics["steps"], "train_tokens": metrics["train_tokens"],
                      "tokens_per_s": metrics["tokens_per_s"], "final_loss": metrics["final_loss"],
                      "quantization": json.loads((out / "train_args.json").read_text())["quantization"]}
    lora, qlora, floor = runs["lora"], runs["qlora"], imports["whole_run"]["rss_mb"]
    training = qlora["training"]["rss_mb"] / lora["training"]["rss_mb"]
    whole = qlora["whole_run"]["rss_mb"] / lora["whole_run"]["rss_mb"]
    return {
        "figures": {
            "model": f"Llama hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}: {parameters:,} "
                     f"parameters ({parameters * 4 / 2**20:,.0f} MiB fp32); LoRA r8 all-linear, fp32 compute, CPU, "
                     "1 thread",
            "data": f"{RECORDS} alpaca records, cutoff {CUTOFF}, batch {BATCH}, 1 epoch",
            "measured": "peak RSS (anonymous + file-backed) of each `wb train` process, MiB, n=1 run each, same "
                        "run: over the whole run, and over the training phase (from its `training:` line to its "
                        "exit); each sample's RssAnon and RssFile peaks beside it. The target reads the training "
                        "phase",
            "lora_training_peak_mb": lora["training"]["rss_mb"],
            "qlora_training_peak_mb": qlora["training"]["rss_mb"],
            "qlora_over_lora_training": round(training, 4),
            "lora_whole_run_peak_mb": lora["whole_run"]["rss_mb"],
            "qlora_whole_run_peak_mb": qlora["whole_run"]["rss_mb"],
            "qlora_over_lora_whole_run": round(whole, 4),
            "imports_only_peak_mb": floor,
            "above_imports_qlora_over_lora_training": round((qlora["training"]["rss_mb"] - floor)
                                                            / (lora["training"]["rss_mb"] - floor), 4),
            "runs": runs,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "targets": {"qlora_training_peak_memory_ratio": target(training, 0.5)},
    }


def _peaks(cmd: list[str], env: dict, interval: float = 0.02) -> dict:
    """One run of `cmd`: {"whole_run", "training", "wall_s", "returncode", "stderr_tail"}, where each
    phase is {"rss_mb", "rss_anon_mb", "rss_file_mb"} (each field's own peak over the phase's samples),
    "training" covering the samples from the child's `training:` line on (None if it printed none)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    training = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("training:"):
                training.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    status = Path(f"/proc/{proc.pid}/status")
    keys = {"VmRSS:": "rss_mb", "RssAnon:": "rss_anon_mb", "RssFile:": "rss_file_mb"}
    whole, train = dict.fromkeys(keys.values(), 0), dict.fromkeys(keys.values(), 0)
    while proc.poll() is None:
        in_training = training.is_set()  # read before the sample: a sample is never early
        try:
            sample = {keys[f[0]]: int(f[1]) for f in (line.split() for line in status.read_text().splitlines())
                      if len(f) > 1 and f[0] in keys}
        except (FileNotFoundError, ProcessLookupError, ValueError):
            sample = {}
        for key, kib in sample.items():
            whole[key] = max(whole[key], kib)
            if in_training:
                train[key] = max(train[key], kib)
        time.sleep(interval)
    reader.join()
    return {"whole_run": _mib(whole), "training": _mib(train) if training.is_set() else None,
            "wall_s": round(time.perf_counter() - start, 3), "returncode": proc.returncode,
            "stderr_tail": "".join(lines)[-2000:]}


def _mib(peaks: dict) -> dict:
    return {key: round(kib / 1024, 1) for key, kib in peaks.items()}


def _check(measured: dict, name: str) -> None:
    if measured["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {measured['stderr_tail']}")
