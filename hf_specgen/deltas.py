"""`theta - theta_pre` of one trainable weight: the interface the weight terms are written against.

A fine-tuned weight differs from its pre-trained value in one of two ways:

* a dense trainable parameter (`DenseDelta`): `theta - theta_pre`, against a tensor holding the
  pre-trained value (a snapshot, a frozen teacher's parameter, peft's `original_module` of a
  `modules_to_save` copy: `hf_specgen.anchor` chooses which), so no weight is copied twice;
* a LoRA-adapted weight (`LoraDelta`): the adapter's effective delta `scale * B @ A`. The base
  weight is frozen and is the pre-trained value, so no snapshot is kept at all.

Each is a `WeightDelta`; the distance regularizers (L1, L2-SP, EWC) are written against that
interface only, so they are LoRA-correct without knowing about LoRA (and, through
`hf_specgen.zero.ShardDelta`, ZeRO-correct without knowing about ZeRO).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


PIECE_ELEMENTS = 2**20  # a piece of a weight the weight terms process at once (4 MiB in float32)
_SCRATCH: dict[tuple[torch.device, int], torch.Tensor] = {}


def scratch(device: torch.device, elements: int, slot: int = 0) -> torch.Tensor:
    """A float32 buffer of `elements` on `device`, kept from call to call (`slot` names independent ones);
    for more than `PIECE_ELEMENTS`, a new one (a whole weight is not kept).

    Args:
        device: where the buffer lives.
        elements: its size.
        slot: which of the kept buffers of `device`.

    Returns:
        A flat float32 tensor of `elements`, uninitialized.
    """
    if elements > PIECE_ELEMENTS:
        return torch.empty(elements, dtype=torch.float32, device=device)
    key = (torch.device(device), slot)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < elements:
        buffer = torch.empty(elements, dtype=torch.float32, device=device)
        _SCRATCH[key] = buffer
    return buffer[:elements]


@dataclass
class DeltaPiece:
    """A piece of one weight's `theta - theta_pre`, in float32, and how to add a gradient for it.

    `difference` may live in a scratch buffer that the next piece reuses: use it before asking for
    the next one. `index` selects the piece in the flattened weight (for a per-element importance)."""

    difference: torch.Tensor
    add_grad_: Callable[[torch.Tensor, float], None]
    index: slice


class WeightDelta:
    """`theta - theta_pre` of one trainable weight, in float32 and in the base weight's layout."""

    name: str

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def pieces(self) -> Iterator[DeltaPiece]:
        """`theta - theta_pre` in pieces, each with its gradient's way in, so that a weight term makes
        one pass over the weights (here one piece: the whole delta, in its own shape)."""
        yield DeltaPiece(self.delta(), self.add_grad_, slice(None))

    def squared_norm(self) -> torch.Tensor:
        return self.delta().pow(2).sum()

    def add_grad_(self, grad_delta: torch.Tensor, alpha: float) -> None:
        """Adds `alpha * d(penalty)/d(parameters)` to `.grad`, given `grad_delta = d(penalty)/d(delta)`.

        Closed form, outside autograd: no autograd or DDP hook fires, so it is also correct after
        the gradients were reduced across processes."""
        raise NotImplementedError

    @torch.no_grad()
    def squared_norm_and_grad_(self, alpha: float) -> torch.Tensor:
        """`||delta||^2`; adds `alpha` times its gradient to `.grad`."""
        values = []
        for piece in self.pieces():
            flat = piece.difference.reshape(-1)
            values.append(torch.dot(flat, flat))
            piece.add_grad_(piece.difference, 2.0 * alpha)
        return torch.stack(values).sum()

    def fisher_parameter(self) -> torch.Tensor:
        """The tensor whose gradient is the gradient with respect to the effective weight, in the
        pre-trained forward the Fisher is estimated with."""
        return self._fisher_param

    def bind_fisher_parameter(self, parameter: torch.Tensor) -> None:
        """Estimate the Fisher through `parameter` (the same weight in a reference model) instead."""
        self._fisher_param = parameter

    @property
    def local_shape(self) -> torch.Size:
        """Shape of the part of `fisher_parameter` this delta regularizes (its Fisher's shape)."""
        return self.fisher_parameter().shape

    def local_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """That part of a whole gradient with respect to `fisher_parameter` (under ZeRO, a rank's slice)."""
        return grad

    def decay_(self, factor: float) -> torch.Tensor:
        """In place, no autograd: `theta - theta_pre <- (1 - factor) * (theta - theta_pre)`.

        Returns the squared distance before the decay (what decoupled L2 logs)."""
        raise NotImplementedError

    @property
    def trainable(self) -> list[nn.Parameter]:
        """The optimizer's parameters this delta is made of that train (`requires_grad`)."""
        raise NotImplementedError

    @property
    def decayed_parameter(self) -> nn.Parameter:
        """The parameter `decay_` changes (the optimizer step that updates it applies decoupled decay)."""
        raise NotImplementedError


