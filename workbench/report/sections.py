"""Turn loaded inputs into what each report section shows: rows, changes, flags, charts.

Only figures present in the inputs are shown, plus what is computed from them (a change, its
standard error and z-test, a relative weight change). A missing figure stays `None` and the
template prints "—". Two scores are only compared when their settings match; otherwise the row
carries a flag saying what differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from workbench.errors import WorkbenchError
from workbench.evals.results import PROMPT_SETTINGS, recorded_setting, subtask_problem
from workbench.report import svg
from workbench.report.load import ModelResults, TrainRun, is_number
from workbench.report.stats import Change, z_test
from workbench.report.weights import WeightComparison

METADATA_KEYS = {"alias", "name", "sample_len", "sample_count", "samples"}
METRIC_ORDER = ("acc", "acc_norm", "exact_match", "f1", "bleu", "rouge")
GEN_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
GEN_RANK_METRIC = "rouge-l"
COMPARED_SETTINGS = ("tasks", "num_fewshot", "limit", "data_dir", "gen_data", "chat_template", "max_new_tokens",
                     *PROMPT_SETTINGS, "backend", "max_model_len")
# Settings added after the first results files: an older file reads as what wb did then (recorded_setting).
LATER_SETTINGS = (*PROMPT_SETTINGS, "backend", "max_model_len")
PROMPT_LABELS = {"system_prompt": "system prompt", "fewshot_as_multiturn": "few-shot as multi-turn"}
SHOWN_PROMPT = 40
DATA_CONFIG_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split")
CHART_BARS = 10


@dataclass(frozen=True)
class Score:
    value: float | None
    se: float | None = None


@dataclass
class Row:
    """One line of a comparison table: a task (or subject) and metric, a score per model."""

    key: str
    label: str
    metric: str
    scores: list[Score | None]  # per model, None where the model has no such figure
    changes: list[Change | None]  # per model; None for the baseline and where not compared
    n_shot: list[Any]
    n: list[Any]
    depth: int = 0
    category: str = ""
    higher_is_better: bool | None = True
    flags: list[str] = field(default_factory=list)

    def sort_change(self, index: int) -> float | None:
        change = self.changes[index]
        return None if change is None else change.diff


# -- lm-eval results -------------------------------------------------------------------------------
def metric_label(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric} ({filt})"


def metric_keys(metrics: dict[str, Any]) -> list[str]:
    """The figures of one task entry (`acc,none`, ...), stderr and bookkeeping keys left out."""
    keys = [k for k, v in metrics.items() if k not in METADATA_KEYS and "_stderr," not in k and is_number(v)]

    def rank(key: str) -> tuple[int, str]:
        metric = key.partition(",")[0]
        return (METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER), key)

    return sorted(keys, key=rank)


def score_of(model: ModelResults, task: str, key: str) -> Score | None:
    metrics = model.results.get(task)
    if metrics is None or not is_number(metrics.get(key)):
        return None
    metric, _, filt = key.partition(",")
    se = metrics.get(f"{metric}_stderr,{filt}")
    return Score(metrics[key], se if is_number(se) else None)


def sample_count(model: ModelResults, task: str, key: str) -> Any:
    """The documents scored: n-samples' effective count, else the task's sample_len or sample_count."""
    effective = model.n_samples(task).get("effective")
    if effective is not None:
        return effective
    metrics = model.results.get(task) or {}
    counts = metrics.get("sample_count")
    if isinstance(counts, dict) and counts.get(key) is not None:
        return counts[key]
    return metrics.get("sample_len")


@dataclass
class TaskTree:
    """The union of every model's task hierarchy (lm-eval's group_subtasks)."""

    children: dict[str, list[str]]
    keys: set[str]

    @classmethod
    def of(cls, models: list[ModelResults]) -> TaskTree:
        children: dict[str, list[str]] = {}
        keys: set[str] = set()
        for model in models:
            keys.update(model.results)
            for group, subtasks in model.group_subtasks.items():
                merged = children.setdefault(group, [])
                merged.extend(s for s in subtasks if s not in merged)
            problem = subtask_problem(children)  # each file's tree is sound; together they may not be
            if problem:
                raise WorkbenchError(f"results file: group_subtasks, with the files before it, {problem}", model.path)
        return cls(children, keys | set(children))

    def is_group(self, key: str) -> bool:
        return bool(self.children.get(key))

    def roots(self) -> list[str]:
        nested = {c for subtasks in self.children.values() for c in subtasks}
        return sorted(k for k in self.keys if k not in nested)

    def leaves(self, group: str, category: str = "") -> list[tuple[str, str]]:
        """(leaf, its parent group) for every non-group task under `group`."""
        found: list[tuple[str, str]] = []
        for child in sorted(self.children.get(group, [])):
            if self.is_group(child):
                found.extend(self.leaves(child, child))
            else:
                found.append((child, category))
        return found

    def summary_keys(self) -> list[tuple[str, int]]:
        """Top-level tasks and every group, nested as lm-eval prints them; grouped leaves go to the breakdown."""
        ordered: list[tuple[str, int]] = []

        def visit(key: str, depth: int) -> None:
            ordered.append((key, depth))
            for child in sorted(self.children.get(key, [])):
                if self.is_group(child):
                    visit(child, depth + 1)

        for root in self.roots():
            visit(root, 0)
        return ordered


def task_label(models: list[ModelResults], task: str) -> str:
    for model in models:
        alias = (model.results.get(task) or {}).get("alias")
        if isinstance(alias, str) and alias.strip(" -"):
            return alias.strip().removeprefix("- ").strip()
    return task


def _data_source(model: ModelResults, task: str) -> str | None:
    config = model.section("configs").get(task)
    if not isinstance(config, dict):
        return None
    picked = {k: config.get(k) for k in DATA_CONFIG_KEYS if config.get(k) is not None}
    return json.dumps(picked, sort_keys=True, default=str) if picked else None


def leaf_mismatches(task: str, base: ModelResults, other: ModelResults) -> list[str]:
    """Why `other`'s score on `task` cannot be set against `base`'s; empty when the settings match."""
    if task not in base.results or task not in other.results:
        return []
    reasons = []
    shots = (base.n_shot(task), other.n_shot(task))
    if None in shots:
        reasons.append("n-shot not recorded")
    elif shots[0] != shots[1]:
        reasons.append(f"n-shot {shots[0]} vs {shots[1]}")
    reasons += prompt_mismatches(base, other)
    counts = (base.n_samples(task), other.n_samples(task))
    if counts[0].get("effective") != counts[1].get("effective"):
        reasons.append(f"samples {counts[0].get('effective', '—')} vs {counts[1].get('effective', '—')}")
    elif counts[0].get("original") != counts[1].get("original"):
        reasons.append(f"data sizes {counts[0].get('original', '—')} vs {counts[1].get('original', '—')}")
    versions = (base.section("versions").get(task), other.section("versions").get(task))
    if versions[0] != versions[1]:
        reasons.append(f"task version {versions[0]} vs {versions[1]}")
    hashes = (base.doc_hashes or {}).get(task), (other.doc_hashes or {}).get(task)
    if hashes[0] is not None and hashes[1] is not None:
        if hashes[0] != hashes[1]:
            reasons.append("different documents")
    elif _data_source(base, task) != _data_source(other, task):
        reasons.append("different data source")
    return reasons


def prompt_mismatches(base: ModelResults, other: ModelResults, keys: tuple[str, ...] = PROMPT_SETTINGS) -> list[str]:
    """The prompt settings (system prompt, few-shot as multi-turn) two results files differ in: the model saw
    other prompts, so its scores are not compared, as with another n-shot."""
    reasons = []
    for key in keys:
        values = [recorded_setting(model.settings, key) for model in (base, other)]
        if values[0] != values[1]:
            reasons.append(f"{PROMPT_LABELS[key]} {_setting_text(values[0])} vs {_setting_text(values[1])}")
    return reasons


def _setting_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value)
    return repr(text if len(text) <= SHOWN_PROMPT else text[:SHOWN_PROMPT] + "…")


def mismatches(tree: TaskTree, task: str, base: ModelResults, other: ModelResults) -> list[str]:
    """A leaf's own reasons; for a group, the distinct reasons of its subtasks."""
    if not tree.is_group(task):
        return leaf_mismatches(task, base, other)
    reasons: list[str] = []
    leaves = [leaf for leaf, _ in tree.leaves(task)]
    missing = [leaf for leaf in leaves if (leaf in base.results) != (leaf in other.results)]
    if missing:
        reasons.append(f"{len(missing)} subtask(s) scored by only one model")
    for leaf in leaves:
        for reason in leaf_mismatches(leaf, base, other):
            text = f"subtasks: {reason}"
            if text not in reasons:
                reasons.append(text)
    return reasons


