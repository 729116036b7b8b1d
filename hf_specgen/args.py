"""Training arguments: `transformers.TrainingArguments` plus the regularizer fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

L2_MODES = ("penalty", "decoupled")
FISHER_TYPES = ("true", "empirical")
ANCHOR_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SpecGenTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the anti-forgetting regularizers of hf_specgen.

    A regularizer is on when its weight is > 0. With every weight at 0 (the default) the
    trainer is exactly `transformers.Trainer`.
    """

    l1_lambda: float = field(
        default=0.0, metadata={"help": "Weight of the L1 distance to the pre-trained weights, sum |theta - theta_pre|."}
    )
    l2_lambda: float = field(
        default=0.0, metadata={"help": "Weight of the L2-SP distance to the pre-trained weights, sum (theta - theta_pre)^2."}
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
        metadata={"help": "Device of the weight snapshot and the teacher ('auto': the model's device, or e.g. 'cpu')."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("l1_lambda", "l2_lambda", "ewc_lambda", "kd_lambda", "feature_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.ewc_num_samples <= 0:
            raise ValueError(f"ewc_num_samples must be > 0, got {self.ewc_num_samples}")
        _check_choice("l2_mode", self.l2_mode, L2_MODES)
        _check_choice("ewc_fisher", self.ewc_fisher, FISHER_TYPES)
        _check_choice("anchor_dtype", self.anchor_dtype, ANCHOR_DTYPES)
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one hidden-state index")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
