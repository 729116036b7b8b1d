"""Batch terms inside TRL's trainers: logits and hidden states at the positions TRL's loss uses.

TRL's losses run a fused LM head: the model's forward returns per-token log-probabilities of the
labels, never the `(batch, length, vocabulary)` logits KD compares. So the batch terms read the
backbone instead: a forward hook keeps the backbone's output of the trainer's own forward (with
its graph, for the student; under `no_grad`, for a reference forward the trainer runs itself, as
DPO does), and the logits are projected through the LM head at the supervised positions only.
The student costs one extra projection of those positions, the teacher a backbone forward when
the trainer runs none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import unwrap_peft
from ..mixin import SpecGenMixin
from ..regularizers import DistillationBatch


# config attributes that change the logits after the LM head (soft-capping, scaling): not reproduced here
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


@dataclass
class Rows:
    """Logits at chosen positions, `[positions, vocabulary]`: what `output_logits` reads of an output."""

    logits: torch.Tensor


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A causal LM's backbone (`base_model`) and its LM head, through peft's wrapper."""
    base = unwrap_peft(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, "base_model", None)
    if head is None or backbone is None or backbone is base:
        raise ValueError(f"{type(base).__name__} has no LM head over a backbone: KD and feature protection need one")
    return backbone, head


def check_plain_head(model: nn.Module) -> None:
    """Refuse a model whose logits are transformed after the LM head (KD would compare other logits)."""
    config = getattr(unwrap_peft(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = [name for name in _LOGIT_TRANSFORMS if getattr(text, name, None) not in (None, 1, 1.0)]
    if found:
        raise ValueError(
            f"kd_lambda > 0 in a TRL trainer reads the logits off the LM head, and "
            f"{type(unwrap_peft(model)).__name__} transforms them after it ({', '.join(found)}): not supported yet"
        )


@contextlib.contextmanager
def captured(module: nn.Module, *, grad: bool) -> Iterator[list[Any]]:
    """The outputs of `module`'s forwards inside the block that run with autograd on (`grad=True`) or off."""
    outputs: list[Any] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        if torch.is_grad_enabled() == grad:
            outputs.append(output)

    handle = module.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def rows(head: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> Rows:
    """The logits predicting each next token at `positions` (`[batch, length - 1]`, True where supervised)."""
    selected = hidden[:, -positions.shape[1] - 1 : -1][positions.to(hidden.device)]
    return Rows(head(selected.to(head.weight.device)))


class CompletionDistillation(SpecGenMixin):
    """`SpecGenMixin` for TRL trainers: the batch terms on the positions the trainer's loss supervises.

    A trainer says which positions (`_specgen_positions`) and what its model forward gets
    (`_specgen_model_inputs`); the student's backbone output is kept from the trainer's own
    forward, the teacher's from the trainer's own reference forward where it runs one, else from a
    forward of the teacher's backbone.
    """

    def _specgen_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """`[batch, length - 1]`: True where a next token is supervised (completion tokens)."""
        labels = inputs["labels"]
        return labels[:, 1:] != -100

    def _specgen_model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What the model's forward gets of `inputs` (no labels: the teacher computes no loss)."""
        return {k: v for k, v in inputs.items() if k not in ("labels", *self.label_names)}

    def _specgen_distillation_batch(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any, DistillationBatch]:
        engine, features = self.specgen, self.specgen.features
        positions = self._specgen_positions(inputs)
        if features:
            inputs = features.model_inputs(inputs)  # output_hidden_states reaches the backbone through TRL's forward
        student_backbone, student_head = backbone_and_head(self.accelerator.unwrap_model(model))
        teacher_backbone, teacher_head = backbone_and_head(engine.teacher.module)
        with captured(student_backbone, grad=True) as student, captured(teacher_backbone, grad=False) as reference:
            loss = self._specgen_base_compute_loss(model, inputs, False, num_items_in_batch)
        if not student:
            raise RuntimeError("the trainer's forward did not run the model's backbone: KD and features cannot see it")
        student_out = student[0]
        teacher_out = reference[0] if reference else self._specgen_teacher_backbone(teacher_backbone, inputs)
        batch = DistillationBatch(
            student=Rows(torch.empty(0)),
            teacher=Rows(torch.empty(0)),
            labels=None,
            shifts_labels=False,
            token_denominator=self._specgen_completion_denominator(positions, num_items_in_batch),
        )
        if engine.uses_logits:
            batch.student = rows(student_head, student_out.last_hidden_state, positions)
            with torch.no_grad():
                batch.teacher = rows(teacher_head, teacher_out.last_hidden_state, positions)
        if features:
            batch.student_features = features.select(student_out, [])
            batch.teacher_features = features.select(teacher_out, [])
            batch.feature_masks = features.masks(inputs, None)
        return loss, None, batch

    def _specgen_completion_denominator(
        self, positions: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor | float | None:
        """What KD's token sum is divided by: as the trainer's loss (default), None for this micro-batch's count."""
        return self._specgen_token_denominator(num_items_in_batch)

    @torch.no_grad()
    def _specgen_teacher_backbone(self, backbone: nn.Module, inputs: dict[str, Any]) -> Any:
        """The teacher's backbone output on the model inputs, in eval mode, under the student's autocast."""
        engine = self.specgen
        if self.is_deepspeed_enabled:
            engine.teacher.partition_(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        model_inputs = {**self._specgen_model_inputs(inputs), "use_cache": False}
        device = engine.teacher.device
        model_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs.items()}
        with engine.teacher.mode(), self.accelerator.autocast():
            return backbone(**model_inputs)
