"""The frozen pre-trained reference: what `theta - theta_pre` is, and the teacher's forward.

A fine-tuned weight differs from its pre-trained value in one of two ways:

* a dense trainable parameter: `theta - theta_pre`, against a snapshot taken when the trainer is
  built (or a tensor that already holds the pre-trained value: a frozen teacher's parameter,
  peft's `original_module` of a `modules_to_save` copy), so no weight is copied twice;
* a LoRA-adapted weight: the adapter's effective delta `scale * B @ A`. The base weight is
  frozen and is the pre-trained value, so no snapshot is kept at all.

Each is a `WeightDelta`; the distance regularizers (L1, L2-SP, EWC) are written against that
interface only, so they are LoRA-correct without knowing about LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import reference_inputs


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA initialisations that rewrite the base weights: with adapters disabled the model is then
# not the pre-trained one.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_SUM_CHUNK = 2**22  # elements summed in float64 at a time by `reference_fingerprint`


def resolve_dtype(name: str, like: torch.Tensor) -> torch.dtype:
    """`anchor_dtype` as a torch dtype; 'auto' keeps the tensor's own (lossless) dtype."""
    return like.dtype if name == "auto" else _DTYPES[name]


def resolve_device(name: str, like: torch.Tensor) -> torch.device:
    """`anchor_device` as a torch device; 'auto' keeps the tensor's own device."""
    return like.device if name == "auto" else torch.device(name)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


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
    """Whether an anchor in `reference` dtype rounds weights held in `weight` dtype (e.g. bf16 of fp32)."""
    return torch.finfo(reference).eps > torch.finfo(weight).eps


def anchor_difference(theta: torch.Tensor, reference: torch.Tensor, coarse: bool) -> torch.Tensor:
    """`theta - theta_pre` in float32, `theta_pre` being `reference`.

    A coarse anchor (`anchor_dtype` rounder than the weights) has a dead zone: where `theta` still
    rounds to its anchor value the difference is 0, so that every term and its gradient are 0 at
    the pre-trained weights whatever the anchor dtype (without it, `theta - bf16(theta)` would give
    L1 a full-size subgradient on every weight from the first step)."""
    ref = reference.to(theta.device)
    difference = theta.float() - ref.float()
    if coarse:
        difference.masked_fill_(theta.to(ref.dtype) == ref, 0.0)
    return difference


class DenseDelta(WeightDelta):
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


PIECE_ELEMENTS = 2**20  # a piece of a weight the weight terms process at once (4 MiB in float32)
_SCRATCH: dict[tuple[torch.device, int], torch.Tensor] = {}


def scratch(device: torch.device, elements: int, slot: int = 0) -> torch.Tensor:
    """A float32 buffer of `elements` on `device`, kept from call to call (`slot` names independent ones);
    for more than `PIECE_ELEMENTS`, a new one (a whole weight is not kept)."""
    if elements > PIECE_ELEMENTS:
        return torch.empty(elements, dtype=torch.float32, device=device)
    key = (torch.device(device), slot)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < elements:
        buffer = torch.empty(elements, dtype=torch.float32, device=device)
        _SCRATCH[key] = buffer
    return buffer[:elements]


def _accumulate_grad(param: nn.Parameter, grad: torch.Tensor, alpha: float) -> None:
    if param.grad is None:
        param.grad = (alpha * grad).to(param.dtype)
    else:
        param.grad.add_(grad.to(param.grad.dtype), alpha=alpha)


