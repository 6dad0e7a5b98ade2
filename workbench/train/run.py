"""`wb train`: LoRA supervised fine-tuning, with the outputs people need to trust the result.

`train()` checks and resolves its settings (`_resolve`: nothing is loaded before the device, the
dtype and DIR are known to be usable), then runs four stages, each a function of this module that
reads on its own (torchtune's recipes are the model):

1. `load_data`: records -> conversations -> chat template -> input_ids + labels, split into train
   and validation (`Data`, with the tokenizer that encoded them).
2. `build_model`: TrainingArguments (before the model: ZeRO-3 partitions it while it loads), the
   base model in the compute dtype, LoRA layers on it and the Trainer around them (`Model`).
3. `fit`: the Trainer's loop, stopped by a non-finite loss before the optimizer applies it, then a
   last evaluation when the final step had none (`Fitted`).
4. `save`: the adapter and tokenizer, checked, and the records beside them, moved into DIR
   (`TrainResult`: the metrics and the lines `wb train` prints).

Between stages 2 and 3 rank 0 creates DIR; from there a failure cleans up after itself (below).

DIR layout. Checkpoints must outlive a failed run (that is what --resume and the NaN guard rail keep),
so DIR is created when training starts and holds `checkpoints/checkpoint-<step>/` (the Trainer's own
layout, optimizer state included). The final files (adapter, tokenizer, train_args.json,
trainer_log.jsonl, loss.svg, metrics.json) are written into a staging folder inside DIR and moved
into place one by one with atomic renames, metrics.json last: a DIR with metrics.json is a finished
run. A failed run that wrote no checkpoint leaves no DIR at all. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import workbench
from workbench.dtypes import resolve_compute_dtype, resolve_device
from workbench.errors import WorkbenchError, first_line
from workbench.io.reader import open_checkpoint
from workbench.outputs import check_not_input
from workbench.provenance import versions, weight_fingerprints
from workbench.report.svg import loss_svg
from workbench.train import adapters
from workbench.train.checks import untrained_special_tokens
from workbench.train.config import config_record, copy_config
from workbench.train.data import LoadedData, load_conversations, refuse_empty
from workbench.train.datasets import DataSource, default_dataset_dir, resolve_sources
from workbench.train.encode import EncodedSet, encode_all
from workbench.train.launch import config_file
from workbench.train.templates import ChatTemplate, resolve_template

FP16_REFUSED = (
    "fp16 training is refused: on these models (Llama, Qwen) fp16 activations overflow and the loss turns NaN "
    "within a few steps; use bf16 (or fp32 where the GPU has no bf16), or pass --allow-fp16 to try anyway"
)
STAGING = ".wb-tmp-final"
DROPPED_FROM_ADAPTER = ("README.md", "training_args.bin")  # PEFT's placeholder card; a pickle of the Trainer args
VERSIONED = ("torch", "transformers", "peft", "accelerate", "deepspeed")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Run:
    """What every stage reads: the settings, checked and resolved before anything is loaded."""

    base: str
    data: list[DataSource]  # --data items resolved: files, or dataset_info.json entries
    out: Path
    options: dict  # as given, with resolved values replacing some; recorded in train_args.json
    device: torch.device
    compute: torch.dtype
    resume_from: Path | None  # the checkpoint --resume continues from
    command: str | None
    started: datetime
    clock: float  # time.perf_counter() at the start, for total_runtime_s


@dataclass
class Data:
    """The data stage's result: examples split into train and validation, and the tokenizer that
    encoded them (holding the chat template it used and a pad token)."""

    loaded: LoadedData
    encoded: EncodedSet
    chat: ChatTemplate
    tokenizer: Any
    train: list[dict]
    val: list[dict]

    @property
    def notes(self) -> list[str]:
        """The records dropped on the way, as warnings."""
        dropped = [item for f in self.loaded.files for item in f.dropped.items()] + [*self.encoded.dropped.items()]
        return [f"dropped {n} record(s): {reason}" for reason, n in dropped]


@dataclass
class Model:
    """The model stage's result: the LoRA model, the Trainer that will fit it, and on how many processes."""

    peft: Any  # the base model with LoRA layers (a peft.PeftModel)
    trainer: Any  # a WbTrainer
    main: bool  # rank 0: the one process that prints and writes files
    world: int  # processes training together
    say: Callable[[str], None]  # prints on rank 0 only
    trainable: int
    total: int
    fingerprint: dict | None  # sha256 of the base's weight files (taken on rank 0 only)
    notes: list[str]  # warnings so far: dropped records, untrained template tokens
    built: adapters.Built | None = None  # how the adapter was made (PiSSA's initial adapter, --adapter DIR)


