"""`wb train`: LoRA supervised fine-tuning, with the outputs people need to trust the result.

DIR layout. Checkpoints must outlive a failed run (that is what --resume and the NaN guard rail keep),
so DIR is created when training starts and holds `checkpoints/checkpoint-<step>/` (the Trainer's own
layout, optimizer state included). The final files (adapter, tokenizer, train_args.json,
trainer_log.jsonl, loss.svg, metrics.json) are written into a staging folder inside DIR and moved
into place one by one with atomic renames, metrics.json last: a DIR with metrics.json is a finished
run. A failed run that wrote no checkpoint leaves no DIR at all. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

import workbench
from workbench.dtypes import resolve_compute_dtype, resolve_device
from workbench.errors import WorkbenchError
from workbench.outputs import check_not_input
from workbench.train.checks import untrained_special_tokens
from workbench.train.data import load_conversations
from workbench.train.encode import encode_all
from workbench.train.launch import config_file
from workbench.train.plot import loss_svg
from workbench.train.templates import resolve_template

FP16_REFUSED = (
    "fp16 training is refused: on these models (Llama, Qwen) fp16 activations overflow and the loss turns NaN "
    "within a few steps; use bf16 (or fp32 where the GPU has no bf16), or pass --allow-fp16 to try anyway"
)
STAGING = ".wb-tmp-final"
DROPPED_FROM_ADAPTER = ("README.md", "training_args.bin")  # PEFT's placeholder card; a pickle of the Trainer args
VERSIONED = ("torch", "transformers", "peft", "accelerate", "deepspeed")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def train(
    base: str,
    data: list[Path],
    out: Path,
    *,
    fmt: str = "auto",
    columns: str | None = None,
    template: str = "auto",
    cutoff_len: int = 1024,
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    val_size: float = 0.0,
    lora_r: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    lora_target: str = "all-linear",
    epochs: float = 3.0,
    lr: float = 1e-4,
    batch_size: int = 2,
    grad_accum: int = 4,
    scheduler: str = "cosine",
    warmup_ratio: float = 0.1,
    seed: int = 42,
    gradient_checkpointing: bool = False,
    logging_steps: int = 5,
    save_steps: int = 500,
    eval_steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    allow_fp16: bool = False,
    trust_remote_code: bool = False,
    strategy: str | None = None,
    command: str | None = None,
) -> dict:
    """Train a LoRA adapter of `base` on `data`; write DIR=`out`; return the final metrics."""
    options = dict(locals())  # the settings as given; resolved values replace some below
    del options["command"]
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    out, data = Path(out), [Path(p) for p in data]
    options.update(base=str(base), out=str(out), data=[str(p) for p in data])
    if strategy and not _under_launcher():
        raise WorkbenchError(f"--strategy {strategy} needs several processes: add --nproc N (or use accelerate launch)")
    run_device = resolve_device(device)
    compute = resolve_compute_dtype(dtype, run_device)
    _check_dtype(compute, run_device, allow_fp16)
    check_not_input(out, [base if Path(base).exists() else None, *data])
    resume_from = _resume_point(out, resume, force)
    options.update(device=run_device.type, dtype=_dtype_name(compute), lora_alpha=lora_alpha or 2 * lora_r,
                   eval_steps=eval_steps or save_steps)

    if not sys.stderr.isatty():  # no download/loading bars in logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    loaded = load_conversations(data, fmt, columns, max_samples)
    tokenizer = _load_tokenizer(base, trust_remote_code)
    chat = resolve_template(template, tokenizer, base)
    encoded = encode_all(loaded.conversations, chat, tokenizer, cutoff_len, train_on_prompt)
    if not encoded.examples:
        detail = "; ".join(f"{r} ({n})" for r, n in encoded.dropped.most_common())
        raise WorkbenchError(f"the dataset is empty after filtering: {detail}", ",".join(map(str, data)))
    train_set, val_set = _split(encoded.examples, val_size, seed)
    if chat.name != "auto":
        tokenizer.chat_template = chat.source  # the saved tokenizer renders prompts as training did
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or chat.eot_token

    args = _training_arguments(out, options, compute, run_device, bool(val_set), strategy)
    main = args.process_index == 0
    say = _say if main else _quiet
    world = args.world_size
    _check_accumulation(len(train_set), batch_size, world, grad_accum)
    notes = [f"dropped {n} record(s): {reason}" for f in loaded.files for reason, n in f.dropped.items()]
    notes += [f"dropped {n} record(s): {reason}" for reason, n in encoded.dropped.items()]
    _describe(say, loaded, encoded, chat, len(train_set), len(val_set), cutoff_len)
    say(f"world size {world}, global batch {batch_size * grad_accum * world} "
        f"(batch {batch_size} x grad-accum {grad_accum} x {world} process{'es' if world > 1 else ''})")
    fingerprint = _fingerprint(base) if main else None

    model = _load_model(base, compute, strategy, trust_remote_code, gradient_checkpointing)
    notes += untrained_special_tokens(model, chat.special_ids, tokenizer)
    model = _add_lora(model, options, seed)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"LoRA r={lora_r} alpha={options['lora_alpha']} on {lora_target}: {trainable:,} trainable of {total:,} "
        f"parameters; {_dtype_name(compute)} on {run_device.type}")
    for line in notes:
        say(f"warning: {line}")

    from workbench.train.trainer import NonFiniteLoss, PadCollator, WbTrainer

    trainer = WbTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=PadCollator(tokenizer.pad_token_id, 8 if run_device.type == "cuda" else 1),
        processing_class=tokenizer,
        echo=say,
    )
    if main:
        _prepare_out(out, force, resume_from is not None)
    trainer.accelerator.wait_for_everyone()
    try:
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except NonFiniteLoss as exc:
            raise WorkbenchError(_non_finite_message(exc, out / "checkpoints", main, save_steps), out) from None
        history = trainer.state.log_history
        if val_set and not any("eval_loss" in e and e["step"] == trainer.state.global_step for e in history):
            trainer.evaluate()
        tokens = trainer.session_tokens + trainer.flush_tokens()
        staging = out / STAGING
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        trainer.save_model(str(staging))  # every rank: under ZeRO-3 this gathers the sharded adapter
        metrics = _metrics(trainer, result.metrics, tokens, len(train_set), len(val_set), world, options, notes,
                           resume_from)
        if main:
            _check_adapter(staging)
            provenance = {
                "wb_version": workbench.__version__,
                "command": command,
                "started": started.isoformat(timespec="seconds"),
                "options": options,
                "base": {"path": str(base), "model_type": getattr(model.config, "model_type", None),
                         "fingerprint": fingerprint},
                "data": {**loaded.summary(), "encoded": encoded.summary(), "train": len(train_set), "val": len(val_set)},
                "template": {"name": chat.name, "end_of_turn": chat.eot_token,
                             "special_tokens": tokenizer.convert_ids_to_tokens(chat.special_ids)},
                "lora": {"trainable_params": trainable, "total_params": total},
                "distributed": {"world_size": world, "global_batch": metrics["global_batch"], "strategy": strategy},
                "versions": _versions(),
                "resumed_from": str(resume_from) if resume_from else None,
            }
            metrics["total_runtime_s"] = round(time.perf_counter() - clock, 3)
            _write_outputs(staging, out, provenance, _log_rows(trainer.state.log_history, trainer.state.max_steps),
                           metrics)
        trainer.accelerator.wait_for_everyone()
    except BaseException:
        if main:
            shutil.rmtree(out / STAGING, ignore_errors=True)
            if resume_from is None and _last_checkpoint(out / "checkpoints") is None:  # DIR is this run's
                shutil.rmtree(out, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return metrics


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _check_dtype(compute: torch.dtype, device: torch.device, allow_fp16: bool) -> None:
    if compute == torch.float16 and not allow_fp16:
        raise WorkbenchError(FP16_REFUSED)
    if compute == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise WorkbenchError("--dtype bf16: this GPU does not support bfloat16; use --dtype fp32")
    if compute not in (torch.bfloat16, torch.float16, torch.float32):
        raise WorkbenchError(f"--dtype {compute} cannot be trained in; use bf16 or fp32")


def _resume_point(out: Path, resume: bool, force: bool) -> Path | None:
    """The checkpoint to continue from (--resume), after checking DIR may be used at all."""
    if resume and force:
        raise WorkbenchError("--resume continues DIR and --force starts it over: pass one of them")
    if resume:
        last = _last_checkpoint(out / "checkpoints")
        if last is None:
            raise WorkbenchError("--resume: there is no checkpoint to continue from", out / "checkpoints")
        return last
    if out.exists() and not force:
        raise WorkbenchError("output exists; pass --force to start over or --resume to continue it", out)
    return None


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (the Trainer writes trainer_state.json last)."""
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    complete = [item for item in found if (item[1] / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def _non_finite_message(exc, checkpoints: Path, main: bool, save_steps: int) -> str:
    """Set aside the checkpoint whose weights gave the non-finite loss; name the last good one."""
    message = f"training stopped: the loss became {exc.value} at step {exc.step}"
    suspect = checkpoints / f"checkpoint-{exc.step - 1}"
    if suspect.is_dir():
        if main:
            os.replace(suspect, suspect.with_name(f"nan-{suspect.name}"))
        message += f"; {suspect.name} (the weights that gave it) was renamed nan-{suspect.name}"
    last = _last_checkpoint(checkpoints)
    if last is None:
        return message + f"; no good checkpoint was written before it (--save-steps {save_steps}), so nothing was kept"
    return message + f"; the last good checkpoint is {last} (an adapter that loads as is; --resume continues from it)"


def _prepare_out(out: Path, force: bool, resuming: bool) -> None:
    """Create DIR/checkpoints, after removing an existing DIR for --force."""
    if force and not resuming and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)


def _load_tokenizer(base: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().exists():
        raise WorkbenchError("the base model folder does not exist", base)
    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"cannot load the tokenizer: {exc}", base) from None


def _load_model(base: str, compute: torch.dtype, strategy: str | None, trust_remote_code: bool, checkpointing: bool):
    """The base model in the compute dtype (fp32 under FSDP, whose mixed precision casts per layer)."""
    from transformers import AutoModelForCausalLM

    load_dtype = torch.float32 if strategy == "fsdp" else compute
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=load_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"cannot load the base model: {exc}", base) from None
    model.config.use_cache = not checkpointing and model.config.use_cache
    return model


