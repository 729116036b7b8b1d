"""DeepSpeed ZeRO: partitioned parameters, and the weight terms on each rank's own partition.

Under ZeRO-3 a model built partitioned (`deepspeed.zero.Init`, as `from_pretrained` builds it once
`TrainingArguments` enabled ZeRO-3) holds each weight as a flat partition per rank (`ds_tensor`):
`held_values`, `local_values` and `local_numel` read what this process holds, `partitioned_copy`
copies such a model partition by partition (the teacher's copy), and `inference_engine`
partitions a frozen module for inference.

The weight terms (L1, L2-SP, EWC) run on each rank's own partition. ZeRO keeps the fp32 master
weights and the averaged gradients partitioned: ZeRO-1/2 split one flat buffer per parameter group
across the ranks (a weight may straddle two), ZeRO-3 splits every weight. Each rank therefore
regularizes only the elements it owns, as a `ShardDelta`: its slice of the master weight minus the
same slice of the anchor, with the penalty's gradient written into its slice of the averaged
gradient. The terms are elementwise, so the slices together are the whole model's term: nothing is
gathered, and the anchor and the Fisher cost 1/world per rank.

When: DeepSpeed's engine steps inside `accelerator.backward`, too late for a Trainer callback,
and a gradient added before the averaging across ranks would come out 1/world too small. So the
penalty runs first thing in the ZeRO optimizer's `step`: after the averaging, before the global
norm is taken and clipped, at the loss scale of the gradients (fp16), once per optimizer step.
ZeRO-1/2 with `offload_optimizer` take each weight fragment's norm during backward already: the
fragments the penalty writes to get their norm taken again, so that `step` clips and logs the
norm of the gradient it applies.
Decoupled decay hooks the wrapped torch optimizer instead, like in one process, and finds its
slices through the flat fp32 partition that optimizer steps.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import compat
from .deltas import DenseDelta, WeightDelta, anchor_difference, is_coarser


def is_partitioned(model: nn.Module) -> bool:
    """Whether `model` was built partitioned by ZeRO-3 (`deepspeed.zero.Init`, as `from_pretrained`
    builds it once `TrainingArguments` enabled ZeRO-3): its parameters are empty outside a forward.

    Args:
        model: any module.

    Returns:
        True when a parameter of `model` is a DeepSpeed partitioned one (`ds_id`).
    """
    return any(hasattr(p, "ds_id") for p in model.parameters())


def partitioned_copy(model: nn.Module) -> nn.Module:
    """A copy of a partitioned model, partitioned the same way: the architecture built again under
    `zero.Init`, each rank copying its own partitions (nothing gathered, 1/world of the model per
    rank). A deep copy would duplicate DeepSpeed's bookkeeping, not the weights.

    Args:
        model: a transformers model built partitioned, while the DeepSpeed configuration is alive.

    Returns:
        The copy, partitioned the same way.

    Raises:
        RuntimeError: the DeepSpeed configuration is gone (the copy would be built whole).
    """
    frozen = compat.from_config(type(model), model.config, dtype=next(model.parameters()).ds_tensor.dtype)
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
    """Elements this process holds: its partition under ZeRO-3 (`ds_tensor`), else the whole.

    Args:
        parameter: a parameter, partitioned or not.

    Returns:
        The number of elements.
    """
    partition = getattr(parameter, "ds_tensor", None)
    return partition.numel() if partition is not None else parameter.numel()


def held_values(parameter: torch.Tensor) -> torch.Tensor:
    """The values of `parameter` this process holds while no forward gathers it: its flat ZeRO-3
    partition (`ds_tensor`) when the model was built partitioned (`zero.Init`), else the tensor.

    Args:
        parameter: a parameter, partitioned or not.

    Returns:
        The partition (padded on the last rank), or `parameter` itself.
    """
    partition = getattr(parameter, "ds_tensor", None)
    if partition is not None and parameter.numel() != getattr(parameter, "ds_numel", parameter.numel()):
        return partition
    return parameter


def local_values(parameter: torch.Tensor) -> torch.Tensor:
    """The elements of `parameter` this process holds: under ZeRO-3 partitioning, its own partition
    without the padding of the last rank; else the whole tensor (the object itself).

    Args:
        parameter: a parameter, partitioned or not.

    Returns:
        A view of the partition without padding, or `parameter` itself.
    """
    partition = getattr(parameter, "ds_tensor", None)
    if partition is None or parameter.numel() == getattr(parameter, "ds_numel", parameter.numel()):
        return parameter
    size = partition.ds_numel
    start = size * dist.get_rank(group=parameter.ds_process_group)
    return partition.reshape(-1).narrow(0, 0, max(0, min(size, parameter.ds_numel - start)))


def inference_engine(module: nn.Module, deepspeed_config: dict[str, Any]) -> Any | None:
    """Under ZeRO-3, partition a frozen `module` like the model: an inference-only DeepSpeed engine (no
    optimizer, no gradients), so a rank holds about 1/world of it and gathers each layer only for its
    forward. Collective: every rank calls it. Other stages keep the module whole (they do not partition
    parameters either).

    Args:
        module: the frozen module (e.g. the teacher's copy of the model).
        deepspeed_config: the DeepSpeed configuration the model is trained under; its optimizer and
            scheduler are left out.

    Returns:
        The engine, in eval mode, under ZeRO-3; else None.
    """
    if deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    import deepspeed

    config = {k: v for k, v in copy.deepcopy(deepspeed_config).items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


class Partition:
    """One weight's slice on this rank: elements `[start, start + numel)` of the flattened weight."""

    start: int
    numel: int
    flat: torch.Tensor  # the fp32 buffer the wrapped torch optimizer steps, which holds the slice

    def master(self) -> torch.Tensor:
        """The slice of the fp32 master weight (a copy under CPU offload: write with `add_to_master_`)."""
        raise NotImplementedError

    def add_to_master_(self, value: torch.Tensor, alpha: float) -> None:
        raise NotImplementedError

    def add_to_grad_(self, value: torch.Tensor, alpha: float) -> None:
        """Adds to the slice of the averaged gradient (between backward and the optimizer step)."""
        raise NotImplementedError


class Zero3Partition(Partition):
    """Through DeepSpeed's local API: each weight's `ds_tensor` partition, padded on the last rank."""

    def __init__(self, param: torch.nn.Parameter, optimizer: Any) -> None:
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_grad,
            safe_set_local_fp32_param,
            safe_set_local_grad,
        )

        self.param = param
        size = param.ds_tensor.ds_numel
        self.start = size * dist.get_rank(group=param.ds_process_group)
        self.numel = max(0, min(size, param.ds_numel - self.start))  # the padding is no weight
        self.flat = optimizer.fp32_partitioned_groups_flat[optimizer.grad_position[optimizer.get_param_id(param)][0]]
        self._get_master, self._set_master = safe_get_local_fp32_param, safe_set_local_fp32_param
        self._get_grad, self._set_grad = safe_get_local_grad, safe_set_local_grad

    def master(self) -> torch.Tensor:
        return self._get_master(self.param)[: self.numel]

    def add_to_master_(self, value: torch.Tensor, alpha: float) -> None:
        _add_through(self._get_master, self._set_master, self.param, self.numel, value, alpha)

    def add_to_grad_(self, value: torch.Tensor, alpha: float) -> None:
        _add_through(self._get_grad, self._set_grad, self.param, self.numel, value, alpha)


