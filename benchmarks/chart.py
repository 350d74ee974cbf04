"""A small line chart of benchmark figures (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def line_chart(path: Path, series: Mapping[str, Mapping[float, float]], *, title: str, xlabel: str,
               ylabel: str, log_x: bool = False, log_y: bool = False, note: str | None = None) -> Path:
    """Draw one line per series (label -> {x: y}), each point labelled with its value; save a PNG."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(7, 4.4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    top = max((y for points in series.values() for y in points.values()), default=1.0)
    for (label, points), marker in zip(series.items(), "osD^v<>", strict=False):
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker=marker, label=label)
    for x in sorted({x for points in series.values() for x in points}):
        # Label each point above it; a point just under another one at this x gets its label aside.
        ys = sorted(points[x] for points in series.values() if x in points)
        for index, y in enumerate(ys):
            crowded = index + 1 < len(ys) and (ys[index + 1] / max(y, 1e-9) < 1.25 if log_y
                                               else ys[index + 1] - y < 0.08 * top)
            axes.annotate(_value(y), (x, y), textcoords="offset points", fontsize=8,
                          xytext=(8, -3) if crowded else (0, 6), ha="left" if crowded else "center",
                          va="top" if crowded else "bottom")
    if log_x:
        axes.set_xscale("log")
        xs_all = sorted({x for points in series.values() for x in points})
        axes.set_xticks(xs_all, [f"{x:,.0f}" for x in xs_all])
    if log_y:
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if y >= 1 else f"{y:g}"))
        axes.yaxis.set_minor_formatter(NullFormatter())
    else:
        axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    if note:
        figure.supxlabel(note, fontsize=7, color="0.4")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _value(y: float) -> str:
    return f"{y:,.0f}" if y >= 10 else f"{y:.1f}"
