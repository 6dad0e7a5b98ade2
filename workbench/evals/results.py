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
A results file may be crafted, so the check covers every field the report and `wb compare` read,
with its type and range, and the report trusts what passed it:

- a figure (score, standard error) is a finite number with |x| <= FIGURE_LIMIT (a standard error
  also >= 0), or null, a string (lm-eval's "N/A") or NaN, which all mean "no figure"; the limit
  keeps every difference and squared standard error the report computes finite;
- a count (sample_len, n-shot, n-samples, generation.n) is a whole number from 0 to FIGURE_LIMIT;
- names and texts are strings, blocks are objects, lists of names are lists of strings;
- group_subtasks describes a tree: no group is its own subtask, nesting and size are bounded;
- all text is valid Unicode (no lone surrogates) and nothing nests deeper than MAX_NESTING.

The same rules check the predictions and samples files' rows (`check_prediction_row`,
`check_sample_row`); `Checker` serves the report's other inputs (a `wb train` folder).
Plain Python: the report reads results without importing lm-eval or torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_json

RESULTS_VERSION = 1
REQUIRED_KEYS = ("wb_results_version", "name", "results", "provenance")
# lm-eval's blocks that map a task name to something, copied as they are; absent ones are read as empty.
LM_EVAL_KEYS = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "configs", "higher_is_better")
GENERATION_KEYS = ("data", "data_sha256", "n", "metrics")

FIGURE_LIMIT = 1e12  # far beyond any score, count or loss; its square (a variance) is still far from overflow
MAX_NESTING = 64  # lm-eval's task configs nest a few levels
MAX_GROUP_DEPTH = 16  # group_subtasks: mmlu is 2 deep
MAX_TREE_ROWS = 50_000  # group_subtasks expanded into the report's tree of rows
LIMIT_TEXT = "1e12"  # FIGURE_LIMIT as messages write it
FILE_NAME_BYTES = 255
PROVENANCE_TEXTS = ("model", "adapter", "dtype", "device", "started", "command")
# Settings that change the prompts a model sees, hence its scores: two results made with different values are
# not compared (as a different n-shot is not). BACKENDS: `wb eval --backend`.
PROMPT_SETTINGS = ("system_prompt", "fewshot_as_multiturn")
BACKENDS = ("hf", "vllm")


def recorded_setting(settings: Mapping[str, Any], key: str) -> Any:
    """A setting of `provenance.settings`, with what a results file written before wb recorded it means.

    Before `--system-prompt`/`--fewshot-as-multiturn`/`--backend` existed, wb ran lm-eval's hf model with no
    system instruction and left fewshot_as_multiturn at simple_evaluate's default, True, which matters only
    with a chat template: an older file reads as system_prompt None, backend "hf", and fewshot_as_multiturn
    true exactly where it asked for the chat template.
    """
    if key in settings:
        return settings[key]
    if key == "fewshot_as_multiturn":
        return settings.get("chat_template") is True
    return {"system_prompt": None, "backend": "hf"}.get(key)


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
    version = data["wb_results_version"]
    if type(version) is not int or version != RESULTS_VERSION:
        raise WorkbenchError(f"unsupported wb_results_version {_shown(version)} (this wb reads {RESULTS_VERSION})",
                             path)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise WorkbenchError(f"results file lacks {', '.join(repr(k) for k in missing)}", path)
    check = Checker("results file", path)
    check.tree(data)
    if not isinstance(data["name"], str) or not data["name"].strip():
        check.fail("'name'", "must be a non-empty string")
    for key in LM_EVAL_KEYS:
        value = data.get(key)
        if (value is not None or key == "results") and not isinstance(value, dict):
            check.fail(repr(key), "must be an object")
    for key in ("results", "groups"):
        for task, entry in (data.get(key) or {}).items():
            _check_task_entry(check, f"{key}[{_key(task)}]", entry)
    _check_task_maps(check, data)
    _check_provenance(check, data["provenance"])
    _check_generation(check, data.get("generation"))
    if data.get("samples_file") is not None:
        check.file_name(data["samples_file"], "'samples_file'")


