"""`wb merge`: merge LoRA adapters and full fine-tunes into a base, one tensor at a time.

Every adapter is a task vector τᵢ per base tensor: for a LoRA adapter, (replacement − base) for
the tensors it saves whole (modules_to_save) plus scale·B@A for the modules it adapts; for a full
fine-tune (a model folder), model − base. The output tensor is base + combine(τ, weights) in
float32, cast to the output dtype. Nothing larger than a row block of one tensor is held for the
linear method (the model never is); TIES and DARE need whole-tensor statistics, so they hold one
full float32 delta per adapter for the tensor being merged.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench import __version__
from workbench.dtypes import TORCH_TO_SAFETENSORS, parse_dtype, resolve_device
from workbench.errors import WorkbenchError
from workbench.io.hashing import hash_files
from workbench.io.jsonfile import read_json
from workbench.io.reader import Checkpoint, open_checkpoint
from workbench.io.writer import (
    MODEL_SIDE_FILES,
    TensorSpec,
    WriteReport,
    parse_size,
    plan_shards,
    row_blocks,
    write_checkpoint,
)
from workbench.weights.adapters.lora import LoraAdapter, is_lora_adapter, read_lora_adapter
from workbench.weights.merge_methods import METHODS, combine, tensor_seed
from workbench.outputs import atomic_dir, check_can_write, check_not_input

# float32 bytes of one row block of the linear merge. Kept small so that the writer's per-block
# temporaries stay under glibc's mmap threshold (reused heap, not fresh zero-filled pages each time).
BLOCK_BYTES = 8 * 1024 * 1024
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = tuple(n for n in MODEL_SIDE_FILES if n not in CONFIG_FILES)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class FineTune:
    """A full fine-tuned model folder used as an adapter: every tensor replaces the base's."""

    path: Path
    checkpoint: Checkpoint

    kind = "full"

    def touches(self, name: str) -> bool:
        return name in self.checkpoint

    def replacement(self, name: str) -> torch.Tensor | None:
        return self.checkpoint.tensor(name)

    def adds_delta(self, name: str) -> bool:
        """A fine-tune has no low-rank part: all of it is in its replacement tensors."""
        return False

    def add_delta(self, acc: torch.Tensor, name: str, start: int, stop: int, weight: float) -> None:
        raise AssertionError("a fine-tune adds no low-rank delta")

    @property
    def files(self) -> list[Path]:
        return [*self.checkpoint.files, self.path / "config.json"]

    def summary(self) -> dict:
        return {"config": None, "lora_modules": 0, "replaced_tensors": "all"}

    def bind(self, base: Checkpoint) -> FineTune:
        """The same tensors with the same shapes as the base, or an error naming the first difference."""
        mine, theirs = set(self.checkpoint.names()), set(base.names())
        if mine != theirs:
            missing, extra = sorted(theirs - mine), sorted(mine - theirs)
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the base has not"
            raise WorkbenchError(f"fine-tuned model {what} (another architecture?)", self.path)
        for name in base.names():
            a, b = self.checkpoint.info(name), base.info(name)
            if a.shape != b.shape:
                raise WorkbenchError(f"shape mismatch for {name!r}: {list(a.shape)} here, {list(b.shape)} in the base", self.path)
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise WorkbenchError(f"tensor {name!r} is {a.dtype} here but {b.dtype} in the base", self.path)
        return self


