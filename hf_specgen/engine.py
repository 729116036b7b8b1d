"""The regularization engine: everything the regularizers need from a training loop, in one object
that is not a Trainer.

`RegularizationEngine` builds the active regularizers from the arguments, the pre-trained
reference (the anchor of the weights, the frozen teacher), estimates importances at the
pre-trained weights, applies the weight terms' closed-form gradients once per optimizer step and
the batch terms on each micro-batch, moves the weight terms onto ZeRO partitions, accumulates
the `loss_<term>` values to log, and saves and checks its state in checkpoints. It serves each
regularizer by what the regularizer declares (`uses_teacher`, `uses_weights`, `needs_importance`,
`normalization`, ...), never by its class.

A trainer takes it through `SpecGenMixin` (`hf_specgen.mixin`), which calls it from the Trainer's
methods; the engine reads the host trainer's arguments, model and accelerator, and asks the host
for what differs between trainers (the batches an importance is estimated from, the inputs of
the teacher) through the mixin's `_specgen_*` methods.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import compat, zero
from .anchor import is_peft_model, reference_fingerprint, snapshot_nbytes, weight_deltas
from .batches import unwrap_peft
from .deltas import DenseDelta, WeightDelta
from .regularizers import (
    BatchRegularizer,
    DistillationBatch,
    ImportanceSample,
    ProtectedFeatures,
    Regularizer,
    StepRegularizer,
    WeightRegularizer,
    build_regularizers,
)
from .regularizers.positions import is_contrastive, output_classes
from .teacher import Teacher


if TYPE_CHECKING:
    from transformers import Trainer

STATE_PREFIX = "specgen_regularizers"
STATE_FILE = f"{STATE_PREFIX}.safetensors"
REFERENCE_KEY = "reference_fingerprint"  # metadata: checksum of the pre-trained weights the run was regularized toward


class RegularizationEngine:
    """The active regularizers of one trainer and the pre-trained reference they share.

    Args:
        host: the trainer (a `transformers.Trainer` with `SpecGenMixin`) whose arguments, model
            and accelerator the engine reads.
        ref_model: the pre-trained model, when it is not the model as it is now (it then serves
            as the teacher, the anchor of the weights and where importances are estimated).

    Attributes:
        regularizers: the active terms, in registry order.
        teacher: the frozen pre-trained forward (batch terms), or None.
        deltas: `theta - theta_pre` of each trainable weight (weight terms), or empty.
        features: where protected features come from (feature terms), or None.
    """

    def __init__(self, host: Trainer, ref_model: nn.Module | None = None) -> None:
        self.host = host
        args = host.args
        self.regularizers: list[Regularizer] = build_regularizers(args)
        # the three ways a term meets the training step (interfaces, not concrete classes)
        self.weight_terms = [r for r in self.regularizers if isinstance(r, WeightRegularizer)]
        self.step_terms = [r for r in self.regularizers if isinstance(r, StepRegularizer)]
        self.batch_terms = [r for r in self.regularizers if isinstance(r, BatchRegularizer)]
        self.importance_terms = [r for r in self.regularizers if r.needs_importance]
        self.ref_model = ref_model
        self.teacher: Teacher | None = None
        self.deltas: list[WeightDelta] = []
        self.features: ProtectedFeatures | None = None
        self.teacher_kwargs: dict[str, Any] = {}
        self.log_sums: dict[str, torch.Tensor] = {}
        self.log_steps = 0
        self.last_seen_step: int | None = None
        self.pending_weight_loss: torch.Tensor | None = None
        self.zero_optimizer: Any = None  # the ZeRO optimizer the weight terms are bound to
        self.weight_share = 1  # how many times a process's part of a weight term counts in the mean over processes
        self.resume_checkpoint: str | None = None
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self._step_targets: dict[int, list[WeightDelta]] = {}
        self.reference_fingerprint: float | None = None
        self._built_shapes: dict[str, tuple[int, ...]] = {}
        if ref_model is not None and not isinstance(ref_model, nn.Module):
            raise ValueError(
                f"ref_model must be a model (torch.nn.Module), got {type(ref_model).__name__} {ref_model!r}: load it "
                "first, e.g. AutoModelForCausalLM.from_pretrained(...)"
            )
        if self.regularizers:
            self._build(host.model, args, ref_model)
        elif ref_model is not None and not getattr(host, "_specgen_base_takes_ref_model", False):
            warnings.warn(
                "ref_model is given but no regularizer is on (every *_lambda is 0): it is not used", stacklevel=3
            )

    def __bool__(self) -> bool:
        return bool(self.regularizers)

    @property
    def uses_logits(self) -> bool:
        """Whether a batch term compares output distributions (the teacher's logits are needed)."""
        return any(r.compares_distributions for r in self.batch_terms)

    @property
    def binds_to_zero(self) -> bool:
        """Whether the weight terms work on ZeRO partitions (they are bound once the engine exists)."""
        return self.host.is_deepspeed_enabled and bool(self.weight_terms or self.step_terms)

    # ---- construction ---------------------------------------------------------------------

    def _build(self, model: nn.Module, args: Any, ref_model: nn.Module | None) -> None:
        host = self.host
        if host.model_init is not None:
            raise ValueError("regularizers need the pre-trained model at construction; model_init is not supported")
        if host.is_fsdp_enabled or getattr(args, "fsdp", None):
            raise ValueError(
                "the regularizers (*_lambda > 0) do not support FSDP yet: shard with DeepSpeed ZeRO-1/2/3 instead "
                "(e.g. accelerate launch --config_file recipes/accelerate/zero3.yaml, or "
                "TrainingArguments(deepspeed=...))"
            )
        if host.is_deepspeed_enabled and (self.weight_terms or self.step_terms) and is_peft_model(model):
            names = ", ".join(f"{r.name}_lambda" for r in self.regularizers if r.uses_weights)
            raise ValueError(f"{names} are not supported for peft models under DeepSpeed yet")
        self._check_outputs_fit_the_terms(model, args)
        uses_features = any(r.uses_features for r in self.regularizers)
        if ref_model is not None:
            _check_same_architecture(model, ref_model, needs_features=uses_features)
        if self.batch_terms:
            self.teacher = Teacher.build(
                model, ref_model=ref_model, dtype=args.anchor_dtype, device=args.anchor_device
            )
        if self.weight_terms or self.step_terms:
            # A frozen teacher copy already holds the pre-trained weights: reuse it as the anchor.
            reference = ref_model
            if reference is None and self.teacher is not None and not self.teacher.adapters_disabled:
                reference = self.teacher.module
            self.deltas = weight_deltas(
                model,
                reference=reference,
                dtype=args.anchor_dtype,
                device=args.anchor_device,
                fisher_at_reference=ref_model is not None and bool(self.importance_terms),
            )
        if uses_features:
            self.features = ProtectedFeatures(model, args.feature_layers)
        if any(r.compares_distributions and r.uses_teacher for r in self.regularizers):
            _check_same_vocabulary(model, self.teacher.module)
        elif self.teacher is not None and self.teacher.accepts("logits_to_keep"):
            self.teacher_kwargs["logits_to_keep"] = 1  # features only: skip the vocabulary projection
        self.reference_fingerprint = reference_fingerprint(model, ref_model)
        self._built_shapes = _trainable_shapes(model)

    def _check_outputs_fit_the_terms(self, model: nn.Module, args: Any) -> None:
        """Terms that compare output distributions refuse a model whose output has one outcome."""
        classes = output_classes(model)
        if classes is None or classes >= 2:
            return
        for reg in self.regularizers:
            if reg.compares_distributions:
                raise ValueError(
                    f"{reg.name}_lambda > 0 compares the model's output distributions, but {type(model).__name__} has "
                    f"{classes} output (num_labels=1, a regression head): a softmax over one logit is constant, "
                    "so the term would always be 0; use l2_lambda, l1_lambda, mas_lambda or feature_lambda instead"
                )

    # ---- memory ---------------------------------------------------------------------------

    def anchor_memory(self) -> dict[str, int]:
        """Bytes this process holds for the pre-trained reference: the weight snapshot, the teacher, the
        importances (under ZeRO, once training has started: this rank's slices, about 1/world of them)."""
        return {
            "weights": snapshot_nbytes(self.deltas),
            "teacher": self.teacher.nbytes if self.teacher is not None else 0,
            "fisher": sum(r.nbytes for r in self.regularizers),
        }

    # ---- a training run ---------------------------------------------------------------------

    def begin_training(self, checkpoint: str | None) -> None:
        """At `train()`: a fresh log, the model checked against the reference it was built with, the state
        loaded from `checkpoint` and what is missing estimated (under DeepSpeed, once bound to ZeRO)."""
        self.log_sums, self.log_steps, self.last_seen_step = {}, 0, None
        if not self.regularizers:
            return
        self._check_unchanged_since_built()
        self.zero_optimizer, self.resume_checkpoint = None, checkpoint
        if not self.binds_to_zero:
            self.load_or_estimate(checkpoint)

    def _check_unchanged_since_built(self) -> None:
        """Refuse weights replaced or resized after the trainer took its reference (resize_token_embeddings)."""
        model = self.host.model
        now = _trainable_shapes(model)
        for name in sorted(set(now) | set(self._built_shapes)):
            before, after = self._built_shapes.get(name), now.get(name)
            if before != after:
                was = f"shape {before}" if before else "no trainable weight of that name"
                now_is = f"shape {after}" if after else "no longer a trainable weight"
                raise ValueError(
                    f"{name} is {now_is}; it was {was} when the trainer was built (e.g. before "
                    "resize_token_embeddings or a new adapter): build the trainer after changing the model, so that "
                    "its pre-trained reference has the same weights"
                )
        current = dict(model.named_parameters())
        stale = [
            d.name
            for d in self.deltas
            if isinstance(d, DenseDelta) and d.name in current and current[d.name] is not d.param
        ]
        if stale:
            raise ValueError(
                f"{stale[0]} was replaced after the trainer was built: build the trainer after changing the model"
            )

    def new_micro_batch(self, global_step: int) -> bool:
        """Counts optimizer steps for the log; True on the first micro-batch of a step."""
        new_step = self.last_seen_step != global_step
        if new_step:
            self.last_seen_step = global_step
            self.log_steps += 1
        return new_step

    # ---- weight terms -------------------------------------------------------------------------

    def apply_weight_terms(self, grad_scale: float) -> torch.Tensor:
        """Adds the weight terms' closed-form gradients at `grad_scale` (fp16's loss scale); returns their sum
        (this process's part of it, counted `weight_share` times)."""
        share = self.weight_share
        values = [reg.apply_(self.deltas, grad_scale).detach().float() * share for reg in self.weight_terms]
        for reg, value in zip(self.weight_terms, values):
            self.record(reg.log_name, value)
        return torch.stack(values).sum()  # on the weights' device: no host sync per step

    def take_pending_weight_loss(self) -> torch.Tensor | None:
        """The weight terms' value the ZeRO step computed, once."""
        value, self.pending_weight_loss = self.pending_weight_loss, None
        return value

    def bind_zero(self, optimizer: Any) -> None:
        """Moves the weight terms onto this rank's ZeRO partitions, once per engine: slices the anchor
        (freeing the whole snapshot), loads or estimates the per-rank state, hooks the optimizer steps."""
        if optimizer is self.zero_optimizer:
            return
        self.zero_optimizer = optimizer
        self.weight_share = torch.distributed.get_world_size()  # what `log` averages over (accelerate may count 1)
        self.deltas = zero.shard_deltas(self.deltas, optimizer)
        self.load_or_estimate(self.resume_checkpoint)
        if self.weight_terms:

            def in_zero_step(loss_scale: float) -> None:
                self.pending_weight_loss = self.apply_weight_terms(loss_scale)

            zero.before_zero_step(optimizer, in_zero_step)
        self.attach_step_terms(optimizer.optimizer, zero.step_targets(self.deltas))

    def attach_step_terms(
        self, optimizer: torch.optim.Optimizer, targets: dict[int, list[WeightDelta]] | None = None
    ) -> None:
        """Before each `optimizer.step`, the decoupled terms on `targets[id(p)]` for each stepped tensor `p`
        (default: each delta on the parameter it decays)."""
        self._step_targets = targets if targets is not None else {id(d.decayed_parameter): [d] for d in self.deltas}
        if not self.step_terms or optimizer is self._hooked_optimizer:
            return
        self._hooked_optimizer = optimizer

        def before_step(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            for group in opt.param_groups:
                deltas = [d for p in group["params"] for d in self._step_targets.get(id(p), ())]
                for reg in self.step_terms:
                    if deltas:
                        self.record(reg.log_name, reg.before_step_(group["lr"], deltas) * self.weight_share)

        optimizer.register_step_pre_hook(before_step)

    # ---- batch terms --------------------------------------------------------------------------

    def teacher_outputs(self, inputs: dict[str, Any], label_names: Any = ()) -> Any:
        """The teacher's forward on a training batch, under the student's autocast (mixed precision: the
        same computation as the student's at the pre-trained weights)."""
        host = self.host
        if host.is_deepspeed_enabled:  # the config is final once training runs
            self.teacher.partition_(host.accelerator.state.deepspeed_plugin.deepspeed_config)
        with host.accelerator.autocast():
            return self.teacher({**inputs, **self.teacher_kwargs}, label_names=label_names)

    def add_batch_terms(
        self, loss: torch.Tensor, batch: DistillationBatch, *, divisor: int, micro_batches: int
    ) -> torch.Tensor:
        """`loss` plus each batch term on `batch`, each making up its share of the optimizer step's loss.

        Args:
            loss: the micro-batch's task loss, as the training step will divide it by `divisor`.
            batch: what the terms compare.
            divisor: what the training step divides the returned loss by (the accumulation steps, or 1
                when the task loss is already normalized over the accumulated batch).
            micro_batches: the micro-batches of this optimizer step.
        """
        for reg in self.batch_terms:
            # "tokens": normalized like the task loss; "batch": a mean over this micro-batch
            share = 1.0 / divisor if reg.normalization == "tokens" else 1.0 / micro_batches
            term = reg(batch)
            self.record(reg.log_name, term.detach() * share)
            loss = loss + term * (share * divisor)
        return loss

    # ---- logging ------------------------------------------------------------------------------

    def record(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float().reshape(())
        self.log_sums[name] = self.log_sums[name] + value if name in self.log_sums else value

    def logged_values(self, gather: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict[str, float]:
        """`loss_task` and each `loss_<term>` since the last log, averaged per optimizer step and over
        processes (`gather`: the trainer's own reduction of `loss`); then a fresh log."""
        if not self.log_sums:
            return {}
        names = list(self.log_sums)
        values = torch.stack([self.log_sums[n].to(device) for n in names])
        values = gather(values).reshape(-1, len(names)).mean(0) / max(self.log_steps, 1)
        self.log_sums, self.log_steps = {}, 0
        return {n: v.item() for n, v in zip(names, values)}

    # ---- state: importances, checkpoints --------------------------------------------------------

    def state_file(self) -> str:
        """The regularizer state's file in a checkpoint: one per rank once bound to ZeRO partitions."""
        if self.zero_optimizer is None:
            return STATE_FILE
        args = self.host.args
        return f"{STATE_PREFIX}.rank{args.process_index}-of-{args.world_size}.safetensors"

    def save_state(self, output_dir: str) -> None:
        """Writes the state file (each process its own under ZeRO) with the reference checksum."""
        if not self.regularizers or not (self.host.args.should_save or self.zero_optimizer is not None):
            return
        tensors = {
            f"{reg.name}.{key}": value.detach().contiguous().cpu()
            for reg in self.regularizers
            for key, value in reg.state_dict().items()
        }
        metadata = {REFERENCE_KEY: repr(self.reference_fingerprint)}
        save_file(tensors, os.path.join(output_dir, self.state_file()), metadata=metadata)

    def load_or_estimate(self, checkpoint: str | None) -> None:
        """Checks that `checkpoint` was trained toward the same pre-trained weights and loads the state it
        saved; then estimates what is still missing (importances)."""
        path = os.path.join(checkpoint, self.state_file()) if checkpoint else None
        saved = sorted(glob.glob(os.path.join(checkpoint, f"{STATE_PREFIX}*.safetensors"))) if checkpoint else []
        if path and os.path.isfile(path):
            self._load_state(path)
        elif saved:
            self.check_reference(saved[0])
            if self.importance_terms:  # their state is in the other layout's files
                raise ValueError(
                    f"{checkpoint} holds the regularizer state of another layout than {self.state_file()} "
                    "(another number of processes, or with / without ZeRO): resume with the layout it was saved with"
                )
        for reg in self.importance_terms:
            if reg.importance is None:
                reg.importance = self._placed(self.estimate_importance(reg))

    def check_reference(self, path: str) -> None:
        """Refuses a checkpoint trained toward other pre-trained weights (whichever terms either run had on)."""
        with safe_open(path, framework="pt") as f:
            saved = (f.metadata() or {}).get(REFERENCE_KEY)
        if saved is None:  # written before the checksum covered every regularizer: nothing to compare
            return
        saved_value, current = float(saved), self.reference_fingerprint
        if not math.isclose(saved_value, current, rel_tol=1e-9, abs_tol=1e-6):
            raise ValueError(
                f"{path} was saved by a trainer regularized toward other pre-trained weights "
                f"(checksum {saved_value!r} "
                f"!= {current!r}): build the trainer from the same pre-trained model (and ref_model) to resume"
            )

    def _load_state(self, path: str) -> None:
        self.check_reference(path)
        tensors = load_file(path)
        for reg in self.regularizers:
            prefix = f"{reg.name}."
            reg.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            if reg.needs_importance and reg.importance is not None:
                reg.importance = self._placed(reg.importance)

    def _placed(self, importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An importance on `anchor_device`, or beside each trained weight."""
        devices = {d.name: d.trainable[0].device for d in self.deltas}
        return {k: v.to(self.importance_device() or devices[k]) for k, v in importance.items()}

    def importance_device(self) -> torch.device | None:
        """Where importances live: `anchor_device`, or (None) beside each weight."""
        device = self.host.args.anchor_device
        return None if device == "auto" else torch.device(device)

    def estimate_importance(self, reg: Regularizer) -> dict[str, torch.Tensor]:
        """`reg`'s importance at the pre-trained weights: through `ref_model` when there is one, else through
        the model (a peft model with its adapters disabled) as it is when training starts."""
        host = self.host
        generator = torch.Generator().manual_seed(host.args.seed)
        model = host.model if self.ref_model is None else self.ref_model
        if zero.is_partitioned(model) and model is self.ref_model:
            raise ValueError(
                f"{reg.name}_lambda with a ref_model partitioned by ZeRO-3 (loaded under zero.Init) is not supported: "
                "pass a ref_model loaded whole, or no ref_model (the importance is then estimated at the model when "
                "training starts)"
            )
        # a contrastive model's candidates are the texts of the batch the task loss sees
        group = host.args.per_device_train_batch_size if is_contrastive(model) else 1
        if group < 2 and is_contrastive(model):
            raise ValueError(
                f"{reg.name}_lambda on a contrastive model (CLIP) needs per_device_train_batch_size >= 2: an image's "
                "candidates are the texts of its batch, and with one there is no distribution to estimate from"
            )
        device = next(model.parameters()).device if model is self.ref_model else None
        batches = host._specgen_importance_batches(reg.num_samples, group, generator, device)
        sample = ImportanceSample(
            model=model,
            deltas=self.deltas,
            batches=batches,
            shifts_labels=compat.loss_shifts_labels(host),
            label_names=host.label_names,
            generator=generator,
            device=self.importance_device(),
        )
        with model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext():
            return reg.estimate(sample)


def _trainable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}


def _check_same_architecture(model: nn.Module, ref_model: nn.Module, *, needs_features: bool) -> None:
    """A ref_model must be the same kind of model: its forward runs on the model's batches."""
    base, ref = unwrap_peft(model), unwrap_peft(ref_model)
    if type(base).__name__ != type(ref).__name__:
        raise ValueError(
            f"ref_model is {type(ref).__name__}, the model {type(base).__name__}: pass the pre-trained "
            "model of the same architecture as ref_model"
        )
    if needs_features:
        sizes = [getattr(getattr(m, "config", None), "hidden_size", None) for m in (base, ref)]
        if None not in sizes and sizes[0] != sizes[1]:
            raise ValueError(
                f"feature_lambda > 0 compares hidden states, but ref_model's hidden_size is {sizes[1]} and the "
                f"model's {sizes[0]}: pass the pre-trained model of the same size as ref_model"
            )


def _vocabulary_size(model: nn.Module) -> int | None:
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _check_same_vocabulary(model: nn.Module, teacher: nn.Module) -> None:
    student_size, teacher_size = _vocabulary_size(model), _vocabulary_size(teacher)
    if student_size is not None and teacher_size is not None and student_size != teacher_size:
        raise ValueError(
            f"kd_lambda > 0 needs the same vocabulary in the model and the teacher: {student_size} != {teacher_size}"
        )