def _check_task_entry(check: Checker, where: str, entry: Any) -> None:
    """One task's or group's figures: `acc,none`, `acc_stderr,none`, sample_len, alias, ...

    The report takes any key with a number (bookkeeping keys aside) as a metric, so every number
    is checked as a figure; a `metric,filter` key holds a figure or a placeholder, nothing else.
    """
    check.mapping(entry, where)
    for key, value in entry.items():
        at = f"{where}[{_key(key)}]"
        if key == "alias":
            check.text(value, at)
        elif key == "sample_len":
            check.count(value, at)
        elif key == "sample_count":
            if value is not None:
                for metric, count in check.mapping(value, at).items():
                    check.count(count, f"{at}[{_key(metric)}]")
        elif key in ("name", "samples"):
            continue  # bookkeeping the report does not read
        elif "," in key or _is_numeric(value):
            check.figure(value, at, low=0.0 if "_stderr," in key else -FIGURE_LIMIT)


def _check_task_maps(check: Checker, data: dict[str, Any]) -> None:
    children: dict[str, list[str]] = {}
    for group, subtasks in (data.get("group_subtasks") or {}).items():
        if not isinstance(subtasks, list) or not all(isinstance(child, str) for child in subtasks):
            check.fail(f"group_subtasks[{_key(group)}]", "must be a list of task names")
        children[group] = subtasks
    problem = subtask_problem(children)
    if problem:
        check.fail("'group_subtasks'", problem)
    for task, shots in (data.get("n-shot") or {}).items():
        check.count(shots, f"n-shot[{_key(task)}]")
    for task, counts in (data.get("n-samples") or {}).items():
        where = f"n-samples[{_key(task)}]"
        for key in ("original", "effective"):
            check.count(check.mapping(counts, where).get(key), f"{where}[{key!r}]")
    for task, version in (data.get("versions") or {}).items():
        if not isinstance(version, str):
            check.number(version, f"versions[{_key(task)}]", "must be a string, a finite number or null")
    for task, config in (data.get("configs") or {}).items():
        check.mapping(config, f"configs[{_key(task)}]")
    for task, directions in (data.get("higher_is_better") or {}).items():
        where = f"higher_is_better[{_key(task)}]"
        for metric, value in check.mapping(directions, where).items():
            if value is not None and not isinstance(value, bool):
                check.fail(f"{where}[{_key(metric)}]", "must be true, false or null")


def subtask_problem(children: Mapping[str, Iterable[str]]) -> str | None:
    """Why lm-eval's group_subtasks (group -> subtask names) cannot be shown as a tree of rows:
    a group that is its own subtask, nesting deeper than MAX_GROUP_DEPTH, or more than
    MAX_TREE_ROWS rows once expanded; None when it can."""
    height: dict[str, int] = {}
    rows: dict[str, int] = {}
    visiting: set[str] = set()
    for root in children:
        if root in height:
            continue
        stack = [(root, iter(children[root]))]
        visiting.add(root)
        while stack:
            node, pending = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                visiting.discard(node)
                subtasks = list(children[node])
                height[node] = 1 + max((height[c] for c in subtasks), default=0)
                rows[node] = 1 + sum(rows[c] for c in subtasks)
                if height[node] > MAX_GROUP_DEPTH:
                    return f"nests groups more than {MAX_GROUP_DEPTH} deep (under {_key(node)})"
                if rows[node] > MAX_TREE_ROWS:
                    return f"expands to more than {MAX_TREE_ROWS} rows (under {_key(node)})"
            elif child in visiting:
                return f"makes {_key(child)} a subtask of itself"
            elif child not in height:
                if child in children:
                    visiting.add(child)
                    stack.append((child, iter(children[child])))
                else:
                    height[child], rows[child] = 1, 1
    return None


