"""Greedy soups (Wortsman et al. 2022, "Model soups"): add a fine-tune to the soup only if the
held-out score of the uniform average does not drop."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import MergeError
from .options import MergeOptions
from .run import iter_merge


StateDict = dict[str, torch.Tensor]


@dataclass
class Soup:
    """The result of `greedy_soup`.

    Attributes:
        ingredients: the fine-tunes kept, in the order they were added.
        score: the held-out score of their uniform average.
        individual: each candidate's own score, by candidate.
        tried: every soup evaluated, `(ingredients, score)`, in order.
    """

    ingredients: list[str]
    score: float
    individual: dict[str, float]
    tried: list[tuple[list[str], float]] = field(default_factory=list)


def greedy_soup(
    pretrained: str | os.PathLike,
    candidates: Sequence[str | os.PathLike],
    evaluate: Callable[[StateDict], float],
    options: MergeOptions | None = None,
) -> Soup:
    """The greedy soup of `candidates`, fine-tunes of `pretrained`.

    Candidates are ranked by their own score; the soup starts with the best, and each next one is
    added if the uniform average with it scores at least as well as the soup without it. Soups are
    built in memory (`iter_merge`, the `linear` method at alpha 1), one at a time: write the result
    with `merge(pretrained, soup.ingredients, 1.0, output_dir)`.

    Args:
        pretrained: the base model the candidates were fine-tuned from.
        candidates: fine-tuned model directories (or Hub ids), distinct.
        evaluate: the held-out score of a state dict (higher is better); load it with
            `model.load_state_dict(state_dict, strict=False)` (tied weights appear once).
        options: `dtype` of the state dicts; the method must be `linear` and no weights given
            (a soup is a uniform average).

    Returns:
        The `Soup`.
    """
    options = options or MergeOptions()
    if options.method != "linear" or options.weights is not None:
        raise MergeError("greedy_soup averages uniformly: options.method must be 'linear' and options.weights None")
    names = [str(c) for c in candidates]
    if not names:
        raise MergeError("greedy_soup: no candidates given")
    if len(set(names)) != len(names):
        raise MergeError(f"greedy_soup: candidates repeat: {names}")

    def score(ingredients: list[str]) -> float:
        ((_, state),) = list(iter_merge(pretrained, ingredients, [1.0], options))
        value = float(evaluate(state))
        if value != value:  # NaN: no order to keep
            raise MergeError(f"greedy_soup: evaluate returned NaN for {ingredients}")
        return value

    individual = {name: score([name]) for name in names}
    ranked = sorted(names, key=lambda name: individual[name], reverse=True)  # stable: ties keep the given order
    soup = Soup([ranked[0]], individual[ranked[0]], individual, [([ranked[0]], individual[ranked[0]])])
    for name in ranked[1:]:
        trial = [*soup.ingredients, name]
        value = score(trial)
        soup.tried.append((trial, value))
        if value >= soup.score:
            soup.ingredients, soup.score = trial, value
    return soup