def is_coarser(reference: torch.dtype, weight: torch.dtype) -> bool:
    """Whether an anchor in `reference` dtype rounds weights held in `weight` dtype (e.g. bf16 of fp32).

    Args:
        reference: the anchor's dtype.
        weight: the weight's dtype.

    Returns:
        True when `reference` has the larger machine epsilon.
    """
    return torch.finfo(reference).eps > torch.finfo(weight).eps


def anchor_difference(theta: torch.Tensor, reference: torch.Tensor, coarse: bool) -> torch.Tensor:
    """`theta - theta_pre` in float32, `theta_pre` being `reference`.

    A coarse anchor (`anchor_dtype` rounder than the weights) has a dead zone: where `theta` still
    rounds to its anchor value the difference is 0, so that every term and its gradient are 0 at
    the pre-trained weights whatever the anchor dtype (without it, `theta - bf16(theta)` would give
    L1 a full-size subgradient on every weight from the first step).

    Args:
        theta: the weight (any float dtype, any device).
        reference: its pre-trained value (moved to `theta`'s device).
        coarse: whether `reference`'s dtype rounds `theta`'s (`is_coarser`): apply the dead zone.

    Returns:
        The float32 difference, in `theta`'s shape.
    """
    ref = reference.to(theta.device)
    difference = theta.float() - ref.float()
    if coarse:
        difference.masked_fill_(theta.to(ref.dtype) == ref, 0.0)
    return difference


