"""The teacher: the frozen pre-trained model's forward, for knowledge and feature distillation.

For a peft model it is the model itself with its adapters disabled (no second copy); otherwise a
frozen copy of the model (under ZeRO-3, a copy partitioned like the model), or the user's
`ref_model`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .anchor import is_peft_model, resolve_device, resolve_dtype
from .batches import reference_inputs
from .modes import eval_mode
from .zero import inference_engine, is_partitioned, local_numel, partitioned_copy


# LoRA initialisations that rewrite the base weights: with adapters disabled the model is then
# not the pre-trained one.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


class Teacher:
    """The frozen pre-trained model's forward: no grad, eval mode (no dropout, no checkpointing).

    For a peft model it is the model itself with its adapters disabled (no second copy), which is
    refused where that is not the pre-trained model. Otherwise it is a frozen module: a copy of
    the model in `dtype` on `device`, or the user's `ref_model`.

    Args:
        module: the module whose forward is the teacher's.
        adapters_disabled: whether `module` is the peft model being trained, run with its adapters disabled.
        owned: whether `module` is a frozen copy made for the teacher (it then counts in `nbytes`).
    """

    def __init__(self, module: nn.Module, *, adapters_disabled: bool, owned: bool = False) -> None:
        self.module, self.adapters_disabled = module, adapters_disabled
        self.owned = owned  # a frozen copy made for the teacher (not the user's or the trainer's own reference)
        self._engine: Any = None  # the DeepSpeed engine that partitions a frozen copy under ZeRO-3

    @classmethod
    def build(
        cls, model: nn.Module, *, ref_model: nn.Module | None = None, dtype: str = "auto", device: str = "auto"
    ) -> Teacher:
        """The teacher of `model`: `ref_model`, the peft model with its adapters disabled, or a frozen copy.

        Args:
            model: the model being fine-tuned (a ZeRO-3 partitioned one gets a copy partitioned alike).
            ref_model: the pre-trained model, when the user gives it (used as it is, frozen).
            dtype: `anchor_dtype` of a copy ("auto": the model's own).
            device: `anchor_device` of a copy ("auto": the model's own).

        Returns:
            The teacher.

        Raises:
            ValueError: a peft model whose adapter-disabled forward is not the pre-trained model.
        """
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
        copy whole (they do not partition parameters either).

        Args:
            deepspeed_config: the DeepSpeed configuration the model is trained under.
        """
        if self.adapters_disabled or self._engine is not None:
            return
        if not self.owned and is_partitioned(self.module):  # a reference its trainer prepared already (DPO's)
            return
        self._engine = inference_engine(self.module, deepspeed_config)

    @contextlib.contextmanager
    def mode(self) -> Iterator[nn.Module]:
        """The teacher module, in eval mode and with adapters disabled where that is what it is."""
        adapters = self.module.disable_adapter() if self.adapters_disabled else contextlib.nullcontext()
        with eval_mode(self.module), adapters:
            yield self.module

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any], label_names: Sequence[str] = ()) -> Any:
        """The teacher's outputs on a training batch (its labels left out, `batches.reference_inputs`).

        Args:
            inputs: the training batch.
            label_names: the Trainer's `label_names`.

        Returns:
            The teacher module's outputs, without autograd.
        """
        device = self.device
        kept = reference_inputs(self.module, inputs, label_names)
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kept.items()}
        with self.mode() as module:
            return module(**moved)


def check_adapters_disable_to_base(model: nn.Module) -> None:
    """Refuse a peft model whose adapter-disabled forward is not the pre-trained model.

    Args:
        model: a peft model.

    Raises:
        ValueError: an adapter with `modules_to_save`, trained biases, or an initialisation that rewrites
            the base weights (PiSSA, OLoRA, CorDA, LoftQ).
    """
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
