"""Pareto math on records: which points no other beats, which to keep, and how methods compare.

Fine-tuning buys speciality (domain scores) with generality (general-task scores); WiSE-FT alpha and a
regularizer's strength move along that trade-off. The Pareto front holds the points no other point beats on
one mean without losing on the other; `best_generality` picks the most general point keeping a share of the
best speciality. Methods are compared by their own curves: each method's front (all its strengths, alphas and
early-stopping points, from the pre-trained point), its most general point keeping a share of the fine-tuned
model's speciality, and the area its front dominates (`method_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .records import ResultRecord, record_order, training_key


REFERENCE_METHODS = ("pre-trained", "zero-shot", "sft")  # the starting point (alignment starts from an SFT model)
FINETUNED_METHODS = ("full", "dpo")  # plain training: fine-tuning, or preference alignment by DPO
KEEP_SPECIALITY = 0.95  # the summary's point: most general among those keeping this share of the best speciality
METHOD_KEEPS = (0.9, 0.95, 1.0)  # the per-method table's columns: shares of the fine-tuned model's speciality


def _dominates(a: ResultRecord, b: ResultRecord) -> bool:
    sa, ga, sb, gb = a.speciality_score, a.generality_score, b.speciality_score, b.generality_score
    return sa >= sb and ga >= gb and (sa > sb or ga > gb)


def pareto_front(records: Sequence[ResultRecord]) -> list[ResultRecord]:
    """The records no other record beats on one mean without losing on the other.

    Args:
        records: the records.

    Returns:
        the front by speciality ascending (generality descending); records tied on both means are all kept, in
        input order.
    """
    front = [r for r in records if not any(_dominates(other, r) for other in records)]
    return sorted(front, key=lambda r: r.speciality_score)


def best_generality(records: Sequence[ResultRecord], keep: float = KEEP_SPECIALITY) -> ResultRecord:
    """The usual pick, a little domain score for much generality.

    Args:
        records: the records.
        keep: the share of the best speciality a record must keep.

    Returns:
        the most general record among those with at least `keep` times the best speciality (ties: more
        speciality, then input order).

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no records")
    return _most_general(records, keep * max(r.speciality_score for r in records))


def _most_general(records: Iterable[ResultRecord], floor: float) -> ResultRecord | None:
    """The most general record with at least `floor` speciality (ties: more speciality, then input order);
    None: none."""
    candidates = [r for r in records if r.speciality_score >= floor]
    return max(candidates, key=lambda r: (r.generality_score, r.speciality_score), default=None)


def compared_methods(records: Sequence[ResultRecord]) -> list[str]:
    """The methods compared: all but the reference (pre-trained) ones.

    Args:
        records: the records.

    Returns:
        their methods, once each, in `record_order`.
    """
    return list(
        dict.fromkeys(r.method for r in sorted(records, key=record_order) if r.method not in REFERENCE_METHODS)
    )


def method_fronts(records: Sequence[ResultRecord]) -> dict[str, list[ResultRecord]]:
    """Each method's own Pareto front: over all its points (strengths, alphas, early stops, chosen points) and
    the reference (pre-trained) points, which start every method's curve.

    Args:
        records: the records of every method and the reference point(s).

    Returns:
        method -> its front by speciality ascending (`pareto_front`), methods in `record_order` (references
        excluded).
    """
    references = [r for r in records if r.method in REFERENCE_METHODS]
    return {
        method: pareto_front([*references, *(r for r in records if r.method == method)])
        for method in compared_methods(records)
    }


def _reference(records: Sequence[ResultRecord]) -> ResultRecord | None:
    """The pre-trained point: the first record of a reference method, else the first at alpha 0; None: none."""
    return next(
        (r for r in records if r.method in REFERENCE_METHODS), next((r for r in records if r.alpha == 0.0), None)
    )


def _finetuned(records: Sequence[ResultRecord]) -> ResultRecord | None:
    """`finetuned_point`, or None where the records hold no candidate."""
    ends = [
        r
        for r in records
        if r.method not in REFERENCE_METHODS
        and r.alpha in (None, 1.0)
        and r.selection is None
        and r.checkpoint is None
        and r.merge is None
    ]
    full = sorted((r for r in ends if r.method in FINETUNED_METHODS), key=lambda r: r.strengths is not None)  # stable
    return full[0] if full else max(ends, key=lambda r: r.speciality_score, default=None)


def finetuned_point(records: Sequence[ResultRecord]) -> ResultRecord:
    """The fine-tuned model the methods are measured against: the first record of method `full` (or `dpo`) at alpha 1
    (or unmerged) with no selection, early stop or merge schedule, those without strengths first; without
    one, the most special such record of any method.

    Args:
        records: the records to look in.

    Returns:
        the fine-tuned point.

    Raises:
        ValueError: no record is a whole training's end (alpha 1 or unmerged, not chosen, not an early stop).
    """
    finetuned = _finetuned(records)
    if finetuned is None:
        raise ValueError(
            f"no fine-tuned point: no record of a method (not {' or '.join(REFERENCE_METHODS)}) at alpha 1 "
            "or unmerged without selection, checkpoint or merge schedule"
        )
    return finetuned


