"""`wb train --config FILE`: settings from a YAML file, the command line overriding them.

A key is either one of `wb train`'s own option names (underscored: lora_r, cutoff_len, base, data,
out, ...) or a key of a LLaMA-Factory training YAML, mapped to the wb option of the same meaning
(`LF_KEYS`). Every value is converted and range-checked by the command's own click option type, so
a file is held to what the command line is. A LLaMA-Factory key that changes results and that wb
does not implement is one error naming it (`LF_REFUSED`, unless it holds the value wb behaves as);
keys that only tune speed or logging are ignored and listed in one warning (`LF_IGNORED`); any
other key is an error, so that a typo is never silently ignored. Relative paths in the file are
taken from the current directory, as LLaMA-Factory does.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from workbench.errors import WorkbenchError

CONFIG_COPY = "train_config.yaml"
REQUIRED = ("base", "data", "out")
INT_LIMIT = 2**63 - 1  # an integer setting beyond this is refused: no option means anything there
_ALIASES = {"base": "model_name_or_path", "data": "dataset", "out": "output_dir"}


def _same(value):
    return value


def _lora_target(value):
    """LLaMA-Factory's `all` is every linear layer but the head (peft's all-linear); a list or a comma list."""
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else None
    if items is None or not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError("expects a module name, a comma list or a YAML list of names")
    names = [i.strip() for i in items]
    return "all-linear" if names == ["all"] else ",".join(names)


def _dataset(value):
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, str):
        return (value,)
    raise ValueError("expects dataset names: a comma list or a YAML list")


def _single_adapter(value):
    if isinstance(value, str) and "," in value:
        raise ValueError("several adapters are not supported; name one (merge the others first with wb merge)")
    return value


def _quantization_bit(value):
    if isinstance(value, bool) or value not in (4, 8, "4", "8"):
        raise ValueError("expects 4 or 8")
    return str(value)


# LLaMA-Factory key -> (wb option, value conversion before the option's own type check)
LF_KEYS: dict[str, tuple[str, Any]] = {
    "model_name_or_path": ("base", _same),
    "adapter_name_or_path": ("adapter", _single_adapter),
    "stage": ("stage", _same),
    "lora_rank": ("lora_r", _same),
    "lora_alpha": ("lora_alpha", _same),
    "lora_dropout": ("lora_dropout", _same),
    "lora_target": ("lora_target", _lora_target),
    "use_dora": ("use_dora", _same),
    "use_rslora": ("use_rslora", _same),
    "quantization_bit": ("quantization_bit", _quantization_bit),
    "quantization_type": ("quantization_type", _same),
    "double_quantization": ("double_quantization", _same),
    "dataset": ("data", _dataset),
    "dataset_dir": ("dataset_dir", _same),
    "template": ("template", _same),
    "cutoff_len": ("cutoff_len", _same),
    "max_samples": ("max_samples", _same),
    "val_size": ("val_size", _same),
    "output_dir": ("out", _same),
    "logging_steps": ("logging_steps", _same),
    "save_steps": ("save_steps", _same),
    "eval_steps": ("eval_steps", _same),
    "per_device_train_batch_size": ("batch_size", _same),
    "gradient_accumulation_steps": ("grad_accum", _same),
    "learning_rate": ("lr", _same),
    "num_train_epochs": ("epochs", _same),
    "lr_scheduler_type": ("scheduler", _same),
    "warmup_ratio": ("warmup_ratio", _same),
    "seed": ("seed", _same),
    "pref_beta": ("pref_beta", _same),
    "pref_loss": ("pref_loss", _same),
    "simpo_gamma": ("simpo_gamma", _same),
    "trust_remote_code": ("trust_remote_code", _same),
    "train_on_prompt": ("train_on_prompt", _same),
    "gradient_checkpointing": ("gradient_checkpointing", _same),
}
# keys handled by `_special`: do_train, finetuning_type, quantization_method, bf16/fp16, overwrite_output_dir,
# pissa_init/pissa_iter/pissa_convert, resume_from_checkpoint
SPECIAL = ("do_train", "finetuning_type", "quantization_method", "bf16", "fp16", "overwrite_output_dir", "pissa_init",
           "pissa_iter", "pissa_convert", "resume_from_checkpoint")
# speed, memory, logging: ignored, listed in one warning
LF_IGNORED = frozenset({
    "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers", "plot_loss", "report_to", "ddp_timeout",
    "save_only_model", "per_device_eval_batch_size", "eval_strategy", "evaluation_strategy", "save_strategy",
    "logging_strategy", "logging_dir", "logging_first_step", "run_name", "save_total_limit", "flash_attn",
    "disable_gradient_checkpointing", "ddp_find_unused_parameters", "dataloader_pin_memory", "tokenized_path",
    "preprocessing_batch_size", "streaming", "use_fast_tokenizer", "low_cpu_mem_usage", "print_param_status",
    "include_num_input_tokens_seen", "include_tokens_per_second", "enable_liger_kernel", "use_unsloth_gc",
    "upcast_layernorm", "upcast_lmhead_output", "infer_backend", "cache_dir", "hf_hub_token", "ms_hub_token",
    "om_hub_token", "do_eval", "do_predict", "predict_with_generate", "compute_accuracy", "max_new_tokens",
})
# keys that change results, refused unless they hold the value wb behaves as (that value is accepted silently)
_NO = object()  # refused whatever the value
LF_REFUSED: dict[str, Any] = {
    "mask_history": False, "packing": False, "neat_packing": False, "enable_thinking": True, "default_system": None,
    "tool_format": None, "eval_dataset": None, "max_steps": -1, "warmup_steps": 0, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "optim": "adamw_torch", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "lr_scheduler_kwargs": None, "resize_vocab": False, "rope_scaling": None, "additional_target": None,
    "loraplus_lr_ratio": None, "lora_bias": "none", "create_new_adapter": False, "use_unsloth": False,
    "deepspeed": None, "fsdp": None, "mix_strategy": "concat", "interleave_probs": None, "buffer_size": _NO,
    "kto_chosen_weight": _NO, "kto_rejected_weight": _NO, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0,
    "ref_model": None, "reward_model": None, "neftune_noise_alpha": None, "shift_attn": False, "use_galore": False,
    "use_badam": False, "use_apollo": False, "freeze_trainable_layers": _NO, "freeze_trainable_modules": _NO,
    "quantization_device_map": None, "export_dir": None, "model_revision": "main", "split": "train",
    "bf16_full_eval": False, "fp16_full_eval": False, "tf32": None, "label_smoothing_factor": 0.0,
    "group_by_length": False, "full_determinism": False, "data_seed": None, "moe_aux_loss_coef": None,
    "use_llama_pro": False, "pissa_iter": -1,
}


@dataclass
class ConfigFile:
    """A --config file, read and checked: the option values it sets and what it ignored."""

    path: Path
    sha256: str
    values: dict[str, Any]  # wb option name -> value, converted by the option's type
    ignored: list[str] = field(default_factory=list)  # LLaMA-Factory keys ignored (speed/logging)

    def record(self) -> dict:
        """What train_args.json keeps of it (options.config)."""
        return {"path": str(self.path), "sha256": self.sha256, "ignored_keys": self.ignored}

    def warning(self) -> str | None:
        if not self.ignored:
            return None
        return (f"{self.path}: ignored LLaMA-Factory key(s) that only tune speed or logging in LLaMA-Factory: "
                f"{', '.join(self.ignored)}")


def read_config(path: Path, command: click.Command, ctx: click.Context | None = None) -> ConfigFile:
    """Parse and check `path` against `command`'s options (YAML: yaml.safe_load, no Python tags)."""
    import yaml

    raw = _read(path)
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"the config is not UTF-8 text (byte {exc.start})", path) from None
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise WorkbenchError(f"cannot read the config as YAML: {detail}{where}", path) from None
    except RecursionError:
        raise WorkbenchError("cannot read the config as YAML: nested too deeply", path) from None
    except ValueError as exc:  # PyYAML's int() of a number over Python's 4300-digit limit
        raise WorkbenchError(f"cannot read the config as YAML: {str(exc)[:100]}", path) from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"the config must be a mapping of settings, not {type(data).__name__}", path)
    options = {o.name: o for o in command.params if isinstance(o, click.Option)}
    ctx = ctx or click.Context(command)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise WorkbenchError(f"config key {_shown(key)} is not text", path)
        if key in SPECIAL:
            updates = _special(key, value, data, path)
        elif key in LF_KEYS:
            name, convert = LF_KEYS[key]
            try:
                updates = {name: convert(value)} if value is not None else {}
            except ValueError as exc:
                raise WorkbenchError(f"config key {key}: {exc}", path) from None
        elif key in options and key not in ("config", "nproc", "as_json"):
            updates = {key: value} if value is not None else {}
        elif key in LF_IGNORED:
            ignored.append(key)
            continue
        elif key in LF_REFUSED:
            accepted = LF_REFUSED[key]
            if accepted is not _NO and (value == accepted or value is None):
                continue
            raise WorkbenchError(f"config key {key}: {_shown(value)} changes training and wb train does not implement "
                                 "it; remove the key", path)
        else:
            raise WorkbenchError(f"unknown config key {_shown(key)} (not a wb train option nor a LLaMA-Factory key wb "
                                 "knows); check its spelling", path)
        for name, item in updates.items():
            if name in values and sources[name] != key:
                raise WorkbenchError(f"config keys {sources[name]} and {key} both set {name}; keep one", path)
            values[name] = _checked(options[name], item, key, ctx, path)
            sources[name] = key
    return ConfigFile(Path(path), hashlib.sha256(raw).hexdigest(), values, sorted(ignored))


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise WorkbenchError(f"cannot read the config: {exc.strerror or exc}", path) from None


