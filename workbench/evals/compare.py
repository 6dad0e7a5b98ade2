"""`wb compare`: evaluate a base and its fine-tunes with the same settings, then render one report.

The output folder collects one results file per model (`<model-name>.json`, with its samples and
predictions files) and `index.html`. A results file already there is re-used when it was made from
the same weights (sha256 of every weight file, as `provenance.model_files`/`adapter_files`) with
the same settings (`provenance.settings`), so adding a model to a comparison evaluates only that
model. A results file made otherwise is never replaced without `force`.

Models: `base`, then each `tuned` folder, then `base` + each `adapter` (evaluated unmerged, named
`<base>+<adapter>`). The base is the report's baseline. An adapter folder written by `wb train`
also adds its training run (loss curve, options, tokens/s) to the report.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.evals.results import PROMPT_SETTINGS, recorded_setting
from workbench.evals.tasks import canonical
from workbench.io.hashing import sha256_file
from workbench.outputs import check_not_input
from workbench.provenance import versions, weight_fingerprints
from workbench.report.load import ModelResults, load_results
from workbench.report.render import render_report

REPORT_NAME = "index.html"


@dataclass(frozen=True)
class Candidate:
    name: str
    model: Path
    adapter: Path | None

    @property
    def filename(self) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]", "_", self.name) + ".json"


@dataclass
class CompareResult:
    report: Path
    results: list[Path]
    evaluated: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"report": str(self.report), "results": [str(p) for p in self.results],
                "evaluated": self.evaluated, "reused": self.reused}

    def lines(self) -> list[str]:
        return [str(self.report)]


def candidates(base: Path, tuned: Sequence[Path], adapters: Sequence[Path]) -> list[Candidate]:
    """The models to evaluate, each with a name that is unique within the comparison."""
    found = [Candidate(_folder_name(base), base, None)]
    found += [Candidate(_folder_name(t), t, None) for t in tuned]
    found += [Candidate(f"{_folder_name(base)}+{_folder_name(a)}", base, a) for a in adapters]
    taken: set[str] = set()
    unique = []
    for candidate in found:
        name, count = candidate.name, 1
        while name in taken:
            count += 1
            name = f"{candidate.name}-{count}"
        taken.add(name)
        unique.append(Candidate(name, candidate.model, candidate.adapter))
    return unique


def _folder_name(path: Path) -> str:
    return Path(path).resolve().name


PER_MODEL = ("adapter", "out", "force", "command", "check_only")  # evaluate's options that compare sets itself


def compare(
    base: str | Path,
    *,
    tuned: Sequence[str | Path] = (),
    adapters: Sequence[str | Path] = (),
    out: str | Path,
    force: bool = False,
    title: str | None = None,
    max_samples: int = 10,
    command: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    **evaluation: Any,
) -> CompareResult:
    """Evaluate (or re-use) every model, then write `out/index.html`; `force` re-evaluates everything.

    `evaluation`: `workbench.evals.run.evaluate`'s keyword options (tasks, data_dir, gen_data, ..., backend,
    cache), with its defaults, the same for every model. Those that change what is scored (tasks, shots,
    system prompt, backend, ...) decide whether a results file is re-used; those that only place the work
    (cache, parallelize, memory, tensor/data parallel sizes) do not.
    """
    if not tuned and not adapters:
        raise WorkbenchError("nothing to compare: give a tuned model or an adapter")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError("--out must be a folder", out)
    eval_kwargs = _evaluation_options(evaluation)
    check_not_input(out, [base, *tuned, *adapters, eval_kwargs["gen_data"],
                          *(spec.split("=", 1)[-1] for spec in eval_kwargs["data_dir"])])
    result = CompareResult(out / REPORT_NAME, [])
    # The base shared by every candidate is hashed once per comparison, not once per candidate.
    weight_hashes = functools.cache(weight_fingerprints)
    todo = []
    for candidate in candidates(Path(base), [Path(t) for t in tuned], [Path(a) for a in adapters]):
        path = out / candidate.filename
        result.results.append(path)
        if path.exists() and not force:
            reasons = reuse_mismatches(load_results(path), candidate, eval_kwargs, weight_hashes)
            if not reasons:
                log(f"re-using {path} ({candidate.name}: same weights and settings)")
                result.reused.append(candidate.name)
                continue
            raise WorkbenchError(f"{path.name} differs from this comparison in: {', '.join(reasons)}; pass --force "
                                 "to re-evaluate and replace it, or choose another --out", path)
        todo.append((candidate, path))
    if todo:
        _check_options(eval_kwargs)
    _check_candidates([candidate for candidate, _ in todo], eval_kwargs["trust_remote_code"])
    for candidate, path in todo:
        log(f"evaluating {candidate.name}")
        _run_evaluate(candidate, path, eval_kwargs, force=path.exists())
        result.evaluated.append(candidate.name)
    runs = [Path(a) for a in adapters if is_train_output(Path(a))]
    render_report(result.results, result.report, train=runs, title=title, max_samples=max_samples, force=True,
                  command=command)
    return result


def is_train_output(folder: Path) -> bool:
    """An adapter written by `wb train` brings its training run into the report."""
    return (folder / "train_args.json").is_file() and (folder / "trainer_log.jsonl").is_file()


def _evaluation_options(given: dict[str, Any]) -> dict[str, Any]:
    """`evaluate`'s keyword options, its own defaults filled in: its signature is the one list of them.
    The per-model ones (model, adapter, out, ...) are compare's to set; tasks and data_dir become lists."""
    from workbench.evals.run import OPTION_DEFAULTS

    shared = {name: default for name, default in OPTION_DEFAULTS.items() if name not in PER_MODEL}
    unknown = sorted(set(given) - set(shared))
    if unknown:
        raise TypeError(f"compare() got unexpected evaluation option(s): {', '.join(unknown)}")
    options = {**shared, **given}
    return {**options, "tasks": list(options["tasks"]), "data_dir": list(options["data_dir"] or ())}


