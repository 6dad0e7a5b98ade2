"""Batched greedy generation: many prompts per forward pass, left-padded.

Left padding keeps every prompt's last token at the same position, so the new tokens of a whole
batch come out of one `generate` call; `generate` derives position ids from the attention mask,
so a padded prompt continues exactly as it would alone. Prompts are sorted by length so that a
batch pads little, and the longest batch runs first, so running out of memory shows up at once
(on CUDA an automatic batch size is halved and the batch retried).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.progress import progress_bar

CPU_BATCH = 16  # --batch-size auto on CPU
CUDA_START_BATCH = 64  # --batch-size auto on CUDA: first try, halved on out-of-memory


@dataclass
class Generated:
    texts: list[str]  # one per prompt, in the order given
    new_tokens: int  # tokens generated, up to and including each end-of-sequence token
    seconds: float
    counts: list[int] | None = None  # new tokens of each prompt, where the generator reports them

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def greedy_config(model, tokenizer, max_new_tokens: int):
    """A fresh greedy GenerationConfig: no sampling settings inherited from the model's defaults."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad
    )


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int | None = None,
    add_special_tokens: bool = True,
    on_batch: Callable[[list[int], list[str], list[int]], None] | None = None,
) -> Generated:
    """Greedy continuations of `prompts` (texts, already in the chat template if one is used).

    on_batch(indices, texts, new token counts) is called after each batch (`wb eval` caches the answers
    and counts them on its own bar); without it, a bar of this call's prompts shows.
    """
    device = next(model.parameters()).device
    auto = batch_size is None
    size = (CUDA_START_BATCH if device.type == "cuda" else CPU_BATCH) if auto else batch_size
    config = greedy_config(model, tokenizer, max_new_tokens)
    eos = set(config.eos_token_id)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[str] = [""] * len(prompts)
    per_prompt = [0] * len(prompts)
    started = time.perf_counter()
    own_bar = progress_bar(len(prompts), "generate", unit="prompt") if on_batch is None else None
    with own_bar or contextlib.nullcontext():
        start = 0
        while start < len(order):
            batch = order[start : start + size]
            try:
                outputs = _generate_batch(model, tokenizer, [prompts[i] for i in batch], config, add_special_tokens)
            except torch.OutOfMemoryError:
                if not auto or size == 1:
                    raise
                size //= 2
                torch.cuda.empty_cache()
                continue
            counts = []
            for index, generated in zip(batch, outputs):
                kept = until_eos(generated, eos)
                counts.append(len(kept))
                texts[index] = tokenizer.decode(kept, skip_special_tokens=True).strip()
            for index, count in zip(batch, counts):
                per_prompt[index] = count
            if on_batch is not None:
                on_batch(batch, [texts[i] for i in batch], counts)
            else:
                own_bar.update(len(batch))
            start += len(batch)
    return Generated(texts=texts, new_tokens=sum(per_prompt), seconds=time.perf_counter() - started,
                     counts=per_prompt)


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts: list[str], config, add_special_tokens: bool) -> list[list[int]]:
    device = next(model.parameters()).device
    encoded = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens
    ).to(device)
    output = model.generate(**encoded, generation_config=config)
    return output[:, encoded["input_ids"].shape[1] :].tolist()


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    if not ids:
        raise WorkbenchError("the tokenizer has no end-of-sequence token to stop generation at")
    return ids
