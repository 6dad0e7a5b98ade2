"""The adapter `wb train` trains: peft's LoRA with its variants, on a base that may be quantized.

- Variants (peft's own options): `--use-dora` (use_dora), `--use-rslora` (use_rslora), `--init`
  (init_lora_weights: True, "gaussian", or PiSSA).
- PiSSA starts A and B from the base's principal components and trains against the *residual* base
  W_res = W - scale * B0 @ A0, so its adapter only means something on that residual. wb keeps the
  initial adapter (`PissaInit`) and saves DIR's adapter converted by peft's
  `save_pretrained(path_initial_model_for_weight_conversion=...)`: a plain LoRA of rank 2r relative to
  the ORIGINAL base (Delta W = B @ A - B0 @ A0), which `wb merge` and `PeftModel.from_pretrained` take
  as is. The Trainer's checkpoints (DIR/checkpoints/checkpoint-N, what --resume reads) stay relative to
  the residual base; DIR/checkpoints/pissa-init holds B0, A0. The fast SVD is LLaMA-Factory's default
  (`pissa_niter_16`, seeded), not a full SVD, which takes hours on an 8B model's CPU copy.
- QLoRA (`--quantization-bit 4|8`): the base loaded through bitsandbytes (`BitsAndBytesConfig`), then
  `peft.prepare_model_for_kbit_training`, which freezes the base and casts its non-quantized weights
  (norms, embeddings, head) to fp32; gradient checkpointing only when the user asked for it.
- `--adapter DIR`: an existing LoRA adapter continued (`PeftModel.from_pretrained(is_trainable=True)`);
  its config decides r, alpha, dropout, targets, DoRA and rsLoRA.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

PISSA_INIT = "pissa_niter_16"  # LLaMA-Factory's pissa_init with its default pissa_iter 16
PISSA_FOLDER = "pissa_init"  # becomes a peft adapter name during the conversion: no dots, no dashes
INITS = {"default": True, "gaussian": "gaussian", "pissa": PISSA_INIT}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt options (malloc.h)
MALLOC_THRESHOLD = 128 * 1024  # glibc's default for both, before its dynamic mmap threshold raises them
QLORA_INSTALL = "--quantization-bit needs bitsandbytes: pip install 'wb[qlora]'"
# the options an existing adapter's config decides: (train option, adapter_config key, default)
ADAPTER_DECIDES = (("lora_r", "r", 8), ("lora_dropout", "lora_dropout", 0.0), ("use_dora", "use_dora", False),
                   ("use_rslora", "use_rslora", False))


@dataclass
class PissaInit:
    """PiSSA's initial adapter (A0, B0), kept in memory from before the first step to the save."""

    state: dict[str, torch.Tensor]


@dataclass
class Built:
    """The LoRA model and what the save needs to know about how it was made."""

    peft: Any  # a peft.PeftModel
    pissa: PissaInit | None
    continued: Path | None  # the --adapter DIR it started from


# ---- checks before anything is loaded -------------------------------------------------------------


def check_options(o: dict) -> None:
    """Refuse, with one line and before anything is loaded, the combinations that cannot work (or that
    wb has not verified), a missing bitsandbytes, and options that --adapter's config contradicts."""
    bits = o.get("quantization_bit")
    if bits is not None:
        import_bitsandbytes()
        if o.get("strategy") in ("fsdp", "zero3"):
            raise WorkbenchError(f"--quantization-bit {bits} with --strategy {o['strategy']}: a quantized base "
                                 "cannot be sharded by wb's FSDP/ZeRO-3 setup; use --strategy ddp or zero2")
        if o["lora_init"] == "pissa":
            raise WorkbenchError(f"--init pissa with --quantization-bit {bits}: PiSSA's SVD needs the full-precision "
                                 "weights (peft's route is to quantize the residual model afterwards); drop one")
        if bits == "8" and o["quantization_type"] != "nf4":
            raise WorkbenchError(f"--quantization-type {o['quantization_type']} is a 4-bit data type; "
                                 "--quantization-bit 8 is LLM.int8")
        if bits == "8" and not o["double_quantization"]:
            raise WorkbenchError("--no-double-quantization is a 4-bit setting; --quantization-bit 8 has none")
    if o["lora_init"] == "pissa":
        if o["use_dora"]:
            raise WorkbenchError("--init pissa with --use-dora: peft's conversion of a PiSSA adapter to a LoRA of "
                                 "the original base drops DoRA's magnitudes; drop one")
        if o.get("strategy") in ("fsdp", "zero3"):
            raise WorkbenchError(f"--init pissa with --strategy {o['strategy']}: PiSSA's SVD needs every weight "
                                 "whole on each process; use --strategy ddp or zero2")
        if o.get("adapter"):
            raise WorkbenchError("--init pissa with --adapter: an existing adapter is continued from its own "
                                 "weights, there is nothing to initialise; drop --init")
    if o.get("adapter"):
        read_continued_config(Path(o["adapter"]), o)