@dataclass
class Fitted:
    """The fit stage's result: the Trainer's own summary and the tokens trained on in this session."""

    train_metrics: dict
    tokens: int


@dataclass
class TrainResult:
    """What `train()` returns: the final metrics (metrics.json) and what `wb train` prints of them.
    Under a launcher only rank 0 reports: elsewhere `lines()` is empty and `to_json()` is None."""

    metrics: dict
    out: Path
    reports: bool = field(default_factory=lambda: os.environ.get("RANK", "0") == "0")  # rank 0, or no launcher

    def lines(self) -> list[str]:
        if not self.reports:
            return []
        m = self.metrics
        evaluated = f", eval_loss {m['eval_loss']:.4f}" if m["eval_loss"] is not None else ""
        loss = m["final_loss"] if m["final_loss"] is not None else m["train_loss"]
        return [f"final loss {loss:.4f}{evaluated} after {m['steps']} steps, {m['tokens_per_s']:,.0f} tokens/s; "
                f"adapter in {self.out}"]

    def to_json(self) -> dict | None:
        return self.metrics if self.reports else None


def train(
    base: str,
    data: list[str | Path],
    out: Path,
    *,
    config: Path | None = None,
    dataset_dir: Path | None = None,
    stage: str = "sft",
    adapter: Path | None = None,
    pref_loss: str = "sigmoid",
    pref_beta: float = 0.1,
    simpo_gamma: float = 0.5,
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
    use_dora: bool = False,
    use_rslora: bool = False,
    lora_init: str = "default",
    quantization_bit: str | None = None,
    quantization_type: str = "nf4",
    double_quantization: bool = True,
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
) -> TrainResult:
    """Train a LoRA adapter of `base` on `data` and write DIR=`out`: settings, then data -> model -> fit -> save."""
    run = _resolve(dict(locals()))
    dataset = load_data(run)
    model = build_model(run, dataset)
    _make_out(run, model)
    with _cleanup_on_failure(run, model.main):
        fitted = fit(run, dataset, model)
        result = save(run, dataset, model, fitted)
    model.say(f"wrote {run.out}")
    return result


def _resolve(given: dict) -> Run:
    """Check and resolve the settings (processes, device, dtype, DIR, the checkpoint to resume)."""
    options = dict(given)  # the settings as given; resolved values replace some below
    command = options.pop("command")
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    base, out = given["base"], Path(given["out"])
    config = Path(given["config"]) if given["config"] is not None else None
    dataset_dir = Path(given["dataset_dir"]) if given["dataset_dir"] is not None else default_dataset_dir()
    data = resolve_sources(given["data"], dataset_dir)
    options.update(base=str(base), out=str(out), data=[str(p) for p in given["data"]],
                   data_files=[str(s.path) for s in data], dataset_dir=str(dataset_dir) if dataset_dir else None,
                   config=config_record(config) if config is not None else None)
    if options["strategy"] and not _under_launcher():
        raise WorkbenchError(f"--strategy {options['strategy']} needs several processes: add --nproc N "
                             "(or use accelerate launch)")
    run_device = resolve_device(options["device"])
    compute = resolve_compute_dtype(options["dtype"], run_device)
    _check_dtype(compute, run_device, options["allow_fp16"])
    check_not_input(out, [base if Path(base).exists() else None, *(s.path for s in data), config])
    resume_from = _resume_point(out, options["resume"], options["force"])
    if options["adapter"] is not None:
        options["adapter"] = str(options["adapter"])  # recorded in train_args.json
        check_not_input(out, [Path(options["adapter"])])
    options.update(device=run_device.type, dtype=_dtype_name(compute),
                   lora_alpha=options["lora_alpha"] or 2 * options["lora_r"],
                   eval_steps=options["eval_steps"] or options["save_steps"])
    adapters.check_options(options)  # after lora_alpha is resolved: --adapter's config is checked against it
    return Run(base, data, out, options, run_device, compute, resume_from, command, started, clock)