def _check_provenance(check: Checker, provenance: Any) -> None:
    check.mapping(provenance, "'provenance'")
    for key in PROVENANCE_TEXTS:
        check.text(provenance.get(key), f"provenance[{key!r}]")
    check.number(provenance.get("duration_s"), "provenance['duration_s']", low=0.0)
    for key in ("model_files", "adapter_files", "versions"):  # name -> sha256 / version
        if provenance.get(key) is not None:
            for name, value in check.mapping(provenance[key], f"provenance[{key!r}]").items():
                check.text(value, f"provenance[{key!r}][{_key(name)}]")
    if provenance.get("settings") is None:
        return
    settings = check.mapping(provenance["settings"], "provenance['settings']")
    at = "provenance['settings'][{!r}]".format
    check.names(settings.get("tasks"), at("tasks"))
    check.count(settings.get("num_fewshot"), at("num_fewshot"))
    check.count(settings.get("max_new_tokens"), at("max_new_tokens"))
    check.number(settings.get("limit"), at("limit"), low=0.0)
    check.text(settings.get("gen_data"), at("gen_data"), path=True)
    data_dir = settings.get("data_dir")
    if isinstance(data_dir, dict):
        for name, folder in data_dir.items():
            check.text(folder, f"{at('data_dir')}[{_key(name)}]", path=True)
    else:
        check.names(data_dir, at("data_dir"), path=True)
    if not isinstance(settings.get("batch_size"), str):
        check.count(settings.get("batch_size"), at("batch_size"))
    if not isinstance(settings.get("chat_template"), (bool, str, type(None))):
        check.fail(at("chat_template"), "must be true, false, a string or null")
    check.text(settings.get("system_prompt"), at("system_prompt"))
    if not isinstance(settings.get("fewshot_as_multiturn", False), bool):
        check.fail(at("fewshot_as_multiturn"), "must be true or false")
    if settings.get("backend", "hf") not in BACKENDS:
        check.fail(at("backend"), f"must be one of {', '.join(BACKENDS)}, not {_shown(settings.get('backend'))}")
    check.count(settings.get("max_model_len"), at("max_model_len"))


def _check_generation(check: Checker, generation: Any) -> None:
    if generation is None:
        return
    if not isinstance(generation, dict):
        check.fail("'generation'", "must be null or an object")
    missing = [key for key in GENERATION_KEYS if key not in generation]
    if missing:
        check.fail("generation", f"lacks {', '.join(repr(k) for k in missing)}")
    for key in ("data", "data_sha256"):
        if not isinstance(generation[key], str):
            check.fail(f"generation[{key!r}]", "must be a string")
    if generation["n"] is None:
        check.fail("generation['n']", f"must be a whole number from 0 to {LIMIT_TEXT}")
    check.count(generation["n"], "generation['n']")
    check.count(generation.get("max_new_tokens"), "generation['max_new_tokens']")
    for key, low in (("metrics", -FIGURE_LIMIT), ("stderr", 0.0)):
        block = generation.get(key)
        if block is None and key == "stderr":
            continue
        for metric, value in check.mapping(block, f"generation[{key!r}]").items():
            check.figure(value, f"generation[{key!r}][{_key(metric)}]", low=low)
    if generation.get("predictions_file") is not None:
        check.file_name(generation["predictions_file"], "generation['predictions_file']")


# -- the side files ---------------------------------------------------------------------------------
def check_prediction_row(row: dict[str, Any], line: int, path: Path) -> None:
    """One line of a predictions file: id, prompt, reference, prediction and per-sample scores."""
    check = Checker("predictions file", path)
    check.tree(row, f"line {line}")
    identifier = row.get("id")
    if identifier is not None and not isinstance(identifier, str) and not _is_whole(identifier):
        check.fail(f"line {line} 'id'", "must be a string, a whole number or null")
    for key in ("prompt", "reference", "prediction"):
        check.text(row.get(key), f"line {line} {key!r}")
    for key, value in row.items():
        if key != "id" and _is_numeric(value):
            check.figure(value, f"line {line} {_key(key)}")


def check_sample_row(row: dict[str, Any], line: int, path: Path) -> None:
    """One line of a samples file; the report reads its task and doc_hash."""
    check = Checker("samples file", path)
    check.tree(row, f"line {line}")
    for key in ("task", "doc_hash"):
        check.text(row.get(key), f"line {line} {key!r}")


def side_file(results_path: Path, name: Any, key: str) -> Path:
    """A file a results file names (`samples_file`, `generation.predictions_file`): only a plain
    file name beside it is accepted."""
    if not _is_file_name(name):
        raise WorkbenchError(f"results file: {key} must be a file name beside it, not {_shown(name)}", results_path)
    return results_path.parent / name


def _is_file_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\x00" not in name
            and len(name.encode("utf-8", "surrogatepass")) <= FILE_NAME_BYTES)


