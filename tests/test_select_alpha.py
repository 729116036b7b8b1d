"""select_alpha: the most general alpha that keeps a speciality floor, on curves whose answer is known."""

from __future__ import annotations

import math

import pytest
from conftest import save
from merge_helpers import tiny_llama

from hf_specgen.merge import AlphaChoice, AlphaSchedule, iter_merge, select_alpha


def curve(speciality, generality=lambda a: 1.0 - a):
    calls = []

    def evaluate(alpha):
        calls.append(alpha)
        return speciality(alpha), generality(alpha)

    return evaluate, calls


def test_bisection_on_a_monotone_curve_finds_the_crossing_within_the_budget():
    """s = alpha^2 from 0 to 1, keep 0.95: the floor 0.95 is crossed at sqrt(0.95) = 0.9747; six halvings
    bracket it in (0.96875, 0.984375] and the upper end is the most general point that reaches it."""
    evaluate, calls = curve(lambda a: a * a)
    choice = select_alpha(evaluate, keep=0.95)
    assert isinstance(choice, AlphaChoice)
    assert calls == [0.0, 1.0, 0.5, 0.75, 0.875, 0.9375, 0.96875, 0.984375]
    assert choice.alpha == 0.984375 and choice.speciality == 0.984375**2 and choice.generality == 1 - 0.984375
    assert choice.floor == 0.95 and choice.calls == 8 and choice.monotone
    assert list(choice.evaluated) == calls
    assert "most general of the 8 scored points" in choice.reason


def test_the_floor_is_a_share_of_the_gain_over_the_pretrained_model():
    """s from 0.2 (alpha 0) to 0.8 (alpha 1), linear: keep 0.5 is a floor of 0.5, reached at alpha 0.5 exactly."""
    evaluate, calls = curve(lambda a: 0.2 + 0.6 * a)
    choice = select_alpha(evaluate, keep=0.5, budget=3)
    assert choice.floor == pytest.approx(0.5) and calls == [0.0, 1.0, 0.5, 0.25, 0.375]
    assert choice.alpha == 0.5 and choice.speciality == pytest.approx(0.5)


def test_known_points_are_not_scored_again_and_resolution_stops_early():
    evaluate, calls = curve(lambda a: a)
    known = {0.0: (0.0, 1.0), 1.0: (1.0, 0.0)}
    choice = select_alpha(evaluate, keep=0.3, budget=50, resolution=0.1, known=known)
    assert calls == [0.5, 0.25, 0.375, 0.3125]  # the bracket (0.25, 0.3125] is narrower than 0.1
    assert choice.alpha == 0.3125 and choice.calls == 4 and len(choice.evaluated) == 6


def test_an_absolute_floor_and_a_floor_the_pretrained_model_meets():
    evaluate, _ = curve(lambda a: 0.5 + 0.5 * a)
    assert select_alpha(evaluate, keep=None, floor=0.75, budget=1).alpha == 0.5
    evaluate, calls = curve(lambda a: 0.5 + 0.5 * a)
    choice = select_alpha(evaluate, keep=None, floor=0.4)
    assert choice.alpha == 0.0 and calls == [0.0, 1.0]  # alpha 0 reaches it: nothing to bracket
    evaluate, _ = curve(lambda a: 0.5 - 0.1 * a)  # the fine-tune lost speciality: nothing to keep
    assert select_alpha(evaluate, keep=0.95).alpha == 0.0


def test_a_curve_that_is_not_monotone_is_said_so_and_the_best_scored_point_is_kept():
    """Speciality peaks at 0.5 and dips at 0.75: bisection would trust (0.5, 1]; the check sees the dip,
    and the choice is the most general scored point that reaches the floor."""
    table = {0.0: 0.1, 1.0: 0.96, 0.5: 0.95, 0.25: 0.2, 0.375: 0.5, 0.4375: 0.7, 0.75: 0.3}
    evaluate, calls = curve(lambda a: table[a])
    choice = select_alpha(evaluate, keep=0.9, budget=4, known=None)
    assert calls == [0.0, 1.0, 0.5, 0.25, 0.375, 0.4375]
    assert choice.monotone and choice.alpha == 0.5  # no dip among the points it scored
    evaluate, _ = curve(lambda a: table[a])
    choice = select_alpha(evaluate, keep=0.9, budget=4, known={0.75: (0.3, 0.25)})
    assert not choice.monotone and choice.alpha == 0.5
    assert choice.reason.startswith("speciality is not monotone in alpha (it falls from alpha 0.5 to 0.75)")
    slack = select_alpha(curve(lambda a: {0.0: 0.1, 1.0: 0.9, 0.5: 0.91}[a])[0], keep=0.5, budget=1, slack=0.02)
    assert slack.monotone  # a fall of 0.01 from 0.5 to 1 is within the slack