def _check_options(kwargs: dict[str, Any]) -> None:
    from workbench.evals import run as evaluation
    from workbench.evals.backends import BackendOptions

    backend = BackendOptions(kwargs["backend"], kwargs["parallelize"], kwargs["max_memory_per_gpu"],
                             kwargs["offload_folder"], kwargs["tensor_parallel_size"], kwargs["data_parallel_size"],
                             kwargs["gpu_memory_utilization"], kwargs["max_model_len"])
    evaluation.check_options(kwargs["device"], kwargs["chat_template"], kwargs["system_prompt"],
                             kwargs["fewshot_as_multiturn"], backend)


def _check_candidates(todo: Sequence[Candidate], trust_remote_code: bool) -> None:
    """Every model and adapter to evaluate checked (weights, adapter against its base, tokenizer) before the
    first evaluation starts, so that a bad last candidate fails in seconds, not after the others ran."""
    if not todo:
        return
    from workbench.evals import run as evaluation

    check = evaluation.check_model_files
    for candidate in todo:
        if not Path(candidate.model).is_dir():
            raise WorkbenchError("model must be a model folder (config.json, tokenizer, weights)", candidate.model)
        if candidate.adapter is not None and not (Path(candidate.adapter) / "adapter_config.json").is_file():
            raise WorkbenchError("--adapter must be a PEFT adapter folder (adapter_config.json)", candidate.adapter)
        check(candidate.model, candidate.adapter, trust_remote_code)


def _run_evaluate(candidate: Candidate, path: Path, kwargs: dict[str, Any], force: bool) -> None:
    from workbench.evals import run as evaluation  # lm-eval and transformers load only now

    out_dir = path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation.evaluate(candidate.model, adapter=candidate.adapter, out=path, force=force, **kwargs)


