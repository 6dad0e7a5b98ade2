"""The model `wb eval` scores with: lm-eval's hf model (one device, or `--parallelize`: one model spread over
every visible GPU) or lm-eval's vllm model (`--backend vllm`: tensor and data parallel, LoRA through vLLM),
and vLLM generation for `--gen-data`.

Every argument is decided by a pure function of the checked inputs (`check_backend`, `hf_model_args`,
`vllm_model_args`, `vllm_generation_request`), so the exact requests are tested without a GPU and without
vllm installed; vllm itself is imported only where a model is loaded or text is generated.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_json

BACKENDS = ("hf", "vllm")
VLLM_INSTALL = "--backend vllm needs vLLM: pip install vllm (CUDA)"
# vLLM accepts only these as max_lora_rank (vllm.config.lora.MaxLoRARanks); an adapter of rank r gets the
# smallest one that holds it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# accelerate's sizes (convert_file_size_to_int): a number of bytes, or a number and a unit.
MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)


@dataclass(frozen=True)
class BackendOptions:
    """`wb eval`'s model-placement options, as given."""

    name: str = "hf"
    parallelize: bool = False
    max_memory_per_gpu: str | None = None
    offload_folder: Path | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None


def check_backend(options: BackendOptions, *, device_type: str, cuda_available: bool, world_size: int,
                  vllm_installed: bool) -> None:
    """Refuse, with one line, options that do not go together; before any model is loaded.

    device_type: the device `--device` resolved to; world_size: processes of this run (`--nproc`, or the
    launcher's WORLD_SIZE); vllm_installed: whether `import vllm` can find the package.
    """
    if options.name not in BACKENDS:
        raise WorkbenchError(f"--backend must be one of {', '.join(BACKENDS)}, not {options.name!r}")
    for flag, given in (("--max-memory-per-gpu", options.max_memory_per_gpu is not None),
                        ("--offload-folder", options.offload_folder is not None)):
        if given and not options.parallelize:
            raise WorkbenchError(f"{flag} applies with --parallelize only")
    if options.max_memory_per_gpu is not None and not MEMORY_SIZE.fullmatch(options.max_memory_per_gpu.strip()):
        raise WorkbenchError(f"--max-memory-per-gpu must be a size such as 70GiB or 80GB, "
                             f"not {options.max_memory_per_gpu!r}")
    if options.name == "hf":
        _check_hf(options, device_type, cuda_available, world_size)
    else:
        _check_vllm(options, device_type, cuda_available, world_size, vllm_installed)


def _check_hf(options: BackendOptions, device_type: str, cuda_available: bool, world_size: int) -> None:
    vllm_only = {"--tensor-parallel-size": options.tensor_parallel_size != 1,
                 "--data-parallel-size": options.data_parallel_size != 1,
                 "--gpu-memory-utilization": options.gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION,
                 "--max-model-len": options.max_model_len is not None}
    for flag, given in vllm_only.items():
        if given:
            raise WorkbenchError(f"{flag} applies to --backend vllm only (hf: --parallelize, --nproc)")
    if not options.parallelize:
        return
    if not cuda_available:
        raise WorkbenchError("--parallelize spreads the model over CUDA GPUs, and this machine has none")
    if device_type != "cuda":
        raise WorkbenchError(f"--parallelize spreads the model over CUDA GPUs; it cannot run with --device "
                             f"{device_type}")
    check_processes(options, world_size)


def _check_vllm(options: BackendOptions, device_type: str, cuda_available: bool, world_size: int,
                vllm_installed: bool) -> None:
    if options.parallelize:
        raise WorkbenchError("--parallelize is the hf backend's; with --backend vllm use --tensor-parallel-size")
    if not vllm_installed:
        raise WorkbenchError(VLLM_INSTALL)
    if not cuda_available or device_type != "cuda":
        raise WorkbenchError("--backend vllm runs on CUDA GPUs" + (", and this machine has none" if not cuda_available
                                                                  else f"; it cannot run with --device {device_type}"))
    check_processes(options, world_size)