class Zero12Partition(Partition):
    """Through the fragment map ZeRO-1/2 keep on each weight (`_hp_mapping`, what DeepSpeed's
    `safe_get_full_*` read): the part of the weight inside this rank's flat fp32 partition."""

    def __init__(self, param: torch.nn.Parameter, optimizer: Any) -> None:
        self.param = param
        mapping = compat.hp_mapping(param)
        self.start, self.numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        self.flat = optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        self.optimizer = optimizer
        self.offloaded = bool(getattr(optimizer, "cpu_offload", False))

    def master(self) -> torch.Tensor:
        return compat.hp_mapping(self.param).hp_fragment  # looked up each time: offloading states relinks it

    def add_to_master_(self, value: torch.Tensor, alpha: float) -> None:
        self.master().add_(value.to(self.flat.device), alpha=alpha)

    def add_to_grad_(self, value: torch.Tensor, alpha: float) -> None:
        grad = compat.lp_grad_fragment(self.param).view(-1)
        if grad.numel() == self.param.numel():  # a whole-weight accumulation buffer (bf16): our fragment of it
            grad = grad.narrow(0, self.start, self.numel)
        grad.add_(value.to(grad.device, grad.dtype), alpha=alpha)
        if self.offloaded:
            self._refresh_offload_norm(grad)

    def _refresh_offload_norm(self, grad: torch.Tensor) -> None:
        """Under `offload_optimizer`, ZeRO-1/2's `step` clips and logs a norm summed from the norms of each
        weight's fragment that it took during backward (`norm_for_param_grads`), and skips an fp16 step on
        the overflow it saw there: both are updated to the fragment as it is now (the offloaded fp32
        gradient, the penalty in it), as ZeRO-3's `safe_set_local_grad` does. `step` still sums the
        fragments' norms across the ranks (and any model-parallel group) itself."""
        optimizer = self.optimizer
        optimizer.norm_for_param_grads[optimizer.get_param_id(self.param)] = grad.to(_norm_dtype()).norm(2)
        optimizer.update_offload_overflow_tracker(grad)


