"""`wb train --stage dpo` against trl's DPOTrainer used directly: preference-training tokens/s.

The bench model of bench_train.py (a Llama of hidden 256, 4 layers, the tests' tokenizer with a ChatML
template) and 64 alpaca-style preference pairs, built first, not timed. Each contender runs in its own
process, twice, alternating (trl, wb, trl, wb), and the better run of each counts. Both train the same
LoRA (r 8, all-linear) with the sigmoid loss, beta 0.1, the same batch, optimizer, schedule, logging and
save settings, one torch thread; the reference of both is the base with the adapter disabled.
tokens/s = tokens of the chosen and rejected sequences trained / the Trainer's train_runtime (trl's own
count, `num_tokens`, for trl; wb's metrics.json for wb).

`python -m bench.bench_dpo trl BASE DATA OUT RESULT.json` is the trl contender itself: the records as
trl's conversational prompt/chosen/rejected rows, tokenized by trl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.bench_train import HIDDEN, LAYERS, WORDS, build_base
from bench.measure import alternate_train_runs, best_tokens_per_s, target

PAIRS, EPOCHS, BATCH, CUTOFF, LR, BETA = 64, 1, 4, 256, 5e-5, 0.1
LOGGING_STEPS, SAVE_STEPS = 4, 1000


def build(work: Path) -> tuple[Path, Path]:
    """The base model folder and an alpaca preference JSON file, seeded."""
    import random

    base = build_base(work)
    rng = random.Random(0)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    rows = [{"instruction": text(6, 16), "input": "", "chosen": text(15, 35), "rejected": text(15, 35)}
            for _ in range(PAIRS)]
    data = work / "pref.json"
    data.write_text(json.dumps(rows))
    return base, data


def trl_direct(base: str, data: str, out: str, result: str) -> None:
    """trl's DPOTrainer with a peft_config, on trl's conversational rows."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [{"prompt": [{"role": "user", "content": r["instruction"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in json.loads(Path(data).read_text())]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=LR,
                     lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=LOGGING_STEPS, save_steps=SAVE_STEPS,
                     use_cpu=True, report_to="none", disable_tqdm=True, seed=42, beta=BETA, loss_type=["sigmoid"],
                     max_length=CUTOFF, gradient_checkpointing=False, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    runtime = trainer.train().metrics["train_runtime"]
    tokens = trainer._total_train_tokens
    Path(result).write_text(json.dumps({"train_runtime_s": runtime, "train_tokens": tokens,
                                        "tokens_per_s": tokens / runtime}))


def run(work_dir: Path) -> dict:
    base, data = build(work_dir)

    def wb_command(out: Path) -> list[str]:
        return ["--stage", "dpo", "--base", str(base), "--data", str(data), "--out", str(out),
                "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--grad-accum", "1", "--cutoff-len", str(CUTOFF),
                "--lr", str(LR), "--pref-beta", str(BETA), "--logging-steps", str(LOGGING_STEPS),
                "--save-steps", str(SAVE_STEPS), "--device", "cpu"]

    runs = alternate_train_runs(work_dir, "trl",
                                [sys.executable, "-m", "bench.bench_dpo", "trl", str(base), str(data)],
                                wb_command, ("trl DPOTrainer", "wb train --stage dpo"))
    best = best_tokens_per_s(runs)
    overhead = 1 - best["wb"] / best["trl"]
    return {
        "figures": {
            "model": f"Llama hidden {HIDDEN}, {LAYERS} layers, LoRA r8 all-linear, fp32 CPU, 1 thread",
            "data": f"{PAIRS} preference pairs, cutoff {CUTOFF}, batch {BATCH}, {EPOCHS} epoch, sigmoid beta {BETA}",
            "n_runs_each": len(runs["wb"]),
            "trl_tokens_per_s": round(best["trl"], 1),
            "wb_tokens_per_s": round(best["wb"], 1),
            "overhead": round(overhead, 4),
            "runs": runs,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "targets": {"dpo_tokens_per_s_overhead": target(overhead, 0.10)},
    }


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "trl":
    trl_direct(*sys.argv[2:])
