"""`wb merge`: merge LoRA adapters and full fine-tunes into a base, one tensor at a time.

Every adapter (a `MergeSource`) is a task vector τᵢ per base tensor: for a LoRA adapter,
(replacement − base) for the tensors it saves whole (modules_to_save) plus scale·B@A for the
modules it adapts; for a full fine-tune (a model folder), model − base. The output tensor is
base + combine(τ, weights) in float32, cast to the output dtype, where the method (a `MergeMethod`
from `methods.registry`) says what combine is and whether it works on row blocks (linear: nothing
larger than a row block of one tensor is held, the model never is) or on whole tensors (TIES and
DARE need whole-tensor statistics, so they hold one full float32 delta per adapter for the tensor
being merged).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.dtypes import TORCH_TO_SAFETENSORS, parse_dtype, resolve_device
from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.weightsum import gains_non_finite
from workbench.io.writer import (
    MODEL_SIDE_FILES,
    TensorSpec,
    WriteReport,
    parse_size,
    plan_shards,
    write_checkpoint,
)
from workbench.outputs import atomic_dir, check_can_write, check_not_input
from workbench.provenance import created, file_fingerprints, versions
from workbench.weights.adapters.base import MergeSource, open_source
from workbench.weights.adapters.finetune import read_float_model_config
from workbench.weights.methods import registry
from workbench.weights.methods.base import MergeBlock, MergeMethod, take_rows

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = tuple(n for n in MODEL_SIDE_FILES if n not in CONFIG_FILES)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class MergeResult:
    """What a merge made: merge.json's record (also written to OUT/merge.json) and the lines `wb merge` prints."""

    out: Path
    record: dict

    def lines(self) -> list[str]:
        record, output = self.record, self.record["output"]
        return [
            f"merged {len(record['adapters'])} adapter(s) into {self.out} ({record['method']}, weights {record['weights']})",
            f"tensors: {output['tensors']} ({output['tensors_changed']} changed), files: {len(output['files'])}, "
            f"dtype: {'/'.join(record['output_dtypes'])}",
            f"weight-sum: {output['weight_sum']:.6f}",
        ]

    def to_json(self) -> dict:
        return self.record


