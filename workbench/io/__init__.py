"""Checkpoint I/O shared by every weight command.

- `layout`: which files hold a model's weights (torch-free; validates index files)
- `reader`: `open_checkpoint`, lazy zero-copy access to tensors
- `writer`: `write_checkpoint`, sharded safetensors written in one pass, hashed and summed
- `hashing`, `weightsum`: file hashes in md5sum format, the float64 weight-sum

This package imports no submodule until asked, so torch-free paths stay torch-free.
"""

from importlib import import_module

_LAZY = {
    "open_checkpoint": "reader",
    "Checkpoint": "reader",
    "TensorInfo": "reader",
    "write_checkpoint": "writer",
    "TensorSpec": "writer",
    "WriteReport": "writer",
    "plan_shards": "writer",
}


def __getattr__(name: str):
    """`from workbench.io import open_checkpoint` works, importing torch only then."""
    if name in _LAZY:
        return getattr(import_module(f"workbench.io.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'workbench.io' has no attribute {name!r}")