# ---- QLoRA -----------------------------------------------------------------------------------------


def import_bitsandbytes():
    """bitsandbytes, or one error line saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise WorkbenchError(QLORA_INSTALL) from None
    return bitsandbytes


def quantization_record(o: dict, compute: torch.dtype) -> dict | None:
    """train_args.json's "quantization": how the base was quantized (None: it was not)."""
    bits = o.get("quantization_bit")
    if bits is None:
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute]
    if bits == "4":
        return {"bits": 4, "type": o["quantization_type"], "double": bool(o["double_quantization"]),
                "compute_dtype": name}
    return {"bits": 8, "type": "llm.int8", "double": None, "compute_dtype": name}


def quantization_config(o: dict, compute: torch.dtype):
    """The BitsAndBytesConfig of --quantization-bit (None without it); bitsandbytes checked first."""
    bits = o.get("quantization_bit")
    if bits is None:
        return None
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if bits == "4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=o["quantization_type"],
                                  bnb_4bit_use_double_quant=bool(o["double_quantization"]),
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def release_checkpoint_memory(model) -> None:
    """Give back what loading a quantized base leaves behind on the CPU: the weights it did not quantize
    (embeddings, norms, head) are still views of the memory-mapped checkpoint, which keeps every page
    that quantizing read mapped into the process, so they are copied out; and the freed full-precision
    copies stay in the C heap until malloc_trim returns them (glibc; elsewhere nothing to do)."""
    import ctypes
    import gc

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor).__name__ not in ("Params4bit", "Int8Params") and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def limit_heap_retention() -> bool:
    """Make the C heap give large freed buffers back to the OS (glibc on Linux; False, nothing done,
    elsewhere). bitsandbytes' CPU 4-bit matmul dequantizes each weight to a fresh full-precision buffer
    in every forward and backward. glibc raises its mmap threshold to the size of each large block freed
    (up to 32 MiB), so from the first step on those buffers come from the heap, and the heap keeps what
    they leave behind: a 4-bit run's memory grew by about a GB over its first steps on the bench's 312M
    model. Fixing both thresholds at glibc's own 128 KiB default turns the dynamic raise off: large
    buffers are mmapped and unmapped on free, and a free top of heap is trimmed. Called before the
    base is loaded: after it, the heap the load fragmented still held 200 MiB more during training. The
    price is fresh zeroed pages for each buffer: slower steps (see bench/bench_qlora.py)."""
    import ctypes
    import platform
    import sys

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    ok = all(libc.mallopt(option, MALLOC_THRESHOLD) == 1 for option in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD))
    libc.malloc_trim(0)
    return ok


def prepare_quantized(model, checkpointing: bool):
    """peft's preparation of a k-bit base for training; gradient checkpointing only when asked for."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- the adapter -----------------------------------------------------------------------------------


def lora_config(o: dict):
    from peft import LoraConfig

    target = o["lora_target"]
    modules = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    return LoraConfig(r=o["lora_r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"],
                      target_modules=modules, use_dora=bool(o["use_dora"]), use_rslora=bool(o["use_rslora"]),
                      init_lora_weights=INITS[o["lora_init"]], task_type="CAUSAL_LM")


def add_adapter(model, o: dict, seed: int) -> Built:
    """New LoRA layers on `model` (or --adapter's, continued); for PiSSA its initial adapter is kept."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import set_seed

    if o.get("adapter"):
        return Built(continue_adapter(model, Path(o["adapter"]), o), None, Path(o["adapter"]))
    set_seed(seed)  # the LoRA A matrices (PiSSA's randomized SVD) are drawn here
    try:
        peft = get_peft_model(model, lora_config(o))
    except ValueError as exc:
        raise WorkbenchError(f"--lora-target {o['lora_target']}: {exc}") from None
    if o["lora_init"] != "pissa":
        return Built(peft, None, None)
    # peft's recipe: from here the adapter is an ordinary LoRA of the (now residual) base
    peft.peft_config["default"].init_lora_weights = True
    state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft).items()}
    return Built(peft, PissaInit(state), None)