def _add_lora(model, options: dict, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    target = options["lora_target"]
    modules = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    config = LoraConfig(r=options["lora_r"], lora_alpha=options["lora_alpha"], lora_dropout=options["lora_dropout"],
                        target_modules=modules, task_type="CAUSAL_LM")
    set_seed(seed)  # the LoRA A matrices are drawn here
    try:
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        raise WorkbenchError(f"--lora-target {target}: {exc}") from None


def _split(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random validation split: a fraction when < 1, else a count."""
    if not val_size:
        return examples, []
    n_val = max(1, round(len(examples) * val_size)) if val_size < 1 else int(val_size)
    if n_val >= len(examples):
        raise WorkbenchError(f"--val-size {val_size} leaves no training examples (of {len(examples)})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def _check_accumulation(n_train: int, batch_size: int, world: int, grad_accum: int) -> None:
    batches = math.ceil(math.ceil(n_train / world) / batch_size)
    if batches < grad_accum:
        raise WorkbenchError(
            f"an epoch has only {batches} batch(es) per process ({n_train} examples, --batch-size {batch_size}, "
            f"{world} process(es)) but --grad-accum is {grad_accum}: no full optimizer step fits in an epoch "
            "(the 'unscale_() has already been called' failure); lower --grad-accum or --batch-size, or add data"
        )


def _training_arguments(out: Path, o: dict, compute: torch.dtype, device: torch.device, evaluate: bool,
                        strategy: str | None):
    """TrainingArguments; created before the model so that ZeRO-3 can partition it while loading."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    warmup = {"warmup_ratio": o["warmup_ratio"]} if "warmup_ratio" in known else {"warmup_steps": o["warmup_ratio"]}
    try:
        return TrainingArguments(
            output_dir=str(out / "checkpoints"),
            per_device_train_batch_size=o["batch_size"],
            per_device_eval_batch_size=o["batch_size"],
            gradient_accumulation_steps=o["grad_accum"],
            num_train_epochs=o["epochs"],
            learning_rate=o["lr"],
            lr_scheduler_type=o["scheduler"],
            **warmup,  # transformers 5: a float warmup_steps < 1 is a ratio of the total steps
            logging_steps=o["logging_steps"],
            logging_nan_inf_filter=False,  # a NaN must reach the guard rail, not be averaged away
            save_strategy="steps",
            save_steps=o["save_steps"],
            eval_strategy="steps" if evaluate else "no",
            eval_steps=o["eval_steps"],
            bf16=compute == torch.bfloat16,
            fp16=compute == torch.float16,
            use_cpu=device.type == "cpu",
            seed=o["seed"],
            data_seed=o["seed"],
            **{checkpointing: o["gradient_checkpointing"], f"{checkpointing}_kwargs": {"use_reentrant": False}},
            deepspeed=str(config_file(strategy)) if strategy in ("zero2", "zero3") else None,
            ddp_find_unused_parameters=False,
            dataloader_pin_memory=device.type == "cuda",
            remove_unused_columns=False,
            report_to="none",
            disable_tqdm=True,
            log_level_replica="error",
        )
    except (ValueError, ImportError) as exc:
        raise WorkbenchError(f"invalid training settings: {exc}") from None


def _fingerprint(base: str) -> dict:
    """sha256 of the base model's weight files (a local folder, or the hub cache's snapshot)."""
    from workbench.weights.checksum import checksum

    folder = Path(base)
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - provenance must not stop a run that loaded the model
            return {"algo": "sha256", "files": None, "error": f"{type(exc).__name__}: {exc}"}
    result = checksum(folder, algo="sha256")
    return {"algo": "sha256", "files": result.files}


def _versions() -> dict:
    found = {"wb": workbench.__version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _describe(say, loaded, encoded, chat, n_train: int, n_val: int, cutoff_len: int) -> None:
    for f in loaded.files:
        say(f"data: {f.path}: {f.records} records ({f.format}), {f.kept} kept")
    say(f"template: {chat.name} (end of turn {chat.eot_token}); {len(encoded.examples)} examples: {n_train} train, "
        f"{n_val} validation; {encoded.truncated} truncated to {cutoff_len} tokens")


def _metrics(trainer, train_metrics: dict, tokens: int, n_train: int, n_val: int, world: int, o: dict,
             notes: list[str], resume_from: Path | None) -> dict:
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    runtime = train_metrics.get("train_runtime", 0.0)
    peak = None
    if torch.cuda.is_available() and trainer.args.device.type == "cuda":
        peak = round(torch.cuda.max_memory_allocated(trainer.args.device) / 2**30, 3)
    return {
        "train_loss": train_metrics.get("train_loss"),
        "final_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "train_runtime_s": round(runtime, 3),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
        "steps": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "train_samples": n_train,
        "val_samples": n_val,
        "world_size": world,
        "global_batch": o["batch_size"] * o["grad_accum"] * world,
        "peak_gpu_memory_gb": peak,
        "resumed_from": resume_from.name if resume_from else None,
        "warnings": notes,
    }


def _log_rows(history: list[dict], total_steps: int) -> list[dict]:
    """trainer_log.jsonl rows: one per logging step, eval_loss merged into its step's row."""
    rows: dict[int, dict] = {}
    for entry in history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"], "total_steps": total_steps, "loss": None})
        if "loss" in entry:
            row.update(loss=entry["loss"], lr=entry.get("learning_rate"), epoch=entry.get("epoch"),
                       grad_norm=entry.get("grad_norm"), tokens_per_s=entry.get("tokens_per_s"),
                       elapsed_s=entry.get("elapsed_s"))
        else:
            row["eval_loss"] = entry["eval_loss"]
            row.setdefault("epoch", entry.get("epoch"))
    return [rows[step] for step in sorted(rows)]


def _check_adapter(folder: Path) -> None:
    """Refuse an adapter without weights (what a ZeRO-3 save without gathering writes)."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise WorkbenchError("the adapter was not saved (no adapter_model.safetensors)", folder)
    with safe_open(str(path), framework="pt") as handle:
        shapes = [handle.get_slice(name).get_shape() for name in handle.keys()]
    if not shapes or any(math.prod(shape) == 0 for shape in shapes):
        raise WorkbenchError("the saved adapter is empty (partitioned weights were not gathered)", path)


def _write_outputs(staging: Path, out: Path, provenance: dict, rows: list[dict], metrics: dict) -> None:
    """Complete the staging folder and move it into DIR file by file, metrics.json last."""
    for name in DROPPED_FROM_ADAPTER:
        (staging / name).unlink(missing_ok=True)
    (staging / "train_args.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    (staging / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (staging / "loss.svg").write_text(loss_svg(rows, f"wb train: {Path(provenance['base']['path']).name}"))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "metrics.json").unlink(missing_ok=True)  # DIR is not "finished" while files are being replaced
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "metrics.json"):
        os.replace(path, out / path.name)
    staging.rmdir()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """Processes other than rank 0 print nothing."""