class DenseDelta(WeightDelta):
    """`theta - theta_pre` of a dense trainable parameter, against a tensor holding its pre-trained value.

    Args:
        name: the parameter's name in the model.
        param: the parameter.
        reference: its pre-trained value: a snapshot, or a tensor that holds it anyway (a frozen teacher's
            parameter, peft's `original_module` of a `modules_to_save` copy); of any dtype, a coarser one
            with the dead zone of `anchor_difference`.
        owned: whether `reference` is a snapshot made for this delta alone (it counts in the anchor's memory).
        fisher_param: the weight the pre-trained forward runs through, when it is not `param`.
    """

    def __init__(
        self,
        name: str,
        param: nn.Parameter,
        reference: torch.Tensor,
        *,
        owned: bool = False,
        fisher_param: nn.Parameter | None = None,
    ) -> None:
        self.name, self.param, self.reference = name, param, reference
        self.owned = owned  # True when `reference` is a snapshot made for this delta alone
        self.coarse = reference.is_floating_point() and is_coarser(reference.dtype, param.dtype)
        # The weight the pre-trained forward runs through: `param` itself, except for a peft
        # `modules_to_save` copy, which the adapter-disabled forward (where the Fisher is estimated)
        # bypasses for its `original_module`, or a reference model's weight (`bind_fisher_parameter`).
        self._fisher_param = param if fisher_param is None else fisher_param

    def delta(self) -> torch.Tensor:
        return anchor_difference(self.param, self.reference, self.coarse)

    @torch.no_grad()
    def add_grad_(self, grad_delta: torch.Tensor, alpha: float) -> None:
        _accumulate_grad(self.param, grad_delta, alpha)

    def pieces(self) -> Iterator[DeltaPiece]:
        """Float32 weights with a float32 gradient: pieces of `PIECE_ELEMENTS` computed into a scratch buffer
        reused from piece to piece, so that a weight term reads the weight, the anchor (of any float
        dtype, a coarse one with its dead zone) and the gradient once and allocates nothing large
        (otherwise: the whole delta)."""
        param, grad = self.param, self.param.grad
        fused = (
            param.dtype == torch.float32
            and self.reference.is_floating_point()
            and grad is not None
            and grad.dtype == torch.float32
            and grad.is_contiguous()
            and param.is_contiguous()
            and self.reference.device == param.device
            and self.reference.is_contiguous()
        )
        if not fused:
            yield from super().pieces()
            return
        flat_param, flat_reference, flat_grad = (
            param.detach().reshape(-1),
            self.reference.reshape(-1),
            grad.reshape(-1),
        )
        size = flat_param.numel()
        for start in range(0, size, PIECE_ELEMENTS):
            stop = min(start + PIECE_ELEMENTS, size)
            difference = scratch(param.device, stop - start)
            weights, anchor = flat_param[start:stop], flat_reference[start:stop]
            torch.sub(weights, anchor, out=difference)  # in float32 whatever the anchor's dtype
            if self.coarse:  # the dead zone of `anchor_difference`
                difference.masked_fill_(weights.to(anchor.dtype) == anchor, 0.0)
            target = flat_grad[start:stop]
            yield DeltaPiece(
                difference, lambda g, alpha, target=target: target.add_(g, alpha=alpha), slice(start, stop)
            )

    @torch.no_grad()
    def decay_(self, factor: float) -> torch.Tensor:
        delta = self.delta()
        self.param.sub_(delta.to(self.param.dtype), alpha=factor)
        flat = delta.reshape(-1)
        return torch.dot(flat, flat)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [self.param]

    @property
    def decayed_parameter(self) -> nn.Parameter:
        return self.param


