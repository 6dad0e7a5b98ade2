"""`wb train` against a plain transformers `Trainer` + peft loop: training tokens/s on the same model and data.

A small Llama (hidden 256, 4 layers, the tests' 320-token BPE tokenizer with a ChatML template) and 128
alpaca records are built first, not timed. Each contender runs in its own process, twice, alternating
(baseline, wb, baseline, wb), and the better run of each counts, so that a burst of load from other work on
the machine does not decide the result. Both use the same LoRA (r 8, all-linear), batch, cutoff, optimizer,
schedule, logging and save settings, one torch thread (two cores are shared here; more threads only add
contention), and report tokens/s = non-padding tokens trained / the Trainer's train_runtime.

`python -m bench.bench_train baseline BASE DATA OUT RESULT.json` is the baseline contender itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.measure import alternate_train_runs, best_tokens_per_s, target

HIDDEN, LAYERS, INTERMEDIATE = 256, 4, 688
RECORDS, EPOCHS, BATCH, CUTOFF, LR = 128, 1, 8, 256, 2e-4
LOGGING_STEPS, SAVE_STEPS = 10, 1000
WORDS = ("the capital of France is Paris the capital of Italy is Rome question what is two plus two answer four "
         "write an advertisement for a black striped dress simple and elegant").split()


def build_base(work: Path) -> Path:
    """The bench model, the tests' tiny Llama scaled up to HIDDEN, LAYERS, INTERMEDIATE (seeded): work/base."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_model, make_tokenizer, save_layout, state_dict_for_files

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=0, hidden=HIDDEN, layers=LAYERS, intermediate=INTERMEDIATE)
    return save_layout(state_dict_for_files(model), work / "base", dtype=torch.float32, config=model.config,
                       tokenizer=tokenizer)


def build(work: Path) -> tuple[Path, Path]:
    """The base model folder and an alpaca JSON file, seeded."""
    import random

    base = build_base(work)
    rng = random.Random(0)
    rows = [{"instruction": " ".join(rng.choices(WORDS, k=rng.randint(6, 16))), "input": "",
             "output": " ".join(rng.choices(WORDS, k=rng.randint(15, 35)))} for _ in range(RECORDS)]
    data = work / "data.json"
    data.write_text(json.dumps(rows))
    return base, data


def baseline(base: str, data: str, out: str, result: str) -> None:
    """The plain loop: apply_chat_template, mask the prompt, DataCollatorForSeq2Seq, Trainer + peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = []
    for row in json.loads(Path(data).read_text()):
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = len(tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False))
        labels = [-100] * prompt + ids[prompt:]
        examples.append({"input_ids": ids[:CUTOFF], "attention_mask": [1] * len(ids[:CUTOFF]),
                         "labels": labels[:CUTOFF]})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.1,
                             logging_steps=LOGGING_STEPS, save_steps=SAVE_STEPS, use_cpu=True, report_to="none",
                             disable_tqdm=True, remove_unused_columns=False, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    runtime = trainer.train().metrics["train_runtime"]
    tokens = sum(len(e["input_ids"]) for e in examples) * EPOCHS
    Path(result).write_text(json.dumps({"train_runtime_s": runtime, "train_tokens": tokens,
                                        "tokens_per_s": tokens / runtime}))


def run(work_dir: Path) -> dict:
    base, data = build(work_dir)

    def wb_command(out: Path) -> list[str]:
        return ["--base", str(base), "--data", str(data), "--out", str(out), "--epochs", str(EPOCHS),
                "--batch-size", str(BATCH), "--grad-accum", "1", "--cutoff-len", str(CUTOFF), "--lr", str(LR),
                "--logging-steps", str(LOGGING_STEPS), "--save-steps", str(SAVE_STEPS), "--device", "cpu"]

    runs = alternate_train_runs(work_dir, "baseline",
                                [sys.executable, "-m", "bench.bench_train", "baseline", str(base), str(data)],
                                wb_command, ("baseline", "wb train"))
    best = best_tokens_per_s(runs)
    overhead = 1 - best["wb"] / best["baseline"]
    return {
        "figures": {
            "model": f"Llama hidden {HIDDEN}, {LAYERS} layers, LoRA r8 all-linear, fp32 CPU, 1 thread",
            "data": f"{RECORDS} alpaca records, cutoff {CUTOFF}, batch {BATCH}, {EPOCHS} epoch",
            "baseline_tokens_per_s": round(best["baseline"], 1),
            "wb_tokens_per_s": round(best["wb"], 1),
            "overhead": round(overhead, 4),
            "runs": runs,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "targets": {"train_tokens_per_s_overhead": target(overhead, 0.10)},
    }


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "baseline":
    baseline(*sys.argv[2:])
