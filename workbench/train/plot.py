"""A small hand-written SVG of the loss curve (train loss as a line, eval loss as dots)."""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 32, 44


def loss_svg(rows: list[dict], title: str) -> str:
    """SVG text for trainer_log rows ({step, loss, eval_loss?}); an empty plot says so."""
    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))]
    points = train + evals
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="14">{escape(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no loss was logged</text></svg>')
        return "\n".join(parts) + "\n"
    x_max = max(s for s, _ in points) or 1
    y_min, y_max = min(v for _, v in points), max(v for _, v in points)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5

    def x(step: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * step / x_max

    def y(value: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (y_max - value) / (y_max - y_min)

    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts.append(f'<path d="M{LEFT},{TOP} V{bottom} H{right}" fill="none" stroke="#444"/>')
    for fraction in (0, 0.5, 1):
        value = y_min + (y_max - y_min) * fraction
        parts.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
    for step in sorted({0, x_max // 2, x_max}):
        parts.append(f'<text x="{x(step):.1f}" y="{bottom + 16}" text-anchor="middle">{step}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 8}" text-anchor="middle">step</text>')
    if train:
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in train)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        parts.append(f'<text x="{right - 90}" y="20" fill="#1f77b4">train loss</text>')
    for s, v in evals:
        parts.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="#d62728"/>')
    if evals:
        parts.append(f'<text x="{right - 180}" y="20" fill="#d62728">eval loss</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