def compare_row(row: Row, models: list[ModelResults], baseline: int,
                reasons_for: Callable[[ModelResults, ModelResults], list[str]]) -> None:
    """Fill `row.changes` and `row.flags` against the baseline column."""
    base_score = row.scores[baseline]
    for index, model in enumerate(models):
        if index == baseline:
            continue
        score = row.scores[index]
        if score is None or base_score is None:
            if (score is None) != (base_score is None):
                missing = model.name if score is None else models[baseline].name
                row.flags.append(f"not scored by {missing}")
            continue
        reasons = reasons_for(models[baseline], model)
        if reasons:
            row.flags.append(f"{model.name}: " + "; ".join(reasons))
            continue
        row.changes[index] = z_test(score.value, score.se, base_score.value, base_score.se)


def higher_is_better(models: list[ModelResults], task: str, key: str) -> bool | None:
    metric = key.partition(",")[0]
    for model in models:
        value = (model.section("higher_is_better").get(task) or {}).get(metric)
        if isinstance(value, bool):
            return value
    return True


def task_row(models: list[ModelResults], baseline: int, tree: TaskTree, task: str, key: str,
             depth: int = 0, category: str = "") -> Row:
    row = Row(
        key=task,
        label=task_label(models, task),
        metric=metric_label(key),
        scores=[score_of(m, task, key) for m in models],
        changes=[None] * len(models),
        n_shot=[m.n_shot(task) if task in m.results else None for m in models],
        n=[sample_count(m, task, key) if task in m.results else None for m in models],
        depth=depth,
        category=category,
        higher_is_better=higher_is_better(models, task, key),
    )
    compare_row(row, models, baseline, lambda base, other: mismatches(tree, task, base, other))
    return row


