"""The report's plot: generality against speciality, one curve per method, the pre-trained and fine-tuned points
and the overall Pareto front."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .pareto import REFERENCE_METHODS, finetuned_point, method_fronts, pareto_front
from .records import ResultRecord, format_percent, training_key


DEFAULT_TITLE = "Speciality vs generality"
CHOSEN_MARKERS = {"auto": "D", "hma": "^"}  # the plot's markers of chosen points, by rule
FAINT = 0.35  # the plot's opacity of a method's points off its front


def plot(
    records: Sequence[ResultRecord], path: str | os.PathLike, title: str = DEFAULT_TITLE, format: str | None = None
) -> Path:
    """Generality against speciality (`_figure`), as an image file.

    Args:
        records: the records to draw.
        path: the file to write.
        title: the plot's title.
        format: the image format (matplotlib's name, e.g. "png", "svg"); default: `path`'s suffix, or PNG.

    Returns:
        `path`.
    """
    path = Path(path)
    _figure(records, title).savefig(path, dpi=120, format=format or path.suffix.lstrip(".") or "png")
    return path


def _is_reference(record: ResultRecord) -> bool:
    return record.method in REFERENCE_METHODS or record.alpha == 0.0


def _figure(records: Sequence[ResultRecord], title: str) -> Figure:
    """One line per method along its own front from the pre-trained point (`method_fronts`), its other points
    faint, early stops as squares, chosen points as diamonds (auto) and triangles (HMA); the pre-trained point
    a star, the fine-tuned one an X; the overall Pareto front a dashed staircase with ringed points.

    Drawn on a bare `Figure` (Agg), so it needs no display and leaves pyplot's state alone."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.add_subplot()
    for method, front in method_fronts(records).items():
        _draw_method(ax, [r for r in records if r.method == method], front)
    for rule, what in (("auto", "auto-alpha pick"), ("hma", "HMA ratio search")):
        if any(r.selection is not None and r.selection["rule"] == rule for r in records):
            ax.scatter([], [], marker=CHOSEN_MARKERS[rule], s=70, color="white", edgecolors="black", label=what)
    if any(r.checkpoint is not None for r in records):
        ax.scatter([], [], marker="s", s=20, color="grey", label="early stop")
    references = [r for r in records if _is_reference(r)]
    if references:
        named = next((r.method for r in references if r.method in REFERENCE_METHODS), "pre-trained")  # e.g. sft
        ax.scatter(*_means(references), marker="*", s=250, color="black", zorder=3, label=named)
    try:
        finetuned = finetuned_point(records)
    except ValueError:
        pass  # no fine-tuned point: nothing to mark
    else:
        ax.scatter(*_means([finetuned]), marker="X", s=110, color="black", zorder=6, label="fine-tuned")
    front = pareto_front(records)
    ax.step(*_means(front), where="pre", linestyle="--", color="grey", zorder=1, label="Pareto front")
    ax.scatter(*_means(front), s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=4)
    ax.set(xlabel="speciality (mean domain score)", ylabel="generality (mean general score)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def _means(records: Sequence[ResultRecord]) -> tuple[list[float], list[float]]:
    return [r.speciality_score for r in records], [r.generality_score for r in records]


def _short_setting(record: ResultRecord) -> str:
    """A point's place on its training's curve: its alpha, or its share of training for an early stop."""
    if record.checkpoint is not None:
        return format_percent(record.checkpoint["fraction"])
    return "" if record.alpha is None else f"{record.alpha:g}"


def _draw_method(ax: Any, own: Sequence[ResultRecord], front: Sequence[ResultRecord]) -> None:
    """A method's front as one line (its strength in the legend if it has one), its other points faint, early
    stops as squares, chosen points apart; annotations: every grid point with one strength, else the front's."""
    method, on_front = own[0].method, {id(r) for r in front}
    one_training = len({training_key(r) for r in own}) == 1
    strengths = ", ".join(f"{name}={value:g}" for name, value in own[0].strength_items) if one_training else ""
    marked = [i for i, r in enumerate(front) if r.method == method and r.selection is None and r.checkpoint is None]
    (line,) = ax.plot(
        *_means(front), marker="o", markevery=marked, label=f"{method} ({strengths})" if strengths else method
    )
    color = line.get_color()
    for r in own:
        if r.selection is not None:
            _draw_chosen(ax, r, color)
        elif r.checkpoint is not None or id(r) not in on_front:
            ax.scatter(
                *_means([r]),
                marker="s" if r.checkpoint is not None else "o",
                s=18,
                color=color,
                alpha=1.0 if id(r) in on_front else FAINT,
                linewidths=0,
                zorder=2,
            )
    for r in own:
        text = _short_setting(r) if r.selection is None and (one_training or id(r) in on_front) else ""
        if text:
            ax.annotate(
                text, (r.speciality_score, r.generality_score), xytext=(4, 4), textcoords="offset points", fontsize=7
            )


def _draw_chosen(ax: Any, record: ResultRecord, color: Any) -> None:
    """A point chosen, not swept: its rule's marker, edged black, and its alpha."""
    rule = record.selection["rule"]
    ax.scatter(*_means([record]), marker=CHOSEN_MARKERS[rule], s=70, color=color, edgecolors="black", zorder=5)
    ax.annotate(
        f"{'auto' if rule == 'auto' else 'HMA'} {record.alpha:g}",
        (record.speciality_score, record.generality_score),
        xytext=(4, -9),
        textcoords="offset points",
        fontsize=7,
    )