def _norm_dtype() -> torch.dtype:
    """The dtype DeepSpeed takes gradient norms in (fp64 where the device has it)."""
    try:
        from deepspeed.runtime.zero.utils import get_norm_dtype
    except ImportError:  # older DeepSpeed: always fp64
        return torch.float64
    return get_norm_dtype()


def _add_through(
    get: Callable, set_: Callable, param: torch.nn.Parameter, numel: int, value: torch.Tensor, alpha: float
) -> None:
    """Adds `alpha * value` to the first `numel` elements of a ZeRO-3 partition read with `get`."""
    partition = get(param)  # a view, or a copy under offload: written back either way
    partition[:numel].add_(value.to(partition.device, partition.dtype), alpha=alpha)
    set_(param, partition)


class ShardDelta(DenseDelta):
    """`theta - theta_pre` on this rank's slice of one weight, flat: ZeRO's fp32 master slice minus
    the anchor's slice; its gradient goes into ZeRO's averaged gradient slice."""

    def __init__(self, delta: DenseDelta, partition: Partition) -> None:
        anchor = _local_anchor(delta.reference, partition)
        super().__init__(delta.name, delta.param, anchor, owned=True, fisher_param=delta.fisher_parameter())
        self.partition = partition
        self.coarse = anchor.is_floating_point() and is_coarser(anchor.dtype, torch.float32)  # vs the fp32 master

    def delta(self) -> torch.Tensor:
        return anchor_difference(self.partition.master(), self.reference, self.coarse)

    @torch.no_grad()
    def add_grad_(self, grad_delta: torch.Tensor, alpha: float) -> None:
        self.partition.add_to_grad_(grad_delta, alpha)

    @property
    def local_shape(self) -> torch.Size:
        return torch.Size([self.partition.numel])

    def local_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(-1).narrow(0, self.partition.start, self.partition.numel)

    @torch.no_grad()
    def decay_(self, factor: float) -> torch.Tensor:
        delta = self.delta()
        self.partition.add_to_master_(delta, -factor)
        return torch.dot(delta, delta)


def _local_anchor(reference: torch.Tensor, partition: Partition) -> torch.Tensor:
    """This rank's slice of the anchor, copied out of a whole snapshot (which can then be freed)."""
    flat = reference.reshape(-1)
    if flat.numel() == partition.numel:  # already this rank's slice (a rebind), or the whole weight is ours
        return flat
    held_is_partition = isinstance(partition, Zero3Partition) and flat.numel() == partition.param.ds_tensor.ds_numel
    start = 0 if held_is_partition else partition.start  # snapshot of a model built partitioned (`zero.Init`)
    return flat.narrow(0, start, partition.numel).clone()


def shard_deltas(deltas: Sequence[DenseDelta], optimizer: Any) -> list[ShardDelta]:
    """Each dense delta's slice on this rank (none where the rank owns no element of the weight)."""
    stage3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
    if not stage3 and not hasattr(optimizer, "single_partition_of_fp32_groups"):
        raise ValueError(
            "l1_lambda, l2_lambda and ewc_lambda under DeepSpeed work with its ZeRO stage 1/2 and stage 3 "
            f"optimizers, not with a {type(optimizer).__name__}"
        )
    shards = []
    for d in deltas:
        if stage3:
            partition: Partition = Zero3Partition(d.param, optimizer)
        elif compat.hp_mapping(d.param) is not None:
            partition = Zero12Partition(d.param, optimizer)
        else:
            continue  # ZeRO-1/2: no element of this weight is in this rank's partition
        if partition.numel > 0:
            shards.append(ShardDelta(d, partition))
    return shards


def step_targets(deltas: Sequence[ShardDelta]) -> dict[int, list[WeightDelta]]:
    """The slices each flat fp32 partition holds, by `id` of the tensor the torch optimizer steps."""
    targets: dict[int, list[WeightDelta]] = {}
    for d in deltas:
        targets.setdefault(id(d.partition.flat), []).append(d)
    return targets


def before_zero_step(optimizer: Any, hook: Callable[[float], None]) -> None:
    """Calls `hook(loss_scale)` at the start of each step of the ZeRO optimizer `optimizer`: the
    gradients are averaged and partitioned, their global norm not yet taken nor clipped (ZeRO-1/2
    offload: each fragment's norm is, which `Zero12Partition.add_to_grad_` takes again)."""
    step = optimizer.step

    # ZeRO-1/2 offload copies the gradients into the fp32 partition asynchronously (from a GPU): let them land first
    offloaded = getattr(optimizer, "cpu_offload", False)
    wait_for_offload = compat.offload_copies_waiter(optimizer) if offloaded else None

    @functools.wraps(step)
    def step_after_hook(*args: Any, **kwargs: Any) -> Any:
        if wait_for_offload is not None:
            wait_for_offload()
        hook(float(getattr(optimizer, "loss_scale", 1.0)))
        return step(*args, **kwargs)

    optimizer.step = step_after_hook