def summary_rows(models: list[ModelResults], baseline: int) -> list[Row]:
    """One row per top-level task or group and metric; a group without figures gets a label row."""
    tree = TaskTree.of(models)
    rows = []
    for task, depth in tree.summary_keys():
        keys = _union_metric_keys(models, task)
        if not keys:
            row = task_row(models, baseline, tree, task, "", depth)
            row.metric = ""
            row.flags = ["no aggregate score; see the per-subject breakdown"] if tree.is_group(task) else []
            rows.append(row)
        rows.extend(task_row(models, baseline, tree, task, key, depth) for key in keys)
    return rows


def _union_metric_keys(models: list[ModelResults], task: str) -> list[str]:
    keys: list[str] = []
    for model in models:
        keys.extend(k for k in metric_keys(model.results.get(task) or {}) if k not in keys)
    return keys


@dataclass
class Breakdown:
    group: str
    label: str
    metric: str
    rows: list[Row]
    charts: list[tuple[str, Markup]]
    sorted_by: str | None


def breakdowns(models: list[ModelResults], baseline: int) -> list[Breakdown]:
    """For each top-level group, its subjects with the change of every model against the baseline."""
    tree = TaskTree.of(models)
    found = []
    for root in tree.roots():
        leaves = tree.leaves(root)
        if not tree.is_group(root) or not leaves:
            continue
        keys = _union_metric_keys(models, leaves[0][0])
        if not keys:
            continue
        key = keys[0]
        rows = [task_row(models, baseline, tree, leaf, key, category=task_label(models, parent) if parent else "")
                for leaf, parent in leaves]
        compared = next((i for i in range(len(models)) if any(r.changes[i] is not None for r in rows)), None)
        if compared is not None:
            rows.sort(key=lambda r: (r.sort_change(compared) is None, -(r.sort_change(compared) or 0.0)))
        charts = [(models[i].name, chart) for i in range(len(models))
                  if i != baseline and (chart := change_chart(rows, i, f"{models[i].name} vs {models[baseline].name}"))]
        found.append(Breakdown(root, task_label(models, root), metric_label(key), rows, charts,
                               models[compared].name if compared is not None else None))
    return found


def change_chart(rows: list[Row], index: int, title: str) -> Markup | None:
    """Bars for the largest gains and the largest losses of one model, with ±1 se whiskers."""
    changed = [(row, row.changes[index]) for row in rows if row.changes[index] is not None]
    gains = sorted((rc for rc in changed if rc[1].diff > 0), key=lambda rc: -rc[1].diff)[:CHART_BARS]
    losses = sorted((rc for rc in changed if rc[1].diff < 0), key=lambda rc: rc[1].diff)[:CHART_BARS]
    chosen = gains + losses[::-1]
    if not chosen:
        return None
    bars = [svg.Bar(row.label, change.diff, change.se, f"{change.diff:+.4f}{change.mark}") for row, change in chosen]
    return svg.bar_chart(bars, f"Largest gains and losses: {title}")


