"""`ExperimentArguments`: the experiment loop's own options, shared by every recipe.

Which methods to compare, the WiSE-FT alphas and their automatic pick, HMA points, LoRA and
weight-averaging options, early-stopping points, and the publishing rule.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ..eval.pareto import KEEP_SPECIALITY
from ..merge.schedule import AlphaSchedule
from .config import check_finite
from .early_stopping import check_fractions
from .methods import ALGORITHMS, DEFAULT_METHODS, METHODS, Method


@dataclass
class ExperimentArguments:
    """Which methods to compare and how to merge, report and publish them.

    Args:
        methods: Methods to fine-tune with: full, l1, l2, ewc, mas, kd, feature, lora, or '+' combinations (e.g.
            kd+feature); default full l1 l2 ewc kd feature lora. Each regularizer's strength is its <name>_lambda.
            A recipe that trains with several algorithms takes one in the name (dpo, rsf: the alignment tax's dpo,
            dpo+l2, rsf+kd; without one, its first).
        alphas: WiSE-FT alphas merged and scored for every method (0: pre-trained, 1: fine-tuned), and/or `auto`:
            the most general alpha keeping auto_keep of the fine-tune's speciality gain, found by bisection
            (`hf_specgen.merge.select_alpha`), e.g. `auto` alone or `0 0.5 1 auto`. After parsing, alphas holds the
            numbers and `auto` has set auto_alpha.
        auto_alpha: Choose an alpha per method automatically (what `auto` in alphas switches on): the grid's scored
            points are reused, and every point the search scores is recorded.
        auto_keep: With alphas auto: the share of the fine-tune's speciality gain over the pre-trained model that
            the chosen alpha keeps (floor = s(0) + auto_keep * (s(1) - s(0))), in (0, 1].
        auto_budget: With alphas auto: evaluations at most besides the two ends (alpha 0 and 1).
        hma_groups: HMA points: search this many layer-group ratios (consecutive blocks, input side first) at each
            of hma_mean_alphas for every method (`hf_specgen.merge.search_group_alphas`), merge and score them; the
            uniform merge at each mean is scored too, for comparison. YAML: `hma: {groups: 3, mean_alphas: [0.2,
            0.5]}`. 0 (the default): no HMA points.
        hma_mean_alphas: HMA: the fixed means of the ratios searched, each in (0, 1].
        hma_samples: HMA's samples: `generated` (the fine-tuned model's answers to training prompts, the paper's
            proxy) or `targets` (the training data's own answers or labels).
        hma_max_samples: HMA: training examples the samples come from, at most.
        hma_steps: HMA: optimizer steps of the ratio search, at most.
        selection_methods: The methods that get the auto-alpha pick and the HMA points (default: every method of
            methods); e.g. `full l2` to spend those evaluations on a few. Names of methods not in methods are
            accepted (a preset can name more than a command line runs).
        publish_point: With push_to_hub: `best` publishes the most general point keeping keep_speciality of the
            best speciality; `auto`, the most general of the methods' auto-alpha picks (needs alphas auto).
        merge_group_alphas: Heterogeneous WiSE-FT (HMA): the shape of one ratio per group of consecutive
            transformer blocks, input side first (e.g. 0.5 1 1.5 for three groups); each of alphas is the mean it
            is scaled to, and tensors outside the blocks (embeddings, final norm, head) get that mean. Every scaled
            ratio must lie in [0, 1]. Default: one alpha for every tensor.
        strength_combination: Combined methods (kd+l2) with strength lists: `product` trains every combination of
            the lists, `paired` the i-th values together (lists of one length, or one value). Any <name>_lambda and
            lora_r may be a list (`l2_lambda: [1e-3, 1e-2]`, `--l2_lambda 1e-3 1e-2`): each method trains at each
            of its strengths.
        eval_fractions: Early stopping as a baseline: the model saved at these fractions of training (e.g. 0.25 0.5
            0.75), scored as extra points of every method; nothing is trained for them. Runs trained before a
            fraction was asked have no checkpoint at it (said, not retrained).
        ema_decay: Methods `<method>+ema`: the run's model is the exponential moving average of its weights, avg =
            ema_decay * avg + (1 - ema_decay) * weights after each optimizer step; in [0, 1).
        sma_start: Methods `<method>+sma`: the run's model is the mean of its weights after each step from this
            fraction of training on; in [0, 1).
        sma_window: Methods `<method>+sma`: average the last sma_window steps instead (>= 1).
        lora_r: LoRA rank (method 'lora'); a list trains one run per rank.
        lora_alpha: LoRA scaling numerator: the update is lora_alpha / r * B @ A.
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Module names LoRA adapts (default: the recipe's, e.g. q_proj v_proj).
        lora_learning_rate: Learning rate of LoRA runs (default: learning_rate); adapters usually want more.
        keep_speciality: Publishing rule: among the runs keeping at least this share of the best speciality,
            publish the most general one.
        keep_merged_models: Keep every WiSE-FT merge on disk after scoring it (default: only the scores).
        report_title: Title of the report's table and plot.
    """

    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={
            "help": f"Methods to fine-tune with: {', '.join(METHODS)}, or '+' combinations (e.g. kd+feature); "
            f"default {' '.join(DEFAULT_METHODS)}. Each regularizer's strength is its <name>_lambda. A recipe "
            f"that trains with several algorithms takes one in the name ({', '.join(ALGORITHMS)}: the alignment "
            "tax's dpo, dpo+l2, rsf+kd; without one, its first)."
        },
    )
    alphas: list[str] = field(
        default_factory=lambda: ["0", "0.25", "0.5", "0.75", "1"],
        metadata={
            "help": "WiSE-FT alphas merged and scored for every method (0: pre-trained, 1: fine-tuned), and/or "
            "`auto`: the most general alpha keeping auto_keep of the fine-tune's speciality gain, found by "
            "bisection (`hf_specgen.merge.select_alpha`), e.g. `auto` alone or `0 0.5 1 auto`. After parsing, "
            "alphas holds the numbers and `auto` has set auto_alpha."
        },
    )
    auto_alpha: bool = field(
        default=False,
        metadata={
            "help": "Choose an alpha per method automatically (what `auto` in alphas switches on): the grid's "
            "scored points are reused, and every point the search scores is recorded."
        },
    )
    auto_keep: float = field(
        default=0.95,
        metadata={
            "help": "With alphas auto: the share of the fine-tune's speciality gain over the pre-trained model "
            "that the chosen alpha keeps (floor = s(0) + auto_keep * (s(1) - s(0))), in (0, 1]."
        },
    )
    auto_budget: int = field(
        default=6, metadata={"help": "With alphas auto: evaluations at most besides the two ends (alpha 0 and 1)."}
    )
    hma_groups: int = field(
        default=0,
        metadata={
            "help": "HMA points: search this many layer-group ratios (consecutive blocks, input side first) at "
            "each of hma_mean_alphas for every method (`hf_specgen.merge.search_group_alphas`), merge and score "
            "them; the uniform merge at each mean is scored too, for comparison. YAML: `hma: {groups: 3, "
            "mean_alphas: [0.2, 0.5]}`. 0 (the default): no HMA points."
        },
    )
    hma_mean_alphas: list[float] = field(
        default_factory=lambda: [0.2, 0.5],
        metadata={"help": "HMA: the fixed means of the ratios searched, each in (0, 1]."},
    )
    hma_samples: str = field(
        default="generated",
        metadata={
            "help": "HMA's samples: `generated` (the fine-tuned model's answers to training prompts, the paper's "
            "proxy) or `targets` (the training data's own answers or labels).",
            "choices": ["generated", "targets"],
        },
    )
    hma_max_samples: int = field(
        default=64, metadata={"help": "HMA: training examples the samples come from, at most."}
    )
    hma_steps: int = field(default=30, metadata={"help": "HMA: optimizer steps of the ratio search, at most."})
    selection_methods: list[str] | None = field(
        default=None,
        metadata={
            "help": "The methods that get the auto-alpha pick and the HMA points (default: every method of "
            "methods); e.g. `full l2` to spend those evaluations on a few. Names of methods not in methods "
            "are accepted (a preset can name more than a command line runs)."
        },
    )
    publish_point: str = field(
        default="best",
        metadata={
            "help": "With push_to_hub: `best` publishes the most general point keeping keep_speciality of the best "
            "speciality; `auto`, the most general of the methods' auto-alpha picks (needs alphas auto).",
            "choices": ["best", "auto"],
        },
    )
    merge_group_alphas: list[float] | None = field(
        default=None,
        metadata={
            "help": "Heterogeneous WiSE-FT (HMA): the shape of one ratio per group of consecutive transformer "
            "blocks, input side first (e.g. 0.5 1 1.5 for three groups); each of alphas is the mean it is scaled "
            "to, and tensors outside the blocks (embeddings, final norm, head) get that mean. Every scaled ratio "
            "must lie in [0, 1]. Default: one alpha for every tensor."
        },
    )
    strength_combination: str = field(
        default="product",
        metadata={
            "help": "Combined methods (kd+l2) with strength lists: `product` trains every combination of the "
            "lists, `paired` the i-th values together (lists of one length, or one value). Any <name>_lambda and "
            "lora_r may be a list (`l2_lambda: [1e-3, 1e-2]`, `--l2_lambda 1e-3 1e-2`): each method trains at "
            "each of its strengths.",
            "choices": ["product", "paired"],
        },
    )
    eval_fractions: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Early stopping as a baseline: the model saved at these fractions of training (e.g. 0.25 "
            "0.5 0.75), scored as extra points of every method; nothing is trained for them. Runs trained "
            "before a fraction was asked have no checkpoint at it (said, not retrained)."
        },
    )
    ema_decay: float = field(
        default=0.99,
        metadata={
            "help": "Methods `<method>+ema`: the run's model is the exponential moving average of its weights, "
            "avg = ema_decay * avg + (1 - ema_decay) * weights after each optimizer step; in [0, 1)."
        },
    )
    sma_start: float = field(
        default=0.5,
        metadata={
            "help": "Methods `<method>+sma`: the run's model is the mean of its weights after each step from "
            "this fraction of training on; in [0, 1)."
        },
    )
    sma_window: int | None = field(
        default=None, metadata={"help": "Methods `<method>+sma`: average the last sma_window steps instead (>= 1)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (method 'lora'); a list trains one run per rank."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator: the update is lora_alpha / r * B @ A."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA adapts (default: the recipe's, e.g. q_proj v_proj)."}
    )
    lora_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of LoRA runs (default: learning_rate); adapters usually want more."},
    )
    keep_speciality: float = field(
        default=KEEP_SPECIALITY,
        metadata={
            "help": "Publishing rule: among the runs keeping at least this share of the best speciality, "
            "publish the most general one."
        },
    )
    keep_merged_models: bool = field(
        default=False,
        metadata={"help": "Keep every WiSE-FT merge on disk after scoring it (default: only the scores)."},
    )
    report_title: str | None = field(default=None, metadata={"help": "Title of the report's table and plot."})
    # {option: [values]} of the strengths given as lists (`parse_config(..., grid_fields=GRID_FIELDS)` fills it;
    # programs set it directly): not a command-line field of its own
    strength_grids: dict[str, list[float]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.alphas, auto = _grid_and_auto(self.alphas)
        self.auto_alpha = self.auto_alpha or auto
        check_finite(self)  # first: NaN passes every range check below
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must lie in [0, 1], got {self.alphas}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas {self.alphas} repeat a value")
        if self.merge_group_alphas is not None:
            self._check_group_shape()
        if self.lora_r <= 0:
            raise ValueError(f"lora_r must be > 0, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_learning_rate is not None and self.lora_learning_rate <= 0:
            raise ValueError(f"lora_learning_rate must be > 0, got {self.lora_learning_rate}")
        if not 0.0 < self.keep_speciality <= 1.0:
            raise ValueError(f"keep_speciality must be in (0, 1], got {self.keep_speciality}")
        if not 0.0 < self.auto_keep <= 1.0:
            raise ValueError(f"auto_keep must be in (0, 1], got {self.auto_keep}")
        if self.auto_budget < 1:
            raise ValueError(f"auto_budget must be >= 1, got {self.auto_budget}")
        if self.publish_point == "auto" and not self.auto_alpha:
            raise ValueError("publish_point auto publishes an auto-alpha pick: add auto to alphas")
        if self.hma_groups < 0:
            raise ValueError(f"hma_groups must be >= 1 (or 0: no HMA points), got {self.hma_groups}")
        if self.hma_groups:
            if not self.hma_mean_alphas or any(not 0.0 < a <= 1.0 for a in self.hma_mean_alphas):
                raise ValueError(f"hma_mean_alphas must be one or more means in (0, 1], got {self.hma_mean_alphas}")
            for name in ("hma_max_samples", "hma_steps"):
                if getattr(self, name) < (2 if name == "hma_max_samples" else 1):
                    raise ValueError(
                        f"{name} must be >= {2 if name == 'hma_max_samples' else 1}, got {getattr(self, name)}"
                    )
        for name in self.selection_methods or []:  # a typo is an error; a method this run does not train is not
            Method.parse(name)
        self.eval_fractions = check_fractions(self.eval_fractions)
        if not self.alphas and not self.auto_alpha:
            raise ValueError("alphas is empty: give alphas to merge, or auto")

    def _check_group_shape(self) -> None:
        shape = self.merge_group_alphas
        if not shape or statistics.fmean(shape) <= 0 or any(a < 0 for a in shape):
            raise ValueError(f"merge_group_alphas must be non-negative ratios with a positive mean, got {shape}")
        for alpha in [*self.alphas, *(self.hma_mean_alphas if self.hma_groups else [])]:
            scaled = [a * alpha / statistics.fmean(shape) for a in shape]
            if max(scaled) > 1.0:
                raise ValueError(
                    f"merge_group_alphas {shape} scaled to alpha {alpha:g} gives {[round(a, 6) for a in scaled]}: "
                    "a ratio above 1; use smaller alphas or a flatter shape"
                )

    def chooses(self, method: str) -> bool:
        """Whether `method` gets the auto-alpha pick and the HMA points (`selection_methods`).

        Args:
            method: a method's name.

        Returns:
            True when `selection_methods` is unset or names it.
        """
        return self.selection_methods is None or method in self.selection_methods

    def merge_schedule(self, alpha: float) -> AlphaSchedule | None:
        """The schedule a merge at (mean) `alpha` uses.

        Args:
            alpha: the merge's alpha (with `merge_group_alphas`, the mean of its ratios).

        Returns:
            `merge_group_alphas` scaled to mean `alpha`; None without them (one alpha for every tensor).
        """
        if self.merge_group_alphas is None:
            return None
        return AlphaSchedule(group_alphas=tuple(self.merge_group_alphas)).at_mean(alpha)


def _grid_and_auto(alphas: list[Any]) -> tuple[list[float], bool]:
    """`alphas` as given (numbers, number strings, `auto`) -> (the numbers, whether `auto` was named)."""
    numbers, auto = [], False
    for item in alphas:
        if isinstance(item, str) and item.strip().lower() == "auto":
            if auto:
                raise ValueError("alphas names auto twice")
            auto = True
            continue
        try:
            numbers.append(float(item))
        except (TypeError, ValueError):
            raise ValueError(f"alphas: {item!r} is neither a number in [0, 1] nor auto") from None
    return numbers, auto