# -- re-use ------------------------------------------------------------------------------------------------
def reuse_mismatches(existing: ModelResults, candidate: Candidate, settings: dict[str, Any],
                     weight_hashes: Callable[[Path], dict[str, str]]) -> list[str]:
    """What differs between an existing results file and the evaluation asked for; empty: re-use it.
    `weight_hashes(path)` gives the sha256 of a model's weight files, as `wb eval` records them."""
    provenance, recorded = existing.provenance, existing.settings
    reasons = []
    if provenance.get("model_files") != weight_hashes(candidate.model):
        reasons.append("model weights")
    wanted_adapter = weight_hashes(candidate.adapter) if candidate.adapter else {}
    if (provenance.get("adapter_files") or {}) != wanted_adapter:
        reasons.append("adapter weights")
    reasons += [key for key, same in _setting_checks(existing, recorded, settings) if not same]
    reasons += [f"{name} ({old}; installed: {now})" for name, old, now in _version_changes(provenance.get("versions"))
                if old != now]
    return reasons


def _version_changes(recorded: Any) -> list[tuple[str, Any, str | None]]:
    """(library, recorded version, installed version): another lm-eval or torch may score differently."""
    if not isinstance(recorded, dict):
        return []
    installed = versions(recorded, python=False)
    return [(name, old, installed[name]) for name, old in recorded.items()]


def _setting_checks(existing: ModelResults, recorded: dict[str, Any], wanted: dict[str, Any]):
    """(setting, matches) pairs; paths compare resolved, tasks by their canonical names."""
    data_dirs = _data_dir_paths(wanted["data_dir"])
    if wanted["tasks"] or not data_dirs:
        yield "tasks", _task_set(recorded.get("tasks")) == _task_set(wanted["tasks"])
    yield "num_fewshot", recorded.get("num_fewshot") == wanted["num_fewshot"]
    yield "limit", recorded.get("limit") == wanted["limit"]
    yield "data_dir", _data_dir_paths(recorded.get("data_dir")) == data_dirs
    yield "batch_size", str(recorded.get("batch_size")) == str(wanted["batch_size"])
    yield "chat_template", recorded.get("chat_template") == wanted["chat_template"]
    for key in (*PROMPT_SETTINGS, "backend"):
        yield key, recorded_setting(recorded, key) == wanted[key]
    if wanted["backend"] == "vllm":  # hf reads the model's own context length
        yield "max_model_len", recorded.get("max_model_len") == wanted["max_model_len"]
    if wanted["dtype"] != "auto":
        from workbench.dtypes import parse_dtype

        yield "dtype", str(existing.provenance.get("dtype")) == str(parse_dtype(wanted["dtype"])).removeprefix("torch.")
    gen = wanted["gen_data"]
    yield "gen_data", _same_path(recorded.get("gen_data"), gen)
    if gen is not None:
        generation = existing.generation or {}
        yield "gen_data content", generation.get("data_sha256") == sha256_file(Path(gen))
        yield "max_new_tokens", recorded.get("max_new_tokens") == wanted["max_new_tokens"]


def _task_set(tasks: Any) -> frozenset[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    return frozenset(canonical(n.strip()) for entry in tasks or () for n in str(entry).split(",") if n.strip())


def _data_dir_paths(value: Any) -> frozenset[Path]:
    """`--data-dir` entries (`NAME=PATH` or `PATH`), or the recorded {name: path}, as resolved folders."""
    if isinstance(value, dict):
        entries = [str(v) for v in value.values()]
    elif isinstance(value, str):
        entries = [value]
    else:
        entries = [str(v) for v in value or ()]
    return frozenset(Path(e.partition("=")[2] if "=" in e and not Path(e).exists() else e).resolve() for e in entries)


def _same_path(recorded: Any, wanted: Any) -> bool:
    if recorded is None or wanted is None:
        return recorded is None and wanted is None
    return Path(str(recorded)).resolve() == Path(str(wanted)).resolve()
