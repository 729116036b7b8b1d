"""The regularizer fields as a mixin dataclass, `SpecGenArguments`, and `SpecGenTrainingArguments`.

`SpecGenArguments` composes with any `TrainingArguments` subclass (TRL's configs too, see
`hf_specgen.trl`): `@dataclass class MyConfig(SpecGenArguments, SomeTrainingArguments)`. Its
fields come after the base's, its validation runs after the base's `__post_init__`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from .dtypes import DTYPES
from .regularizers import REGULARIZERS, weight_field


L2_MODES = ("penalty", "decoupled")
FISHER_TYPES = ("true", "empirical")
ANCHOR_DTYPES = ("auto", *DTYPES)


@dataclass
class SpecGenArguments:
    """The anti-forgetting regularizers of hf_specgen, as fields to mix into training arguments.

    A regularizer is on when its weight `<name>_lambda` is > 0. With every weight at 0 (the
    default) a SpecGen trainer is exactly its base trainer.

    Args:
        l1_lambda: Weight of the L1 distance to the pre-trained weights, sum |theta - theta_pre|.
        l2_lambda: Weight of the L2-SP distance to the pre-trained weights, sum (theta - theta_pre)^2.
        l2_mode: 'penalty': L2-SP added to the loss (its gradient is clipped with the task gradient). 'decoupled':
            decay toward the pre-trained weights in the optimizer step, theta -= lr * l2_lambda * (theta -
            theta_pre), like AdamW's decoupled weight decay.
        ewc_lambda: Weight of EWC, sum F_i (theta_i - theta_pre_i)^2 with a diagonal Fisher F.
        ewc_num_samples: Number of training examples the diagonal Fisher is estimated from.
        ewc_fisher: 'true': labels sampled from the pre-trained model's predictive distribution (the Fisher
            information); 'empirical': the data set's own labels (the empirical Fisher).
        mas_lambda: Weight of MAS, sum Omega_i (theta_i - theta_pre_i)^2 with Omega the output's sensitivity (needs
            no labels).
        mas_num_samples: Number of training examples MAS's importance is estimated from.
        kd_lambda: Weight of logit distillation, T^2 * KL(p_pre / T || p_theta / T) per supervised token.
        kd_temperature: Softmax temperature T of logit distillation.
        feature_lambda: Weight of feature protection, mean ||h_theta(x) - h_pre(x)||^2 on the protected features.
        feature_layers: Hidden-state indices protected for language models (0 = embeddings, -1 = last layer). CLIP
            models protect their image embeddings and ignore this.
        anchor_dtype: dtype of the pre-trained weight snapshot and of the frozen teacher ('auto': the weights' own
            dtype, which is lossless). Differences and the Fisher are always computed in float32.
        anchor_device: Device of the weight snapshot and the teacher ('auto': the model's device, or e.g. 'cpu').
    """

    l1_lambda: float = field(
        default=0.0,
        metadata={"help": "Weight of the L1 distance to the pre-trained weights, sum |theta - theta_pre|."},
    )
    l2_lambda: float = field(
        default=0.0,
        metadata={"help": "Weight of the L2-SP distance to the pre-trained weights, sum (theta - theta_pre)^2."},
    )
    l2_mode: str = field(
        default="penalty",
        metadata={
            "help": "'penalty': L2-SP added to the loss (its gradient is clipped with the task gradient). "
            "'decoupled': decay toward the pre-trained weights in the optimizer step, "
            "theta -= lr * l2_lambda * (theta - theta_pre), like AdamW's decoupled weight decay.",
            "choices": list(L2_MODES),
        },
    )
    ewc_lambda: float = field(
        default=0.0, metadata={"help": "Weight of EWC, sum F_i (theta_i - theta_pre_i)^2 with a diagonal Fisher F."}
    )
    ewc_num_samples: int = field(
        default=128, metadata={"help": "Number of training examples the diagonal Fisher is estimated from."}
    )
    ewc_fisher: str = field(
        default="true",
        metadata={
            "help": "'true': labels sampled from the pre-trained model's predictive distribution (the Fisher "
            "information); 'empirical': the data set's own labels (the empirical Fisher).",
            "choices": list(FISHER_TYPES),
        },
    )
    mas_lambda: float = field(
        default=0.0,
        metadata={
            "help": "Weight of MAS, sum Omega_i (theta_i - theta_pre_i)^2 with Omega the output's sensitivity "
            "(needs no labels)."
        },
    )
    mas_num_samples: int = field(
        default=128, metadata={"help": "Number of training examples MAS's importance is estimated from."}
    )
    kd_lambda: float = field(
        default=0.0,
        metadata={"help": "Weight of logit distillation, T^2 * KL(p_pre / T || p_theta / T) per supervised token."},
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of logit distillation."})
    feature_lambda: float = field(
        default=0.0,
        metadata={"help": "Weight of feature protection, mean ||h_theta(x) - h_pre(x)||^2 on the protected features."},
    )
    feature_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={
            "help": "Hidden-state indices protected for language models (0 = embeddings, -1 = last layer). "
            "CLIP models protect their image embeddings and ignore this."
        },
    )
    anchor_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the pre-trained weight snapshot and of the frozen teacher ('auto': the weights' own "
            "dtype, which is lossless). Differences and the Fisher are always computed in float32.",
            "choices": list(ANCHOR_DTYPES),
        },
    )
    anchor_device: str = field(
        default="auto",
        metadata={
            "help": "Device of the weight snapshot and the teacher ('auto': the model's device, or e.g. 'cpu')."
        },
    )

    def __post_init__(self) -> None:
        base_post_init = getattr(super(), "__post_init__", None)
        if base_post_init is not None:  # the TrainingArguments subclass this is mixed into
            base_post_init()
        _check_floats(self)
        for name in REGULARIZERS:
            if getattr(self, weight_field(name)) < 0:
                raise ValueError(f"{weight_field(name)} must be >= 0, got {getattr(self, weight_field(name))}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        for name in ("ewc_num_samples", "mas_num_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        _check_choice("l2_mode", self.l2_mode, L2_MODES)
        _check_choice("ewc_fisher", self.ewc_fisher, FISHER_TYPES)
        _check_choice("anchor_dtype", self.anchor_dtype, ANCHOR_DTYPES)
        _check_device("anchor_device", self.anchor_device)
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one hidden-state index")


@dataclass
class SpecGenTrainingArguments(SpecGenArguments, TrainingArguments):
    """`TrainingArguments` with the anti-forgetting regularizers of hf_specgen (`SpecGenArguments`).

    With every `<name>_lambda` at 0 (the default) `SpecGenTrainer` is exactly `transformers.Trainer`.
    """


# Fields of this class that must be finite numbers (NaN passes `x < 0`; inf trains to NaN weights).
FINITE_FIELDS = (
    *(weight_field(name) for name in REGULARIZERS),
    *(option for cls in REGULARIZERS.values() for option in cls.positive_options),
)


def _check_floats(args: TrainingArguments) -> None:
    """Every regularizer float a finite number; no float field of `TrainingArguments` NaN (never a
    meaningful value); `feature_layers` a list of integers."""
    for name in FINITE_FIELDS:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        setattr(args, name, float(value))
    layers = args.feature_layers
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise ValueError(f"feature_layers must be a list of hidden-state indices (integers), got {layers!r}")
    for f in fields(args):
        value = getattr(args, f.name, None)
        if not isinstance(value, float) or isinstance(value, bool):
            continue
        if f.name in FINITE_FIELDS and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
        if math.isnan(value):
            raise ValueError(f"{f.name} must be a number, got nan")


def _check_device(name: str, value: str) -> None:
    """`value` is 'auto' or a device torch knows and this machine has."""
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {value!r}") from None
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise ValueError(f"{name} cannot be 'meta': a meta tensor holds no values to compare with")
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{name}={value!r}: no {device.type} device is available on this machine")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"{name}={value!r}: this machine has {count()} {device.type} device(s)")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
