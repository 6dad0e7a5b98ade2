"""Read and validate what the other commands write: results files, train folders, merge/diff records.

Every reader refuses a file it cannot use with a `WorkbenchError` naming that file, so that a
report is never rendered from half-understood input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.evals.results import (
    Checker,
    check_prediction_row,
    check_sample_row,
    read_results,
    side_file,
)
from workbench.io.hashing import sha256_file
from workbench.io.jsonfile import parse_json, read_json
from workbench.provenance import file_fingerprints

SIDE_RECORDS = ("merge.json", "weight_diff.json")
TRAIN_LOG_FIGURES = ("loss", "eval_loss", "tokens_per_s", "rewards/margins", "eval_rewards/margins")  # what the
# report reads from trainer_log.jsonl (the margins: a preference run's)


@dataclass
class ModelResults:
    """One `wb eval` results file, validated (`evals.results`), with its predictions and sample hashes."""

    path: Path
    name: str
    data: dict[str, Any]
    sha256: str
    predictions: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)
    doc_hashes: dict[str, frozenset[str]] | None = None

    def section(self, key: str) -> dict[str, Any]:
        return self.data.get(key) or {}

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        return self.section("results")

    @property
    def group_subtasks(self) -> dict[str, list[str]]:
        return self.section("group_subtasks")

    @property
    def generation(self) -> dict[str, Any] | None:
        return self.data.get("generation")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.section("provenance")

    @property
    def settings(self) -> dict[str, Any]:
        return self.provenance.get("settings") or {}

    def n_shot(self, task: str) -> Any:
        return self.section("n-shot").get(task)

    def n_samples(self, task: str) -> dict[str, Any]:
        entry = self.section("n-samples").get(task)
        return entry if isinstance(entry, dict) else {}


@dataclass
class TrainRun:
    """A `wb train` output folder."""

    path: Path
    args: dict[str, Any]
    log: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    adapter_config: dict[str, Any] | None
    adapter_files: dict[str, str]


def read_jsonl(path: Path, what: str,
               check: Callable[[dict[str, Any], int, Path], None] | None = None) -> list[dict[str, Any]]:
    """Parse a JSON-lines file whose every line is an object; `check(row, line, path)` refuses a row."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = parse_json(line, f"{what}: line {number} is not valid JSON", path)
                if not isinstance(row, dict):
                    raise WorkbenchError(f"{what}: line {number} is not a JSON object", path)
                if check is not None:
                    check(row, number, path)
                rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read {what}: {exc}", path) from None
    return rows


def is_number(value: Any) -> bool:
    """A real figure: int or float (not bool, not NaN or infinite, not lm-eval's "N/A")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))  # an int may be too large for a float


def load_results(path: str | Path) -> ModelResults:
    """Read a `wb eval` results file and the predictions and samples files it names."""
    path = Path(path)
    data = read_results(path)
    results = ModelResults(path=path, name=data["name"], data=data, sha256=sha256_file(path))
    generation = data.get("generation")
    if generation and generation.get("predictions_file"):
        side = side_file(path, generation["predictions_file"], "generation.predictions_file")
        if side.is_file():
            results.predictions = read_jsonl(side, "predictions file", check_prediction_row)
        else:
            results.notes.append(f"predictions file {side.name} is missing, so no generation samples are shown")
    if data.get("samples_file"):
        side = side_file(path, data["samples_file"], "samples_file")
        if side.is_file():
            results.doc_hashes = _doc_hashes(read_jsonl(side, "samples file", check_sample_row))
        else:
            results.notes.append(f"samples file {side.name} is missing, so documents cannot be compared")
    return results


def _doc_hashes(rows: list[dict[str, Any]]) -> dict[str, frozenset[str]]:
    by_task: dict[str, set[str]] = {}
    for row in rows:
        task, doc_hash = row.get("task"), row.get("doc_hash")
        if isinstance(task, str) and isinstance(doc_hash, str):
            by_task.setdefault(task, set()).add(doc_hash)
    return {task: frozenset(hashes) for task, hashes in by_task.items()}


def unique_names(models: list[ModelResults]) -> None:
    """Two files naming the same model (say 0-shot and 5-shot runs) get their file stem appended."""
    counts: dict[str, int] = {}
    for model in models:
        counts[model.name] = counts.get(model.name, 0) + 1
    seen: set[str] = set()
    for model in models:
        if counts[model.name] > 1:
            model.name = f"{model.name} [{model.path.stem}]"
        if model.name in seen:
            raise WorkbenchError(f"two results files have the same name {model.name!r}; give one another file name",
                                 model.path)
        seen.add(model.name)


def load_train_run(path: str | Path) -> TrainRun:
    """Read a `wb train` output folder: options, log, final metrics, adapter config and hashes."""
    path = Path(path)
    if not path.is_dir():
        raise WorkbenchError("not a `wb train` output folder", path)
    args = read_json(path / "train_args.json", "train_args.json")
    if not isinstance(args, dict):
        raise WorkbenchError("train_args.json is not a JSON object", path / "train_args.json")
    Checker("train_args.json", path / "train_args.json").tree(args)
    log_path = path / "trainer_log.jsonl"
    if not log_path.is_file():
        raise WorkbenchError("not a `wb train` output folder: trainer_log.jsonl is missing", path)
    log = read_jsonl(log_path, "trainer_log.jsonl", _check_log_row)
    metrics = _optional_object(path / "metrics.json")
    adapter_config = _optional_object(path / "adapter_config.json")
    adapter_files = file_fingerprints(path, [file for file in sorted(path.glob("adapter_model.*")) if file.is_file()])
    return TrainRun(path, args, log, metrics, adapter_config, adapter_files)


def _check_log_row(row: dict[str, Any], line: int, path: Path) -> None:
    """A trainer_log.jsonl row: a whole step, and losses and speeds the chart can scale.

    A diverged run logs NaN or infinite losses, which the chart leaves out; a finite figure is
    held to the results files' range so that the axes' arithmetic stays finite.
    """
    check = Checker("trainer_log.jsonl", path)
    check.tree(row, f"line {line}")
    if not is_number(row.get("step")):
        check.fail(f"line {line}", "has no numeric 'step'")
    check.count(row["step"], f"line {line} 'step'")
    for key in TRAIN_LOG_FIGURES:
        value = row.get(key)
        if not (isinstance(value, float) and not math.isfinite(value)):
            check.number(value, f"line {line} {key!r}")


def _optional_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = read_json(path, path.name)
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path.name} is not a JSON object", path)
    Checker(path.name, path).tree(data)
    return data


def load_side_record(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """The merge.json or weight_diff.json that `wb merge`/`wb recover`/`wb diff` leave in a folder."""
    root = folder if folder.is_dir() else folder.parent
    for name in SIDE_RECORDS:
        record = _optional_object(root / name)
        if record is not None:
            return name, record
    return None