def _special(key: str, value, data: dict, path: Path) -> dict[str, Any]:
    """LLaMA-Factory keys that do not map one to one onto an option."""
    def refuse(why: str):
        raise WorkbenchError(f"config key {key}: {why}", path)

    if key == "do_train":
        if value is not True:
            refuse("wb train trains; do_train must be true")
        return {}
    if key == "finetuning_type":
        if value != "lora":
            refuse(f"{_shown(value)} is not implemented; wb train fine-tunes LoRA adapters (finetuning_type: lora)")
        return {}
    if key == "quantization_method":
        if value not in ("bnb", "bitsandbytes", None):
            refuse(f"{_shown(value)} is not implemented; wb quantizes with bitsandbytes (bnb)")
        return {}
    if key in ("bf16", "fp16"):
        if not isinstance(value, bool):
            refuse("expects true or false")
        if data.get("bf16") is True and data.get("fp16") is True:
            refuse("bf16 and fp16 are both true; choose one")
        if value:
            return {"dtype": key}
        # both false is fp32: said once (by bf16), else the two keys would clash on dtype
        return {"dtype": "fp32"} if key == "bf16" and data.get("fp16") is False else {}
    if key == "overwrite_output_dir":
        if not isinstance(value, bool):
            refuse("expects true or false")
        return {"force": True} if value else {}
    if key == "pissa_init":
        if not isinstance(value, bool):
            refuse("expects true or false")
        return {"lora_init": "pissa"} if value else {}
    if key == "pissa_iter":
        if value not in (-1, None):
            refuse("wb's --init pissa is peft's exact SVD (pissa_iter: -1); fast SVD iterations are not implemented")
        return {}
    if key == "pissa_convert":
        if value not in (True, None):
            refuse("wb always saves a PiSSA adapter converted to a plain LoRA of the original base")
        return {}
    if value is not None:  # resume_from_checkpoint
        refuse("a checkpoint path is not implemented; pass --resume to continue DIR/checkpoints' last checkpoint")
    return {}


