"""Names of dtypes and devices as every command accepts them.

Kept free of heavy imports apart from torch: the weight path must not pull in transformers.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ["auto", *DTYPE_NAMES]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`None`/"auto" gives None (keep the input's dtype, or pick per device); else the torch dtype."""
    if name is None or name == "auto":
        return None
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise WorkbenchError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}") from None


def resolve_device(name: str | None) -> torch.device:
    """"auto"/None: CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_compute_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """For training and evaluation: auto is bf16 where the device supports it, else fp32."""
    dtype = parse_dtype(name)
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
