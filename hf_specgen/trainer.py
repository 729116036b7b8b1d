"""`SpecGenTrainer`: `transformers.Trainer` plus regularization toward the pre-trained model."""

from __future__ import annotations

import contextlib
import glob
import itertools
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import get_last_checkpoint

from . import zero
from .anchor import (
    DenseDelta,
    Teacher,
    WeightDelta,
    is_partitioned,
    is_peft_model,
    reference_fingerprint,
    snapshot_nbytes,
    weight_deltas,
)
from .batches import task_labels, unwrap_peft
from .args import SpecGenTrainingArguments
from .regularizers import (
    EWC,
    BatchRegularizer,
    DistillationBatch,
    FeatureProtection,
    LogitDistillation,
    ProtectedFeatures,
    StepRegularizer,
    WeightRegularizer,
    build_regularizers,
    estimate_fisher,
)
from .regularizers.positions import is_contrastive, output_classes

STATE_PREFIX = "specgen_regularizers"
STATE_FILE = f"{STATE_PREFIX}.safetensors"
REFERENCE_KEY = "reference_fingerprint"  # metadata: checksum of the pre-trained weights the run was regularized toward


class SpecGenTrainer(Trainer):
    """A drop-in `Trainer` whose loss is the task loss plus the active regularizers.

    The pre-trained reference is the model as it is when the trainer is built, or `ref_model`.
    Weight terms (L1, L2-SP, EWC) depend on the weights only: `training_step` adds their value to
    the loss it reports and their closed-form gradient to `.grad`, once per optimizer step. Batch
    terms (KD, feature protection) are added in `compute_loss` on every micro-batch, normalized so
    that each counts the same whatever the gradient accumulation. Both are part of the gradient
    `max_grad_norm` clips; decoupled L2 acts in the optimizer step instead. Each term is logged as
    `loss_<name>` beside `loss_task`.

    Under DeepSpeed ZeRO (1, 2 or 3) the weight terms work on each rank's own partition of the fp32
    master weights and averaged gradients (`hf_specgen.zero`): once the engine exists, the anchor
    and the Fisher are cut down to the rank's slices, and the penalties' gradients are added at the
    start of the ZeRO optimizer's step (after the averaging, before clipping); decoupled L2 hooks
    the torch optimizer DeepSpeed wraps. A rank's share of a term is logged as world x share, so
    that the mean over processes `log` takes is the whole model's value. Checkpoints keep one
    regularizer state file per rank.
    """

    def __init__(self, *args: Any, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.regularizers = build_regularizers(self.args) if isinstance(self.args, SpecGenTrainingArguments) else []
        self._weight_terms = [r for r in self.regularizers if isinstance(r, WeightRegularizer)]
        self._batch_terms = [r for r in self.regularizers if isinstance(r, BatchRegularizer)]
        self._step_terms = [r for r in self.regularizers if isinstance(r, StepRegularizer)]
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_steps = 0
        self._last_seen_step: int | None = None
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self._step_targets: dict[int, list[WeightDelta]] = {}
        self._zero_optimizer: Any = None  # the ZeRO optimizer the weight terms are bound to
        self._weight_share = 1  # how many times a process's part of a weight term counts in the mean over processes
        self._pending_weight_loss: torch.Tensor | None = None
        self._resume_checkpoint: str | None = None
        self.teacher: Teacher | None = None
        self.deltas: list[WeightDelta] = []
        self.features: ProtectedFeatures | None = None
        self._teacher_kwargs: dict[str, Any] = {}
        self._ref_model = ref_model
        self._reference_fingerprint: float | None = None
        self._built_shapes: dict[str, tuple[int, ...]] = {}
        if not self.regularizers:
            return
        if self.model_init is not None:
            raise ValueError("regularizers need the pre-trained model at construction; model_init is not supported")
        if self.is_fsdp_enabled or getattr(self.args, "fsdp", None):
            raise ValueError(
                "the regularizers (*_lambda > 0) do not support FSDP yet: shard with DeepSpeed ZeRO-1/2/3 instead "
                "(e.g. accelerate launch --config_file recipes/accelerate/zero3.yaml, or TrainingArguments(deepspeed=...))"
            )
        if self.is_deepspeed_enabled and (self._weight_terms or self._step_terms) and is_peft_model(self.model):
            raise ValueError(
                "l1_lambda, l2_lambda and ewc_lambda are not supported for peft models under DeepSpeed yet"
            )
        options = self.args
        self._check_outputs_fit_the_terms()
        if ref_model is not None:
            _check_same_architecture(self.model, ref_model, needs_features=any(isinstance(r, FeatureProtection) for r in self._batch_terms))
        if self._batch_terms:
            self.teacher = Teacher.build(self.model, ref_model=ref_model, dtype=options.anchor_dtype, device=options.anchor_device)
        if self._weight_terms or self._step_terms:
            # A frozen teacher copy already holds the pre-trained weights: reuse it as the anchor.
            reference = ref_model
            if reference is None and self.teacher is not None and not self.teacher.adapters_disabled:
                reference = self.teacher.module
            self.deltas = weight_deltas(
                self.model, reference=reference, dtype=options.anchor_dtype, device=options.anchor_device,
                fisher_at_reference=ref_model is not None and self.args.ewc_lambda > 0,
            )  # fmt: skip
        if any(isinstance(r, FeatureProtection) for r in self._batch_terms):
            self.features = ProtectedFeatures(self.model, options.feature_layers)
        if any(isinstance(r, LogitDistillation) for r in self._batch_terms):
            _check_same_vocabulary(self.model, self.teacher.module)
        elif self.teacher is not None and self.teacher.accepts("logits_to_keep"):
            self._teacher_kwargs["logits_to_keep"] = 1  # features only: skip the vocabulary projection
        self._reference_fingerprint = reference_fingerprint(self.model, ref_model)
        self._built_shapes = _trainable_shapes(self.model)

    def _check_outputs_fit_the_terms(self) -> None:
        """KD and EWC compare output distributions: refuse a model whose output has one outcome."""
        classes = output_classes(self.model)
        if classes is not None and classes < 2:
            for name in ("kd_lambda", "ewc_lambda"):
                if getattr(self.args, name) > 0:
                    raise ValueError(
                        f"{name} > 0 compares the model's output distributions, but {type(self.model).__name__} has "
                        f"{classes} output (num_labels=1, a regression head): a softmax over one logit is constant, "
                        "so the term would always be 0; use l2_lambda, l1_lambda or feature_lambda instead"
                    )

    # ---- memory ---------------------------------------------------------------------------

    def anchor_memory(self) -> dict[str, int]:
        """Bytes this process holds for the pre-trained reference: the weight snapshot, the teacher, the
        Fisher (under ZeRO, once training has started: this rank's slices, about 1/world of them)."""
        fisher = sum(
            t.numel() * t.element_size()
            for r in self.regularizers
            if isinstance(r, EWC) and r.fisher is not None
            for t in r.fisher.values()
        )
        return {
            "weights": snapshot_nbytes(self.deltas),
            "teacher": self.teacher.nbytes if self.teacher is not None else 0,
            "fisher": fisher,
        }

    # ---- training ---------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self._log_sums, self._log_steps = {}, 0  # a previous train()'s unlogged steps belong to no log of this one
        if self.regularizers:
            self._check_unchanged_since_built()
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            self._prepare_regularizers(checkpoint if isinstance(checkpoint, str) else None)
        self._last_seen_step = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if not self.regularizers or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        micro_batches = getattr(self, "current_gradient_accumulation_steps", 1)  # set by the training loop
        # `divisor`: what `training_step` divides the returned loss by; a term that should make up
        # `share` of the optimizer step's loss is added as `term * share * divisor`.
        divisor = 1 if self._loss_is_ga_scaled(num_items_in_batch) else micro_batches
        labels = task_labels(inputs, self.label_names)

        student_inputs = self.features.model_inputs(inputs) if self.features else inputs
        with self._capture_features(self.accelerator.unwrap_model(model)) as student_features:
            loss, outputs = super().compute_loss(
                model, student_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        self._record("loss_task", loss.detach() / divisor)
        if not self._batch_terms:
            return (loss, outputs) if return_outputs else loss

        if self.is_deepspeed_enabled:  # the config is final once training runs
            self.teacher.partition_(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        # under the student's autocast (mixed precision): the same computation as the student's at step 0
        with self._capture_features(self.teacher.module) as teacher_features, self.accelerator.autocast():
            teacher_outputs = self.teacher({**student_inputs, **self._teacher_kwargs}, label_names=self.label_names)
        batch = DistillationBatch(
            student=outputs,
            teacher=teacher_outputs,
            labels=labels,
            shifts_labels=self._loss_shifts_labels,
            token_denominator=self._task_token_denominator(num_items_in_batch),
        )
        if self.features:
            batch.student_features = self.features.select(outputs, student_features)
            batch.teacher_features = self.features.select(teacher_outputs, teacher_features)
            batch.feature_masks = self.features.masks(inputs, labels)
        for reg in self._batch_terms:
            # KD is normalized like the task loss; feature protection is a micro-batch mean.
            share = 1.0 / divisor if isinstance(reg, LogitDistillation) else 1.0 / micro_batches
            term = reg(batch)
            self._record(reg.log_name, term.detach() * share)
            loss = loss + term * (share * divisor)

        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step; on an optimizer step's first micro-batch, also the weight terms' gradients
        (under DeepSpeed: in the ZeRO optimizer's step, on the micro-batch that ends the step)."""
        if not self.regularizers:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.is_deepspeed_enabled and (self._weight_terms or self._step_terms):
            self._bind_zero(self.model_wrapped.optimizer)
        new_step = self._last_seen_step != self.state.global_step
        if new_step:
            self._last_seen_step = self.state.global_step
            self._log_steps += 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        if new_step and self._weight_terms and self._zero_optimizer is None:
            scaler = getattr(self.accelerator, "scaler", None)
            grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
            self._pending_weight_loss = self._apply_weight_terms(grad_scale)
        if self._pending_weight_loss is not None:
            loss = loss + self._pending_weight_loss.to(loss.device, loss.dtype)
            self._pending_weight_loss = None
        return loss

    def _apply_weight_terms(self, grad_scale: float) -> torch.Tensor:
        """Adds L1 / L2 / EWC's closed-form gradients at `grad_scale` (fp16's loss scale); returns their sum
        (this process's part of it, counted `_weight_share` times)."""
        share = self._weight_share
        values = [reg.apply_(self.deltas, grad_scale).detach().float() * share for reg in self._weight_terms]
        for reg, value in zip(self._weight_terms, values):
            self._record(reg.log_name, value)
        return torch.stack(values).sum()  # on the weights' device: no host sync per step

    def _apply_weight_terms_to_zero(self, loss_scale: float) -> None:
        """Run by the ZeRO optimizer as its step starts; `training_step` adds the value to the loss it reports."""
        self._pending_weight_loss = self._apply_weight_terms(loss_scale)

    def _bind_zero(self, optimizer: Any) -> None:
        """Moves the weight terms onto this rank's ZeRO partitions, once per engine: slices the anchor
        (freeing the whole snapshot), loads or estimates the per-rank state, hooks the optimizer steps."""
        if optimizer is self._zero_optimizer:
            return
        self._zero_optimizer = optimizer
        self._weight_share = torch.distributed.get_world_size()  # what `log` averages over (accelerate may count 1)
        self.deltas = zero.shard_deltas(self.deltas, optimizer)
        self._load_or_estimate_state(self._resume_checkpoint)
        if self._weight_terms:
            zero.before_zero_step(optimizer, self._apply_weight_terms_to_zero)
        self._attach_step_terms(optimizer.optimizer, zero.step_targets(self.deltas))

    def _loss_is_ga_scaled(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Mirrors `Trainer.training_step`: is the task loss already normalized over the accumulated batch?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def _task_token_denominator(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float | None:
        """What the task loss divides its token sum by (mirrors `Trainer.compute_loss`); None for a local mean."""
        if num_items_in_batch is None or not (self.model_accepts_loss_kwargs or self.compute_loss_func):
            return None
        if self.args.average_tokens_across_devices:
            return num_items_in_batch / (self.accelerator.num_processes // self.get_tp_size())
        return num_items_in_batch

    def _capture_features(self, module: nn.Module) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        return self.features.capture(module) if self.features else contextlib.nullcontext([])

    # ---- decoupled terms, in the optimizer step ---------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (built, or the user's), with the decoupled terms hooked in once."""
        optimizer = super().create_optimizer(model)
        targets = {id(d.decayed_parameter): [d] for d in self.deltas}
        self._attach_step_terms(getattr(optimizer, "optimizer", optimizer), targets)  # unwrap Accelerate's wrapper
        return optimizer

    def _attach_step_terms(self, optimizer: torch.optim.Optimizer, targets: dict[int, list[WeightDelta]]) -> None:
        """Before each `optimizer.step`, the decoupled terms on `targets[id(p)]` for each stepped tensor `p`."""
        self._step_targets = targets
        if not self._step_terms or optimizer is self._hooked_optimizer:
            return
        self._hooked_optimizer = optimizer

        def before_step(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            for group in opt.param_groups:
                deltas = [d for p in group["params"] for d in self._step_targets.get(id(p), ())]
                for reg in self._step_terms:
                    if deltas:
                        self._record(reg.log_name, reg.before_step_(group["lr"], deltas) * self._weight_share)

        optimizer.register_step_pre_hook(before_step)

    # ---- logging ------------------------------------------------------------------------------

    def _record(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float().reshape(())
        self._log_sums[name] = self._log_sums[name] + value if name in self._log_sums else value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `loss_task` and each `loss_<term>`, averaged per optimizer step and over processes."""
        if "loss" in logs and self._log_sums:
            names = list(self._log_sums)
            values = torch.stack([self._log_sums[n].to(self.args.device) for n in names])
            # the Trainer's own reduction of `loss` (accelerate's state may count one process under DeepSpeed on CPU)
            values = nested_gather(values, self.args.parallel_mode).reshape(-1, len(names)).mean(0) / max(self._log_steps, 1)
            logs.update({n: v.item() for n, v in zip(names, values)})
            self._log_sums, self._log_steps = {}, 0
        super().log(logs, *args, **kwargs)

    # ---- state: Fisher estimation, checkpoints --------------------------------------------------

    def _prepare_regularizers(self, checkpoint: str | None) -> None:
        """Loads the regularizer state saved with `checkpoint`, and estimates what is still missing;
        under DeepSpeed once the engine has partitioned the weights (`_bind_zero`)."""
        self._zero_optimizer, self._resume_checkpoint = None, checkpoint
        if not (self.is_deepspeed_enabled and (self._weight_terms or self._step_terms)):
            self._load_or_estimate_state(checkpoint)

    def _load_or_estimate_state(self, checkpoint: str | None) -> None:
        """Checks that `checkpoint` was trained toward the same pre-trained weights and loads the state it
        saved; then estimates what is still missing (EWC's Fisher)."""
        path = os.path.join(checkpoint, self._state_file()) if checkpoint else None
        saved = sorted(glob.glob(os.path.join(checkpoint, f"{STATE_PREFIX}*.safetensors"))) if checkpoint else []
        if path and os.path.isfile(path):
            self._load_regularizer_state(path)
        elif saved:
            self._check_reference(saved[0])
            if any(isinstance(reg, EWC) for reg in self.regularizers):  # its Fisher is in the other layout's files
                raise ValueError(
                    f"{checkpoint} holds the regularizer state of another layout than {self._state_file()} "
                    "(another number of processes, or with / without ZeRO): resume with the layout it was saved with"
                )
        for reg in self.regularizers:
            if isinstance(reg, EWC) and reg.fisher is None:
                reg.fisher = self._placed(self._estimate_fisher(reg))

    def _placed(self, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Fisher on `anchor_device`, or beside each trained weight."""
        devices = {d.name: d.trainable[0].device for d in self.deltas}
        return {k: v.to(self._fisher_device() or devices[k]) for k, v in fisher.items()}

    def _check_reference(self, path: str) -> None:
        """Refuses a checkpoint trained toward other pre-trained weights (whichever terms either run had on)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            saved = (f.metadata() or {}).get(REFERENCE_KEY)
        if saved is None:  # written before the checksum covered every regularizer: nothing to compare
            return
        saved_value, current = float(saved), self._reference_fingerprint
        if not math.isclose(saved_value, current, rel_tol=1e-9, abs_tol=1e-6):
            raise ValueError(
                f"{path} was saved by a trainer regularized toward other pre-trained weights (checksum {saved_value!r} "
                f"!= {current!r}): build the trainer from the same pre-trained model (and ref_model) to resume"
            )

    def _estimate_fisher(self, reg: EWC) -> dict[str, torch.Tensor]:
        """EWC's Fisher at the pre-trained weights: through `ref_model` when there is one, else through
        the model (a peft model with its adapters disabled) as it is when training starts."""
        generator = torch.Generator().manual_seed(self.args.seed)
        model = self.model if self._ref_model is None else self._ref_model
        if is_partitioned(model) and model is self._ref_model:
            raise ValueError(
                "ewc_lambda with a ref_model partitioned by ZeRO-3 (loaded under zero.Init) is not supported: pass a "
                "ref_model loaded whole, or no ref_model (the Fisher is then estimated at the model when training starts)"
            )
        disabled = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
        # a contrastive model's candidates are the texts of the batch the task loss sees
        group = self.args.per_device_train_batch_size if is_contrastive(model) else 1
        if group < 2 and is_contrastive(model):
            raise ValueError(
                "ewc_lambda on a contrastive model (CLIP) needs per_device_train_batch_size >= 2: an image's "
                "candidates are the texts of its batch, and with one there is no distribution to estimate from"
            )
        device = next(model.parameters()).device if model is self._ref_model else None
        with disabled:
            return estimate_fisher(
                model,
                self.deltas,
                self._fisher_batches(reg.num_samples, group, generator, device),
                empirical=reg.fisher_type == "empirical",
                shifts_labels=self._loss_shifts_labels,
                generator=generator,
                device=self._fisher_device(),
                label_names=self.label_names,
            )

    def _fisher_device(self) -> torch.device | None:
        """Where the Fisher lives: `anchor_device`, or (None) beside each weight."""
        return None if self.args.anchor_device == "auto" else torch.device(self.args.anchor_device)

    def _fisher_batches(
        self, n: int, group: int, generator: torch.Generator, device: torch.device | None = None
    ) -> Iterator[dict[str, Any]]:
        """`n` training examples in a seeded random order, collated `group` at a time (on `device`, or the
        model's)."""
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("EWC needs a train_dataset to estimate the Fisher at the pre-trained weights")
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass
        if isinstance(dataset, torch.utils.data.IterableDataset):
            rows = itertools.islice(dataset, n)
        else:
            rows = (dataset[int(i)] for i in torch.randperm(len(dataset), generator=generator)[:n])
        for chunk in _chunks(rows, group):
            batch = self._prepare_inputs(self.data_collator(chunk))
            if device is not None:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            yield batch

    def _check_unchanged_since_built(self) -> None:
        """Refuse weights replaced or resized after the trainer took its reference (resize_token_embeddings)."""
        now = _trainable_shapes(self.model)
        for name in sorted(set(now) | set(self._built_shapes)):
            before, after = self._built_shapes.get(name), now.get(name)
            if before != after:
                was = f"shape {before}" if before else "no trainable weight of that name"
                now_is = f"shape {after}" if after else "no longer a trainable weight"
                raise ValueError(
                    f"{name} is {now_is}; it was {was} when the SpecGenTrainer was built (e.g. before "
                    "resize_token_embeddings or a new adapter): build the trainer after changing the model, so that "
                    "its pre-trained reference has the same weights"
                )
        current = dict(self.model.named_parameters())
        stale = [d.name for d in self.deltas if isinstance(d, DenseDelta) and d.name in current and current[d.name] is not d.param]
        if stale:
            raise ValueError(
                f"{stale[0]} was replaced after the SpecGenTrainer was built: build the trainer after changing the model"
            )

    def _state_file(self) -> str:
        """The regularizer state's file in a checkpoint: one per rank once bound to ZeRO partitions."""
        if self._zero_optimizer is None:
            return STATE_FILE
        return f"{STATE_PREFIX}.rank{self.args.process_index}-of-{self.args.world_size}.safetensors"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.regularizers and (self.args.should_save or self._zero_optimizer is not None):
            tensors = {
                f"{reg.name}.{key}": value.detach().contiguous().cpu()
                for reg in self.regularizers
                for key, value in reg.state_dict().items()
            }
            metadata = {REFERENCE_KEY: repr(self._reference_fingerprint)}
            save_file(tensors, os.path.join(output_dir, self._state_file()), metadata=metadata)

    def _load_regularizer_state(self, path: str) -> None:
        self._check_reference(path)
        tensors = load_file(path)
        for reg in self.regularizers:
            prefix = f"{reg.name}."
            reg.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            if isinstance(reg, EWC) and reg.fisher is not None:
                reg.fisher = self._placed(reg.fisher)


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _trainable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}


def _check_same_architecture(model: nn.Module, ref_model: nn.Module, *, needs_features: bool) -> None:
    """A ref_model must be the same kind of model: its forward runs on the model's batches."""
    base, ref = unwrap_peft(model), unwrap_peft(ref_model)
    if type(base).__name__ != type(ref).__name__:
        raise ValueError(
            f"ref_model is a {type(ref).__name__}, the model a {type(base).__name__}: pass the pre-trained "
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