def test_an_unreachable_floor_names_the_best_point():
    evaluate, _ = curve(lambda a: 0.5 * a)
    with pytest.raises(
        ValueError, match=r"^no scored point reaches the speciality floor 0.9: the best is 0.5 at alpha 1$"
    ):
        select_alpha(evaluate, keep=None, floor=0.9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0.0}, "keep must be in (0, 1], got 0.0"),
        ({"keep": 1.5}, "keep must be in (0, 1]"),
        ({"keep": 0.9, "floor": 0.5}, "give either keep"),
        ({"floor": math.nan, "keep": None}, "floor must be a finite number"),
        ({"budget": 0}, "budget must be an integer >= 1"),
        ({"resolution": 0}, "resolution must be in (0, 1)"),
        ({"upper": 1.5}, "upper must be in (0, 1]"),
        ({"slack": -1}, "slack must be a finite number >= 0"),
        ({"known": {0.5: (0.1,)}}, "evaluate(0.5) must return (speciality, generality)"),
    ],
)
def test_bad_arguments_are_one_message(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}"):
        select_alpha(lambda a: (a, 1 - a), **kwargs)
    with pytest.raises(
        ValueError, match=r"evaluate\(0\) must return \(speciality, generality\), two finite numbers, got nan"
    ):
        select_alpha(lambda a: math.nan)


def test_selecting_the_mean_alpha_of_a_group_schedule_on_real_merges(tmp_path):
    """The mean alpha of a group shape, each point a real in-memory merge scored by its distance to each
    end: speciality = closeness to the fine-tuned weights, generality = closeness to the pre-trained ones."""
    pre = save(tiny_llama(0, layers=4), tmp_path / "pre")
    ft = save(tiny_llama(1, layers=4), tmp_path / "ft")
    pre_sd, ft_sd = (dict(next(iter_merge(pre, ft, [a]))[1]) for a in (0.0, 1.0))
    total = sum(float((ft_sd[k] - pre_sd[k]).norm() ** 2) for k in ft_sd)
    shape = AlphaSchedule(group_alphas=(0.5, 1.0, 1.5))
    assert shape.max_mean == pytest.approx(2 / 3) and shape.at_mean(shape.max_mean).group_alphas[-1] == 1.0

    def evaluate(mean):
        ((_, state),) = iter_merge(pre, ft, [shape.at_mean(mean)] if mean > 0 else [0.0])
        to_ft = sum(float((state[k] - ft_sd[k]).norm() ** 2) for k in state) / total
        to_pre = sum(float((state[k] - pre_sd[k]).norm() ** 2) for k in state) / total
        return 1 - to_ft, 1 - to_pre

    choice = select_alpha(evaluate, keep=0.75, budget=4, upper=shape.max_mean)
    assert list(choice.evaluated)[:2] == [0.0, shape.max_mean]
    assert choice.monotone and 0.0 < choice.alpha < shape.max_mean and choice.speciality >= choice.floor
    lower = max(a for a in choice.evaluated if a < choice.alpha)
    assert choice.evaluated[lower][0] < choice.floor  # the bracket: just below the choice misses the floor


def test_floor_alone_and_neither_keep_nor_floor():
    """`floor=` needs no `keep=None`; with neither, keep is 0.95. A fine-tune without a speciality gain
    gives alpha 0 without an evaluation, and says why."""
    evaluate, calls = curve(lambda a: a)
    assert select_alpha(evaluate, floor=0.5, budget=1).alpha == 0.5
    evaluate, calls = curve(lambda a: a)
    assert select_alpha(evaluate).floor == 0.95
    evaluate, calls = curve(lambda a: 0.5 - 0.25 * a)  # the fine-tune lost speciality
    choice = select_alpha(evaluate, keep=0.9)
    assert (choice.alpha, choice.calls, choice.monotone) == (0.0, 2, False)
    assert choice.reason.startswith(
        "the fine-tuned end's speciality 0.25 is not above the pre-trained model's 0.5: no gain"
    )