Source = LoraAdapter | FineTune


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
) -> dict:
    """Merge `adapters` into `base` and write a Hugging Face folder at `out`; returns merge.json's dict."""
    started = time.time()
    base, out = Path(base).absolute(), Path(out)
    adapters = [Path(a).absolute() for a in adapters]
    weights = _check_settings(adapters, weights, method, density)
    out_dtype = parse_dtype(dtype)
    torch_device = resolve_device(device)
    max_shard = parse_size(shard_size)
    check_can_write(out, force)
    check_not_input(out, [base, *adapters])

    base_config = _read_model_config(base)
    base_ckpt = open_checkpoint(base)
    tied = bool(base_config.get("tie_word_embeddings", False))
    sources = [_open_source(path, base_ckpt, tied) for path in adapters]
    specs = [
        TensorSpec(name, info.shape, out_dtype if (out_dtype and info.dtype.is_floating_point) else info.dtype)
        for name, info in base_ckpt.infos.items()
    ]
    merger = TensorMerger(base_ckpt, sources, weights, method, density, seed, torch_device)

    with ThreadPoolExecutor(max_workers=1) as pool:  # fingerprints hash while the merge is written
        fingerprints = pool.submit(_fingerprints, base_ckpt, sources)
        with atomic_dir(out, force=force, inputs=[base, *adapters]) as tmp:
            report = write_checkpoint(tmp, plan_shards(specs, max_shard), merger, hash_algos=("sha256",),
                                      description="merging")
            tokenizer_from = _write_side_files(base, sources, base_config, out_dtype, tmp)
            settings = {
                "method": method,
                "weights": weights,
                "density": None if method == "linear" else density,
                "seed": seed if method.startswith("dare") else None,
                "dtype": "auto" if out_dtype is None else DTYPE_CONFIG_NAMES[out_dtype],
                "output_dtypes": sorted({TORCH_TO_SAFETENSORS[s.dtype] for s in specs}),
                "device": str(torch_device),
                "tokenizer_from": tokenizer_from,
            }
            record = _record(base, sources, settings, report, fingerprints.result(), merger.changed, command, started)
            (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


class TensorMerger:
    """The writer's `produce`: the merged value of one base tensor, as a tensor or row blocks."""

    def __init__(self, base: Checkpoint, sources: list[Source], weights: list[float], method: str,
                 density: float, seed: int, device: torch.device):
        self.base, self.sources, self.weights = base, sources, weights
        self.method, self.density, self.seed, self.device = method, density, seed, device
        self.changed = 0
        self._scratch = torch.empty(0, dtype=torch.float32, device=device)

    def __call__(self, spec: TensorSpec) -> torch.Tensor | Iterator[torch.Tensor]:
        tensor = self.base.tensor(spec.name)
        parts = [i for i, source in enumerate(self.sources) if source.touches(spec.name)]
        if not parts or not tensor.dtype.is_floating_point:
            # row blocks even when only copied: the writer's per-block temporaries stay small
            return (_rows(tensor, start, stop).to(spec.dtype) for start, stop in self._blocks(spec))
        self.changed += 1
        if self.method == "linear":
            return (self._linear_rows(spec, parts, start, stop) for start, stop in self._blocks(spec))
        return self._whole(spec, parts)

    def _blocks(self, spec: TensorSpec) -> list[tuple[int, int]]:
        return [(0, 1)] if not spec.shape else row_blocks(spec.shape, torch.float32, BLOCK_BYTES)

    def _linear_rows(self, spec: TensorSpec, parts: list[int], start: int, stop: int) -> torch.Tensor:
        """base + Σ wᵢ·τᵢ for rows [start, stop). When exactly one adapter replaces the tensor
        and its weight is 1, start from its tensor instead: the same sum, and exactly what peft's
        modules_to_save (or a lone fine-tune) gives."""
        base_rows = _rows(self.base.tensor(spec.name), start, stop)
        replacing = [i for i in parts if self.sources[i].replacement(spec.name) is not None]
        anchor = replacing[0] if len(replacing) == 1 and self.weights[replacing[0]] == 1.0 else None
        first = base_rows if anchor is None else _rows(self.sources[anchor].replacement(spec.name), start, stop)
        acc = self._buffer(first.shape)
        acc.copy_(first)
        for i in parts:
            source, weight = self.sources[i], self.weights[i]
            if i in replacing and i != anchor:
                task = self._fetch(_rows(source.replacement(spec.name), start, stop)) - self._fetch(base_rows)
                acc.add_(task, alpha=weight)
            if source.adds_delta(spec.name):
                source.add_delta(acc, spec.name, start, stop, weight)
        return self._finish(spec, acc, base_rows)

    def _whole(self, spec: TensorSpec, parts: list[int]) -> torch.Tensor:
        """TIES / DARE over whole tensors: each participating adapter's full τ, then combine."""
        base = self.base.tensor(spec.name)
        base_full = self._fetch(base)
        rows = spec.shape[0] if spec.shape else 1
        tasks = []
        for i in parts:
            source = self.sources[i]
            replacement = source.replacement(spec.name)
            task = torch.zeros_like(base_full) if replacement is None else self._fetch(replacement) - base_full
            if source.adds_delta(spec.name):
                source.add_delta(task, spec.name, 0, rows, 1.0)
            tasks.append(task)
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, spec.name))
        merged = combine(self.method, tasks, [self.weights[i] for i in parts], self.density, generator)
        del tasks
        return self._finish(spec, merged.add_(base_full), base)

    def _fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        """float32 on the merge device (maybe the read-only mapped view itself: never modify it)."""
        return tensor.to(device=self.device, dtype=torch.float32)

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
        # a float32 sum is finite exactly when every entry is (short of sums near 3e38)
        finite = math.isfinite(float(merged.sum()))
        if finite and spec.dtype == torch.float16:  # fp16 can overflow where float32 does not
            finite = bool(torch.isfinite(result).all())
        if not finite and bool(torch.isfinite(base).all()):
            raise WorkbenchError(
                f"merging gave NaN or inf in {spec.name!r} (an adapter holds NaN/inf, or the sum overflows {spec.dtype})")
        return result.cpu()


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor if tensor.dim() == 0 else tensor[start:stop]


