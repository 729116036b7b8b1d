"""Strength grids: every method trained at each of its strengths, so that methods are compared by
their curves rather than by one strength each.

Each `<name>_lambda` and `lora_r` of a recipe's configuration may be a list (`l2_lambda: [1e-3,
1e-2, 1e-1]` in the YAML, `--l2_lambda 1e-3 1e-2 1e-1` on the command line). A method with one
strength option (`l2`, `lora`) trains once per value; a combination (`kd+l2`, `lora+l2`) trains at
the product of its lists (`strength_combination: product`, the default) or at paired values
(`paired`: the i-th value of each list together; lists of one value pair with every position).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..regularizers import REGULARIZERS, weight_field
from .methods import Method


# The options that may hold a list of strengths.
GRID_FIELDS = (*(weight_field(name) for name in REGULARIZERS), "lora_r")
COMBINATIONS = ("product", "paired")


@dataclass(frozen=True)
class TrainingPoint:
    """One training of the comparison: a method at its strengths (e.g. `l2` at `{"l2_lambda": 0.01}`)."""

    method: Method
    strengths: tuple[tuple[str, float], ...]  # (option, value) in the method's order

    @property
    def values(self) -> dict[str, float]:
        return dict(self.strengths)

    def describe(self) -> str:
        """E.g. `l2 (l2_lambda=0.01)`, or `full`."""
        inner = ", ".join(f"{name}={value:g}" for name, value in self.strengths)
        return f"{self.method.name} ({inner})" if inner else self.method.name


def check_grid(name: str, values: Sequence[Any]) -> list[float]:
    """A strength list of option `name`: non-empty, finite numbers > 0 (whole numbers for `lora_r`), no value
    twice; else a `ValueError` naming it (a strength of 0 is another method: `full`).

    Args:
        name: the option (`l2_lambda`, `lora_r`, ...).
        values: its values, already converted to numbers.

    Returns:
        The values as a list.
    """
    values = list(values)
    if not values:
        raise ValueError(f"{name} is an empty list: give one strength or more")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be finite numbers, got {values}")
        if value <= 0 or (name == "lora_r" and value != int(value)):
            raise ValueError(f"{name} must be {'whole numbers' if name == 'lora_r' else 'numbers'} > 0, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} {values} repeats a value")
    return values


def expand_points(
    methods: Sequence[Method],
    grids: Mapping[str, Sequence[float]],
    defaults: Mapping[str, float],
    combination: str = "product",
) -> list[TrainingPoint]:
    """The trainings a comparison implies: each method at each of its strengths.

    Args:
        methods: the methods compared.
        grids: the options given as lists, `{"l2_lambda": [1e-3, 1e-2], ...}` (checked by `check_grid`).
        defaults: every strength option's single value (the configuration's own), used where no list is given.
        combination: `product` (every combination of a combined method's lists) or `paired` (the i-th values
            together; the lists must have one length, or one value).

    Returns:
        The points, method by method in the order given, strengths in the order of their lists.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"strength_combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    unknown = sorted(set(grids) - set(GRID_FIELDS))
    if unknown:
        raise ValueError(f"{unknown} cannot be lists: only {', '.join(GRID_FIELDS)} can")
    points = []
    for method in methods:
        names = method.strength_fields
        lists = [check_grid(name, grids[name]) if name in grids else [defaults[name]] for name in names]
        for values in _combine(method.name, names, lists, combination):
            points.append(TrainingPoint(method, tuple(zip(names, values))))
    return points


def _combine(method: str, names: Sequence[str], lists: list[list[float]], combination: str) -> list[tuple[float, ...]]:
    if combination == "product" or len(lists) < 2:
        return list(itertools.product(*lists))
    lengths = {len(values) for values in lists if len(values) > 1}
    if len(lengths) > 1:
        given = ", ".join(f"{name} {len(values)}" for name, values in zip(names, lists))
        raise ValueError(
            f"method {method}: strength_combination paired needs lists of one length (or one value), got {given}"
        )
    length = lengths.pop() if lengths else 1
    return [tuple(values[i] if len(values) > 1 else values[0] for values in lists) for i in range(length)]


def grid_summary(points: Sequence[TrainingPoint]) -> str:
    """One line on what a grid implies, e.g. `5 trainings: full 1, l2 3 (l2_lambda 0.001, 0.01, 0.1), lora 1`."""
    by_method: dict[str, list[TrainingPoint]] = {}
    for point in points:
        by_method.setdefault(point.method.name, []).append(point)
    parts = []
    for name, group in by_method.items():
        varied = [option for option, _ in group[0].strengths if len({p.values[option] for p in group}) > 1]
        detail = "; ".join(f"{option} " + ", ".join(f"{p.values[option]:g}" for p in group) for option in varied)
        parts.append(f"{name} {len(group)}" + (f" ({detail})" if detail else ""))
    return f"{len(points)} training{'s' if len(points) != 1 else ''}: " + ", ".join(parts)
