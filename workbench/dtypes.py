"""Names of dtypes and devices as every command accepts them.

The names are plain strings, importable without torch: the CLI builds its choice lists from them
(`wb checksum` and `wb --help` never import torch). torch is imported by the functions that turn a
name into a torch dtype or device, and by the safetensors dtype tables (`SAFETENSORS_DTYPES`,
`TORCH_TO_SAFETENSORS`), which are built the first time they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

# The dtype names a command accepts -> the torch dtype each names.
DTYPE_NAMES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
DTYPE_CHOICES = ["auto", *DTYPE_NAMES]  # auto: keep the input's dtype, or pick one per device
STORAGE_DTYPE_CHOICES = list(DTYPE_NAMES)  # where a dtype must be named (wb diff)
DEVICE_CHOICES = ["auto", "cpu", "cuda"]  # auto: CUDA when present, else CPU

# safetensors' dtype names -> the torch dtype each names.
_SAFETENSORS_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def __getattr__(name: str):
    """`SAFETENSORS_DTYPES` ({"F32": torch.float32, ...}) and `TORCH_TO_SAFETENSORS`, built on first use."""
    if name not in ("SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    tables = globals()
    tables["SAFETENSORS_DTYPES"] = {key: getattr(torch, value) for key, value in _SAFETENSORS_NAMES.items()}
    tables["TORCH_TO_SAFETENSORS"] = {value: key for key, value in tables["SAFETENSORS_DTYPES"].items()}
    return tables[name]


def element_size(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`None`/"auto" gives None (keep the input's dtype, or pick per device); else the torch dtype."""
    if name is None or name == "auto":
        return None
    try:
        torch_name = DTYPE_NAMES[name.lower()]
    except KeyError:
        raise WorkbenchError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}") from None
    import torch

    return getattr(torch, torch_name)


def resolve_device(name: str | None) -> torch.device:
    """"auto"/None: CUDA when present, else CPU. Asking for CUDA without one is an error."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_compute_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """For training and evaluation: auto is bf16 where the device supports it, else fp32."""
    import torch

    dtype = parse_dtype(name)
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