def _lora_deltas(model: nn.Module, *, refuse_dora: bool = True) -> list[LoraDelta]:
    """One `LoraDelta` per peft LoRA layer with a trainable factor, over all its active adapters
    (DoRA refused: its weight change is no such delta; `refuse_dora=False` to list the layers anyway)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return []
    deltas = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [
            a for a in module.active_adapters if a in module.lora_A or a in getattr(module, "lora_embedding_A", {})
        ]
        for adapter in adapters:
            if refuse_dora and module.use_dora.get(adapter, False):
                raise ValueError(
                    f"{name}: DoRA adapters are not supported by the distance regularizers: their effective "
                    "weight change is not scale * B @ A"
                )
        if adapters:
            delta = LoraDelta(f"{name}.base_layer.weight", module, adapters)
            if delta.trainable:
                deltas.append(delta)
    return deltas


def weight_deltas(
    model: nn.Module,
    *,
    reference: nn.Module | None = None,
    dtype: str = "auto",
    device: str = "auto",
    fisher_at_reference: bool = False,
) -> list[WeightDelta]:
    """One `WeightDelta` per trainable weight of `model`, tied weights once.

    Args:
        model: the model being fine-tuned (a peft model's LoRA layers give `LoraDelta`s).
        reference: a module holding the pre-trained weights under the same parameter names (the
            frozen teacher, or a user-supplied `ref_model`); without it the trainable weights are
            copied in `dtype` to `device`.
        fisher_at_reference: estimate EWC's Fisher through `reference`'s weights (a `ref_model`),
            not through the model's own.

    Returns:
        The deltas, LoRA layers first.
    """
    deltas: list[WeightDelta] = list(_lora_deltas(model))
    covered = {id(p) for d in deltas for _, a, b in d.factors for p in (a, b)}
    all_params = dict(model.named_parameters(remove_duplicate=False))
    ref_params = dict(reference.named_parameters(remove_duplicate=False)) if reference is not None else {}
    missing = []
    for name, param in model.named_parameters():  # deduplicates tied weights
        if not param.requires_grad or id(param) in covered:
            continue
        ref_name = name if name in ref_params else _peft_free_name(name)  # a plain ref_model of a peft model
        if ref_name in ref_params:
            ref = ref_params[ref_name]
            ref_shape, shape = getattr(ref, "ds_shape", ref.shape), getattr(param, "ds_shape", param.shape)
            if ref_shape != shape:
                raise ValueError(f"reference weight {name} has shape {tuple(ref_shape)}, model has {tuple(shape)}")
            deltas.append(DenseDelta(name, param, held_values(ref).detach()))
        elif reference is not None and not _is_modules_to_save(name):
            missing.append(name)
        elif _is_modules_to_save(name):
            original = all_params[_original_module_name(name)]
            deltas.append(DenseDelta(name, param, original.detach(), fisher_param=original))
        else:
            held = held_values(param)
            snapshot = held.detach().to(resolve_device(device, held), resolve_dtype(dtype, held), copy=True)
            deltas.append(DenseDelta(name, param, snapshot, owned=True))
    if missing:
        raise ValueError(
            f"ref_model has no weights for: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    if fisher_at_reference and reference is not None:
        for d in deltas:
            d.bind_fisher_parameter(_reference_parameter(ref_params, d.name))
    return deltas


def _reference_parameter(ref_params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The reference model's weight for the model's weight `name` (peft prefixes and copies removed)."""
    for candidate in (name, _peft_free_name(name), _peft_free_name(_without_modules_to_save(name))):
        if candidate in ref_params:
            return ref_params[candidate]
    raise ValueError(f"ref_model has no weight for {name}")


def _without_modules_to_save(name: str) -> str:
    # "...lm_head.modules_to_save.default.weight" -> "...lm_head.weight"
    if not _is_modules_to_save(name):
        return name
    head, tail = name.split(".modules_to_save.", 1)
    return f"{head}.{tail.split('.', 1)[1]}"


def reference_fingerprint(model: nn.Module, reference: nn.Module | None = None) -> float:
    """A checksum of the pre-trained values of `model`'s trainable weights, whichever terms are on:
    the sum (in float64) of the base weights of its LoRA layers and of the other trainable weights
    as `reference` (a `ref_model`) holds them, or as the model holds them when the trainer is built.

    Under ZeRO-3 a model built partitioned (`zero.Init`) holds partitions: their sums are added
    over the processes, so the checksum is the whole model's however it is partitioned.
    """
    ref_params = dict(reference.named_parameters(remove_duplicate=False)) if reference is not None else {}
    lora = _lora_deltas(model, refuse_dora=False)
    covered = {id(p) for d in lora for _, a, b in d.factors for p in (a, b)}
    values = [d.layer.get_base_layer().weight for d in lora]
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in covered:
            values.append(_reference_parameter(ref_params, name) if ref_params else param)
    total = torch.zeros((), dtype=torch.float64)
    partitioned = False
    for value in values:
        held = local_values(value)
        partitioned = partitioned or held is not value
        for chunk in held.detach().reshape(-1).split(_SUM_CHUNK):  # float64 in pieces: no float64 copy of a weight
            total += chunk.double().sum().cpu()
    if partitioned and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = held.device if torch.distributed.get_backend() != "gloo" else torch.device("cpu")
        total = total.to(device)
        torch.distributed.all_reduce(total)
    return float(total)


def _is_modules_to_save(name: str) -> bool:
    return ".modules_to_save." in name


def _peft_free_name(name: str) -> str:
    # "base_model.model.x.q_proj.base_layer.bias" -> "x.q_proj.bias": the name in the model peft wraps
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _original_module_name(name: str) -> str:
    # "...lm_head.modules_to_save.default.weight" -> "...lm_head.original_module.weight"
    head, tail = name.split(".modules_to_save.", 1)
    return f"{head}.original_module.{tail.split('.', 1)[1]}"


def snapshot_nbytes(deltas: list[WeightDelta]) -> int:
    """Bytes of the weight snapshots the anchor made (references to existing tensors cost nothing)."""
    return sum(d.reference.numel() * d.reference.element_size() for d in deltas if getattr(d, "owned", False))


class Teacher:
    """The frozen pre-trained model's forward: no grad, eval mode (no dropout, no checkpointing).

    For a peft model it is the model itself with its adapters disabled (no second copy), which is
    refused where that is not the pre-trained model. Otherwise it is a frozen module: a copy of
    the model in `dtype` on `device`, or the user's `ref_model`.
    """

    def __init__(self, module: nn.Module, *, adapters_disabled: bool, owned: bool = False) -> None:
        self.module, self.adapters_disabled = module, adapters_disabled
        self.owned = owned  # a frozen copy made for the teacher (not the user's or the trainer's own reference)
        self._engine: Any = None  # the DeepSpeed engine that partitions a frozen copy under ZeRO-3

    @classmethod
    def build(
        cls, model: nn.Module, *, ref_model: nn.Module | None = None, dtype: str = "auto", device: str = "auto"
    ) -> Teacher:
        owned = ref_model is None
        if ref_model is not None:
            frozen = ref_model
        elif is_peft_model(model):
            check_adapters_disable_to_base(model)
            return cls(model, adapters_disabled=True)
        elif is_partitioned(model):
            frozen = partitioned_copy(model)
        else:
            frozen = copy.deepcopy(model)
            # a forward patched onto the instance (TRL's fused LM head) closes over the original model:
            # the copy runs its class's own forward
            frozen.__dict__.pop("forward", None)
        if not is_partitioned(frozen):  # a partitioned copy keeps the model's dtype and DeepSpeed's placement
            first = next(frozen.parameters())
            frozen.to(device=resolve_device(device, first), dtype=resolve_dtype(dtype, first))
        frozen.eval().requires_grad_(False)
        return cls(frozen, adapters_disabled=False, owned=owned)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def accepts(self, argument: str) -> bool:
        """Whether the teacher's forward takes `argument` (e.g. `logits_to_keep`)."""
        base = self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module
        return argument in inspect.signature(base.forward).parameters

    @property
    def nbytes(self) -> int:
        """Memory the teacher adds: its copy's (this process's partitions under ZeRO-3); zero when it is the
        model with adapters disabled or a reference model that exists anyway (`ref_model`, DPO's own)."""
        if not self.owned:
            return 0
        return sum(local_numel(p) * p.element_size() for p in self.module.parameters())

    def partition_(self, deepspeed_config: dict[str, Any]) -> None:
        """Under ZeRO-3, partition a frozen copy like the model: an inference-only DeepSpeed engine
        (no optimizer, no gradients), so a rank holds about 1/world of the teacher and gathers
        each layer only for its forward. Collective: every rank calls it. Other stages keep the
        copy whole (they do not partition parameters either)."""
        if self.adapters_disabled or self._engine is not None:
            return
        if not self.owned and is_partitioned(self.module):  # a reference its trainer prepared already (DPO's)
            return
        if deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
            return
        import deepspeed

        config = {k: v for k, v in copy.deepcopy(deepspeed_config).items() if k not in ("optimizer", "scheduler")}
        self._engine, *_ = deepspeed.initialize(model=self.module, config=config)
        self._engine.eval()

    @contextlib.contextmanager
    def mode(self) -> Iterator[nn.Module]:
        """The teacher module, in eval mode and with adapters disabled where that is what it is."""
        was_training = self.module.training
        self.module.eval()
        try:
            with self.module.disable_adapter() if self.adapters_disabled else contextlib.nullcontext():
                yield self.module
        finally:
            self.module.train(was_training)

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any], label_names: Sequence[str] = ()) -> Any:
        """The teacher's outputs on a training batch (its labels left out, `batches.reference_inputs`)."""
        device = self.device
        kept = reference_inputs(self.module, inputs, label_names)
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kept.items()}
        with self.mode() as module:
            return module(**moved)