class LoraDelta(WeightDelta):
    """The effective delta of one peft `LoraLayer`, in the base weight's layout: the sum over its
    active adapters of `scale_a * B_a @ A_a`.

    With several active adapters the terms act on that sum (the weight's change from the
    pre-trained one), never on each adapter alone. Written as one low-rank product
    `B_cat @ A_cat` with `B_cat = [scale_a * B_a]` side by side and `A_cat = [A_a]` stacked, the
    squared norm is `<B_cat^T B_cat, A_cat A_cat^T>`: Gram matrices of the total rank, never the
    `out x in` product. Gradients go to the factors that train only (a frozen `lora_A`, as in
    LoRA-FA, gets none).

    Args:
        name: the base weight's name in the model.
        layer: the peft `LoraLayer` (linear or embedding).
        adapters: its active adapter(s).
    """

    def __init__(self, name: str, layer: nn.Module, adapters: str | list[str]) -> None:
        self.name, self.layer = name, layer
        self._fisher_param: torch.Tensor | None = None  # default: the frozen base weight
        self.adapters = [adapters] if isinstance(adapters, str) else list(adapters)
        self.embedding = self.adapters[0] in getattr(layer, "lora_embedding_A", {})
        self.factors: list[tuple[str, nn.Parameter, nn.Parameter]] = []  # (adapter, A, B)
        for adapter in self.adapters:
            if self.embedding:
                a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            else:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if a.dim() != 2 or b.dim() != 2:
                raise ValueError(
                    f"{name}: only linear and embedding LoRA layers are supported, got {type(layer).__name__}"
                )
            self.factors.append((adapter, a, b))

    # One adapter's factors (the common case), by name.
    @property
    def A(self) -> nn.Parameter:  # noqa: N802 - LoRA's own notation
        return self._single()[1]

    @property
    def B(self) -> nn.Parameter:  # noqa: N802
        return self._single()[2]

    @property
    def scale(self) -> float:
        return self._scale(self._single()[0])

    def _single(self) -> tuple[str, nn.Parameter, nn.Parameter]:
        if len(self.factors) != 1:
            raise AttributeError(f"{self.name} has {len(self.factors)} active adapters: read `factors`")
        return self.factors[0]

    def _scale(self, adapter: str) -> float:
        return float(self.layer.scaling[adapter])

    @property
    def transposed(self) -> bool:
        """Whether the base weight's layout is that of `(B @ A).T` (embeddings, `fan_in_fan_out`)."""
        return self.embedding or getattr(self.layer, "fan_in_fan_out", False)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`B_cat` (scales folded in) and `A_cat`, in float32."""
        if len(self.factors) == 1:
            adapter, a, b = self.factors[0]
            return self._scale(adapter) * b.float(), a.float()
        b_cat = torch.cat([self._scale(adapter) * b.float() for adapter, _, b in self.factors], dim=1)
        return b_cat, torch.cat([a.float() for _, a, _ in self.factors], dim=0)

    def delta(self) -> torch.Tensor:
        b, a = self._stacked()
        product = b @ a
        return product.T if self.transposed else product

    def squared_norm(self) -> torch.Tensor:
        # ||B A||_F^2 = tr(A^T B^T B A) = <B^T B, A A^T>: Gram matrices of the rank, never out x in.
        b, a = self._stacked()
        return ((b.T @ b) * (a @ a.T)).sum()

    @torch.no_grad()
    def add_grad_(self, grad_delta: torch.Tensor, alpha: float) -> None:
        # delta = sum_a s_a B_a A_a, so dP/dB_a = s_a G A_a^T and dP/dA_a = s_a B_a^T G, G = dP/d(B A layout)
        g = grad_delta.T if self.transposed else grad_delta
        for adapter, a, b in self.factors:
            s = self._scale(adapter)
            if b.requires_grad:
                _accumulate_grad(b, g @ a.float().T, alpha * s)
            if a.requires_grad:
                _accumulate_grad(a, b.float().T @ g, alpha * s)

    @torch.no_grad()
    def squared_norm_and_grad_(self, alpha: float) -> torch.Tensor:
        # P = <B^T B, A A^T> over the stacked factors: dP/dB_cat = 2 B_cat (A A^T), dP/dA_cat = 2 (B^T B) A_cat,
        # then each adapter's columns / rows of them (times s_a for B_a, whose scale B_cat folds in).
        b, a = self._stacked()
        gram_a, gram_b = a @ a.T, b.T @ b
        grad_b, grad_a = (b @ gram_a) * (2.0 * alpha), (gram_b @ a) * (2.0 * alpha)
        start = 0
        for adapter, a_param, b_param in self.factors:
            rank = a_param.shape[0]
            if b_param.requires_grad:
                _accumulate_grad(b_param, grad_b[:, start : start + rank], self._scale(adapter))
            if a_param.requires_grad:
                _accumulate_grad(a_param, grad_a[start : start + rank], 1.0)
            start += rank
        return (gram_b * gram_a).sum()

    def fisher_parameter(self) -> torch.Tensor:
        return self.layer.get_base_layer().weight if self._fisher_param is None else self._fisher_param

    @torch.no_grad()
    def decay_(self, factor: float) -> torch.Tensor:
        """Scales each adapter's trainable B (or A where B is frozen) by `1 - factor`: the delta exactly,
        when every adapter trains."""
        squared = self.squared_norm()
        for _, a, b in self.factors:
            (b if b.requires_grad else a).mul_(1.0 - factor)
        return squared

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for _, a, b in self.factors for p in (a, b) if p.requires_grad]

    @property
    def decayed_parameter(self) -> nn.Parameter:
        return next(b if b.requires_grad else a for _, a, b in self.factors if a.requires_grad or b.requires_grad)


def _accumulate_grad(param: nn.Parameter, grad: torch.Tensor, alpha: float) -> None:
    if param.grad is None:
        param.grad = (alpha * grad).to(param.dtype)
    else:
        param.grad.add_(grad.to(param.grad.dtype), alpha=alpha)