# -- settings --------------------------------------------------------------------------------------
def settings_differences(models: list[ModelResults]) -> list[tuple[str, list[Any]]]:
    """Eval settings (provenance.settings) that are not the same for every model."""
    differing = []
    for key in COMPARED_SETTINGS:
        values = [recorded_setting(m.settings, key) if key in LATER_SETTINGS else m.settings.get(key, "not recorded")
                  for m in models]
        if any(v != values[0] for v in values[1:]):
            differing.append((key, values))
    return differing


# -- generation ------------------------------------------------------------------------------------
@dataclass
class GenerationRow:
    model: str
    index: int
    scores: dict[str, Score]
    changes: dict[str, Change | None]
    info: dict[str, Any]
    flags: list[str]


@dataclass
class SampleOutput:
    model: str
    prediction: str | None
    scores: dict[str, Any]


@dataclass
class Sample:
    key: str
    prompt: str
    reference: str
    outputs: list[SampleOutput]
    delta: float | None


@dataclass
class Generation:
    rows: list[GenerationRow]
    baseline: str
    contender: str | None
    wins: list[Sample]
    losses: list[Sample]
    shown: list[Sample]  # when there is nothing to rank against: the first samples
    joined: int
    notes: list[str]


def generation_section(models: list[ModelResults], baseline: int, max_samples: int) -> Generation | None:
    with_gen = [i for i, m in enumerate(models) if m.generation]
    if not with_gen:
        return None
    base = baseline if baseline in with_gen else with_gen[0]
    rows = [_generation_row(models, base, i) for i in with_gen]
    others = [i for i in with_gen if i != base]
    contender = next((i for i in others if not rows[with_gen.index(i)].flags), None)
    notes = [note for i in with_gen for note in models[i].notes if "predictions" in note]
    if base != baseline:
        notes.append(f"{models[baseline].name} has no generation results; {models[base].name} is the reference here")
    with_predictions = [i for i in with_gen if models[i].predictions]
    by_model = {i: _predictions_by_key(models[i]) for i in with_predictions}
    if contender not in by_model:
        contender = None
    common = [k for k in by_model.get(base, {}) if all(k in by_model[i] for i in with_predictions)]
    samples = [_sample(models, with_predictions, by_model, key, base, contender) for key in common]
    ranked = [s for s in samples if s.delta is not None]
    wins = sorted((s for s in ranked if s.delta > 0), key=lambda s: -s.delta)[:max_samples]
    losses = sorted((s for s in ranked if s.delta < 0), key=lambda s: s.delta)[:max_samples]
    shown = [] if wins or losses else samples[:max_samples]
    return Generation(rows, models[base].name, models[contender].name if contender is not None else None,
                      wins, losses, shown, len(common), notes)


def _generation_row(models: list[ModelResults], base: int, index: int) -> GenerationRow:
    gen, ref = models[index].generation, models[base].generation
    metrics, stderr = gen.get("metrics") or {}, gen.get("stderr") or {}
    scores = {k: Score(metrics[k] if is_number(metrics.get(k)) else None,
                       stderr[k] if is_number(stderr.get(k)) else None) for k in GEN_METRICS}
    flags = [] if index == base else [*_generation_mismatches(ref, gen),
                                      *prompt_mismatches(models[base], models[index], ("system_prompt",))]
    changes: dict[str, Change | None] = dict.fromkeys(GEN_METRICS)
    if index != base and not flags:
        base_metrics, base_stderr = ref.get("metrics") or {}, ref.get("stderr") or {}
        for k in GEN_METRICS:
            if is_number(metrics.get(k)) and is_number(base_metrics.get(k)):
                changes[k] = z_test(metrics[k], scores[k].se, base_metrics[k],
                                    base_stderr[k] if is_number(base_stderr.get(k)) else None)
    info = {key: gen.get(key) for key in ("n", "max_new_tokens", "data", "data_sha256")}
    return GenerationRow(models[index].name, index, scores, changes, info, flags)


def _generation_mismatches(ref: dict[str, Any], gen: dict[str, Any]) -> list[str]:
    reasons = []
    if ref.get("data_sha256") != gen.get("data_sha256"):
        reasons.append("different data (sha256)")
    for key, label in (("n", "samples"), ("max_new_tokens", "max_new_tokens")):
        if ref.get(key) != gen.get(key):
            reasons.append(f"{label} {ref.get(key, '—')} vs {gen.get(key, '—')}")
    return reasons