def _checked(option: click.Option, value, key: str, ctx: click.Context, path: Path):
    """`value` converted and checked by the option's own type (as if given on the command line)."""
    def bad(why: str):
        raise WorkbenchError(f"config key {key}: {why}", path)

    kind = option.type
    if option.is_flag:
        if not isinstance(value, bool):
            bad("expects true or false")
        return value
    if option.multiple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, str) for v in items):
            bad("expects text or a list of text")
        return tuple(items)
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        bad(f"expects a single {kind.name} value, not {type(value).__name__}")
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        if isinstance(kind, click.types.FloatParamType) and isinstance(value, str):
            try:
                value = float(value)  # PyYAML reads 5e-5 (no dot) as text; LLaMA-Factory's parser takes it
            except ValueError:
                bad(f"expects a number, not {_shown(value)}")
        if not isinstance(value, (int, float)):
            bad(f"expects a number, not {type(value).__name__}")
        if isinstance(kind, click.types.IntParamType) and isinstance(value, float):
            bad(f"expects an integer, not {_shown(value)}")
        if isinstance(kind, click.types.FloatParamType) and isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:  # an integer of hundreds of digits: beyond any float
                bad("expects a finite number, not an integer beyond any float")
        if isinstance(value, int) and not -INT_LIMIT <= value <= INT_LIMIT:  # no setting needs more than 64 bits
            bad(f"expects an integer within 64 bits, not {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            bad(f"expects a finite number, not {_shown(value)}")
    elif isinstance(kind, click.Choice) and isinstance(value, int) and abs(value) <= INT_LIMIT and str(value) in kind.choices:
        value = str(value)
    elif not isinstance(value, str):
        bad(f"expects text, not {type(value).__name__} {_shown(value)}")
    if isinstance(value, str) and "\x00" in value:  # a path type would stat it: ValueError, not BadParameter
        bad("contains a NUL byte")
    try:
        return kind.convert(value, option, ctx)
    except click.BadParameter as exc:
        bad(exc.message if len(exc.message) <= 200 else exc.message[:197] + "...")  # it quotes the value


def _shown(value) -> str:
    """A value as an error shows it: repr clipped to 60 characters. repr itself may fail: Python refuses to
    write an integer of over 4300 digits (YAML's 0x... or 1:2:3 forms make one from a short text)."""
    try:
        text = repr(value)
    except ValueError:
        return "a value too large to show"
    return text if len(text) <= 60 else text[:57] + "..."


def merge(ctx: click.Context, config: ConfigFile) -> dict:
    """ctx.params with the file's values, except where the command line gave one (defaults never win)."""
    from click.core import ParameterSource

    merged = dict(ctx.params)
    for name, value in config.values.items():
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            merged[name] = value
    return merged


def check_required(params: dict, config_path: Path | None) -> None:
    """--base, --data and --out must be set, on the command line or in the config."""
    for name in REQUIRED:
        if not params.get(name):
            where = f" or as {name}/{_ALIASES[name]} in the config" if config_path else " (or in a --config file)"
            raise WorkbenchError(f"--{name} is required: give it on the command line{where}",
                                 config_path if config_path else None)


def copy_config(staging: Path, options: dict) -> None:
    """Copy the --config file (options["config"]["path"]) into the staging folder as train_config.yaml."""
    record = options.get("config")
    if record:
        shutil.copyfile(record["path"], Path(staging) / CONFIG_COPY)


def config_record(path: Path) -> dict:
    """train_args.json's options.config: the file's path, sha256 and the LLaMA-Factory keys it ignored."""
    import yaml

    raw = _read(path)
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, yaml.YAMLError):
        data = None
    keys = sorted(k for k in data if k in LF_IGNORED) if isinstance(data, dict) else []
    return {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "ignored_keys": keys}
