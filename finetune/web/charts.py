"""The loss chart: training and eval loss by step, drawn as inline SVG (no charting library).

The SVG is built from numbers only (every text node is a formatted number or a fixed label), so it needs no
escaping. The same function draws the chart on the server (first paint) and is mirrored by ``app.js`` for the
live updates of a running training; both read the rows of ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

WIDTH, HEIGHT = 640, 260
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 52, 16, 14, 34


def loss_points(rows: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``(train, eval)`` as ``(step, loss)`` pairs from metrics rows; rows without a finite loss are skipped."""
    train: list[tuple[float, float]] = []
    evals: list[tuple[float, float]] = []
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, out in (("loss", train), ("eval_loss", evals)):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.append((float(step), float(value)))
    return train, evals


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]`` (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def loss_chart_svg(rows: Iterable[Mapping[str, Any]], title: str = "Loss by step") -> str:
    """An accessible SVG line chart of training (solid) and eval (dashed, dots) loss; a note when empty."""
    train, evals = loss_points(rows)
    points = train + evals
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title" '
            f'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">'
            f'<title id="chart-title">{title}</title>')
    if not points:
        return (head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="chart-empty">'
                "No loss logged yet</text></svg>")
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(steps)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(losses), max(losses)
    margin = (y1 - y0) * 0.08 or max(abs(y1) * 0.1, 0.1)
    y0, y1 = max(0.0, y0 - margin) if y0 >= 0 else y0 - margin, y1 + margin
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def sx(step: float) -> float:
        return PAD_LEFT + (step - x0) / (x1 - x0) * plot_w

    def sy(loss: float) -> float:
        return PAD_TOP + (1 - (loss - y0) / (y1 - y0)) * plot_h

    parts = [head, '<g class="chart-grid">']
    for tick in nice_ticks(y0, y1):
        y = sy(tick)
        parts.append(f'<line x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{PAD_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    for tick in nice_ticks(x0, x1, 5):
        if float(tick).is_integer() and x0 <= tick <= x1:
            x = sx(tick)
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - PAD_BOTTOM + 16}" text-anchor="middle">{int(tick)}</text>')
    parts.append(f'<text x="{PAD_LEFT + plot_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle">step</text></g>')
    if train:
        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in train)
        parts.append(f'<polyline class="chart-train" points="{path}"/>')
    if evals:
        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in evals)
        parts.append(f'<polyline class="chart-eval" points="{path}"/>')
        parts += [f'<circle class="chart-eval-dot" cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3"/>' for s, v in evals]
    parts.append(_legend(bool(train), bool(evals)))
    last = [f"train {_fmt(train[-1][1])} at step {int(train[-1][0])}"] if train else []
    last += [f"eval {_fmt(evals[-1][1])} at step {int(evals[-1][0])}"] if evals else []
    parts.append(f'<desc>{len(train)} training points, {len(evals)} eval points; latest: {"; ".join(last)}</desc>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(train: bool, evals: bool) -> str:
    x = WIDTH - PAD_RIGHT - 150
    out = ['<g class="chart-legend">']
    if train:
        out.append(f'<line class="chart-train" x1="{x}" x2="{x + 18}" y1="{PAD_TOP + 8}" y2="{PAD_TOP + 8}"/>'
                   f'<text x="{x + 24}" y="{PAD_TOP + 12}">train</text>')
    if evals:
        out.append(f'<line class="chart-eval" x1="{x + 72}" x2="{x + 90}" y1="{PAD_TOP + 8}" y2="{PAD_TOP + 8}"/>'
                   f'<text x="{x + 96}" y="{PAD_TOP + 12}">eval</text>')
    out.append("</g>")
    return "".join(out)