def _check_settings(adapters: list[Path], weights: list[float] | None, method: str, density: float) -> list[float]:
    if not adapters:
        raise WorkbenchError("give at least one --adapter")
    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise WorkbenchError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s)")
    if not all(math.isfinite(w) for w in weights):
        raise WorkbenchError("--weights must be finite numbers")
    if method != "linear" and not 0 < density <= 1:
        raise WorkbenchError(f"--density must be in (0, 1], got {density}")
    return [float(w) for w in weights]


def _read_model_config(folder: Path) -> dict:
    """A model folder's config.json, refusing quantized checkpoints (their weights are not floats)."""
    if not folder.is_dir():
        raise WorkbenchError("expected a model folder (config.json and weights)", folder)
    file = folder / "config.json"
    if not file.is_file():
        raise WorkbenchError("model folder has no config.json", folder)
    config = read_json(file, "config.json")
    if not isinstance(config, dict):
        raise WorkbenchError("config.json is not a JSON object", file)
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise WorkbenchError(f"quantized model ({method}) cannot be merged exactly; merge into the float model", folder)
    return config


def _open_source(path: Path, base: Checkpoint, tied: bool) -> Source:
    if is_lora_adapter(path):
        return read_lora_adapter(path).bind(base, tied_embeddings=tied)
    if (path / "config.json").is_file():
        _read_model_config(path)
        return FineTune(path, open_checkpoint(path)).bind(base)
    raise WorkbenchError("not a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)", path)


def _fingerprints(base: Checkpoint, sources: list[Source]) -> list[dict[str, str]]:
    """sha256 of the base's and every adapter's weight and config files, {relative name: hex}."""
    groups = [[*base.files, base.root / "config.json"], *[s.files for s in sources]]
    roots = [base.root, *[s.path for s in sources]]
    jobs = os.cpu_count() or 1
    result = []
    for root, files in zip(roots, groups):
        names = [Path(os.path.relpath(f, root)).as_posix() for f in files]
        result.append(dict(zip(names, hash_files(files, "sha256", jobs))))
    return result


def _write_side_files(base: Path, sources: list[Source], config: dict, out_dtype: torch.dtype | None,
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


def _record(base: Path, sources: list[Source], settings: dict, report: WriteReport, hashes: list[dict[str, str]],
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
        "versions": {"wb": __version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
    }
