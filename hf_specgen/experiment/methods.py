"""Fine-tuning methods a recipe compares, by name: `full`, one regularizer (`l1`, `l2`, `ewc`,
`mas`, `kd`, `feature`: the registry's names), `lora`, or a combination joined by `+` (e.g.
`kd+feature`, `lora+l2`); any of them with a moving average of the weights during training,
`+ema` or `+sma` (e.g. `full+ema`, `l2+sma`), whose averaged weights become the run's model. A recipe
that trains with more than one algorithm (the alignment-tax recipe: `dpo`, `rsf`) takes the algorithm
as a part of the name too (`dpo`, `dpo+l2`, `rsf+kd`); a name without one trains with its first.

A method switches on its regularizers at the strengths the configuration gives (`l2_lambda`, ...)
and switches the others off, so one configuration holds every method's strength.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..args import SpecGenTrainingArguments
from ..regularizers import MAS, weight_field
from ..regularizers import REGULARIZERS as REGISTRY


REGULARIZERS = tuple(REGISTRY)
METHODS = ("full", *REGULARIZERS, "lora")
ALGORITHMS = ("dpo", "rsf")  # training algorithms a recipe may offer (`Recipe.algorithms`)
AVERAGES = ("ema", "sma")  # moving averages of the weights during training (`hf_specgen.averaging`)
# Regularizers a recipe trains only when its configuration names them (`--methods ... mas`).
OPT_IN = (MAS.name,)
# What a recipe compares when its configuration names no methods: every method but the opt-in ones.
DEFAULT_METHODS = tuple(method for method in METHODS if method not in OPT_IN)


@dataclass(frozen=True)
class Method:
    """A named way to fine-tune: the regularizers it switches on and whether it trains a LoRA adapter.

    Args:
        name: the method's name as written, e.g. `"kd+feature"`, `"full+ema"`, `"dpo+l2"`.
        regularizers: the regularizers it switches on, e.g. `("kd", "feature")`.
        lora: whether it trains a LoRA adapter.
        average: `"ema"` or `"sma"`: the run's model is the moving average of its weights; None: the weights.
        algorithm: `"dpo"` or `"rsf"` (`ALGORITHMS`); None: the recipe's first or only way to train.
    """

    name: str
    regularizers: tuple[str, ...]
    lora: bool
    average: str | None = None  # "ema" or "sma": the run's model is the moving average of its weights
    algorithm: str | None = None  # "dpo" or "rsf" (`ALGORITHMS`); None: the recipe's first or only way to train

    @classmethod
    def parse(cls, name: str) -> Method:
        parts = name.split("+")
        averages = [p for p in parts if p in AVERAGES]
        algorithms = [p for p in parts if p in ALGORITHMS]
        trained = [p for p in parts if p not in AVERAGES and p not in ALGORITHMS]
        unknown = [p for p in trained if p not in METHODS]
        full_with_more = "full" in trained and (len(trained) > 1 or algorithms)
        if unknown or len(set(parts)) != len(parts) or full_with_more or len(averages) > 1 or len(algorithms) > 1:
            raise ValueError(
                f"unknown method {name!r}: use one of {', '.join(METHODS)} or a '+' combination of "
                f"{', '.join(REGULARIZERS)} and lora (e.g. kd+feature), optionally with one of {', '.join(AVERAGES)} "
                f"(e.g. full+ema, l2+sma) and, where the recipe offers them, one algorithm of {', '.join(ALGORITHMS)} "
                "(e.g. dpo, dpo+l2: plain dpo is written dpo, not dpo+full)"
            )
        if not trained and not algorithms:
            raise ValueError(
                f"method {name!r} averages a training's weights: name the training too, e.g. full+{averages[0]}"
            )
        return cls(
            name,
            tuple(p for p in parts if p in REGULARIZERS),
            "lora" in parts,
            averages[0] if averages else None,
            algorithms[0] if algorithms else None,
        )

    @property
    def strength_fields(self) -> tuple[str, ...]:
        """The options that set this method's strengths: each regularizer's `<name>_lambda`, and `lora_r`."""
        return (*(weight_field(r) for r in self.regularizers), *(("lora_r",) if self.lora else ()))

    def training_arguments(self, base: SpecGenTrainingArguments, **changes: object) -> SpecGenTrainingArguments:
        """`base` with this method's regularizers at their configured strength and the others off."""
        strengths = {
            weight_field(r): getattr(base, weight_field(r)) if r in self.regularizers else 0.0 for r in REGULARIZERS
        }
        return dataclasses.replace(base, **strengths, **changes)

    def hyperparameter(self, base: SpecGenTrainingArguments, lora_r: int) -> tuple[str | None, float | None]:
        """The strength a report shows beside the method: its single regularizer's weight, or LoRA's rank."""
        if len(self.regularizers) == 1 and not self.lora:
            name = weight_field(self.regularizers[0])
            return name, getattr(base, name)
        if self.lora and not self.regularizers:
            return "lora_r", float(lora_r)
        return None, None


def parse_methods(names: list[str], base: SpecGenTrainingArguments) -> list[Method]:
    """The methods named, checked: known, not repeated, and each regularizer given a finite strength
    > 0 (and `kd` a finite temperature > 0), whatever `base`'s own checks let through.

    Args:
        names: the methods' names, e.g. `["full", "l2", "kd+feature"]`.
        base: the training arguments holding the strengths.

    Returns:
        The parsed methods, in the order given.
    """
    if not names:
        raise ValueError("methods is empty: name at least one of " + ", ".join(METHODS))
    if len(set(names)) != len(names):
        raise ValueError(f"methods {names} name a method twice")
    methods = [Method.parse(name) for name in names]
    for method in methods:
        needs = {weight_field(r): "its strength" for r in method.regularizers}
        for r in method.regularizers:
            needs.update(REGISTRY[r].positive_options)  # e.g. kd's temperature
        for name, what in needs.items():
            value = getattr(base, name)
            if not math.isfinite(value) or value <= 0:  # isfinite first: NaN passes `<= 0`
                raise ValueError(f"method {method.name!r} needs {name} > 0 ({what}), a finite number, got {value}")
    return methods
