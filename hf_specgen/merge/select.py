"""Choosing alpha instead of sweeping it: the most general merge that keeps a stated speciality.

Along WiSE-FT's path (or a group schedule's mean alpha) speciality usually rises with alpha and
generality falls, so the most general merge that keeps a speciality floor is the smallest alpha
that reaches the floor. `select_alpha` brackets that crossing by bisection between the two ends
(alpha 0, the pre-trained model, and alpha 1, the fine-tuned one, which a recipe has scored
anyway), within a budget of evaluations. It does not trust the assumption: the speciality of the
points it evaluated must not fall as alpha grows (within `slack`); where it does, it says so and
picks, among the points it has, the most general one that reaches the floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


Scores = tuple[float, float]  # (speciality, generality)


@dataclass
class AlphaChoice:
    """The result of `select_alpha`.

    Attributes:
        alpha: the chosen alpha.
        speciality: its speciality score.
        generality: its generality score.
        floor: the speciality it had to reach.
        evaluated: every point scored, `alpha -> (speciality, generality)`, in the order scored
            (the ends included, whether scored here or given).
        calls: how many times `evaluate` was called.
        monotone: whether speciality did not fall with alpha over the points scored.
        reason: how the point was chosen, in a sentence.
    """

    alpha: float
    speciality: float
    generality: float
    floor: float
    evaluated: dict[float, Scores] = field(default_factory=dict)
    calls: int = 0
    monotone: bool = True
    reason: str = ""


def select_alpha(
    evaluate: Callable[[float], Scores],
    *,
    keep: float | None = None,
    floor: float | None = None,
    budget: int = 6,
    resolution: float = 0.01,
    slack: float = 0.0,
    known: Mapping[float, Scores] | None = None,
    upper: float = 1.0,
) -> AlphaChoice:
    """The most general alpha whose speciality keeps `keep` of the fine-tune's gain (or reaches `floor`).

    Args:
        evaluate: scores the merge at an alpha, returning `(speciality, generality)` (higher is
            better for both), e.g. by merging with `iter_merge` and running the evaluation.
        keep: the share of the speciality gain to keep: the floor is `s(0) + keep * (s(1) - s(0))`;
            in (0, 1]; 0.95 when neither `keep` nor `floor` is given.
        floor: an absolute speciality floor instead of `keep`.
        budget: evaluations allowed besides the two ends (at least 1).
        resolution: stop once the bracket around the crossing is this narrow (a share of `upper`).
        slack: how far speciality may fall between two scored points, as alpha grows, before the
            curve counts as not monotone (evaluation noise).
        known: points already scored, `alpha -> (speciality, generality)`, e.g. the ends: not
            scored again.
        upper: the top of the range searched, whose speciality `keep` counts the gain to: 1 (the
            fine-tuned model) for one alpha; for the mean alpha of a group shape, the largest mean
            it scales to within [0, 1], `AlphaSchedule.max_mean`.

    Returns:
        The `AlphaChoice`.

    Raises:
        ValueError: bad arguments, an `evaluate` that does not return two finite numbers, or no
            scored point that reaches the floor (an absolute floor above the fine-tuned model's).
    """
    if keep is not None and floor is not None:
        raise ValueError(
            "give either keep (a share of the speciality gain) or floor (an absolute speciality), not both"
        )
    if keep is None and floor is None:
        keep = 0.95
    if keep is not None and not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if floor is not None and not _finite(floor):
        raise ValueError(f"floor must be a finite number, got {floor!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if not (_finite(resolution) and 0.0 < resolution < 1.0):
        raise ValueError(f"resolution must be in (0, 1), got {resolution!r}")
    if not (_finite(upper) and 0.0 < upper <= 1.0):
        raise ValueError(f"upper must be in (0, 1], got {upper!r}")
    if not (_finite(slack) and slack >= 0.0):
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    choice = AlphaChoice(alpha=math.nan, speciality=math.nan, generality=math.nan, floor=math.nan)
    for alpha, scores in (known or {}).items():
        choice.evaluated[float(alpha)] = _checked(alpha, scores)

    def score(alpha: float) -> Scores:
        if alpha not in choice.evaluated:
            choice.calls += 1
            choice.evaluated[alpha] = _checked(alpha, evaluate(alpha))
        return choice.evaluated[alpha]

    (s0, _), (s1, _) = score(0.0), score(float(upper))
    choice.floor = floor if floor is not None else s0 + keep * (s1 - s0)
    low, high = 0.0, float(upper)
    if s0 >= choice.floor:
        high = 0.0  # the pre-trained model already meets it (no speciality gained to keep)
        if keep is not None:
            choice.monotone = s1 >= s0
            choice.alpha, choice.speciality, choice.generality = 0.0, *choice.evaluated[0.0]
            choice.reason = (
                f"the fine-tuned end's speciality {s1:g} is not above the pre-trained model's {s0:g}: "
                "no gain to keep, so alpha 0 (the pre-trained model)"
            )
            return choice
    spent = 0
    while high - low > resolution * upper and spent < budget:
        middle = (low + high) / 2
        fresh = middle not in choice.evaluated
        speciality, _ = score(middle)
        spent += fresh
        if speciality >= choice.floor:
            high = middle
        else:
            low = middle
    return _choose(choice, slack)


def _choose(choice: AlphaChoice, slack: float) -> AlphaChoice:
    points = sorted(choice.evaluated.items())
    drops = [(a, b) for (a, (sa, _)), (b, (sb, _)) in zip(points, points[1:]) if sb < sa - slack]
    meeting = [(alpha, scores) for alpha, scores in points if scores[0] >= choice.floor]
    if not meeting:
        best_alpha, (best, _) = max(points, key=lambda point: point[1][0])
        raise ValueError(
            f"no scored point reaches the speciality floor {choice.floor:g}: the best is {best:g} at "
            f"alpha {best_alpha:g}"
        )
    alpha, (speciality, generality) = max(meeting, key=lambda point: (point[1][1], -point[0]))
    choice.alpha, choice.speciality, choice.generality = alpha, speciality, generality
    choice.monotone = not drops
    if drops:
        a, b = drops[0]
        choice.reason = (
            f"speciality is not monotone in alpha (it falls from alpha {a:g} to {b:g}): the bracket cannot be "
            f"trusted, so alpha {alpha:g} is the most general of the {len(points)} scored points that reach "
            f"{choice.floor:g}"
        )
    else:
        choice.reason = (
            f"alpha {alpha:g} is the most general of the {len(points)} scored points that reach the speciality floor "
            f"{choice.floor:g} ({choice.calls} evaluations)"
        )
    return choice


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked(alpha: float, scores: object) -> Scores:
    if not isinstance(scores, (tuple, list)) or len(scores) != 2 or not all(_finite(value) for value in scores):
        raise ValueError(
            f"evaluate({alpha:g}) must return (speciality, generality), two finite numbers, got {scores!r}"
        )
    return float(scores[0]), float(scores[1])
