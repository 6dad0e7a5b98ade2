"""`wb report`: render results, train folders and weight comparisons into one self-contained HTML file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.outputs import atomic_file, check_can_write, check_not_input
from workbench.report import sections
from workbench.report.load import (
    ModelResults,
    TrainRun,
    is_number,
    load_results,
    load_train_run,
    unique_names,
)
from workbench.report.weights import WeightComparison, weight_comparisons

TEMPLATE = "report.html"


@dataclass
class ReportInfo:
    path: Path
    models: list[str]
    baseline: str
    sections: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "models": self.models, "baseline": self.baseline, "sections": self.sections}

    def lines(self) -> list[str]:
        return [str(self.path)]


def render_report(
    results: Sequence[str | Path],
    out: str | Path,
    *,
    baseline: str | None = None,
    train: Sequence[str | Path] = (),
    weights: Sequence[tuple[str, str]] = (),
    title: str | None = None,
    max_samples: int = 10,
    force: bool = False,
    command: str | None = None,
) -> ReportInfo:
    """Read every input (refusing any it cannot use), then write the report to `out` atomically.

    `weights` holds `(BASE, TUNED)` pairs of `NAME=PATH` (or bare `PATH`) specs.
    """
    out = Path(out)
    check_can_write(out, force)  # fail before the (possibly long) weight pass
    inputs = [*results, *train, *(spec.split('=', 1)[-1] for pair in weights for spec in pair)]
    check_not_input(out, inputs)
    if not results:
        raise WorkbenchError("give at least one results file")
    models = [load_results(path) for path in results]
    unique_names(models)
    first = baseline_index(models, baseline)
    models.insert(0, models.pop(first))
    context = build_context(models, [load_train_run(d) for d in train], weight_comparisons(list(weights)),
                            title=title, max_samples=max_samples, command=command)
    html = environment().get_template(TEMPLATE).render(**context)
    with atomic_file(out, force=force, inputs=inputs) as handle:
        handle.write(html)
    return ReportInfo(out, [m.name for m in models], models[0].name, [s for s, _ in context["toc"]])


def baseline_index(models: list[ModelResults], baseline: str | None) -> int:
    """The model named `baseline` (its name, or its results file's name or path); the first by default."""
    if baseline is None:
        return 0
    for index, model in enumerate(models):
        if baseline in (model.name, model.data["name"], model.path.name, model.path.stem, str(model.path)):
            return index
    names = ", ".join(repr(m.name) for m in models)
    raise WorkbenchError(f"--baseline {baseline!r} is none of the models ({names})")


def build_context(models: list[ModelResults], runs: list[TrainRun], comparisons: list[WeightComparison], *,
                  title: str | None, max_samples: int, command: str | None) -> dict[str, Any]:
    """Everything the template shows; the baseline is `models[0]`."""
    summary = sections.summary_rows(models, 0)
    breakdowns = sections.breakdowns(models, 0)
    generation = sections.generation_section(models, 0, max_samples)
    trainings = [sections.training_section(run) for run in runs]
    weights = [sections.weights_section(c) for c in comparisons]
    toc = [("Summary", "summary")]
    for present, entry in ((breakdowns, ("Per-subject breakdown", "breakdown")),
                           (generation, ("Generation", "generation")),
                           (trainings, ("Training", "training")),
                           (weights, ("Weights", "weights"))):
        if present:
            toc.append(entry)
    toc.append(("Provenance", "provenance"))
    names = [m.name for m in models]
    return {
        "title": title or " vs ".join(names),
        "models": models,
        "anchors": {m.name: f"model-{i}" for i, m in enumerate(models)},
        "summary": summary,
        "settings_diff": sections.settings_differences(models),
        "breakdowns": breakdowns,
        "generation": generation,
        "gen_metrics": sections.GEN_METRICS,
        "trainings": trainings,
        "weights": weights,
        "toc": toc,
        "number": {anchor: index for index, (_, anchor) in enumerate(toc, start=1)},
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wb_version": __version__,
        "command": command,
        "flatten": sections.flatten,
    }


def environment() -> Environment:
    """Autoescaping everywhere: model outputs and file contents are untrusted text."""
    env = Environment(
        loader=PackageLoader("workbench", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "htm", "css", "js", "svg"), default=True,
                                     default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=fmt_number, signed=fmt_signed, pval=fmt_p, plain=fmt_plain, same=fmt_same, short=fmt_short)
    return env


def fmt_number(value: Any, digits: int = 4) -> str:
    """A figure as it is in the input (ints as ints), "—" where there is none."""
    if not is_number(value):
        return "—"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_short(value: Any) -> str:
    """Six significant digits: the input's figure, rounded only when it has more."""
    if not is_number(value):
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def fmt_signed(value: Any, digits: int = 4) -> str:
    return f"{value:+.{digits}f}" if is_number(value) else "—"


def fmt_p(p: Any) -> str:
    if not is_number(p):
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def fmt_plain(value: Any) -> str:
    """Any input value as text: "—" for null, JSON for lists and objects."""
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (dict, list, tuple, bool)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def fmt_same(values: Sequence[Any]) -> str:
    """One value when every model agrees, else each model's value in column order."""
    present = [v for v in values if v is not None]
    if present and all(v == present[0] for v in present) and len(present) == len(values):
        return fmt_plain(present[0])
    if not present:
        return "—"
    return " / ".join(fmt_plain(v) for v in values)
