"""Merge methods: pure functions over tensors, registered by name, their parameters declared.

A method computes one output tensor from the pre-trained tensor, the fine-tuned tensor(s), the
tensor's `alpha` (from the alpha schedule: one number, per group of blocks, per name rule), the
fine-tuned models' `weights`, the per-tensor inputs it declares (e.g. Fisher diagonals) and its
own scalar parameters. It does no I/O and knows nothing of names, shards, dtypes on disk, tied
weights or added tokens: reading, planning, writing, side files, the atomic output, the model
card and the Hub push are shared by every method (`plan`, `writer`, `run`).

Inputs come in their stored dtypes (compute in float32, `.float()`, or wider: `interpolate`); the
result is cast to the output dtype and checked for NaN and inf by the caller. Returning an input unchanged (e.g. at
alpha 0 or 1) makes that output a bit-exact copy.

Adding a method is one function and its registration::

    @register_method(
        "my_method", formula="theta = theta_pre + alpha * sign(theta_ft - theta_pre) * beta",
        parameters={"beta": Parameter(0.01, "step size")},
    )
    def my_method(pre, finetuned, *, alpha, weights, beta):
        (ft,) = finetuned
        return pre.float() + alpha * beta * torch.sign(ft.float() - pre.float())

after which `specgen merge --method my_method --my-method-beta 0.02 ...` and
`MergeOptions(method="my_method", method_params={"beta": 0.02})` use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import MergeError


if TYPE_CHECKING:  # torch is imported where a method computes: the registry (and `specgen --help`) loads without it
    from torch import Tensor


@dataclass(frozen=True)
class Parameter:
    """A scalar parameter of a method.

    Attributes:
        default: its value when not given.
        help: what it is, for the CLI's `--<method>-<name>` option and the README.
        positive: it must be > 0.
    """

    default: float
    help: str
    positive: bool = False


@dataclass(frozen=True)
class TensorInput:
    """A per-tensor input of a method (e.g. a Fisher diagonal), read from a file of tensors named as
    the checkpoint's, each shaped like the pre-trained or the fine-tuned tensor.

    Attributes:
        like: "pretrained" or "finetuned": whose shape each tensor must have.
        help: what the file holds, for the CLI's `--<input name>` option.
    """

    like: Literal["pretrained", "finetuned"]
    help: str


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (see `register_method`).

    Args:
        name: the method's name (`--method NAME`).
        function: the pure function over tensors, `function(pre, finetuned, *, alpha, weights, ...)`, its
            parameters and inputs as keywords.
        formula: its formula, for the help, `merge_config.json` and the model card.
        description: one line on what it is.
        parameters: its scalar parameters by name (`--<method>-<name>`).
        inputs: its per-tensor inputs by name (`--<input>`), e.g. Fisher files.
        max_finetuned: how many fine-tuned models it takes at most (None: any number).
        fallback: the method for a tensor its inputs do not cover (None: an error).
        delta: its form on a LoRA delta, `delta(W0, scale * B @ A, alpha)`; None: no exact low-rank form.
        tags: the model card's tags.
        interpolates_only: alphas outside [0, 1] refused even with extrapolate (a str: why).
        weights_are_shares: the weights are shares of a mean: a negative one extrapolates.
        non_negative_inputs: every per-tensor input must be finite and >= 0 (e.g. Fisher diagonals).
        elementwise: each output element depends only on the same element of each input: the merge
            may compute a tensor chunk by chunk (on flat slices) as it writes it.
    """

    name: str
    function: Callable[..., Tensor]
    formula: str
    description: str = ""
    parameters: Mapping[str, Parameter] = field(default_factory=dict)
    inputs: Mapping[str, TensorInput] = field(default_factory=dict)
    max_finetuned: int | None = None  # how many fine-tuned models it takes at most (None: any number)
    fallback: str | None = None  # the method for a tensor its inputs do not cover (None: an error)
    delta: Callable[[Tensor, Tensor, float], Tensor] | None = None  # on a LoRA delta: (W0, scale * B @ A, alpha)
    tags: tuple[str, ...] = ("merge",)
    interpolates_only: bool | str = False  # alphas outside [0, 1] refused even with extrapolate (a str: why)
    weights_are_shares: bool = False  # the weights are shares of a mean: a negative one extrapolates
    non_negative_inputs: bool = False  # every per-tensor input must be finite and >= 0 (e.g. Fisher diagonals)
    elementwise: bool = False  # output element i from element i of each input: computed chunk by chunk