def _predictions_by_key(model: ModelResults) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for row in model.predictions or []:
        key = row.get("id") if row.get("id") is not None else row.get("prompt")
        if key is not None:
            rows.setdefault(str(key), row)
    return rows


def _sample(models: list[ModelResults], with_gen: list[int], by_model: dict[int, dict[str, dict[str, Any]]],
            key: str, base: int, contender: int | None) -> Sample:
    ref_row = by_model[base][key]
    outputs = [SampleOutput(models[i].name, by_model[i][key].get("prediction"),
                            {m: by_model[i][key].get(m) for m in GEN_METRICS}) for i in with_gen]
    delta = None
    if contender is not None:
        mine, theirs = by_model[contender][key].get(GEN_RANK_METRIC), ref_row.get(GEN_RANK_METRIC)
        same_prompt = by_model[contender][key].get("prompt") == ref_row.get("prompt")
        if is_number(mine) and is_number(theirs) and same_prompt:
            delta = mine - theirs
    return Sample(key, str(ref_row.get("prompt", "")), str(ref_row.get("reference", "")), outputs, delta)


# -- training --------------------------------------------------------------------------------------
HEADLINE_TRAIN = ("train_loss", "eval_loss", "tokens_per_s", "train_runtime_s", "steps")
TRAIN_ENTRIES = 64  # resolved options are the point of the section: show them all


@dataclass
class Training:
    run: TrainRun
    chart: Markup | None
    margins: Markup | None  # a preference run's reward margin by step, beside the loss
    headline: list[tuple[str, Any]]
    metrics: list[tuple[str, str]]
    options: list[tuple[str, str]]
    adapter: list[tuple[str, str]]


FLATTEN_DEPTH = 4
FLATTEN_ENTRIES = 16
FLATTEN_TEXT = 300


def flatten(data: dict[str, Any], prefix: str = "", depth: int = 0,
            max_entries: int = FLATTEN_ENTRIES) -> list[tuple[str, str]]:
    """Nested records as `a.b = value` lines; lists and other values as compact JSON.

    Records such as weight_diff.json hold a fingerprint per tensor: an object deeper than
    FLATTEN_DEPTH or larger than `max_entries` becomes one line saying how many entries it has.
    """
    lines: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            if depth + 1 >= FLATTEN_DEPTH or len(value) > max_entries:
                lines.append((name, f"{{{len(value)} entries, see the file}}"))
            else:
                lines.extend(flatten(value, f"{name}.", depth + 1, max_entries))
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > FLATTEN_TEXT:
            text = f"{text[:FLATTEN_TEXT]}… ({len(text)} characters, see the file)"
        lines.append((name, text))
    return lines


def training_section(run: TrainRun) -> Training:
    chart = svg.loss_chart(run.log, f"Loss by step: {run.path.name}")
    margins = svg.margin_chart(run.log, f"Chosen-vs-rejected reward margin by step: {run.path.name}")
    metrics = run.metrics or {}
    headline = [(key, metrics[key]) for key in HEADLINE_TRAIN if is_number(metrics.get(key))]
    if not any(key == "tokens_per_s" for key, _ in headline):
        speeds = [row["tokens_per_s"] for row in run.log if is_number(row.get("tokens_per_s"))]
        if speeds:
            headline.append(("tokens_per_s (last logged)", speeds[-1]))
    adapter = {k: v for k, v in (run.adapter_config or {}).items() if v not in (None, {}, [], "")}
    return Training(run, chart, margins, headline, flatten(metrics, max_entries=TRAIN_ENTRIES),
                    flatten(run.args, max_entries=TRAIN_ENTRIES), flatten(adapter, max_entries=TRAIN_ENTRIES))


# -- weights ---------------------------------------------------------------------------------------
@dataclass
class WeightsView:
    comparison: WeightComparison
    heatmap: Markup | None
    others: list[tuple[str, float | None]]


def format_relative(value: float) -> str:
    return f"{value:.2e}"


def weights_section(comparison: WeightComparison) -> WeightsView:
    layers, modules = comparison.layers, comparison.modules
    heat = None
    if layers and modules:
        def value(r: int, c: int) -> float | None:
            cell = comparison.cells.get((layers[r], modules[c]))
            return None if cell is None else cell.relative

        heat = svg.heatmap([f"layer {n}" for n in layers], modules, value,
                           f"Relative change ‖ΔW‖/‖W‖: {comparison.tuned.name} vs {comparison.base.name}",
                           format_relative)
    others = [(name, norms.relative) for name, norms in comparison.others.items()]
    return WeightsView(comparison, heat, others)
