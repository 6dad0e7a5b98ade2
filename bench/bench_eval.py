"""Batched greedy generation (`wb eval --gen-data`) against one prompt at a time.

The baseline is what LLaMA3-SFT's predict.py does: for each prompt, tokenize it, `model.generate`
it alone, decode. Both run here on the same prompts (AdvertiseGen's first rows in the chat template,
or built-in sentences when ../shared is absent), the same small random Llama (hidden 256, 4 layers,
built in-process) and the same greedy settings, so their outputs must be identical; throughput is
generated tokens per second of wall time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ADVERTISEGEN = ROOT.parent / "shared" / "data" / "advertisegen" / "dev.json"
PROMPTS = 32
MAX_NEW_TOKENS = 64
BATCH = 16


def run(work_dir: Path) -> dict:
    """Batch by batch: the batched call, then the same prompts one by one, so both see the same load."""
    from bench.measure import target
    from workbench.evals.generate import generate, greedy_config, until_eos

    model, tokenizer = _model()
    prompts = _prompts(tokenizer)
    config = greedy_config(model, tokenizer, MAX_NEW_TOKENS)
    eos = set(config.eos_token_id)
    generate(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2, add_special_tokens=False)  # warm-up

    batched_texts, batched_tokens, batched_s = [], 0, 0.0
    single_texts, single_tokens, single_s = [], 0, 0.0
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start : start + BATCH]
        output = generate(model, tokenizer, chunk, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH, add_special_tokens=False)
        batched_texts += output.texts
        batched_tokens += output.new_tokens
        batched_s += output.seconds
        started = time.perf_counter()
        with torch.inference_mode():
            for prompt in chunk:  # LLaMA3-SFT's predict.py: one prompt per generate call
                inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                generated = model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
                kept = until_eos(generated.tolist(), eos)
                single_tokens += len(kept)
                single_texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
        single_s += time.perf_counter() - started
    batched_rate, single_rate = batched_tokens / batched_s, single_tokens / single_s
    return {
        "figures": {
            "prompts": len(prompts),
            "max_new_tokens": MAX_NEW_TOKENS,
            "batch_size": BATCH,
            "new_tokens": batched_tokens,
            "batched_s": round(batched_s, 2),
            "one_at_a_time_s": round(single_s, 2),
            "batched_tokens_per_s": round(batched_rate, 1),
            "one_at_a_time_tokens_per_s": round(single_rate, 1),
            "outputs_identical": batched_texts == single_texts,
            "torch_threads": torch.get_num_threads(),
        },
        "targets": {"batched_speedup": target(batched_rate / single_rate, 3.0, higher_is_better=True)},
    }


def _model():
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), hidden=256, layers=4, intermediate=688, seed=0)
    model.config.max_position_embeddings = 1024  # byte-level tokens: a Chinese prompt runs past tiny's 256
    return model, tokenizer


def _prompts(tokenizer) -> list[str]:
    if ADVERTISEGEN.is_file():
        from workbench.evals.gendata import load_gen_data

        texts = [item.prompt for item in load_gen_data(ADVERTISEGEN)[:PROMPTS]]
    else:
        from tiny import CORPUS

        texts = [f"{CORPUS[i % len(CORPUS)]} ({i})" for i in range(PROMPTS)]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    return sorted(rendered, key=lambda text: len(tokenizer(text)["input_ids"]))  # batches of similar length
