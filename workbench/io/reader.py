"""Open a checkpoint (a model folder or one weight file) without loading it.

Tensors come back one at a time as zero-copy views of memory-mapped files: their pages belong to
the page cache, not the process, so walking a 13B checkpoint costs no more anonymous memory than
the tensors a command computes from them.
"""

from __future__ import annotations

import mmap
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.dtypes import element_size
from workbench.errors import WorkbenchError
from workbench.io.layout import find_weight_files
from workbench.io.paths import safe_join
from workbench.io.safetensors_format import Header, Slot, read_header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * element_size(self.dtype)


class Checkpoint:
    """Lazy, read-only access to the tensors of a safetensors or PyTorch `.bin` checkpoint."""

    def __init__(self, root: Path, files: list[Path], index_file: Path | None):
        self.root = root
        self.files = files
        self.index_file = index_file
        self.format = "safetensors" if files[0].suffix == ".safetensors" else "bin"
        self.headers: dict[Path, Header] = {}
        self._slots: dict[Path, dict[str, Slot]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._state_dicts: dict[Path, dict[str, torch.Tensor]] = {}
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            for info in self._scan(file):
                if info.name in self.infos:
                    raise WorkbenchError(f"tensor {info.name!r} appears in more than one weight file", file)
                self.infos[info.name] = info

    # -- listing -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise WorkbenchError(f"tensor {name!r} is not in this checkpoint", self.root) from None

    def relative(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix() if file.is_relative_to(self.root) else file.name

    @property
    def weight_files(self) -> list[str]:
        return [self.relative(f) for f in self.files]

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    # -- reading -------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """A read-only view of the tensor's bytes in the mapped file (copy before modifying)."""
        info = self.info(name)
        if self.format == "bin":
            return self._state_dict(info.file)[name]
        header = self.headers[info.file]
        slot = self._slots[info.file][name]
        buffer = self._map(info.file)
        if slot.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=slot.nbytes, offset=header.data_start + slot.begin)
        return flat.view(info.dtype).view(info.shape)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.tensor(name)

    def close(self) -> None:
        self._state_dicts.clear()
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view is still alive; the mapping goes when it does
                pass
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _scan(self, file: Path) -> list[TensorInfo]:
        if file.suffix == ".safetensors":
            header = read_header(file)
            self.headers[file] = header
            self._slots[file] = {s.name: s for s in header.slots}
            return [TensorInfo(s.name, s.shape, s.dtype, file) for s in header.slots]
        state = self._state_dict(file)
        return [TensorInfo(n, tuple(t.shape), t.dtype, file) for n, t in state.items()]

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:
                # ACCESS_COPY: private and writable (torch.frombuffer wants a writable buffer),
                # pages are shared with the page cache until written, which nothing here does.
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def _state_dict(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._state_dicts:
            self._state_dicts[file] = load_bin(file)
        return self._state_dicts[file]


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """`torch.load` with mmap and weights_only; a pickle that holds anything but tensors is refused."""
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(exc, file) from None
    except RuntimeError as exc:
        text = str(exc)
        if "mmap" in text and "zipfile" in text:  # the legacy (pre-1.6) format cannot be mapped
            state = _load_legacy_bin(file)
        else:
            raise _damaged(exc, file) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a damaged file
        raise _damaged(exc, file) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WorkbenchError("not a state dict of tensors", file)
    return state


def _load_legacy_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(exc, file) from None
    except Exception as exc:  # noqa: BLE001 - any failure here means a damaged file
        raise _damaged(exc, file) from None


def _first_line(exc: BaseException, default: str) -> str:
    """torch's messages run to several lines of advice; the first says what happened."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # "Weights only load failed. <advice>\n\nTrying to load unsupported GLOBAL posix.system ...": keep the
    # line naming the object; else the first sentence
    detail = next((line for line in lines if line.startswith(("WeightsUnpickler error", "Unsupported", "Trying to"))),
                  None)
    return (detail or (lines[0] if lines else default)).split(". ")[0].rstrip(".")


def _refused_pickle(exc: BaseException, file: Path) -> WorkbenchError:
    reason = _first_line(exc, "unsupported object")
    return WorkbenchError(f"refusing to unpickle: weights_only=True rejected this file ({reason})", file)


def _damaged(exc: BaseException, file: Path) -> WorkbenchError:
    return WorkbenchError(f"cannot read PyTorch checkpoint, truncated or damaged: {_first_line(exc, type(exc).__name__)}",
                          file)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model folder (sharded or single, safetensors or .bin), an index, or one weight file."""
    found = find_weight_files(path)
    checkpoint = Checkpoint(found.root, found.files, found.index_file)
    if found.weight_map is not None:
        _check_index(checkpoint, found.weight_map)
    return checkpoint


def _check_index(checkpoint: Checkpoint, weight_map: dict[str, str]) -> None:
    for name, shard in weight_map.items():
        if name not in checkpoint.infos:
            raise WorkbenchError(f"index says {name!r} is in {shard!r} but it is not there", checkpoint.index_file)
        if checkpoint.infos[name].file != safe_join(checkpoint.root, shard, "index names a shard", checkpoint.index_file):
            raise WorkbenchError(f"index says {name!r} is in {shard!r} but it is in another shard", checkpoint.index_file)
    if len(checkpoint.infos) != len(weight_map):
        extra = sorted(set(checkpoint.infos) - set(weight_map))[:3]
        raise WorkbenchError(f"shards hold tensors the index does not list: {extra}", checkpoint.index_file)
