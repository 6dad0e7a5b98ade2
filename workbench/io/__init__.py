"""Checkpoint I/O shared by every weight command: lazy readers, an atomic sharded writer, hashing."""

from workbench.io.reader import Checkpoint, TensorInfo, open_checkpoint
from workbench.io.writer import TensorSpec, WriteReport, write_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "TensorSpec", "WriteReport", "open_checkpoint", "write_checkpoint"]