def load_data(run: Run) -> Data:
    """Data stage: records -> conversations (data.py) -> the chat template (templates.py) -> input_ids
    and labels (encode.py), split into train and validation. The tokenizer is loaded here and keeps
    the template it encoded with, so the saved tokenizer renders prompts as training did."""
    o = run.options
    if not sys.stderr.isatty():  # no download/loading bars in logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if o["stage"] == "dpo":
        from workbench.train.preference import load_preference_data

        return load_preference_data(run)
    loaded = load_conversations(run.data, o["fmt"], o["columns"], o["max_samples"])
    tokenizer = load_run_tokenizer(run)
    chat = resolve_template(o["template"], tokenizer, run.base)
    encoded = encode_all(loaded.conversations, chat, tokenizer, o["cutoff_len"], o["train_on_prompt"])
    return finish_data(run, loaded, encoded, chat, tokenizer, "dataset")


def finish_data(run: Run, loaded, encoded, chat: ChatTemplate, tokenizer, what: str) -> Data:
    """The data stage's end, for SFT and preference data: an empty set refused (the reasons counted), the
    validation split, and the tokenizer given the template it encoded with and a pad token."""
    if not encoded.examples:
        refuse_empty(what, loaded.files, encoded.dropped)
    train_set, val_set = _split(encoded.examples, run.options["val_size"], run.options["seed"])
    if chat.name != "auto":
        tokenizer.chat_template = chat.source
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or chat.eot_token
    return Data(loaded, encoded, chat, tokenizer, train_set, val_set)


def build_model(run: Run, data: Data) -> Model:
    """Model stage: TrainingArguments first (under ZeRO-3 they make the model load partitioned), then
    the base model in the compute dtype, LoRA layers on it and the Trainer around them. Says what
    will be trained; rank 0 takes the base's fingerprint before loading it."""
    o = run.options
    args = _training_arguments(run.out, o, run.compute, run.device, bool(data.val), o["strategy"])
    main, world = args.process_index == 0, args.world_size
    say = _say if main else _quiet
    _check_accumulation(len(data.train), o["batch_size"], world, o["grad_accum"])
    _describe(say, data, o, world)
    fingerprint = _fingerprint(run.base) if main else None
    base = _load_model(run.base, run.compute, o["strategy"], o["trust_remote_code"], o["gradient_checkpointing"],
                       adapters.quantization_config(o, run.compute), args.device)
    notes = data.notes + untrained_special_tokens(base, data.chat.special_ids, data.tokenizer)
    built = adapters.add_adapter(base, o, o["seed"])
    peft = built.peft
    trainable, total = peft.get_nb_trainable_parameters()
    say(f"{_adapter_words(o)} r={o['lora_r']} alpha={o['lora_alpha']} on {o['lora_target']}: {trainable:,} "
        f"trainable of {total:,} parameters; {_dtype_name(run.compute)} on {run.device.type}{_base_words(o)}")
    for line in notes:
        say(f"warning: {line}")
    if o["stage"] == "dpo":
        from workbench.train.preference import preference_trainer

        trainer = preference_trainer(peft, args, data, run, say)
    else:
        trainer = _trainer(peft, args, data, run.device, say)
    return Model(peft, trainer, main, world, say, trainable, total, fingerprint, notes, built)