METHODS: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    formula: str,
    parameters: Mapping[str, Parameter] | None = None,
    inputs: Mapping[str, TensorInput] | None = None,
    max_finetuned: int | None = None,
    fallback: str | None = None,
    delta: Callable[[Tensor, Tensor, float], Tensor] | None = None,
    tags: Sequence[str] = ("merge",),
    interpolates_only: bool | str = False,
    weights_are_shares: bool = False,
    non_negative_inputs: bool = False,
    elementwise: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Registers a method under `name` (a decorator); the function is returned unchanged.

    Args:
        name: the method's name (`--method NAME`, `MergeOptions.method`).
        formula: what it computes, for the model card and `merge_config.json`.
        parameters: its scalar parameters, passed to it as keywords.
        inputs: its per-tensor inputs, passed as keywords (tensors); the files they are read from
            are `MergeOptions.method_inputs[name]` (`--<name>` with `-` for `_`).
        max_finetuned: how many fine-tuned models it merges at most.
        fallback: a method for tensors the inputs lack (its function must take no inputs).
        delta: the method on a LoRA adapter, `f(W0, scale * B @ A, alpha)`: None where a method has
            no exact form on a low-rank delta (the adapter is then refused: merge it into the full
            model first).
        tags: the model card's tags besides `hf_specgen`.
        interpolates_only: alphas outside [0, 1] are refused even with `extrapolate` (a string says why).
        weights_are_shares: the fine-tuned models' weights are shares of a mean (a soup): a negative
            one extrapolates and needs `extrapolate`.
        non_negative_inputs: every per-tensor input must be finite and >= 0 (checked as it is read).
        elementwise: the function maps each element of its inputs to the same element of its output
            (no reduction, no reshaping): a merge then calls it on flat chunks of a tensor, so that a
            2 GB embedding is merged in a few MB of memory. Leave False where unsure: whole tensors.

    Returns:
        The decorator.
    """

    def decorate(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"a merge method {name!r} is registered already")
        description = (function.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MergeMethod(
            name,
            function,
            formula,
            description,
            dict(parameters or {}),
            dict(inputs or {}),
            max_finetuned,
            fallback,
            delta,
            tuple(tags),
            interpolates_only,
            weights_are_shares,
            non_negative_inputs,
            elementwise,
        )
        return function

    return decorate


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`; a `MergeError` listing the known ones otherwise.

    Args:
        name: the method's name, e.g. `"linear"`.

    Returns:
        The registered method.
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class BoundMethod:
    """A method with its parameters and the fine-tuned models' weights: what the plan calls per tensor."""

    method: MergeMethod
    params: Mapping[str, float]
    weights: tuple[float, ...]

    def __call__(self, pre: Tensor, finetuned: Sequence[Tensor], alpha: float, inputs: Mapping[str, Tensor]) -> Tensor:
        if self.method.inputs and not set(self.method.inputs) <= set(inputs):
            if not self.method.fallback:  # planning refuses this; never recurse into itself
                raise MergeError(
                    f"method {self.method.name!r}: a tensor lacks its inputs and there is no fallback method"
                )
            return self.fallback()(pre, finetuned, alpha, {})
        return self.method.function(pre, finetuned, alpha=alpha, weights=self.weights, **inputs, **self.params)

    def fallback(self) -> BoundMethod:
        """The method for tensors this one's inputs do not cover."""
        return BoundMethod(get_method(self.method.fallback), {}, self.weights) if self.method.fallback else self

    def name_for(self, covered: bool) -> str:
        """The method a tensor is merged with, whether or not its inputs cover it."""
        return self.method.name if covered or not self.method.fallback else self.method.fallback


