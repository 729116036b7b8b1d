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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA initialisations that rewrite the base weights: with adapters disabled the model is then
# not the pre-trained one.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


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


class WeightDelta:
    """`theta - theta_pre` of one trainable weight, in float32 and in the base weight's layout."""

    name: str

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

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
        delta = self.delta()
        self.add_grad_(delta, 2.0 * alpha)
        flat = delta.reshape(-1)
        return torch.dot(flat, flat)

    def fisher_parameter(self) -> torch.Tensor:
        """The tensor whose gradient is the gradient with respect to the effective weight."""
        raise NotImplementedError

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
        """The optimizer's parameters this delta is made of."""
        raise NotImplementedError

    @property
    def decayed_parameter(self) -> nn.Parameter:
        """The parameter `decay_` changes (the optimizer step that updates it applies decoupled decay)."""
        raise NotImplementedError

    def fingerprint(self) -> float:
        """A cheap checksum of the pre-trained value, to detect a resume from another anchor."""
        raise NotImplementedError


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
        # The weight the pre-trained forward runs through: `param` itself, except for a peft
        # `modules_to_save` copy, which the adapter-disabled forward (where the Fisher is estimated)
        # bypasses for its `original_module`.
        self._fisher_param = param if fisher_param is None else fisher_param

    def delta(self) -> torch.Tensor:
        return self.param.float() - self.reference.to(self.param.device, torch.float32)

    @torch.no_grad()
    def add_grad_(self, grad_delta: torch.Tensor, alpha: float) -> None:
        _accumulate_grad(self.param, grad_delta, alpha)

    def fisher_parameter(self) -> torch.Tensor:
        return self._fisher_param

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

    def fingerprint(self) -> float:
        return float(self.reference.double().sum())


