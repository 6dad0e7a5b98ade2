"""Write a Hugging Face checkpoint folder one tensor at a time.

The caller says which tensors will exist (`TensorSpec`s) and how to produce each one; the writer
lays the shards out (HF names and index, safetensors' own byte layout), asks for tensors in file
order, writes each shard sequentially, hashes every file while writing it and accumulates the
float64 weight-sum in the same pass. Nothing is held but the tensor (or row block) in hand.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.dtypes import element_size
from workbench.errors import WorkbenchError
from workbench.io.hashing import StreamHasher
from workbench.io.safetensors_format import Header, header_from_raw, layout
from workbench.io.weightsum import float64_sum
from workbench.progress import progress_bar

DEFAULT_SHARD_SIZE = 5 * 1000**3  # "5GB", as transformers means it
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: Header


@dataclass
class WriteReport:
    files: dict[str, dict[str, object]] = field(default_factory=dict)  # name -> {size, md5, sha256}
    weight_sum: float = 0.0
    tensor_count: int = 0
    index_file: str | None = None

    def hashes(self, algo: str) -> dict[str, str]:
        return {name: str(entry[algo]) for name, entry in self.files.items()}


Producer = Callable[[TensorSpec], "torch.Tensor | Iterable[torch.Tensor]"]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
               "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """A shard size in bytes: "5GB" (10^9, as transformers), "500MiB" (2^20), or a whole number of
    bytes. "5B" is refused: mergekit users write it for 5 billion, and it would mean 5 bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match or (match[2] is None and "." in match[1]):
            raise WorkbenchError(f"cannot read size {text!r}; write a byte size such as 5GB, 500MB or 2GiB")
        number, unit = match.groups()
        size = int(float(number) * _SIZE_UNITS[unit.upper()]) if unit else int(number)
    if size < 1:
        raise WorkbenchError(f"size {text!r} must be at least one byte; write e.g. 5GB")
    return size


def plan_shards(specs: list[TensorSpec], max_shard_size: int, metadata: dict[str, str] | None = None) -> list[ShardPlan]:
    """Group tensors into shards in the given order as transformers does (a tensor larger than
    the limit gets a shard of its own) and name them `model-0000k-of-0000n.safetensors`."""
    metadata = {"format": "pt"} if metadata is None else metadata
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    return [
        ShardPlan(name, layout([(s.name, s.dtype, s.shape) for s in group], metadata))
        for name, group in zip(names, groups)
    ]


def plans_from_headers(headers: dict[str, bytes], source: Path) -> list[ShardPlan]:
    """Reproduce existing files' exact layouts from their stored header bytes (read from `source`)."""
    return [ShardPlan(name, header_from_raw(raw, source)) for name, raw in headers.items()]


def index_text(plans: list[ShardPlan]) -> str:
    """The index transformers writes: sorted keys, indent 2, total_size of tensor bytes."""
    weight_map = {slot.name: plan.filename for plan in plans for slot in plan.header.slots}
    total = sum(slot.nbytes for plan in plans for slot in plan.header.slots)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def write_checkpoint(
    out_dir: Path,
    plans: list[ShardPlan],
    produce: Producer,
    *,
    index: str | None = None,
    hash_algos: tuple[str, ...] = ("md5", "sha256"),
    description: str = "writing",
) -> WriteReport:
    """Write every shard in `plans` into `out_dir` (which the caller made atomic with
    `outputs.atomic_dir`), calling `produce` once per tensor, in file order. `produce` returns
    the tensor or an iterable of row blocks (for tensors too large to hold twice)."""
    report = WriteReport()
    total = sum(plan.header.data_size for plan in plans)
    with one_torch_thread(), progress_bar(total, description) as bar:
        for plan in plans:
            report.files[plan.filename] = _write_shard(out_dir / plan.filename, plan.header, produce, report, bar, hash_algos)
    if len(plans) > 1 or index is not None:
        name = "model.safetensors.index.json"
        (out_dir / name).write_text(index if index is not None else index_text(plans), encoding="utf-8")
        report.index_file = name
    return report


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU ops on the calling thread only while a checkpoint is written.

    `produce` does small, memory-bound per-block work (adds, casts, sums) while this writer's hash
    threads use the other cores; OpenMP workers spinning beside them cost two to three times the
    CPU they save (measured on 2 cores: recover 8.9 s user with one thread, 28.7 s with two; merge
    7x slower with two threads on a loaded machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_shard(path: Path, header: Header, produce: Producer, report: WriteReport, bar, algos) -> dict[str, object]:
    hasher = StreamHasher(algos)
    size = 0

    def emit(data: bytes | memoryview) -> None:
        nonlocal size
        handle.write(data)
        hasher.update(data)
        size += len(data)

    with open(path, "wb") as handle:
        emit(len(header.raw).to_bytes(8, "little"))
        emit(header.raw)
        for slot in header.slots:
            spec = TensorSpec(slot.name, slot.shape, slot.dtype)
            written = 0
            for block in _blocks(produce(spec)):
                _check_block(spec, block, written)
                block = block.detach().to("cpu").contiguous()
                report.weight_sum += float64_sum(block)
                data = block.reshape(-1).view(torch.uint8).numpy()
                emit(memoryview(data).cast("B"))
                written += data.nbytes
                bar.update(data.nbytes)
            if written != slot.nbytes:
                raise WorkbenchError(f"tensor {slot.name!r}: produced {written} bytes, expected {slot.nbytes}", path)
            report.tensor_count += 1
    hashes = hasher.hexdigests()
    return {"size": size, **hashes}


def _blocks(result: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else result


def _check_block(spec: TensorSpec, block: torch.Tensor, written: int) -> None:
    if block.dtype != spec.dtype:
        raise WorkbenchError(f"tensor {spec.name!r} came as {block.dtype}, expected {spec.dtype}")
    if written == 0 and tuple(block.shape) != spec.shape and tuple(block.shape[1:]) != spec.shape[1:]:
        raise WorkbenchError(f"tensor {spec.name!r} has shape {list(block.shape)}, expected {list(spec.shape)}")


def copy_side_files(source: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (whatever of them exists)."""
    copied = []
    for name in MODEL_SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
            copied.append(name)
    return copied
