"""Small hand-written inline SVG charts: diverging bars, line chart, heatmap, and the loss curve.

Every chart is built from `_el`, which escapes each attribute and text node, and returned as
`Markup` so the (autoescaping) template embeds it as is. No `xmlns`: inline SVG in HTML5 does not
need one, and a report must not name any URL. The one loss curve, `loss_chart`, is drawn here for
both the report and `wb train`'s loss.svg (`loss_svg`: the same chart as a file of its own, which
does carry the namespace, the report's text styles and a white background). A preference run's
reward margin (`margin_chart`) is drawn beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from workbench.report.load import is_number

GAIN = "#1b7f3b"
LOSS = "#c0392b"
AXIS = "#6b7280"
GRID = "#e5e7eb"
SERIES_COLOURS = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777")
HEAT_LOW = (247, 251, 255)
HEAT_HIGH = (8, 48, 107)
LINE_WIDTH, LINE_HEIGHT = 760, 300
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a standalone file needs it; inline SVG in a report must not
STANDALONE_STYLE = f"text {{ font: 11px sans-serif; fill: #374151; }} text.axis {{ fill: {AXIS}; }}"


def _el(tag: str, attrs: dict[str, object] | None = None, *children: str | Markup) -> Markup:
    """`<tag a="v">children</tag>`; attribute values and plain-string children are escaped."""
    rendered = "".join(f' {key.rstrip("_").replace("_", "-")}="{escape(value)}"'
                       for key, value in (attrs or {}).items() if value is not None)
    body = Markup("").join(child if isinstance(child, Markup) else escape(child) for child in children)
    return Markup(f"<{tag}{rendered}>{body}</{tag}>")


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _svg(width: float, height: float, label: str, *children: Markup, standalone: bool = False) -> Markup:
    """The chart's root; `standalone` makes it an SVG file: namespace, height, styles, white behind, visible title."""
    attrs = {"viewBox": f"0 0 {_num(width)} {_num(height)}", "width": _num(width), "role": "img",
             "aria_label": label, "class": "chart"}
    if not standalone:
        return _el("svg", attrs, _el("title", None, label), *children)
    return _el("svg", {"xmlns": SVG_NAMESPACE, **attrs, "height": _num(height)}, _el("title", None, label),
               _el("style", None, Markup(STANDALONE_STYLE)),
               _el("rect", {"width": "100%", "height": "100%", "fill": "white"}),
               _el("text", {"x": _num(width - 16), "y": 14, "text_anchor": "end"}, label), *children)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (the usual 1-2-5 steps). A range too narrow for a
    float step (e.g. two losses one rounding apart) is widened, and ticks are counted, not summed,
    so the loop always ends."""
    if high - low <= max(abs(low), abs(high)) * 1e-9:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    steps = min(4 * count, math.ceil((high - start) / step - 1e-9))
    return [round(start + k * step, 12) for k in range(steps + 1)]


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    se: float | None = None
    text: str = ""  # printed beside the bar; the caller formats the figure from its input


def bar_chart(bars: Sequence[Bar], label: str, width: int = 760) -> Markup:
    """Horizontal bars diverging from zero: gains right in green, losses left in red, ±1 se whiskers."""
    row, top, label_w, value_w = 22, 8, 250, 70
    height = top * 2 + row * len(bars) + 18
    extent = max((abs(b.value) + (b.se or 0.0) for b in bars), default=1.0) or 1.0
    plot_left, plot_right = label_w, width - value_w
    zero = (plot_left + plot_right) / 2
    scale = (plot_right - plot_left) / 2 / extent
    parts: list[Markup] = [
        _el("line", {"x1": _num(zero), "x2": _num(zero), "y1": top, "y2": _num(height - 18), "stroke": AXIS}),
    ]
    for i, bar in enumerate(bars):
        y = top + i * row
        x_end = zero + bar.value * scale
        colour = GAIN if bar.value >= 0 else LOSS
        parts.append(_el("text", {"x": label_w - 8, "y": _num(y + row * 0.68), "text_anchor": "end",
                                  "class": "label"}, bar.label))
        parts.append(_el("rect", {"x": _num(min(zero, x_end)), "y": _num(y + 4), "height": row - 8,
                                  "width": _num(max(abs(x_end - zero), 0.5)), "fill": colour, "rx": 2},
                         _el("title", None, f"{bar.label}: {bar.text}")))
        if bar.se:
            lo, hi = zero + (bar.value - bar.se) * scale, zero + (bar.value + bar.se) * scale
            parts.append(_el("line", {"x1": _num(lo), "x2": _num(hi), "y1": _num(y + row / 2),
                                      "y2": _num(y + row / 2), "stroke": "#111827", "stroke_width": 1}))
        parts.append(_el("text", {"x": width - value_w + 6, "y": _num(y + row * 0.68),
                                  "class": "value gain" if bar.value >= 0 else "value loss"}, bar.text))
    axis_y = height - 6
    parts.append(_el("text", {"x": _num(zero), "y": axis_y, "text_anchor": "middle", "class": "axis"}, "0"))
    parts.append(_el("text", {"x": plot_left, "y": axis_y, "class": "axis"}, f"-{_tick_label(extent)}"))
    parts.append(_el("text", {"x": _num(plot_right), "y": axis_y, "text_anchor": "end", "class": "axis"},
                     f"+{_tick_label(extent)}"))
    return _svg(width, height, label, *parts)


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    markers: bool = False


def line_chart(series: Sequence[Series], label: str, x_label: str, y_label: str,
               width: int = LINE_WIDTH, height: int = LINE_HEIGHT, standalone: bool = False) -> Markup:
    """Lines (or lines with markers) on shared axes, with round ticks, grid and a legend."""
    left, right, top, bottom = 64, 16, 28, 44
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_ticks = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
    y_ticks = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / ((y1 - y0) or 1.0) * (height - top - bottom)

    parts: list[Markup] = []
    for tick in y_ticks:
        parts.append(_el("line", {"x1": left, "x2": width - right, "y1": _num(py(tick)), "y2": _num(py(tick)),
                                  "stroke": GRID}))
        parts.append(_el("text", {"x": left - 6, "y": _num(py(tick) + 4), "text_anchor": "end", "class": "axis"},
                         _tick_label(tick)))
    for tick in x_ticks:
        parts.append(_el("text", {"x": _num(px(tick)), "y": height - bottom + 16, "text_anchor": "middle",
                                  "class": "axis"}, _tick_label(tick)))
    parts.append(_el("line", {"x1": left, "x2": width - right, "y1": height - bottom, "y2": height - bottom,
                              "stroke": AXIS}))
    parts.append(_el("text", {"x": _num((left + width - right) / 2), "y": height - 6, "text_anchor": "middle",
                              "class": "axis"}, x_label))
    parts.append(_el("text", {"x": 14, "y": _num(top + (height - top - bottom) / 2), "text_anchor": "middle",
                              "class": "axis", "transform": f"rotate(-90 14 {_num(top + (height - top - bottom) / 2)})"},
                     y_label))
    legend_x = left
    for index, item in enumerate(series):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        points = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in item.points)
        if len(item.points) > 1:
            parts.append(_el("polyline", {"points": points, "fill": "none", "stroke": colour, "stroke_width": 2}))
        if item.markers or len(item.points) == 1:
            parts.extend(_el("circle", {"cx": _num(px(x)), "cy": _num(py(y)), "r": 3.5, "fill": colour},
                             _el("title", None, f"{item.name} at {_tick_label(x)}: {y:g}")) for x, y in item.points)
        parts.append(_el("rect", {"x": legend_x, "y": 8, "width": 14, "height": 4, "fill": colour}))
        parts.append(_el("text", {"x": legend_x + 18, "y": 14, "class": "axis"}, item.name))
        legend_x += 26 + 7 * len(item.name)
    return _svg(width, height, label, *parts, standalone=standalone)


def _train_eval_chart(rows: Sequence[dict], key: str, name: str, y_label: str, label: str,
                      standalone: bool) -> Markup | None:
    """trainer_log.jsonl's `key` by step: the train rows' as a line, `eval_<key>` as dots; None when the log
    has neither."""
    train = [(row["step"], row[key]) for row in rows if is_number(row.get(key))]
    evals = [(row["step"], row[f"eval_{key}"]) for row in rows if is_number(row.get(f"eval_{key}"))]
    series = [Series(f"train {name}", train)] if train else []
    if evals:
        series.append(Series(f"eval {name}", evals, markers=True))
    return line_chart(series, label, "step", y_label, standalone=standalone) if series else None


def loss_chart(rows: Sequence[dict], label: str, standalone: bool = False) -> Markup | None:
    """The loss curve of trainer_log.jsonl rows: train loss as a line, eval loss as dots; None when
    no loss was logged."""
    return _train_eval_chart(rows, "loss", "loss", "loss", label, standalone)


def margin_chart(rows: Sequence[dict], label: str, standalone: bool = False) -> Markup | None:
    """A preference run's chosen-vs-rejected reward margin (trl's `rewards/margins` in trainer_log.jsonl):
    train as a line, eval as dots; None when the log has none (an SFT run)."""
    return _train_eval_chart(rows, "rewards/margins", "margin", "reward margin", label, standalone)


def loss_svg(rows: Sequence[dict], label: str) -> str:
    """`wb train`'s loss.svg: `loss_chart` as an SVG file of its own; an empty plot says so."""
    chart = loss_chart(rows, label, standalone=True)
    if chart is None:
        note = _el("text", {"x": _num(LINE_WIDTH / 2), "y": _num(LINE_HEIGHT / 2), "text_anchor": "middle",
                            "class": "axis"}, "no loss was logged")
        chart = _svg(LINE_WIDTH, LINE_HEIGHT, label, note, standalone=True)
    return str(chart) + "\n"


