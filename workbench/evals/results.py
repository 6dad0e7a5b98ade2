"""The RESULTS.json contract: what `wb eval` writes and `wb report`/`wb compare` read.

One results file is a JSON object with

- `wb_results_version` (RESULTS_VERSION), `name` (a non-empty string);
- lm-eval's own blocks (LM_EVAL_KEYS), each an object keyed by task or group name (an absent one
  reads as empty);
- `generation`: null, or the ROUGE/BLEU block (GENERATION_KEYS at least), with its predictions file;
- `samples_file`: the per-question file beside it, or null;
- `provenance`: an object (model, fingerprints, versions, command, settings).

The writer (`workbench.evals.run`) and the readers (`workbench.report.load`) both take the version
and the keys from here; `check_results` is the one validation a file passes before it is used.
Plain Python: the report reads results without importing lm-eval or torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_json

RESULTS_VERSION = 1
REQUIRED_KEYS = ("wb_results_version", "name", "results", "provenance")
# lm-eval's blocks that map a task name to something, copied as they are; absent ones are read as empty.
LM_EVAL_KEYS = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "configs", "higher_is_better")
GENERATION_KEYS = ("data", "data_sha256", "n", "metrics")


def read_results(path: str | Path) -> dict[str, Any]:
    """A results file's content, checked against the contract (`check_results`)."""
    path = Path(path)
    data = read_json(path, "results file")
    check_results(data, path)
    return data


def check_results(data: Any, path: Path) -> None:
    """Refuse, naming `path`, content that is not a results file this wb reads."""
    if not isinstance(data, dict):
        raise WorkbenchError("not a wb results file: the top level is not a JSON object", path)
    if "wb_results_version" not in data:
        raise WorkbenchError("not a wb results file: no 'wb_results_version' (write one with `wb eval`)", path)
    if data["wb_results_version"] != RESULTS_VERSION:
        raise WorkbenchError(
            f"unsupported wb_results_version {data['wb_results_version']!r} (this wb reads {RESULTS_VERSION})", path
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise WorkbenchError(f"results file lacks {', '.join(repr(k) for k in missing)}", path)
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise WorkbenchError("results file: 'name' must be a non-empty string", path)
    for key in LM_EVAL_KEYS:
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise WorkbenchError(f"results file: {key!r} must be an object", path)
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            raise WorkbenchError(f"results file: results[{task!r}] must be an object", path)
    for group, children in (data.get("group_subtasks") or {}).items():
        if not isinstance(children, list) or not all(isinstance(child, str) for child in children):
            raise WorkbenchError(f"results file: group_subtasks[{group!r}] must be a list of task names", path)
    if not isinstance(data["provenance"], dict):
        raise WorkbenchError("results file: 'provenance' must be an object", path)
    _check_generation(data.get("generation"), path)


def _check_generation(generation: Any, path: Path) -> None:
    if generation is None:
        return
    if not isinstance(generation, dict):
        raise WorkbenchError("results file: 'generation' must be null or an object", path)
    missing = [key for key in GENERATION_KEYS if key not in generation]
    if missing:
        raise WorkbenchError(f"results file: generation lacks {', '.join(repr(k) for k in missing)}", path)
    for key in ("metrics", "stderr"):
        block = generation.get(key)
        if block is not None and not isinstance(block, dict):
            raise WorkbenchError(f"results file: generation.{key} must be an object", path)


def side_file(results_path: Path, name: Any, key: str) -> Path:
    """A file a results file names (`samples_file`, `generation.predictions_file`): only a plain
    file name beside it is accepted."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise WorkbenchError(f"results file: {key} must be a file name beside it, not {name!r}", results_path)
    return results_path.parent / name