def check_processes(options: BackendOptions, processes: int) -> None:
    """--backend vllm runs its own workers: refused with --nproc N > 1 (the `wb eval --nproc` parent checks
    this before it launches; a launched process sees WORLD_SIZE).

    --parallelize under several processes is lm-eval's model-and-data parallelism: each process spreads its
    copy over the GPUs of its node whose index modulo the node's process count is its local rank (8 GPUs,
    2 processes: GPUs 0,2,4,6 and 1,3,5,7), and the questions are sharded over the copies."""
    if processes > 1 and options.name == "vllm":
        raise WorkbenchError(f"--backend vllm runs its own workers; it cannot run in {processes} processes "
                             "(--nproc): use --data-parallel-size")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def launcher_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """The number of processes `accelerate launch`/torchrun started for this run (1 outside a launcher)."""
    try:
        return max(1, int(environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# -- hf ----------------------------------------------------------------------------------------------------------
def hf_model_args(options: BackendOptions) -> dict[str, Any]:
    """HFLM's keyword arguments for the placement: none for one device; `--parallelize`: lm-eval's naive model
    parallelism (accelerate's device_map="auto" over every visible GPU, `max_memory_per_gpu` on each,
    layers that fit on none offloaded to `offload_folder`, lm-eval's "./offload" when not given)."""
    if not options.parallelize:
        return {}
    args: dict[str, Any] = {"parallelize": True}
    if options.max_memory_per_gpu is not None:
        args["max_memory_per_gpu"] = options.max_memory_per_gpu.strip()
    if options.offload_folder is not None:
        args["offload_folder"] = str(Path(options.offload_folder).resolve())
    return args


# -- vllm --------------------------------------------------------------------------------------------------------
def vllm_model_args(model: Path, adapter: Path | None, tokenizer: Path, dtype: str, batch_size: int | str,
                    options: BackendOptions, trust_remote_code: bool) -> dict[str, Any]:
    """lm-eval's VLLM keyword arguments. dtype: the compute dtype's torch name (`bfloat16`, ...), the one the
    hf backend would use; tokenizer: the folder the hf backend reads it from (run.tokenizer_folder); an
    adapter is applied through vLLM's LoRA support, with the smallest max_lora_rank vLLM accepts that
    holds the adapter's rank."""
    if dtype not in VLLM_DTYPES:
        raise WorkbenchError(f"--backend vllm computes in {', '.join(VLLM_DTYPES)}, not {dtype}")
    args: dict[str, Any] = {
        "pretrained": str(model.resolve()),
        "tokenizer": str(tokenizer.resolve()),
        "dtype": dtype,
        "batch_size": batch_size,
        "tensor_parallel_size": options.tensor_parallel_size,
        "data_parallel_size": options.data_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "max_model_len": options.max_model_len,
        "trust_remote_code": trust_remote_code,
    }
    if adapter is not None:
        args.update(lora_local_path=str(adapter.resolve()), enable_lora=True,
                    max_lora_rank=vllm_lora_rank(adapter_rank(adapter), adapter))
    return args


def adapter_rank(adapter: Path) -> int:
    """The largest LoRA rank of a PEFT adapter: `r`, or a larger one of its `rank_pattern`."""
    path = adapter / "adapter_config.json"
    config = read_json(path, "adapter config")
    if not isinstance(config, dict):
        raise WorkbenchError("adapter config: the top level is not a JSON object", path)
    ranks = [("r", config.get("r"))]
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise WorkbenchError("adapter config: 'rank_pattern' must be an object", path)
    ranks += [(f"rank_pattern[{name!r}]", value) for name, value in pattern.items()]
    for where, value in ranks:
        if type(value) is not int or value < 1:
            text = repr(value)  # a crafted value (or pattern name) may be thousands of characters long
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise WorkbenchError(f"adapter config: {where[:80]} must be a whole number of at least 1, not {shown}", path)
    return max(value for _, value in ranks)


def vllm_lora_rank(rank: int, adapter: Path) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise WorkbenchError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this adapter's is {rank}", adapter)


def vllm_generation_request(tokenizer, prompts: list[str], max_new_tokens: int,
                            add_special_tokens: bool) -> tuple[list[list[int]], dict[str, Any]]:
    """The token ids of each prompt (tokenized as the hf generation path does) and vLLM's SamplingParams
    arguments: greedy, at most `max_new_tokens`, stopping at the model's end-of-sequence tokens."""
    ids = [list(map(int, row)) for row in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    return ids, {"temperature": 0.0, "max_tokens": max_new_tokens}


def is_vllm(lm) -> bool:
    return type(lm).__name__ == "VLLM" and type(lm).__module__.startswith("lm_eval.models.vllm")


def vllm_generate(lm, prompts: list[str], max_new_tokens: int, add_special_tokens: bool):
    """Greedy continuations with the vLLM engine lm-eval's VLLM holds (its LoRA request, its data-parallel
    replicas): the weights are loaded once for benchmarks and generation."""
    from vllm import SamplingParams

    from workbench.evals.generate import Generated

    ids, sampling = vllm_generation_request(lm.tokenizer, prompts, max_new_tokens, add_special_tokens)
    started = time.perf_counter()
    outputs = lm._model_generate(requests=ids, generate=True, sampling_params=SamplingParams(**sampling))
    texts = [output.outputs[0].text.strip() for output in outputs]
    counts = [len(output.outputs[0].token_ids) for output in outputs]
    return Generated(texts=texts, new_tokens=sum(counts), seconds=time.perf_counter() - started, counts=counts)


def load_vllm(args: dict[str, Any]):
    """lm-eval's VLLM with `args` (vllm_model_args)."""
    from lm_eval.models.vllm_causallms import VLLM

    try:
        return VLLM(**args)
    except (OSError, ValueError) as exc:
        from workbench.evals.run import one_line

        raise WorkbenchError(f"vLLM could not load the model: {one_line(exc)}", Path(args["pretrained"])) from None
