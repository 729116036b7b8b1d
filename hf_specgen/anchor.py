"""The anchor: the pre-trained values the weight terms pull a fine-tuned model back toward.

`weight_deltas` gives each trainable weight its `WeightDelta` (`hf_specgen.deltas`), choosing where
its pre-trained value is read: the frozen base weight of a LoRA layer (no snapshot), peft's
`original_module` of a `modules_to_save` copy, a reference model's weight (the frozen teacher, a
user's `ref_model`), or else a snapshot taken when the trainer is built, in `anchor_dtype` on
`anchor_device`. So no weight is copied twice. `reference_fingerprint` is a checksum of those
values, which a resumed run checks.
"""

from __future__ import annotations

import torch
from torch import nn

from .deltas import DenseDelta, LoraDelta, WeightDelta
from .dtypes import torch_dtype
from .zero import held_values, local_values


_SUM_CHUNK = 2**22  # elements summed in float64 at a time by `reference_fingerprint`


def resolve_dtype(name: str, like: torch.Tensor) -> torch.dtype:
    """`anchor_dtype` as a torch dtype; 'auto' keeps the tensor's own (lossless) dtype.

    Args:
        name: "auto" or one of `hf_specgen.dtypes.DTYPES`.
        like: the tensor whose dtype "auto" keeps.

    Returns:
        The dtype.
    """
    return like.dtype if name == "auto" else torch_dtype(name)


def resolve_device(name: str, like: torch.Tensor) -> torch.device:
    """`anchor_device` as a torch device; 'auto' keeps the tensor's own device.

    Args:
        name: "auto" or a torch device name.
        like: the tensor whose device "auto" keeps.

    Returns:
        The device.
    """
    return like.device if name == "auto" else torch.device(name)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft model (its pre-trained forward is the one with adapters disabled).

    Args:
        model: any module.

    Returns:
        True for a `peft.PeftModel`.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


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
        dtype: `anchor_dtype`, the dtype of a snapshot ("auto": the weight's own).
        device: `anchor_device`, where a snapshot is kept ("auto": beside the weight).
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

    Args:
        model: the model being fine-tuned.
        reference: the `ref_model` holding the pre-trained weights, if any.

    Returns:
        The checksum.
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
    """Bytes of the weight snapshots the anchor made (references to existing tensors cost nothing).

    Args:
        deltas: the deltas `weight_deltas` made.

    Returns:
        The bytes of the snapshots they own.
    """
    return sum(d.reference.numel() * d.reference.element_size() for d in deltas if getattr(d, "owned", False))
