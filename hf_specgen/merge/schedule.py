"""Which alpha each tensor gets: one number, one per group of consecutive blocks, or per name rule.

Heterogeneous Model Averaging (HMA, "Mitigating the Alignment Tax of RLHF") gives each of K
contiguous groups of transformer blocks its own ratio: `group_alphas=(0.1, 0.2, 0.3)` is input,
middle and output for K = 3. Blocks are found by name, the first `<container>.<N>.` in it with
the container one of `layers`, `layer`, `h`, `blocks`, `block` (`model.layers.N.`,
`transformer.h.N.`, `encoder.layer.N.`, T5's `encoder.block.N.`): every container (a "stack",
e.g. CLIP's `text_model.encoder.layers` and `vision_model.encoder.layers`, an encoder and a
decoder) is split on its own, block `b` of `n` in group `b * K // n`. Tensors outside every
stack (embeddings, final norm, head) get `outside_alpha`, by default the groups' mean (as in the
paper).

Rules are regular expressions over tensor names (`re.search`), first match wins, `alpha` for the
others. With `linear_only`, only the weights of linear layers (`nn.Linear`, GPT-2's `Conv1D`)
follow the schedule; every other tensor (embeddings, norms, biases) gets `non_linear_alpha`, by
default 1: the fine-tuned model's, not averaged.

Everything is checked before a merge writes anything: alphas, regular expressions, a group count
larger than a stack's blocks, a rule that matches no tensor.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import MergeError


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch

BLOCK = re.compile(r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.")


def find_block(name: str) -> tuple[str, int] | None:
    """`(stack, index)` of the transformer block a tensor belongs to, e.g. `("model.layers", 3)` for
    `model.layers.3.mlp.up_proj.weight`; None outside the blocks."""
    match = BLOCK.match(name)
    return (match["stack"], int(match["index"])) if match else None


def block_counts(names: Sequence[str]) -> dict[str, int]:
    """The number of blocks of each stack (highest index + 1), in order of first appearance."""
    counts: dict[str, int] = {}
    for name in names:
        found = find_block(name)
        if found is not None:
            stack, index = found
            counts[stack] = max(counts.get(stack, 0), index + 1)
    return counts


@dataclass(frozen=True)
class AlphaSchedule:
    """The alpha of every tensor of a merge (0: pre-trained, 1: fine-tuned).

    Attributes:
        alpha: every tensor's alpha; with `rules`, the alpha of tensors no rule matches.
        group_alphas: one alpha per group of consecutive blocks, input side first (HMA).
        outside_alpha: with `group_alphas`, the alpha of tensors outside the blocks (default:
            the mean of `group_alphas`).
        rules: `(regular expression, alpha)` pairs over tensor names, first match wins.
        linear_only: only the weights of linear layers follow the schedule.
        non_linear_alpha: with `linear_only`, every other tensor's alpha (default 1: not averaged).
    """

    alpha: float | None = None
    group_alphas: tuple[float, ...] | None = None
    outside_alpha: float | None = None
    rules: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    linear_only: bool = False
    non_linear_alpha: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.group_alphas, str) or isinstance(self.rules, str):
            raise MergeError(
                "group_alphas and rules take sequences (e.g. (0.1, 0.2, 0.3) and (('mlp', 0.3),)), not a string"
            )
        if self.group_alphas is not None:
            object.__setattr__(self, "group_alphas", tuple(self.group_alphas))
        rules = []
        for rule in self.rules:
            if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
                raise MergeError(f"an alpha rule is a (regular expression, alpha) pair, got {rule!r}")
            rules.append(tuple(rule))
        object.__setattr__(self, "rules", tuple(rules))

    @property
    def scalar(self) -> bool:
        """One alpha for every tensor (plain WiSE-FT)."""
        return self.group_alphas is None and not self.rules and not self.linear_only

    @property
    def mean(self) -> float:
        """The alpha that sums the schedule up: `alpha`, or the groups' mean."""
        if self.group_alphas is None:
            return self.alpha
        return _round(statistics.fmean(self.group_alphas))

    def check(self, extrapolate: bool) -> None:
        """A `MergeError` for alphas out of range (outside [0, 1] without `extrapolate`, not finite),
        a missing or doubly given alpha, or a rule that is not a regular expression."""
        if self.group_alphas is not None and self.rules:
            raise MergeError(
                "group alphas (--group-alphas) and alpha rules (--alpha-rule) do not go together: choose one"
            )
        if self.group_alphas is not None:
            if not self.group_alphas:
                raise MergeError("group alphas (--group-alphas): none given")
            if self.alpha is not None:
                raise MergeError("give either alpha (--alpha) or group alphas (--group-alphas), not both")
        elif self.alpha is None:
            raise MergeError("no alpha given (--alpha, or --group-alphas)")
        elif self.outside_alpha is not None:
            raise MergeError("outside_alpha (--outside-alpha) goes with group alphas (--group-alphas)")
        named = [("alpha", self.alpha), ("outside_alpha (--outside-alpha)", self.outside_alpha)]
        named += [(f"group alpha {i + 1}", a) for i, a in enumerate(self.group_alphas or ())]
        named += [(f"alpha rule {pattern!r}", a) for pattern, a in self.rules]
        if self.linear_only:
            named.append(("non_linear_alpha (--non-linear-alpha)", self.non_linear_alpha))
        for what, value in named:
            if value is not None:
                check_alpha(value, extrapolate, what)
        for pattern, _ in self.rules:
            if pattern == "":
                raise MergeError(
                    "alpha rule '' (--alpha-rule) is empty: it would match every tensor; use --alpha instead"
                )
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise MergeError(f"alpha rule {pattern!r} is not a regular expression ({error})") from None

    @property
    def max_mean(self) -> float:
        """The largest mean alpha this schedule's group shape scales to with every group alpha in [0, 1]
        (1 without group alphas)."""
        if self.group_alphas is None or max(self.group_alphas) <= 0:
            return 1.0
        return _round(min(1.0, statistics.fmean(self.group_alphas) / max(self.group_alphas)))

    def at_mean(self, mean: float) -> AlphaSchedule:
        """This schedule's shape at another mean: a sweep point. Group alphas are scaled so that their
        mean is `mean` (their mean must not be 0); otherwise `alpha` becomes `mean`."""
        if self.group_alphas is None:
            return replace(self, alpha=mean)
        current = statistics.fmean(self.group_alphas)
        if current == 0:
            raise MergeError(
                f"the group shape {list(self.group_alphas)} has mean 0: it cannot be scaled to a mean alpha"
            )
        return replace(self, group_alphas=tuple(_round(a * mean / current) for a in self.group_alphas))

    def resolve(
        self, names: Sequence[str], linear: set[str] | None = None, model_names: Sequence[str] | None = None
    ) -> dict[str, float]:
        """The alpha of each tensor name.

        Args:
            names: every tensor of the merge, by the name the schedule knows it by.
            linear: the weights of linear layers (needed with `linear_only`; None: unknown).
            model_names: every tensor of the model, where `names` are only some of them (an adapter's):
                blocks are counted and rules must match among these (default: `names`).

        Returns:
            `{name: alpha}`; a `MergeError` where the groups or rules do not fit the names.
        """
        if self.linear_only and linear is None:
            raise MergeError(
                "linear_only (--linear-only) needs the architecture to know the linear layers: transformers cannot "
                "build it from the pre-trained model's config.json"
            )
        universe = list(model_names) if model_names is not None else names
        if self.group_alphas is not None:
            alphas = self._by_groups(names, universe)
        elif self.rules:
            alphas = self._by_rules(names, universe)
        else:
            alphas = {name: self.alpha for name in names}
        if self.linear_only:
            alphas = {name: a if name in linear else self.non_linear_alpha for name, a in alphas.items()}
        return alphas

    def _by_groups(self, names: Sequence[str], universe: Sequence[str]) -> dict[str, float]:
        counts, k = block_counts([*universe, *names]), len(self.group_alphas)
        if not counts:
            raise MergeError(
                "group alphas (--group-alphas): no transformer blocks found in the tensor names (layers.N., h.N., "
                "blocks.N., layer.N., block.N.); use alpha rules (--alpha-rule) instead"
            )
        small = [(stack, n) for stack, n in counts.items() if n < k]
        if small:
            stack, n = small[0]
            raise MergeError(f"group alphas (--group-alphas): {k} groups, but {stack} has only {n} blocks")
        outside = self.outside_alpha if self.outside_alpha is not None else self.mean
        alphas = {}
        for name in names:
            found = find_block(name)
            alphas[name] = outside if found is None else self.group_alphas[found[1] * k // counts[found[0]]]
        return alphas

    def _by_rules(self, names: Sequence[str], universe: Sequence[str]) -> dict[str, float]:
        compiled = [(re.compile(pattern), a) for pattern, a in self.rules]
        everything = [*universe, *names]
        unmatched = [p for (p, _), (r, _) in zip(self.rules, compiled) if not any(r.search(n) for n in everything)]
        if unmatched:
            raise MergeError(f"alpha rule {unmatched[0]!r} (--alpha-rule) matches no tensor of the model")
        return {name: next((a for r, a in compiled if r.search(name)), self.alpha) for name in names}

    def describe(self) -> dict[str, Any]:
        """What `merge_config.json`, the model card and report records say of the schedule."""
        if self.group_alphas is not None:
            kind = {
                "kind": "groups",
                "group_alphas": list(self.group_alphas),
                "outside_alpha": self.outside_alpha if self.outside_alpha is not None else self.mean,
            }
        elif self.rules:
            kind = {"kind": "rules", "rules": [[p, a] for p, a in self.rules], "default_alpha": self.alpha}
        else:
            kind = {"kind": "scalar", "alpha": self.alpha}
        if self.linear_only:
            kind.update(linear_only=True, non_linear_alpha=self.non_linear_alpha)
        return {**kind, "mean_alpha": self.mean}


def _round(alpha: float) -> float:
    """To 12 significant digits: a shape scaled to a mean of 0.2 gives 0.2, not 0.20000000000000004."""
    return float(f"{alpha:.12g}")


def check_alpha(alpha: Any, extrapolate: bool, what: str = "alpha") -> float:
    """`alpha` as a float; a `MergeError` unless it is finite, within float32 range and in [0, 1]
    (or outside, with `extrapolate`)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise MergeError(f"{what} must be a number, got {alpha!r}")
    if not math.isfinite(alpha) or abs(alpha) > FLOAT32_MAX:  # torch.lerp would raise
        raise MergeError(
            f"{what} must be a finite number within float32 range (merged tensors are at most float32), got {alpha}"
        )
    if not extrapolate and not 0.0 <= alpha <= 1.0:
        raise MergeError(
            f"{what} must be in [0, 1] (0: pretrained, 1: finetuned), got {alpha}; "
            "pass extrapolate=True (--extrapolate) to go beyond"
        )
    return float(alpha)