def bind(
    name: str,
    n_finetuned: int,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    extrapolate: bool = False,
) -> BoundMethod:
    """`name` with its parameters checked and defaulted, and the weights of `n_finetuned` models.

    Args:
        name: a registered method.
        n_finetuned: how many fine-tuned models are merged.
        weights: one per fine-tuned model (default: 1 each); finite, summing to a positive number.
        params: the method's parameters by name; unknown names, non-numbers and values outside
            their declared range are refused.
        extrapolate: allow negative weights where the weights are shares of a mean (a soup).

    Returns:
        The bound method; a `MergeError` for anything that does not fit.
    """
    method = get_method(name)
    if method.max_finetuned is not None and n_finetuned > method.max_finetuned:
        raise MergeError(f"method {name!r} merges {method.max_finetuned} fine-tuned model(s), got {n_finetuned}")
    if n_finetuned < 1:
        raise MergeError("no fine-tuned model given")
    weights = tuple(1.0 for _ in range(n_finetuned)) if weights is None else tuple(weights)
    if len(weights) != n_finetuned:
        raise MergeError(f"weights (--weights): {len(weights)} given for {n_finetuned} fine-tuned model(s)")
    if not all(_is_number(w) and math.isfinite(w) for w in weights) or not sum(weights) > 0:
        raise MergeError(
            f"weights (--weights) must be finite numbers summing to a positive number, got {list(weights)}"
        )
    if method.weights_are_shares and not extrapolate and any(w < 0 for w in weights):
        raise MergeError(
            f"weights (--weights) {list(weights)}: a negative share of method {name!r}'s mean extrapolates beyond the "
            "fine-tuned models; pass extrapolate=True (--extrapolate) to allow it"
        )
    params = dict(params or {})
    unknown = sorted(set(params) - set(method.parameters))
    if unknown:
        known = ", ".join(method.parameters) or "none"
        raise MergeError(f"method {name!r} has no parameter {unknown[0]!r} (its parameters: {known})")
    values = {}
    for key, declared in method.parameters.items():
        value = params.get(key, declared.default)
        if not _is_number(value) or not math.isfinite(value) or (declared.positive and not value > 0):
            rule = "a positive number" if declared.positive else "a finite number"
            raise MergeError(f"{name} parameter {key!r} must be {rule}, got {value!r}")
        values[key] = float(value)
    return BoundMethod(method, values, tuple(float(w) for w in weights))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- the built-in methods -----------------------------------------------------------------------