def merge(
    base: str | Path,
    adapters: list[str | Path],
    *,
    out: str | Path,
    weights: list[float] | None = None,
    method: str = "linear",
    density: float = 0.5,
    seed: int = 0,
    dtype: str | None = "auto",
    device: str = "cpu",
    shard_size: str | int = "5GB",
    force: bool = False,
    command: str | None = None,
    **params: Any,
) -> MergeResult:
    """Merge `adapters` into `base` and write a Hugging Face folder at `out` (merge.json included).

    `params`: the values of parameters a registered method declares beyond weights, density and seed."""
    started = time.time()
    unknown = sorted(set(params) - {param.name for param in registry.params()})
    if unknown:
        raise TypeError(f"merge() got an unexpected keyword argument {unknown[0]!r}")
    base, out = Path(base).absolute(), Path(out)
    adapters = [Path(a).absolute() for a in adapters]
    values = {"weights": weights, "density": density, "seed": seed, **params}
    chosen, values = _check_settings(adapters, method, values)
    out_dtype = parse_dtype(dtype)
    torch_device = resolve_device(device)
    max_shard = parse_size(shard_size)
    check_can_write(out, force)
    check_not_input(out, [base, *adapters])

    base_config = read_float_model_config(base)
    base_ckpt = open_checkpoint(base)
    tied = bool(base_config.get("tie_word_embeddings", False))
    sources = [open_source(path, base_ckpt, tied) for path in adapters]
    specs = [
        TensorSpec(name, info.shape, out_dtype if (out_dtype and info.dtype.is_floating_point) else info.dtype)
        for name, info in base_ckpt.infos.items()
    ]
    merger = TensorMerger(base_ckpt, sources, chosen, values, torch_device)

    with ThreadPoolExecutor(max_workers=1) as pool:  # fingerprints hash while the merge is written
        fingerprints = pool.submit(_fingerprints, base_ckpt, sources)
        with atomic_dir(out, force=force, inputs=[base, *adapters]) as tmp:
            report = write_checkpoint(tmp, plan_shards(specs, max_shard), merger, hash_algos=("sha256",),
                                      description="merging")
            tokenizer_from = _write_side_files(base, sources, base_config, out_dtype, tmp)
            settings = {
                "method": chosen.name,
                **{param.name: values.get(param.name) for param in registry.params()},  # null where undeclared
                "dtype": "auto" if out_dtype is None else DTYPE_CONFIG_NAMES[out_dtype],
                "output_dtypes": sorted({TORCH_TO_SAFETENSORS[s.dtype] for s in specs}),
                "device": str(torch_device),
                "tokenizer_from": tokenizer_from,
            }
            record = _record(base, sources, settings, report, fingerprints.result(), merger.changed, command, started)
            (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return MergeResult(out, record)


class TensorMerger:
    """The writer's `produce`: the merged value of one base tensor, as a tensor or row blocks.

    Only the sources that touch a tensor take part in its merge (peft's rule); the method merges
    row block by row block when it declares `row_blocks`, else the whole tensor at once."""

    def __init__(self, base: Checkpoint, sources: list[MergeSource], method: MergeMethod, values: dict[str, Any],
                 device: torch.device):
        self.base, self.sources, self.method, self.device = base, sources, method, device
        self.weights, self.options = values["weights"], method.options(values)
        self.changed = 0
        self._scratch = torch.empty(0, dtype=torch.float32, device=device)

    def __call__(self, spec: TensorSpec) -> torch.Tensor | Iterator[torch.Tensor]:
        tensor = self.base.tensor(spec.name)
        parts = [i for i, source in enumerate(self.sources) if source.touches(spec.name)]
        if not parts or not tensor.dtype.is_floating_point:
            # row blocks even when only copied: the writer's per-block temporaries stay small
            return (take_rows(tensor, start, stop).to(spec.dtype) for start, stop in row_blocks(spec.shape))
        self.changed += 1
        generator = self.method.generator(spec.name, self.options)
        if self.method.row_blocks:
            return (self._merge(spec, parts, start, stop, generator) for start, stop in row_blocks(spec.shape))
        return self._merge(spec, parts, 0, spec.shape[0] if spec.shape else 1, generator)

    def _merge(self, spec: TensorSpec, parts: list[int], start: int, stop: int,
               generator: torch.Generator | None) -> torch.Tensor:
        base = take_rows(self.base.tensor(spec.name), start, stop)
        block = MergeBlock(spec.name, start, stop, base, [self.sources[i] for i in parts],
                           [self.weights[i] for i in parts], self.options, generator, self.device, self._buffer)
        return self._finish(spec, self.method.merge(block), base)

    def _buffer(self, shape: torch.Size) -> torch.Tensor:
        """A float32 block reused from one row block to the next: fresh large buffers cost a page
        fault per 4 KiB. (What goes to the writer is always a new tensor.)"""
        numel = math.prod(shape)
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._scratch[:numel].view(shape)

    def _finish(self, spec: TensorSpec, merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Round the float32 result once to the output dtype (a new tensor: `merged` may be the
        reused buffer), refusing NaN/inf that the base did not have."""
        result = merged.to(spec.dtype, copy=True)
        if gains_non_finite(result, base):  # checked in the output dtype: fp16 overflows where float32 does not
            raise WorkbenchError(
                f"merging gave NaN or inf in {spec.name!r} (an adapter holds NaN/inf, or the sum overflows {spec.dtype})")
        return result.cpu()


def _check_settings(adapters: list[Path], method: str, values: dict[str, Any]) -> tuple[MergeMethod, dict[str, Any]]:
    """The method called `method` and its declared parameters' checked values."""
    if not adapters:
        raise WorkbenchError("give at least one --adapter")
    chosen = registry.get(method)
    return chosen, chosen.check(values, len(adapters))


def _fingerprints(base: Checkpoint, sources: list[MergeSource]) -> list[dict[str, str]]:
    """sha256 of the base's and every adapter's weight and config files, {relative name: hex}."""
    groups = [(base.root, [*base.files, base.root / "config.json"]), *[(s.path, s.files) for s in sources]]
    return [file_fingerprints(root, files) for root, files in groups]


def _write_side_files(base: Path, sources: list[MergeSource], config: dict, out_dtype: torch.dtype | None,
                      out_dir: Path) -> str:
    """config.json (its dtype rewritten when --dtype changes it), generation_config.json, and one
    tokenizer: the first adapter's that carries one, else the base's. Returns where it came from."""
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if out_dtype is not None and any(config.get(k) != DTYPE_CONFIG_NAMES[out_dtype] for k in keys):
        config = {**config, **dict.fromkeys(keys, DTYPE_CONFIG_NAMES[out_dtype])}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    else:
        (out_dir / "config.json").write_bytes((base / "config.json").read_bytes())
    if (base / "generation_config.json").is_file():
        (out_dir / "generation_config.json").write_bytes((base / "generation_config.json").read_bytes())
    source = next((s.path for s in sources if any((s.path / m).is_file() for m in TOKENIZER_MARKERS)), base)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (out_dir / name).write_bytes((source / name).read_bytes())
    return str(source)


def _record(base: Path, sources: list[MergeSource], settings: dict, report: WriteReport, hashes: list[dict[str, str]],
            changed: int, command: str | None, started: float) -> dict:
    adapters = [
        {"path": str(s.path), "kind": s.kind, "weight": w, "files_sha256": h, **s.summary()}
        for s, w, h in zip(sources, settings["weights"], hashes[1:])
    ]
    return {
        "command": command,
        "base": {"path": str(base), "files_sha256": hashes[0]},
        "adapters": adapters,
        **settings,
        "output": {
            "files": report.files,
            "index_file": report.index_file,
            "tensors": report.tensor_count,
            "tensors_changed": changed,
            "weight_sum": report.weight_sum,
        },
        "versions": versions(("torch",), python=False),
        "created": created(started),
        "duration_s": round(time.time() - started, 3),
    }
