"""The training engine: `transformers.Trainer` plus what `wb train` needs on every step.

`WbTrainerMixin` holds it, so that the SFT `WbTrainer` and the preference trainers built on trl's
(workbench/train/preference.py) share one behaviour:

- a non-finite loss stops training *before* the optimizer applies it (every rank agrees, so a
  multi-process run stops together), so each checkpoint already written is a good one;
- tokens are counted per micro-batch without a device sync and summed over ranks only when logging;
- each training log entry carries total_steps, tokens_per_s (since the previous log, evaluation time
  excluded) and elapsed_s (continuing across --resume); they are stored in the Trainer's own
  log history, so they survive in checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


class NonFiniteLoss(Exception):
    """Raised when a micro-batch's loss is NaN or inf; `step` is the optimizer step it belonged to."""

    def __init__(self, step: int, value: float):
        self.step = step
        self.value = value
        super().__init__(f"loss became {value} at step {step}")


class PadCollator:
    """Right-pads a batch: input_ids with the pad id, labels with -100, attention_mask with 0."""

    def __init__(self, pad_id: int, multiple: int = 1):
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        length = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class WbTrainerMixin:
    """The non-finite-loss stop, token counting and wb's log fields, for any `transformers.Trainer`
    subclass: put it first among the bases (`class T(WbTrainerMixin, SomeTrainer)`)."""

    def __init__(self, *args, echo: Callable[[str], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens: torch.Tensor | None = None  # this rank's tokens since the last log
        self.session_tokens = 0  # all ranks' tokens trained on in this session
        self._clock = _Clock()
        for printer in (PrinterCallback, ProgressCallback):  # wb prints its own log lines
            self.remove_callback(printer)
        self.add_callback(_LogCallback(self._clock, echo))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        count = self.count_tokens(inputs)
        self._tokens = count if self._tokens is None else self._tokens + count
        if not _finite_everywhere(loss):
            raise NonFiniteLoss(self.state.global_step + 1, float(loss))
        return loss

    def count_tokens(self, inputs: dict) -> torch.Tensor:
        """The tokens of one micro-batch (a tensor, summed without a device sync)."""
        return inputs["attention_mask"].sum()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            tokens = self.flush_tokens()
            now = time.perf_counter()
            logs["total_steps"] = self.state.max_steps
            logs["tokens_per_s"] = round(tokens / max(now - self._clock.window, 1e-9), 1)
            logs["elapsed_s"] = round(self._clock.offset + now - self._clock.start, 3)
            self._clock.window = now
        elif "eval_runtime" in logs:
            self._clock.window += logs["eval_runtime"]
        super().log(logs, start_time)

    def flush_tokens(self) -> int:
        """Sum the tokens counted since the last call over all ranks (a collective: call on every rank)."""
        local = self._tokens if self._tokens is not None else torch.zeros((), dtype=torch.long, device=self.args.device)
        self._tokens = None
        total = int(self.accelerator.reduce(local.to(self.args.device), reduction="sum").item())
        self.session_tokens += total
        return total


class WbTrainer(WbTrainerMixin, Trainer):
    """The SFT Trainer: `transformers.Trainer` with wb's behaviour."""


class _Clock:
    def __init__(self):
        self.start = self.window = time.perf_counter()
        self.offset = 0.0  # elapsed seconds of earlier sessions (--resume)


class _LogCallback(TrainerCallback):
    """Starts the clock once the state (and, on resume, its log history) is loaded; echoes log lines."""

    def __init__(self, clock: _Clock, echo: Callable[[str], None] | None):
        self.clock = clock
        self.echo = echo

    def on_train_begin(self, args, state, control, **kwargs):
        previous = [e["elapsed_s"] for e in state.log_history if "elapsed_s" in e]
        self.clock.offset = previous[-1] if previous else 0.0
        self.clock.start = self.clock.window = time.perf_counter()
        if self.echo and state.is_world_process_zero:
            resumed = f", resuming after step {state.global_step}" if state.global_step else ""
            steps = f"{state.max_steps} optimizer step{'' if state.max_steps == 1 else 's'}"
            self.echo(f"training: {steps}{resumed}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.echo and state.is_world_process_zero and logs):
            return
        step = f"step {state.global_step}/{state.max_steps}"
        if "loss" in logs:
            self.echo(f"{step}  loss {logs['loss']:.4f}{_preference(logs, '')}  lr {logs.get('learning_rate', 0):.3g}  "
                      f"epoch {logs.get('epoch', 0):.2f}  {logs['tokens_per_s']:,.0f} tok/s  {logs['elapsed_s']:.1f} s")
        elif "eval_loss" in logs:
            self.echo(f"{step}  eval_loss {logs['eval_loss']:.4f}{_preference(logs, 'eval_')}")


def _preference(logs: dict, prefix: str) -> str:
    """The reward margin and accuracy of a preference trainer's log entry (trl's names); empty for SFT."""
    if f"{prefix}rewards/margins" not in logs:
        return ""
    return (f"  margin {logs[f'{prefix}rewards/margins']:.4f}  "
            f"accuracy {logs.get(f'{prefix}rewards/accuracies', 0.0):.2f}")


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one tiny all-reduce when several processes run)."""
    finite = torch.isfinite(loss.detach()).all().to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