def is_partitioned(model: nn.Module) -> bool:
    """Whether `model` was built partitioned by ZeRO-3 (`deepspeed.zero.Init`, as `from_pretrained`
    builds it once `TrainingArguments` enabled ZeRO-3): its parameters are empty outside a forward."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def partitioned_copy(model: nn.Module) -> nn.Module:
    """A copy of a partitioned model, partitioned the same way: the architecture built again under
    `zero.Init`, each rank copying its own partitions (nothing gathered, 1/world of the model per
    rank). A deep copy would duplicate DeepSpeed's bookkeeping, not the weights."""
    frozen = type(model)._from_config(model.config, dtype=next(model.parameters()).ds_tensor.dtype)
    if not is_partitioned(frozen):
        raise RuntimeError(
            "copying a ZeRO-3 partitioned model needs the DeepSpeed configuration alive (TrainingArguments)"
        )
    pairs = [*zip(model.parameters(), frozen.parameters()), *zip(model.buffers(), frozen.buffers())]
    with torch.no_grad():
        for source, target in pairs:
            if hasattr(source, "ds_id"):
                target.ds_tensor.copy_(source.ds_tensor)
            else:
                target.copy_(source)
    return frozen


def local_numel(parameter: torch.Tensor) -> int:
    """Elements this process holds: its partition under ZeRO-3 (`ds_tensor`), else the whole."""
    partition = getattr(parameter, "ds_tensor", None)
    return partition.numel() if partition is not None else parameter.numel()