def not_comparable(records: Sequence[ResultRecord]) -> str | None:
    """Why the records cannot be compared by method (`method_summary`).

    Args:
        records: the records.

    Returns:
        what they lack (a method, a pre-trained point, or a fine-tuned point apart from it on both axes), or None
        when they hold it.
    """
    reference, finetuned = _reference(records), _finetuned(records)
    if not compared_methods(records):
        return "no method"
    if reference is None or finetuned is None:
        return "no pre-trained point" if reference is None else "no fine-tuned point (a method at alpha 1)"
    for axis in ("speciality", "generality"):
        if getattr(reference, f"{axis}_score") == getattr(finetuned, f"{axis}_score"):
            return (
                f"the pre-trained and fine-tuned points have the same {axis}, "
                f"{getattr(reference, f'{axis}_score'):.3f}: nothing to scale the areas by"
            )
    return _less_special(reference, finetuned)


def _less_special(reference: ResultRecord, finetuned: ResultRecord) -> str | None:
    """Why the methods cannot be measured against a fine-tune less special than the pre-trained model (`hypervolume`
    scales each axis between the two whichever is higher, so the pre-trained point would be the most special and
    most general, and a front reaching it would get an area of 1); None where the fine-tune gained."""
    if finetuned.speciality_score < reference.speciality_score:
        return (
            f"the fine-tuned model is less special than the pre-trained one ({finetuned.speciality_score:.3f} < "
            f"{reference.speciality_score:.3f}): no speciality gained to trade generality for"
        )
    return None


def _scale(axis: str, pre: float, finetuned: float) -> Callable[[float], float]:
    """Maps `axis`'s scores so that the lower of `pre` and `finetuned` is 0 and the higher 1."""
    low, high = sorted((pre, finetuned))
    if high == low:
        raise ValueError(
            f"hypervolume: the pre-trained and fine-tuned points have the same {axis} ({low:.4g}), "
            f"so the {axis} axis has no span to scale by"
        )
    return lambda score: (score - low) / (high - low)


def hypervolume(points: Iterable[ResultRecord], reference: ResultRecord, finetuned: ResultRecord) -> float:
    """The area of the (speciality, generality) plane the points dominate above the corner
    (min(s_pre, s_ft), min(g_pre, g_ft)), both axes scaled so that the pre-trained and fine-tuned points span
    [0, 1]: the union of the rectangles from the corner to each point. Points below the corner on an axis add
    nothing; points beyond 1 are not clipped.

    Args:
        points: the records, e.g. a method's front.
        reference: the pre-trained point.
        finetuned: the fine-tuned point.

    Returns:
        the area, 0 for no points; the pre-trained and fine-tuned points alone make 0.

    Raises:
        ValueError: the two points tie on an axis (nothing to scale it by).
    """
    speciality = _scale("speciality", reference.speciality_score, finetuned.speciality_score)
    generality = _scale("generality", reference.generality_score, finetuned.generality_score)
    corners = sorted(((speciality(p.speciality_score), generality(p.generality_score)) for p in points), reverse=True)
    area, height = 0.0, 0.0
    for x, y in corners:  # by x descending: each point adds the strip above the highest one before it
        if x > 0.0 and y > height:
            area, height = area + x * (y - height), y
    return area


def compare_methods(
    records: Sequence[ResultRecord], keeps: Sequence[float] = METHOD_KEEPS
) -> tuple[list[dict[str, Any]], ResultRecord]:
    """Each method against the fine-tuned model, with the most general records themselves.

    Args:
        records: the records of every method and the reference (pre-trained) point.
        keeps: shares of the fine-tuned speciality a point must keep.

    Returns:
        one row per method, in `record_order`: {"method", "points", "trainings", "best": {keep: its most general
        record keeping that share, or None}, "hypervolume"}; and the fine-tuned point.

    Raises:
        ValueError: as `method_summary`.
    """
    reference = _reference(records)
    if reference is None:
        raise ValueError(
            f"no pre-trained point to compare methods from: no record of {' or '.join(REFERENCE_METHODS)} "
            "nor at alpha 0"
        )
    finetuned = finetuned_point(records)
    rows = []
    for method, front in method_fronts(records).items():
        own = [r for r in records if r.method == method]
        rows.append(
            {
                "method": method,
                "points": len(own),
                "trainings": len({training_key(r) for r in own}),
                "best": {keep: _most_general(own, keep * finetuned.speciality_score) for keep in keeps},
                "hypervolume": hypervolume(front, reference, finetuned),
            }
        )
    return rows, finetuned


def method_summary(records: Sequence[ResultRecord], keeps: Sequence[float] = METHOD_KEEPS) -> list[dict[str, Any]]:
    """Each method against the fine-tuned model (`finetuned_point`), from the pre-trained point.

    Args:
        records: the records of every method and the reference (pre-trained) point.
        keeps: shares of the fine-tuned speciality a point must keep to count for `best_generality`.

    Returns:
        one row per method, in `record_order`: {"method", "points" (its records), "trainings" (distinct strengths),
        "best_generality": {keep: the highest generality among its points with speciality >= keep * s_ft, or None},
        "best_point": {keep: that point's label, or None}, "hypervolume": `hypervolume` of its `method_fronts` front}.

    Raises:
        ValueError: no pre-trained point (a reference method's record or alpha 0), no fine-tuned point, or the two
            tie on an axis.
    """
    rows, _ = compare_methods(records, keeps)
    for row in rows:
        best = row.pop("best")
        row["best_generality"] = {keep: None if r is None else r.generality_score for keep, r in best.items()}
        row["best_point"] = {keep: None if r is None else r.label for keep, r in best.items()}
        row["hypervolume"] = row.pop("hypervolume")  # last, as documented
    return rows