def heat_colour(fraction: float) -> str:
    fraction = min(1.0, max(0.0, fraction))
    rgb = (round(lo + (hi - lo) * fraction) for lo, hi in zip(HEAT_LOW, HEAT_HIGH))
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def heatmap(rows: Sequence[str], columns: Sequence[str], value: Callable[[int, int], float | None],
            label: str, fmt: Callable[[float], str]) -> Markup:
    """A table of coloured cells (linear scale from 0 to the largest value), each labelled with its figure."""
    cell_w, cell_h, left = 74, 20, 78
    top = 16 + round(6.2 * max((len(c) for c in columns), default=4) * 0.64)  # room for the slanted headings
    values = [value(r, c) for r in range(len(rows)) for c in range(len(columns))]
    largest = max((v for v in values if v is not None), default=0.0)
    peak = largest or 1.0  # only scales the colours; the legend names the real largest value
    width = left + cell_w * len(columns) + 8 + round(4.8 * len(columns[-1]) if columns else 0)
    height = top + cell_h * len(rows) + 44
    parts: list[Markup] = []
    for c, column in enumerate(columns):
        x = _num(left + cell_w * (c + 0.5) - 6)
        parts.append(_el("text", {"x": x, "y": top - 6, "class": "axis",
                                  "transform": f"rotate(-40 {x} {top - 6})"}, column))
    for r, row in enumerate(rows):
        y = top + r * cell_h
        parts.append(_el("text", {"x": left - 8, "y": _num(y + cell_h * 0.7), "text_anchor": "end",
                                  "class": "axis"}, row))
        for c in range(len(columns)):
            parts.append(_heat_cell(left + c * cell_w, y, cell_w, cell_h, value(r, c), peak, fmt,
                                    f"{row} {columns[c]}"))
    if largest:
        parts.extend(_heat_legend(left, top + cell_h * len(rows) + 14, largest, fmt))
    return _svg(width, height, label, *parts)