class LoraDelta(WeightDelta):
    """`scale * B @ A` of one adapter on one peft `LoraLayer`, in the base weight's layout."""

    def __init__(self, name: str, layer: nn.Module, adapter: str) -> None:
        self.name, self.layer, self.adapter = name, layer, adapter
        self.embedding = adapter in getattr(layer, "lora_embedding_A", {})
        if self.embedding:
            self.A, self.B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        else:
            self.A, self.B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError(f"{name}: only linear and embedding LoRA layers are supported, got {type(layer).__name__}")

    @property
    def scale(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def transposed(self) -> bool:
        """Whether the base weight's layout is that of `(B @ A).T` (embeddings, `fan_in_fan_out`)."""
        return self.embedding or getattr(self.layer, "fan_in_fan_out", False)

    def delta(self) -> torch.Tensor:
        product = self.scale * (self.B.float() @ self.A.float())
        return product.T if self.transposed else product

    def squared_norm(self) -> torch.Tensor:
        # ||s B A||_F^2 = s^2 tr(A^T B^T B A) = s^2 <B^T B, A A^T>: two r x r Gram matrices,
        # never the out x in product.
        a, b = self.A.float(), self.B.float()
        return self.scale**2 * ((b.T @ b) * (a @ a.T)).sum()

    @torch.no_grad()
    def add_grad_(self, grad_delta: torch.Tensor, alpha: float) -> None:
        # delta = s B A, so dP/dB = s G A^T and dP/dA = s B^T G, with G = dP/d(B A layout)
        g = grad_delta.T if self.transposed else grad_delta
        a, b = self.A.float(), self.B.float()
        _accumulate_grad(self.B, g @ a.T, alpha * self.scale)
        _accumulate_grad(self.A, b.T @ g, alpha * self.scale)

    @torch.no_grad()
    def squared_norm_and_grad_(self, alpha: float) -> torch.Tensor:
        # d/dB s^2 <B^T B, A A^T> = 2 s^2 B (A A^T), d/dA = 2 s^2 (B^T B) A: r x r work again
        a, b = self.A.float(), self.B.float()
        gram_a, gram_b = a @ a.T, b.T @ b
        factor = 2.0 * alpha * self.scale**2
        _accumulate_grad(self.B, b @ gram_a, factor)
        _accumulate_grad(self.A, gram_b @ a, factor)
        return self.scale**2 * (gram_b * gram_a).sum()

    def fisher_parameter(self) -> torch.Tensor:
        return self.layer.get_base_layer().weight

    @torch.no_grad()
    def decay_(self, factor: float) -> torch.Tensor:
        squared = self.squared_norm()
        self.B.mul_(1.0 - factor)  # scales B @ A, hence the effective delta, by exactly (1 - factor)
        return squared

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [self.A, self.B]

    @property
    def decayed_parameter(self) -> nn.Parameter:
        return self.B

    def fingerprint(self) -> float:
        return float(self.fisher_parameter().double().sum())


def _accumulate_grad(param: nn.Parameter, grad: torch.Tensor, alpha: float) -> None:
    if param.grad is None:
        param.grad = (alpha * grad).to(param.dtype)
    else:
        param.grad.add_(grad.to(param.grad.dtype), alpha=alpha)


def _lora_deltas(model: nn.Module) -> list[LoraDelta]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return []
    deltas = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.use_dora.get(adapter, False):
                raise ValueError(
                    f"{name}: DoRA adapters are not supported by the distance regularizers: their effective "
                    "weight change is not scale * B @ A"
                )
            delta = LoraDelta(f"{name}.base_layer.weight", module, adapter)
            if any(p.requires_grad for p in delta.trainable):
                deltas.append(delta)
    return deltas


def weight_deltas(
    model: nn.Module,
    *,
    reference: nn.Module | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> list[WeightDelta]:
    """One `WeightDelta` per trainable weight of `model`, tied weights once.

    `reference` is a module holding the pre-trained weights under the same parameter names (the
    frozen teacher, or a user-supplied `ref_model`); without it the trainable weights are copied
    in `dtype` to `device`.
    """
    deltas: list[WeightDelta] = list(_lora_deltas(model))
    covered = {id(p) for d in deltas for p in d.trainable}
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
        raise ValueError(f"ref_model has no weights for: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return deltas


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

    def __init__(self, module: nn.Module, *, adapters_disabled: bool) -> None:
        self.module, self.adapters_disabled = module, adapters_disabled
        self._engine: Any = None  # the DeepSpeed engine that partitions a frozen copy under ZeRO-3

    @classmethod
    def build(
        cls, model: nn.Module, *, ref_model: nn.Module | None = None, dtype: str = "auto", device: str = "auto"
    ) -> Teacher:
        if ref_model is not None:
            frozen = ref_model
        elif is_peft_model(model):
            check_adapters_disable_to_base(model)
            return cls(model, adapters_disabled=True)
        elif is_partitioned(model):
            frozen = partitioned_copy(model)
        else:
            frozen = copy.deepcopy(model)
        if not is_partitioned(frozen):  # a partitioned copy keeps the model's dtype and DeepSpeed's placement
            first = next(frozen.parameters())
            frozen.to(device=resolve_device(device, first), dtype=resolve_dtype(dtype, first))
        frozen.eval().requires_grad_(False)
        return cls(frozen, adapters_disabled=False)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def accepts(self, argument: str) -> bool:
        """Whether the teacher's forward takes `argument` (e.g. `logits_to_keep`)."""
        base = self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module
        return argument in inspect.signature(base.forward).parameters

    @property
    def nbytes(self) -> int:
        """Memory the teacher adds: zero when it is the model with adapters disabled."""
        if self.adapters_disabled:
            return 0
        return sum(local_numel(p) * p.element_size() for p in self.module.parameters())

    def partition_(self, deepspeed_config: dict[str, Any]) -> None:
        """Under ZeRO-3, partition a frozen copy like the model: an inference-only DeepSpeed engine
        (no optimizer, no gradients), so a rank holds about 1/world of the teacher and gathers
        each layer only for its forward. Collective: every rank calls it. Other stages keep the
        copy whole (they do not partition parameters either)."""
        if self.adapters_disabled or self._engine is not None:
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
    def __call__(self, inputs: dict[str, Any]) -> Any:
        device = self.device
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items() if k != "labels"}
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
        raise RuntimeError("copying a ZeRO-3 partitioned model needs the DeepSpeed configuration alive (TrainingArguments)")
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