def weighted_average(finetuned: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """`sum_i w_i theta_i / sum_i w_i` in float32 (one tensor: itself, unconverted).

    Args:
        finetuned: tensors of one shape.
        weights: one each, summing to a positive number.

    Returns:
        The weighted mean (a soup).
    """
    import torch

    if len(finetuned) == 1:
        return finetuned[0]
    total = sum(weights)
    out = torch.zeros(finetuned[0].shape, dtype=torch.float32)
    for tensor, weight in zip(finetuned, weights):
        out.add_(tensor.float(), alpha=weight / total)
    return out


def _linear_delta(pre: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """`W0 + alpha * delta`, exact for a LoRA delta (alpha 0: W0 itself)."""
    return pre if alpha == 0 else pre.float() + alpha * delta


@register_method(
    "linear",
    formula="theta = (1 - alpha) * theta_pre + alpha * sum_i w_i theta_i / sum_i w_i",
    delta=_linear_delta,
    tags=("wise-ft", "merge"),
    weights_are_shares=True,
    elementwise=True,
)
def linear(pre: Tensor, finetuned: Sequence[Tensor], *, alpha: float, weights: Sequence[float]) -> Tensor:
    """WiSE-FT: interpolation toward the fine-tuned model, or toward the weighted soup of several.

    Args:
        pre: the pre-trained tensor.
        finetuned: the fine-tuned tensors (one: WiSE-FT; several: a soup, uniform by default).
        alpha: 0 is the pre-trained tensor, 1 the fine-tuned one (or the soup).
        weights: the fine-tuned models' weights, normalized to sum to 1.

    Returns:
        The merged tensor; alpha 0 and 1 give bit-exact copies.
    """
    target = weighted_average(finetuned, weights)
    if alpha == 0:
        return pre
    if alpha == 1:
        return target
    return interpolate(pre, target, alpha)


def interpolate(pre: Tensor, target: Tensor, alpha: float) -> Tensor:
    """`(1 - alpha) * pre + alpha * target` computed in float64: the float64 interpolation itself, so that
    rounding it to the output dtype is within 1 ulp of the exact value wherever float64's own rounding is.

    Float32 arithmetic is not enough where `pre` and `target` nearly cancel: the result is much smaller than
    either and float32's rounding of the terms is many ulps of it (2**23 measured with float32 inputs on a
    297M-parameter fine-tune; with bfloat16 inputs at alpha 0.3, e.g. pre = -3 * 2**-10 and target =
    7 * 2**-10, float32 gave 2.3e-10 where the exact value is 4e-19). The inputs are never modified.

    Args:
        pre: the pre-trained tensor.
        target: the tensor at alpha 1, shaped like `pre`.
        alpha: the interpolation weight.

    Returns:
        A new float64 tensor (the caller casts it to the output dtype).
    """
    import torch

    wide = torch.float64
    return pre.to(wide, copy=True).mul_(1 - alpha).add_(target.to(wide, copy=True).mul_(alpha))


@register_method(
    "task_arithmetic",
    formula="theta = theta_pre + alpha * sum_i w_i (theta_i - theta_pre)",
    tags=("task-arithmetic", "merge"),
    elementwise=True,
)
def task_arithmetic(pre: Tensor, finetuned: Sequence[Tensor], *, alpha: float, weights: Sequence[float]) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): the pre-trained tensor plus the weighted task vectors scaled by alpha.

    Args:
        pre: the pre-trained tensor.
        finetuned: the fine-tuned tensors, one per task.
        alpha: the scaling factor s of the summed task vectors (0: the pre-trained tensor).
        weights: each task vector's weight (not normalized; default 1 each).

    Returns:
        The merged tensor.
    """
    import torch

    if alpha == 0:
        return pre
    base = pre.float()
    total = torch.zeros_like(base)
    for tensor, weight in zip(finetuned, weights):
        total.add_(tensor.float() - base, alpha=weight)
    return torch.add(base, total, alpha=alpha)  # a new tensor: the inputs serve every alpha of a sweep


@register_method(
    "fisher",
    formula="theta = (alpha * F_ft * theta_ft + (1 - alpha) * F_pre * theta_pre) "
    "/ (alpha * F_ft + (1 - alpha) * F_pre), "
    "each F floored at epsilon",
    parameters={
        "epsilon": Parameter(1e-8, "floor of each Fisher value (where both are below it: linear)", positive=True)
    },
    inputs={
        "fisher_pre": TensorInput(
            "pretrained",
            "diagonal Fisher of the pre-trained model (a `specgen fisher` file, or a "
            "training run's specgen_regularizers.safetensors with EWC)",
        ),
        "fisher_finetuned": TensorInput(
            "finetuned", "diagonal Fisher of the fine-tuned model (a `specgen fisher` file)"
        ),
    },
    max_finetuned=1,
    fallback="linear",
    tags=("fisher-merging", "merge"),
    interpolates_only="a F_ft and (1 - a) F_pre must both be non-negative, or the denominator can vanish",
    non_negative_inputs=True,
    elementwise=True,
)
def fisher(
    pre: Tensor,
    finetuned: Sequence[Tensor],
    *,
    alpha: float,
    weights: Sequence[float],
    fisher_pre: Tensor,
    fisher_finetuned: Tensor,
    epsilon: float,
) -> Tensor:
    """Fisher-weighted averaging (Matena and Raffel 2022), element by element.

    Args:
        pre: the pre-trained tensor.
        finetuned: the fine-tuned tensor (one).
        alpha: the fine-tuned model's share: 0 the pre-trained tensor, 1 the fine-tuned one.
        weights: unused (one model).
        fisher_pre: the pre-trained model's diagonal Fisher, shaped like `pre`.
        fisher_finetuned: the fine-tuned model's, shaped like the fine-tuned tensor.
        epsilon: each Fisher value is raised to at least this (where both are: linear at alpha).

    Returns:
        The merged tensor; alpha 0 and 1 give bit-exact copies.
    """
    import torch

    (ft,) = finetuned
    if alpha == 0:
        return pre
    if alpha == 1:
        return ft
    # theta_pre + w * (theta_ft - theta_pre), w = a F_ft / (a F_ft + (1 - a) F_pre): two temporaries
    weight = fisher_finetuned.float().clamp_min(epsilon).mul_(alpha)
    total = fisher_pre.float().clamp_min(epsilon).mul_(1 - alpha).add_(weight)
    weight.div_(total)
    return torch.lerp(pre.float(), ft.float(), weight, out=total)
