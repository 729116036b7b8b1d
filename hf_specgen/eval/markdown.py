"""The report's text in GitHub Markdown: the table of records, the per-method table, the pick and the chosen points.

`markdown_table` is also the table `hf_specgen.merge.wise_ft(..., scores=...)` embeds in a model card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .pareto import METHOD_KEEPS, best_generality, compare_methods, finetuned_point, pareto_front
from .records import ResultRecord, format_percent, record_order


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(records: Sequence[ResultRecord]) -> str:
    """One row per record, every metric (blank where a record lacks it), the two means and `*` on the Pareto front.

    Args:
        records: the records, listed in `record_order`.

    Returns:
        the GitHub Markdown table.
    """
    speciality = list(dict.fromkeys(name for r in records for name in r.speciality))
    generality = list(dict.fromkeys(name for r in records for name in r.generality))
    front = {id(r) for r in pareto_front(records)}
    header = ["method", "setting", *speciality, *generality, "speciality", "generality", "Pareto"]
    lines = [
        "| " + " | ".join(map(_cell, header)) + " |",
        "|---|---|" + "---:|" * (len(header) - 3) + ":---:|",
    ]
    for r in sorted(records, key=record_order):
        scores = [r.speciality.get(name) for name in speciality] + [r.generality.get(name) for name in generality]
        scores += [r.speciality_score, r.generality_score]
        cells = [_cell(r.method), _cell(r.setting), *("" if s is None else f"{s:.3f}" for s in scores)]
        lines.append("| " + " | ".join(cells + ["*" if id(r) in front else ""]) + " |")
    return "\n".join(lines)


def method_table(records: Sequence[ResultRecord], keeps: Sequence[float] = METHOD_KEEPS) -> str:
    """GitHub Markdown: one row per method (`method_summary`), each keep's most general point as its generality
    and setting ("-": no point keeps that much), then a line naming the largest dominated area and its margin.

    Args:
        records: as for `method_summary`.
        keeps: as for `method_summary`.

    Returns:
        the table and the line under it.
    """
    rows, finetuned = compare_methods(records, keeps)
    floors = [
        f"best generality at speciality >= {keep * finetuned.speciality_score:.3f} ({format_percent(keep)})"
        for keep in keeps
    ]
    header = ["method", "trainings", "points", *floors, "hypervolume"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        best = [
            "-" if r is None else f"{r.generality_score:.3f}" + (f" ({r.setting})" if r.setting else "")
            for r in row["best"].values()
        ]
        cells = [row["method"], str(row["trainings"]), str(row["points"]), *best, f"{row['hypervolume']:.3f}"]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines + ["", _winner(rows)] if rows else lines)


def _winner(rows: Sequence[Mapping[str, Any]]) -> str:
    first, *others = sorted(rows, key=lambda row: -row["hypervolume"])
    if first["hypervolume"] <= 0.0:
        return "No method's front dominates any area beyond the pre-trained and fine-tuned points."
    text = f"Largest dominated area: {first['method']} ({first['hypervolume']:.3f})"
    if not others:
        return text + ", the only method."
    second = others[0]
    margin = first["hypervolume"] - second["hypervolume"]
    return text + f", {margin:.3f} more than {second['method']} ({second['hypervolume']:.3f})."


def per_method_section(records: Sequence[ResultRecord]) -> str:
    """The report's "Per method" section: what the table measures, then `method_table`.

    Args:
        records: as for `method_summary`.

    Returns:
        the section, its heading first, ending in a blank line.
    """
    finetuned = finetuned_point(records)
    return (
        f"## Per method\n\nEach method is measured against the fine-tuned model, {finetuned.label}, whose speciality "
        f"is {finetuned.speciality_score:.3f}: its most general point keeping each share of that speciality, and the "
        "area its own Pareto front dominates, both axes scaled so that the pre-trained and fine-tuned points span "
        "[0, 1] (1: as special as the fine-tuned and as general as the pre-trained model).\n\n"
        f"{method_table(records)}\n\n"
    )


def chosen_points(records: Sequence[ResultRecord]) -> str:
    """Markdown lines on the points chosen rather than swept: each auto-alpha pick (its alpha, floor and
    evaluations) and each HMA merge beside the uniform merge of its method at the same mean alpha, where the
    records hold one.

    Args:
        records: the records.

    Returns:
        one list item per chosen point, in `record_order`; empty without chosen points.
    """
    lines = []
    for r in sorted((r for r in records if r.selection is not None), key=record_order):
        chosen = r.selection
        if chosen["rule"] == "auto":
            lines.append(
                f"- {r.method}: auto alpha {r.alpha:g} (speciality {r.speciality_score:.3f} >= floor "
                f"{chosen.get('floor', math.nan):.3f}, generality {r.generality_score:.3f}) after "
                f"{chosen.get('evaluations', '?')} evaluations ({chosen.get('reused', 0)} reused from the grid)"
                + ("" if chosen.get("monotone", True) else "; " + chosen.get("reason", ""))
            )
            continue
        uniform = [
            u
            for u in records
            if u.method == r.method
            and u.value == r.value
            and u.alpha == r.alpha
            and u.selection is None
            and u.merge is None
        ]
        ratios = "/".join(f"{a:.3g}" for a in (r.merge or {}).get("group_alphas", []))
        text = (
            f"- {r.method}: HMA ratios {ratios} (mean {r.alpha:g}): speciality {r.speciality_score:.3f}, "
            f"generality {r.generality_score:.3f}"
        )
        if uniform:
            u = uniform[0]
            text += (
                f"; uniform alpha {u.alpha:g}: {u.speciality_score:.3f}, {u.generality_score:.3f} "
                f"(HMA {r.speciality_score - u.speciality_score:+.3f} speciality, "
                f"{r.generality_score - u.generality_score:+.3f} generality)"
            )
        lines.append(text)
    return "\n".join(lines)


def pick_summary(records: Sequence[ResultRecord], keep: float) -> str:
    """The report's sentence on the front, the best speciality and the pick (`best_generality`).

    Args:
        records: the records (at least one).
        keep: the share of the best speciality the pick keeps.

    Returns:
        the sentences.
    """
    best_s = max(records, key=lambda r: r.speciality_score)
    pick = best_generality(records, keep)
    return (
        f"{len(pareto_front(records))} of {len(records)} points are on the Pareto front (marked *). "
        f"The best speciality is {best_s.speciality_score:.3f} ({best_s.label}). Keeping at least "
        f"{keep:.0%} of it, the most general point is {pick.label}: speciality "
        f"{pick.speciality_score:.3f}, generality {pick.generality_score:.3f}."
    )