def held_values(parameter: torch.Tensor) -> torch.Tensor:
    """The values of `parameter` this process holds while no forward gathers it: its flat ZeRO-3
    partition (`ds_tensor`) when the model was built partitioned (`zero.Init`), else the tensor."""
    partition = getattr(parameter, "ds_tensor", None)
    if partition is not None and parameter.numel() != getattr(parameter, "ds_numel", parameter.numel()):
        return partition
    return parameter


def local_values(parameter: torch.Tensor) -> torch.Tensor:
    """The elements of `parameter` this process holds: under ZeRO-3 partitioning, its own partition
    without the padding of the last rank; else the whole tensor (the object itself)."""
    partition = getattr(parameter, "ds_tensor", None)
    if partition is None or parameter.numel() == getattr(parameter, "ds_numel", parameter.numel()):
        return parameter
    import torch.distributed as dist

    size = partition.ds_numel
    start = size * dist.get_rank(group=parameter.ds_process_group)
    return partition.reshape(-1).narrow(0, 0, max(0, min(size, parameter.ds_numel - start)))


def check_adapters_disable_to_base(model: nn.Module) -> None:
    """Refuse a peft model whose adapter-disabled forward is not the pre-trained model."""
    for adapter, config in model.peft_config.items():
        if getattr(config, "modules_to_save", None):
            raise ValueError(
                f"adapter {adapter!r} has modules_to_save={config.modules_to_save}: with adapters disabled the "
                "model is not the pre-trained one; pass the pre-trained model as ref_model"
            )
        if getattr(config, "bias", "none") != "none":
            raise ValueError(
                f"adapter {adapter!r} trains biases (bias={config.bias!r}): with adapters disabled the model is not "
                "the pre-trained one; pass the pre-trained model as ref_model"
            )
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise ValueError(
                f"adapter {adapter!r} uses init_lora_weights={init!r}, which rewrites the base weights: with adapters "
                "disabled the model is not the pre-trained one; pass the pre-trained model as ref_model"
            )
