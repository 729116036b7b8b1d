"""`SpecGenMixin`: the regularization engine in any `transformers.Trainer` subclass.

    class SpecGenTrainer(SpecGenMixin, Trainer): ...
    class SpecGenSFTTrainer(SpecGenMixin, SFTTrainer): ...

The mixin overrides the Trainer's `train`, `compute_loss`, `training_step`, `create_optimizer`,
`log` and checkpoint saving, each a thin call into `RegularizationEngine` around the base
class's own method; with every `<name>_lambda` at 0 it calls the base methods only. What differs
between trainers is in the `_specgen_*` methods a subclass may override: the batch the batch
terms compare (`_specgen_distillation_batch`), how the task loss is normalized
(`_specgen_loss_is_ga_scaled`, `_specgen_token_denominator`) and the examples an importance is
estimated from (`_specgen_importance_batches`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from . import compat
from .batches import task_labels
from .deltas import WeightDelta
from .engine import RegularizationEngine
from .regularizers import DistillationBatch, ProtectedFeatures, Regularizer
from .teacher import Teacher


class SpecGenMixin:
    """Adds the active regularizers (`SpecGenArguments`' `<name>_lambda > 0`) to a Trainer's loss.

    The pre-trained reference is the model as it is when the trainer is built, or `ref_model`.
    Weight terms (L1, L2-SP, EWC, MAS) depend on the weights only: `training_step` adds their value
    to the loss it reports and their closed-form gradient to `.grad`, once per optimizer step. Batch
    terms (KD, feature protection) are added in `compute_loss` on every micro-batch, normalized so
    that each counts the same whatever the gradient accumulation. Both are part of the gradient
    `max_grad_norm` clips; decoupled L2 acts in the optimizer step instead. Each term is logged as
    `loss_<name>` beside `loss_task`.

    Under DeepSpeed ZeRO (1, 2 or 3) the weight terms work on each rank's own partition of the fp32
    master weights and averaged gradients (`hf_specgen.zero`), their gradients added at the start
    of the ZeRO optimizer's step (after the averaging, before clipping). Checkpoints keep the
    regularizer state, one file per rank under ZeRO.

    Args:
        ref_model: the pre-trained model, when the model passed is not it (e.g. already changed);
            every other argument is the base trainer's.
    """

    # Whether the base trainer takes a `ref_model` argument of its own (DPO): it is then passed on, and
    # `_specgen_reference` reads the reference the base trainer holds.
    _specgen_base_takes_ref_model: ClassVar[bool] = False

    def __init__(self, *args: Any, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._specgen_base_takes_ref_model:
            if ref_model is not None:
                kwargs["ref_model"] = ref_model
            super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self.specgen = RegularizationEngine(self, self._specgen_reference(ref_model))

    def _specgen_reference(self, ref_model: nn.Module | None) -> nn.Module | None:
        """The pre-trained model the engine anchors to (None: the model as it is now)."""
        return ref_model

    # ---- what the engine holds, by name ---------------------------------------------------------

    @property
    def regularizers(self) -> list[Regularizer]:
        return self.specgen.regularizers

    @property
    def teacher(self) -> Teacher | None:
        return self.specgen.teacher

    @property
    def deltas(self) -> list[WeightDelta]:
        return self.specgen.deltas

    @property
    def features(self) -> ProtectedFeatures | None:
        return self.specgen.features

    def anchor_memory(self) -> dict[str, int]:
        """Bytes this process holds for the pre-trained reference: `weights` (the snapshot), `teacher`
        (a frozen copy) and `fisher` (importances: EWC's Fisher, MAS's Omega)."""
        return self.specgen.anchor_memory()

    # ---- the Trainer's methods ------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self.specgen.begin_training(checkpoint if isinstance(checkpoint, str) else None)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        engine = self.specgen
        if not engine or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        micro_batches = compat.accumulation_steps(self)  # set by the training loop
        # `divisor`: what `training_step` divides the returned loss by; a term that should make up
        # `share` of the optimizer step's loss is added as `term * share * divisor`.
        divisor = 1 if self._specgen_loss_is_ga_scaled(num_items_in_batch) else micro_batches
        if not engine.batch_terms:
            result = self._specgen_base_compute_loss(model, inputs, return_outputs, num_items_in_batch)
            engine.record("loss_task", (result[0] if return_outputs else result).detach() / divisor)
            return result
        loss, outputs, batch = self._specgen_distillation_batch(model, inputs, num_items_in_batch)
        engine.record("loss_task", loss.detach() / divisor)
        loss = engine.add_batch_terms(loss, batch, divisor=divisor, micro_batches=micro_batches)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step; on an optimizer step's first micro-batch, also the weight terms' gradients
        (under DeepSpeed: in the ZeRO optimizer's step, on the micro-batch that ends the step)."""
        engine = self.specgen
        if not engine:
            return super().training_step(model, inputs, num_items_in_batch)
        if engine.binds_to_zero:
            engine.bind_zero(self.model_wrapped.optimizer)
        new_step = engine.new_micro_batch(self.state.global_step)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if new_step and engine.weight_terms and engine.zero_optimizer is None:
            scaler = getattr(self.accelerator, "scaler", None)
            grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
            engine.pending_weight_loss = engine.apply_weight_terms(grad_scale)
        weight_loss = engine.take_pending_weight_loss()
        if weight_loss is not None:
            loss = loss + weight_loss.to(loss.device, loss.dtype)
        return loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (built, or the user's), with the decoupled terms hooked in once."""
        optimizer = super().create_optimizer(model)
        self.specgen.attach_step_terms(getattr(optimizer, "optimizer", optimizer))  # unwrap Accelerate's wrapper
        return optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `loss_task` and each `loss_<term>`, averaged per optimizer step and over processes."""
        if "loss" in logs:
            # the Trainer's own reduction of `loss` (accelerate's state may count one process under DeepSpeed on CPU)
            gather = lambda values: compat.nested_gather(values, self.args.parallel_mode)  # noqa: E731
            logs.update(self.specgen.logged_values(gather, self.args.device))
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:  # a private hook: see `compat.INTERNALS`
        super()._save_optimizer_and_scheduler(output_dir)
        self.specgen.save_state(output_dir)

    # ---- what differs between trainers --------------------------------------------------------------

    def _specgen_base_compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> Any:
        """The base trainer's own `compute_loss` (for subclasses of the mixin, whose `super()` is the mixin)."""
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _specgen_loss_is_ga_scaled(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Mirrors `Trainer.training_step`: is the task loss already normalized over the accumulated batch?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def _specgen_token_denominator(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float | None:
        """What the task loss divides its token sum by (mirrors `Trainer.compute_loss`); None for a local mean."""
        if num_items_in_batch is None or not (self.model_accepts_loss_kwargs or self.compute_loss_func):
            return None
        if self.args.average_tokens_across_devices:
            return num_items_in_batch / (self.accelerator.num_processes // self.get_tp_size())
        return num_items_in_batch

    def _specgen_distillation_batch(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any, DistillationBatch]:
        """The task loss, the model's outputs, and what the batch terms compare: the model's outputs
        (logits, protected features) on `inputs` against the teacher's on the same inputs."""
        engine, features = self.specgen, self.specgen.features
        labels = task_labels(inputs, self.label_names)
        student_inputs = features.model_inputs(inputs) if features else inputs
        with _captured(features, self.accelerator.unwrap_model(model)) as student_features:
            loss, outputs = self._specgen_base_compute_loss(model, student_inputs, True, num_items_in_batch)
        with _captured(features, engine.teacher.module) as teacher_features:
            teacher_outputs = engine.teacher_outputs(student_inputs, self.label_names)
        batch = DistillationBatch(
            student=outputs,
            teacher=teacher_outputs,
            labels=labels,
            shifts_labels=compat.loss_shifts_labels(self),
            token_denominator=self._specgen_token_denominator(num_items_in_batch),
        )
        if features:
            batch.student_features = features.select(outputs, student_features)
            batch.teacher_features = features.select(teacher_outputs, teacher_features)
            batch.feature_masks = features.masks(inputs, labels)
        return loss, outputs, batch

    def _specgen_importance_batches(
        self, n: int, group: int, generator: torch.Generator, device: torch.device | None = None
    ) -> Iterator[dict[str, Any]]:
        """`n` training examples in a seeded random order, collated `group` at a time (on `device`, or the
        model's): what EWC's Fisher and MAS's importance are estimated from."""
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError(
                "EWC and MAS need a train_dataset to estimate their importance at the pre-trained weights"
            )
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = compat.remove_unused_columns(self, dataset, "training")
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass
        if isinstance(dataset, torch.utils.data.IterableDataset):
            rows = itertools.islice(dataset, n)
        else:
            rows = (dataset[int(i)] for i in torch.randperm(len(dataset), generator=generator)[:n])
        for chunk in _chunks(rows, group):
            batch = compat.prepare_inputs(self, self.data_collator(chunk))
            if device is not None:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            yield batch


def _captured(
    features: ProtectedFeatures | None, module: nn.Module
) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
    return features.capture(module) if features else contextlib.nullcontext([])


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
