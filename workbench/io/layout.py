"""Which files of a model folder hold its weights: torch-free, so `wb checksum` starts instantly.

Index files are validated here (shard names stay inside the folder, shards are present), whatever
reads them next. Paths are kept as the user gave them (relative stays relative, symlinks are not
resolved), so names print as the user typed them and a hub-cache snapshot of symlinks works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_json
from workbench.io.paths import check_member_name

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Looked for in this order when a folder is given.
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class WeightFiles:
    root: Path
    files: list[Path]
    index_file: Path | None
    weight_map: dict[str, str] | None  # tensor name -> shard name, from the index

    @property
    def names(self) -> list[str]:
        """Each file's name relative to `root`, POSIX style (what checksum lists say)."""
        return [file.relative_to(self.root).as_posix() for file in self.files]


def find_weight_files(path: str | Path) -> WeightFiles:
    """A model folder (sharded or single, safetensors or .bin), an index file, or one weight file."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError("no such file or folder", path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WorkbenchError("not a weight file (expected .safetensors, .bin or an index .json)", path)
        return WeightFiles(path.parent, [path], None, None)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (path / index_name).is_file():
            return _from_index(path / index_name)
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return WeightFiles(path, [path / name], None, None)
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if shards:
        return WeightFiles(path, shards, None, None)
    raise WorkbenchError("no weight files found (model.safetensors, an index, or pytorch_model.bin)", path)


def _from_index(index_file: Path) -> WeightFiles:
    root = index_file.parent
    index = read_json(index_file, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise WorkbenchError("index does not parse: no weight_map object", index_file)
    if not weight_map:
        raise WorkbenchError("index does not parse: weight_map is empty", index_file)
    files: dict[str, Path] = {}
    for shard in weight_map.values():
        name = check_member_name(shard, "index names a shard", index_file)
        files[name] = root / name
    for shard, candidate in sorted(files.items()):  # names are clean now: sortable, inside root
        if not candidate.is_file():
            raise WorkbenchError(f"index names a missing shard {shard!r}", index_file)
    return WeightFiles(root, [files[shard] for shard in sorted(files)], index_file, weight_map)