def _heat_cell(x: float, y: float, w: float, h: float, v: float | None, peak: float,
               fmt: Callable[[float], str], where: str) -> Markup:
    if v is None:
        return _el("rect", {"x": x, "y": y, "width": w - 1, "height": h - 1, "fill": "#f3f4f6"},
                   _el("title", None, f"{where}: not present"))
    fraction = v / peak
    return Markup("").join([
        _el("rect", {"x": x, "y": y, "width": w - 1, "height": h - 1, "fill": heat_colour(fraction)},
            _el("title", None, f"{where}: {fmt(v)}")),
        _el("text", {"x": _num(x + w / 2), "y": _num(y + h * 0.7), "text_anchor": "middle",
                     "class": "cell dark" if fraction > 0.55 else "cell"}, fmt(v)),
    ])


def _heat_legend(x: float, y: float, peak: float, fmt: Callable[[float], str]) -> Iterable[Markup]:
    steps = 5
    for i in range(steps):
        yield _el("rect", {"x": x + i * 30, "y": y, "width": 30, "height": 10, "fill": heat_colour(i / (steps - 1))})
    yield _el("text", {"x": x, "y": y + 24, "class": "axis"}, "0")
    yield _el("text", {"x": x + steps * 30, "y": y + 24, "class": "axis", "text_anchor": "end"}, fmt(peak))