def fit(run: Run, data: Data, model: Model) -> Fitted:
    """Fit stage: the Trainer's loop, from the start or from --resume's checkpoint; a non-finite loss
    stops it and names the last good checkpoint. A validation set is evaluated at the end when the
    last step was not; the tokens are summed over all ranks."""
    from workbench.train.trainer import NonFiniteLoss

    trainer = model.trainer
    try:
        result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except NonFiniteLoss as exc:
        message = _non_finite_message(exc, run.out / "checkpoints", model.main, run.options["save_steps"])
        raise WorkbenchError(message, run.out) from None
    history = trainer.state.log_history
    if data.val and not any("eval_loss" in e and e["step"] == trainer.state.global_step for e in history):
        trainer.evaluate()
    return Fitted(result.metrics, trainer.session_tokens + trainer.flush_tokens())


def save(run: Run, data: Data, model: Model, fitted: Fitted) -> TrainResult:
    """Save stage: the adapter and tokenizer into DIR's staging folder (on every rank: under ZeRO-3
    this gathers the sharded adapter); on rank 0 the adapter checked, train_args.json,
    trainer_log.jsonl, loss.svg and metrics.json written beside it and all moved into DIR."""
    trainer = model.trainer
    staging = run.out / STAGING
    if model.main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    metrics = _metrics(run, data, model, fitted)
    if model.main:
        if model.built is not None and model.built.pissa is not None:
            adapters.save_pissa_converted(model.built, staging, run.out / "checkpoints")
            model.say(f"PiSSA: the adapter is saved converted to a LoRA of the original base (r={2 * run.options['lora_r']}); "
                      "checkpoints/ stay relative to the residual base (checkpoints/pissa-init holds the initial adapter)")
        _check_adapter(staging)
        copy_config(staging, run.options)  # --config's file, as train_config.yaml
        if model.built is not None:
            metrics["adapter"] = adapters.adapter_record(model.built, staging)
        provenance = _provenance(run, data, model, metrics)
        metrics["total_runtime_s"] = round(time.perf_counter() - run.clock, 3)
        _write_outputs(staging, run.out, provenance, _log_rows(trainer.state.log_history, trainer.state.max_steps),
                       metrics)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(metrics, run.out)


def _make_out(run: Run, model: Model) -> None:
    """Rank 0 creates DIR/checkpoints (after removing an existing DIR for --force); the others wait."""
    if model.main:
        _prepare_out(run.out, run.options["force"], run.resume_from is not None)
    model.trainer.accelerator.wait_for_everyone()


@contextlib.contextmanager
def _cleanup_on_failure(run: Run, main: bool) -> Iterator[None]:
    """On any failure, Ctrl-C included, rank 0 removes the staging folder, and DIR too when it is this
    run's and holds no checkpoint."""
    try:
        yield
    except BaseException:
        if main:
            shutil.rmtree(run.out / STAGING, ignore_errors=True)
            if run.resume_from is None and _last_checkpoint(run.out / "checkpoints") is None:  # DIR is this run's
                shutil.rmtree(run.out, ignore_errors=True)
        raise


def _provenance(run: Run, data: Data, model: Model, metrics: dict) -> dict:
    """train_args.json: how this adapter was made."""
    return {
        "wb_version": workbench.__version__,
        "command": run.command,
        "started": run.started.isoformat(timespec="seconds"),
        "options": run.options,
        "base": {"path": str(run.base), "model_type": getattr(model.peft.config, "model_type", None),
                 "fingerprint": model.fingerprint},
        "data": {**data.loaded.summary(), "encoded": data.encoded.summary(), "train": len(data.train),
                 "val": len(data.val)},
        "template": {"name": data.chat.name, "end_of_turn": data.chat.eot_token,
                     "special_tokens": data.tokenizer.convert_ids_to_tokens(data.chat.special_ids)},
        "lora": {"trainable_params": model.trainable, "total_params": model.total},
        "adapter": metrics.get("adapter"),
        "quantization": adapters.quantization_record(run.options, run.compute),
        "distributed": {"world_size": model.world, "global_batch": metrics["global_batch"],
                        "strategy": run.options["strategy"]},
        "versions": versions(VERSIONED),
        "resumed_from": str(run.resume_from) if run.resume_from else None,
    }

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