def read_continued_config(folder: Path, o: dict) -> dict:
    """--adapter DIR's adapter_config.json, checked: a LoRA wb can continue, whose values the LoRA
    options given do not contradict (one given with another value is refused by name)."""
    from workbench.weights.adapters.lora import check_numbers, read_adapter_config

    config = read_adapter_config(folder)
    check_numbers(config, folder)
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise WorkbenchError(f"lora_dropout must be a number in [0, 1), not {dropout!r}"[:120],
                             folder / "adapter_config.json")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise WorkbenchError(f"--adapter: a {config.get('peft_type')!r} adapter; wb trains LoRA adapters"[:200], folder)
    modules = config.get("target_modules")
    if not (modules is None or isinstance(modules, str)
            or isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise WorkbenchError(f"target_modules must be a module name or a list of names, not {modules!r}"[:200],
                             folder / "adapter_config.json")
    relative = str(config.get("init_lora_weights", True)).lower().startswith(("pissa", "corda", "olora"))
    if relative or (folder.resolve().parent / "pissa-init").is_dir():  # a wb PiSSA run's checkpoint
        raise WorkbenchError("--adapter: this adapter is relative to a PiSSA residual base (a checkpoint, not a "
                             "finished DIR); continue its run with --resume, or pass the run's converted adapter",
                             folder)
    _check_against(config, o, folder)
    return config


def continue_adapter(model, folder: Path, o: dict):
    """--adapter DIR: its LoRA, trainable. Its config decides the LoRA options: the ones left at their
    defaults take the adapter's values, and `o` records them."""
    from peft import PeftModel

    config = read_continued_config(folder, o)
    try:
        peft = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WorkbenchError(f"--adapter: cannot load it onto --base: {str(exc).splitlines()[0][:300]}",
                             folder) from None
    # the continued adapter is an adapter of this run's --base (the first run may have named it otherwise,
    # e.g. relative to another folder): peft reads base_model_name_or_path back when it saves
    for adapter_config in peft.peft_config.values():
        adapter_config.base_model_name_or_path = o["base"]
    o.update(lora_r=config.get("r", 8), lora_alpha=config.get("lora_alpha", 8),
             lora_dropout=config.get("lora_dropout", 0.0), lora_target=_target_text(config.get("target_modules")),
             use_dora=bool(config.get("use_dora")), use_rslora=bool(config.get("use_rslora")))
    return peft


def _check_against(config: dict, o: dict, folder: Path) -> None:
    where = folder / "adapter_config.json"
    for option, key, default in ADAPTER_DECIDES:
        theirs = config.get(key, default)
        if o[option] != default and o[option] != theirs:
            given = f"--{option.replace('_', '-')}" + ("" if isinstance(default, bool) else f" {o[option]}")
            raise WorkbenchError(f"{given} conflicts with the adapter's {key}={theirs}: --adapter's config "
                                 "decides it; drop the option", where)
    alpha, theirs = o["lora_alpha"], config.get("lora_alpha", 8)
    if alpha != 2 * o["lora_r"] and not math.isclose(alpha, theirs):  # alpha = 2 x r is the default
        raise WorkbenchError(f"--lora-alpha {alpha} conflicts with the adapter's lora_alpha={theirs}: --adapter's "
                             "config decides it; drop the option", where)
    target = o["lora_target"]
    if target != "all-linear":
        given = sorted(t.strip() for t in target.split(",") if t.strip())
        modules = config.get("target_modules")
        if given != (sorted(modules) if isinstance(modules, list) else modules):
            raise WorkbenchError(f"--lora-target {target} conflicts with the adapter's target_modules="
                                 f"{_target_text(modules)}: --adapter's config decides it; drop the option", where)


def _target_text(modules: object) -> str:
    return ",".join(sorted(map(str, modules))) if isinstance(modules, list) else str(modules)


# ---- saving ------------------------------------------------------------------------------------------


def save_pissa_converted(built: Built, staging: Path, checkpoints: Path) -> None:
    """Overwrite the staging folder's adapter with peft's conversion of the PiSSA adapter to a LoRA of
    the original base (rank 2r), and keep the initial adapter as DIR/checkpoints/pissa-init."""
    from safetensors.torch import save_file

    init = staging / PISSA_FOLDER
    shutil.rmtree(init, ignore_errors=True)
    init.mkdir()
    save_file({k: v.contiguous() for k, v in built.pissa.state.items()}, str(init / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    built.peft.save_pretrained(str(staging), path_initial_model_for_weight_conversion=str(init))
    kept = checkpoints / "pissa-init"
    shutil.rmtree(kept, ignore_errors=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.move(str(init), str(kept))


def adapter_record(built: Built, staging: Path) -> dict:
    """train_args.json's and metrics.json's "adapter": the saved adapter's own config, and how it was made."""
    from workbench.io.jsonfile import read_json

    saved = read_json(staging / "adapter_config.json", "adapter config")
    return {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "use_dora": bool(saved.get("use_dora")),
            "use_rslora": bool(saved.get("use_rslora")),
            "init": "pissa" if built.pissa is not None else _init_name(built.peft.peft_config["default"]),
            "pissa_converted": built.pissa is not None,
            "continued_from": str(built.continued) if built.continued else None}


def _init_name(config) -> str:
    init = config.init_lora_weights
    return "default" if init is True else str(init)