# -- the checks -------------------------------------------------------------------------------------
class Checker:
    """Type and range checks that refuse with one line: `<what>: <where> <problem> (<path>)`."""

    def __init__(self, what: str, path: Path):
        self.what, self.path = what, path

    def fail(self, where: str, problem: str):
        raise WorkbenchError(f"{self.what}: {where} {problem}", self.path)

    def tree(self, data: Any, where: str = "") -> None:
        """Every string (key or value) valid Unicode, nothing nested deeper than MAX_NESTING."""
        stack: list[tuple[Any, int, tuple]] = [(data, 0, ())]
        while stack:
            value, depth, trail = stack.pop()
            if isinstance(value, str):
                if not _is_unicode(value):
                    self.fail(_trail(where, trail), "holds text that is not valid Unicode (a lone surrogate)")
            elif isinstance(value, (dict, list)):
                if depth >= MAX_NESTING:
                    self.fail(_trail(where, trail), f"nests more than {MAX_NESTING} levels deep")
                items = value.items() if isinstance(value, dict) else enumerate(value)
                for key, item in items:
                    if isinstance(key, str) and not _is_unicode(key):
                        self.fail(_trail(where, trail), "has a key that is not valid Unicode (a lone surrogate)")
                    stack.append((item, depth + 1, (*trail, key)))

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, "must be an object")
        return value

    def text(self, value: Any, where: str, *, path: bool = False) -> None:
        """A string or null; `path`: one that names a file or folder (no NUL, which no path holds)."""
        if value is not None and not isinstance(value, str):
            self.fail(where, f"must be a string or null, not {_shown(value)}")
        if path and value is not None and "\x00" in value:
            self.fail(where, "must be a path, not text with a NUL character")

    def names(self, value: Any, where: str, *, path: bool = False) -> None:
        """A name, a list of names, or null."""
        if value is None or isinstance(value, str):
            self.text(value, where, path=path)
            return
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(where, "must be a string, a list of strings or null")
        for index, item in enumerate(value):
            self.text(item, f"{where}[{index}]", path=path)

    def number(self, value: Any, where: str, problem: str = "", *, low: float = -FIGURE_LIMIT) -> None:
        """Null or a finite number in [low, FIGURE_LIMIT]."""
        if value is None:
            return
        if not _in_range(value, low):
            self.fail(where, problem or f"must be a finite number {_bounds(low)} or null, not {_shown(value)}")

    def figure(self, value: Any, where: str, *, low: float = -FIGURE_LIMIT) -> None:
        """A score or standard error: a finite number in [low, FIGURE_LIMIT]; null, a string such as
        lm-eval's "N/A", or NaN mean there is none."""
        if value is None or isinstance(value, str) or (isinstance(value, float) and math.isnan(value)):
            return
        if not _in_range(value, low):
            self.fail(where, f"must be a finite number {_bounds(low)}, not {_shown(value)}")

    def count(self, value: Any, where: str) -> None:
        """Null or a whole number from 0 to FIGURE_LIMIT."""
        if value is not None and not (_is_whole(value) and 0 <= value <= FIGURE_LIMIT):
            self.fail(where, f"must be a whole number from 0 to {LIMIT_TEXT}, not {_shown(value)}")

    def file_name(self, value: Any, where: str) -> None:
        if not _is_file_name(value):
            self.fail(where, f"must be a file name beside it, not {_shown(value)}")


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: Any, low: float) -> bool:
    """A number (an int of any size, a finite float) in [low, FIGURE_LIMIT]."""
    return _is_numeric(value) and (isinstance(value, int) or math.isfinite(value)) and low <= value <= FIGURE_LIMIT


def _bounds(low: float) -> str:
    return f"from 0 to {LIMIT_TEXT}" if low == 0 else f"with |x| <= {LIMIT_TEXT}"


def _is_whole(value: Any) -> bool:
    return _is_numeric(value) and (isinstance(value, int) or (math.isfinite(value) and value.is_integer()))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key(key: Any, limit: int = 60) -> str:
    """A key as the messages show it: repr, cut short (a crafted name may be long)."""
    text = ascii(key) if isinstance(key, str) and not _is_unicode(key) else repr(key)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _shown(value: Any) -> str:
    """A value in a message: scalars as they are (cut short), containers by their kind."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    return _key(value, 40)


def _trail(where: str, trail: tuple, shown: int = 8) -> str:
    """`where` then the path to a node, as `provenance['settings']['x'][0]` (cut short when deep)."""
    if not trail:
        return where or "the top level"
    head, rest = trail[0], trail[1:shown]
    path = _key(head) if not rest or not isinstance(head, str) or not _is_unicode(head) else head
    path += "".join(f"[{_key(step)}]" for step in rest) + ("…" if len(trail) > shown else "")
    return f"{where} {path}" if where else path