def load_run_tokenizer(run: Run):
    """The tokenizer training encodes with: --adapter's folder when it holds one (the SFT run saved its
    tokenizer and chat template there, which a DPO stage continuing it must keep), else the base's."""
    adapter = run.options["adapter"]
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return _load_tokenizer(adapter, run.options["trust_remote_code"])
    return _load_tokenizer(run.base, run.options["trust_remote_code"])


def _load_tokenizer(base: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().exists():
        raise WorkbenchError("the base model folder does not exist", base)
    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"cannot load the tokenizer: {first_line(exc)}",
                             base) from None


def _load_model(base: str, compute: torch.dtype, strategy: str | None, trust_remote_code: bool, checkpointing: bool,
                quantization=None, device: torch.device | None = None):
    """The base model in the compute dtype (fp32 under FSDP, whose mixed precision casts per layer);
    with a bitsandbytes `quantization` config, quantized on this process's device and prepared for
    k-bit training (adapters.prepare_quantized); on the CPU the C heap is first told to give large
    freed buffers back (adapters.limit_heap_retention)."""
    from transformers import AutoModelForCausalLM

    load_dtype = torch.float32 if strategy == "fsdp" else compute
    placed = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device}}
    if quantization is not None and device is not None and device.type == "cpu":
        adapters.limit_heap_retention()  # before loading: the load's transient buffers are given back too
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=load_dtype, trust_remote_code=trust_remote_code,
                                                     **placed)
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"cannot load the base model: {first_line(exc)}",
                             base) from None
    if quantization is not None:
        adapters.release_checkpoint_memory(model)
        model = adapters.prepare_quantized(model, checkpointing)
    model.config.use_cache = not checkpointing and model.config.use_cache
    return model


def _adapter_words(o: dict) -> str:
    """What kind of adapter is trained, as `wb train` says it: LoRA, DoRA, rsLoRA, PiSSA-initialised ..."""
    kind = "DoRA" if o["use_dora"] else "LoRA"
    words = [f"rs{kind}" if o["use_rslora"] else kind]
    if o["lora_init"] != "default":
        words.append(f"({o['lora_init']} init)")
    if o.get("adapter"):
        words.append(f"continued from {o['adapter']}")
    return " ".join(words)


