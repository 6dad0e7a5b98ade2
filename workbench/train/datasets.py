"""`--data NAME --dataset-dir DIR`: dataset names -> files through LLaMA-Factory's dataset_info.json.

An item of --data that is an existing file is read as a file (format detected); any other item is
a name in DIR/dataset_info.json (DIR: --dataset-dir, else ./data when ./data/dataset_info.json
exists, as LLaMA-Factory does). An entry's `file_name` (a file, or a folder of .json/.jsonl files)
must stay inside DIR; `formatting` (alpaca, sharegpt), `columns`, `tags` and `ranking` are kept for
the reader (data.py; the preference stage reads `ranking` sources). Entries that only name a hub
dataset (hf_hub_url, ms_hub_url, ...) are refused: wb reads local files only.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_json
from workbench.io.paths import safe_join

REGISTRY = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
COLUMN_KEYS = ("prompt", "query", "response", "history", "system", "messages", "tools", "chosen", "rejected",
               "kto_tag", "images", "videos", "audios")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "subset", "split", "folder", "num_samples",
              "file_sha1", *HUB_KEYS}
DATA_SUFFIXES = (".json", ".jsonl")


def shown_names(names, limit: int = 200) -> str:
    """Names read from a file, for an error line: comma-separated, clipped to `limit` characters; one that is
    not printable text is shown quoted (repr escapes a crafted newline, so the message stays one line)."""
    text = ", ".join(n if isinstance(n, str) and n.isprintable() else repr(n) for n in names)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class DataSource:
    """One file to read and how: a plain --data file (the defaults) or a dataset_info.json entry."""

    path: Path                 # the file to read
    name: str | None = None    # dataset_info name, None for a plain file
    formatting: str = "auto"   # "auto" | "alpaca" | "sharegpt" (plain files: "auto")
    columns: dict[str, str] = field(default_factory=dict)  # LLaMA-Factory column map (empty: the format's defaults)
    tags: dict[str, str] = field(default_factory=dict)     # LLaMA-Factory sharegpt tags (empty: defaults)
    ranking: bool = False      # a preference dataset (chosen/rejected)


def default_dataset_dir(cwd: Path | None = None) -> Path | None:
    """./data when it holds a dataset_info.json (LLaMA-Factory's default dataset_dir), else None."""
    folder = (cwd or Path.cwd()) / "data"
    return Path("data") if (folder / REGISTRY).is_file() else None


def resolve_sources(items: Sequence[str | Path], dataset_dir: Path | None) -> list[DataSource]:
    """Each item: an existing file as is, else a dataset name of `dataset_dir`'s dataset_info.json."""
    registry: dict | None = None
    folder = dataset_dir if dataset_dir is not None else default_dataset_dir()
    sources: list[DataSource] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            sources.append(DataSource(path, None, "auto", {}, {}, False))
            continue
        if folder is None:
            raise WorkbenchError("no such data file, and no --dataset-dir (nor ./data/dataset_info.json) to look "
                                 "it up as a dataset name", str(item))
        if registry is None:
            registry = read_registry(folder)
        sources += _entry_sources(str(item), registry, folder)
    return sources


def read_registry(folder: Path) -> dict:
    """dataset_info.json of `folder`: an object of objects."""
    path = Path(folder) / REGISTRY
    if not path.is_file():
        raise WorkbenchError(f"--dataset-dir has no {REGISTRY}", folder)
    registry = read_json(path, REGISTRY, allow_nan=False)
    if not isinstance(registry, dict):
        raise WorkbenchError(f"{REGISTRY} must be an object of dataset entries, not {type(registry).__name__}", path)
    return registry


def _entry_sources(name: str, registry: dict, folder: Path) -> list[DataSource]:
    where = Path(folder) / REGISTRY
    if name not in registry:
        close = difflib.get_close_matches(name, [str(k) for k in registry], n=5, cutoff=0.5)
        hint = f"; close names: {shown_names(close)}" if close else ""
        raise WorkbenchError(f"no data file and no dataset named {name!r} in {REGISTRY}{hint}", where)
    entry = registry[name]
    if not isinstance(entry, dict):
        raise WorkbenchError(f"dataset {name!r} is a {type(entry).__name__}, not an object", where)
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise WorkbenchError(f"dataset {name!r} has unknown key(s) {shown_names(unknown)}", where)
    if "file_name" not in entry:
        hub = next((k for k in HUB_KEYS if k in entry), None)
        if hub:
            raise WorkbenchError(f"dataset {name!r} is a hub dataset ({hub}: {shown_names([entry[hub]])}), not available offline; "
                                 "download it and name its file in file_name", where)
        raise WorkbenchError(f"dataset {name!r} has no file_name", where)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise WorkbenchError(f"dataset {name!r}: formatting {formatting!r} is not supported; use alpaca or sharegpt",
                             where)
    columns = _string_map(entry.get("columns", {}), COLUMN_KEYS, f"dataset {name!r} columns", where)
    tags = _string_map(entry.get("tags", {}), TAG_KEYS, f"dataset {name!r} tags", where)
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise WorkbenchError(f"dataset {name!r}: ranking must be true or false", where)
    for key in ("images", "videos", "audios"):
        if key in columns:
            raise WorkbenchError(f"dataset {name!r} has {key}: multimodal data is not supported by wb train", where)
    if "kto_tag" in columns:
        raise WorkbenchError(f"dataset {name!r} is a KTO dataset (kto_tag): KTO is not implemented", where)
    target = safe_join(Path(folder), entry["file_name"], "file_name", where)
    return [DataSource(path, name, formatting, columns, tags, ranking) for path in _files(target, name, where)]


def _string_map(value, keys: tuple[str, ...], what: str, where: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) and v and v.isprintable() for v in value.values()):
        raise WorkbenchError(f"{what} must be an object of names", where)
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise WorkbenchError(f"{what}: unknown key(s) {shown_names(unknown)} (known: {', '.join(keys)})", where)
    return dict(value)


def _files(target: Path, name: str, where: Path) -> list[Path]:
    if target.is_file():
        return [target]
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise WorkbenchError(f"dataset {name!r}: its folder has no .json or .jsonl files", target)
        return files
    raise WorkbenchError(f"dataset {name!r}: file_name does not exist", target)