def _base_words(o: dict) -> str:
    bits = o.get("quantization_bit")
    if bits is None:
        return ""
    return f", base quantized to {bits} bits ({o['quantization_type'] if bits == '4' else 'LLM.int8'})"


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
    """TrainingArguments (for --stage dpo trl's config class of --pref-loss, a subclass, with the preference
    settings); created before the model so that ZeRO-3 can partition it while loading."""
    from transformers import TrainingArguments

    arguments, preference = TrainingArguments, {}
    if o["stage"] == "dpo":
        from workbench.train.preference import preference_config

        arguments, preference = preference_config(o, device.type)
    known = {f.name for f in fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    warmup = {"warmup_ratio": o["warmup_ratio"]} if "warmup_ratio" in known else {"warmup_steps": o["warmup_ratio"]}
    try:
        return arguments(
            **preference,
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
    folder = Path(base)
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - provenance must not stop a run that loaded the model
            return {"algo": "sha256", "files": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"algo": "sha256", "files": weight_fingerprints(folder)}


def _describe(say, data: Data, o: dict, world: int) -> None:
    """What will be trained on, and by how many processes."""
    for f in data.loaded.files:
        say(f"data: {f.label()}: {f.records} records ({f.format}), {f.kept} kept")
    unit = "preference pairs" if o["stage"] == "dpo" else "examples"
    say(f"template: {data.chat.name} (end of turn {data.chat.eot_token}); {len(data.encoded.examples)} {unit}: "
        f"{len(data.train)} train, {len(data.val)} validation; {data.encoded.truncated} truncated to "
        f"{o['cutoff_len']} tokens")
    say(f"world size {world}, global batch {o['batch_size'] * o['grad_accum'] * world} "
        f"(batch {o['batch_size']} x grad-accum {o['grad_accum']} x {world} process{'es' if world > 1 else ''})")


def _trainer(model, args, data: Data, device: torch.device, say: Callable[[str], None]):
    """The WbTrainer: right-padding to a multiple of 8 on CUDA, the tokenizer saved beside the adapter."""
    from workbench.train.trainer import PadCollator, WbTrainer

    return WbTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.val or None,
        data_collator=PadCollator(data.tokenizer.pad_token_id, 8 if device.type == "cuda" else 1),
        processing_class=data.tokenizer,
        echo=say,
    )


def _metrics(run: Run, data: Data, model: Model, fitted: Fitted) -> dict:
    """metrics.json (and what `wb train --json` prints)."""
    trainer, o, world, tokens = model.trainer, run.options, model.world, fitted.tokens
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    runtime = fitted.train_metrics.get("train_runtime", 0.0)
    peak = None
    if torch.cuda.is_available() and trainer.args.device.type == "cuda":
        peak = round(torch.cuda.max_memory_allocated(trainer.args.device) / 2**30, 3)
    return {
        "train_loss": fitted.train_metrics.get("train_loss"),
        "final_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "train_runtime_s": round(runtime, 3),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
        "steps": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "train_samples": len(data.train),
        "val_samples": len(data.val),
        "world_size": world,
        "global_batch": o["batch_size"] * o["grad_accum"] * world,
        "peak_gpu_memory_gb": peak,
        "resumed_from": run.resume_from.name if run.resume_from else None,
        "warnings": model.notes,
        **_final_preference(history),
    }


def _final_preference(history: list[dict]) -> dict:
    """The last logged preference metrics of training and of evaluation (trl's names); none for SFT."""
    from workbench.train.preference import PREFERENCE_METRICS

    final = {}
    for prefix in ("", "eval_"):
        rows = [e for e in history if f"{prefix}rewards/margins" in e]
        if rows:
            final.update({f"{prefix}{k}": rows[-1][f"{prefix}{k}"] for k in PREFERENCE_METRICS
                          if f"{prefix}{k}" in rows[-1]})
    return final


def _log_rows(history: list[dict], total_steps: int) -> list[dict]:
    """trainer_log.jsonl rows: one per logging step, eval_loss merged into its step's row; a preference
    run's rows also carry trl's reward metrics (rewards/margins, ..., and eval_rewards/... when evaluated)."""
    from workbench.train.preference import PREFERENCE_METRICS

    rows: dict[int, dict] = {}
    for entry in history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"], "total_steps": total_steps, "loss": None})
        if "loss" in entry:
            row.update(loss=entry["loss"], lr=entry.get("learning_rate"), epoch=entry.get("epoch"),
                       grad_norm=entry.get("grad_norm"), tokens_per_s=entry.get("tokens_per_s"),
                       elapsed_s=entry.get("elapsed_s"))
            row.update({k: entry[k] for k in PREFERENCE_METRICS if k in entry})
        else:
            row["eval_loss"] = entry["eval_loss"]
            row.setdefault("epoch", entry.get("epoch"))
            row.update({f"eval_{k}": entry[f"eval_{k}"] for k in PREFERENCE_METRICS if f"eval_{k}" in entry})
    return [rows[step] for step in sorted(rows)]


def _check_adapter(folder: Path) -> None:
    """Refuse an adapter without weights (what a ZeRO-3 save without gathering writes)."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise WorkbenchError("the adapter was not saved (no adapter_model.safetensors)", folder)
    with open_checkpoint(path) as adapter:  # the header only: shapes, no tensor data
        shapes = [info.shape for info in adapter.infos.values()]
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
