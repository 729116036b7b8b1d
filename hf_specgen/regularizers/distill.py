"""Distillation from the frozen pre-trained model: logits (KD) and features (feature protection)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import BatchRegularizer
from .batch import DistillationBatch
from .positions import check_distribution, output_logits, supervised_positions


class LogitDistillation(BatchRegularizer):
    """`lambda * T^2 * KL(p_pre / T || p_theta / T)` per supervised token, normalized like the task loss.

    Args:
        weight: `kd_lambda`.
        temperature: the softmax temperature `T`, `kd_temperature`.
    """

    name = "kd"
    compares_distributions = True
    positive_options = {"kd_temperature": "the distillation temperature"}
    normalization = "tokens"

    def __init__(self, weight: float, temperature: float = 1.0) -> None:
        super().__init__(weight)
        self.temperature = temperature

    @classmethod
    def from_args(cls, args) -> LogitDistillation:
        return cls(args.kd_lambda, args.kd_temperature)

    def __call__(self, batch: DistillationBatch) -> torch.Tensor:
        student, _, mask = supervised_positions(output_logits(batch.student), batch.labels, batch.shifts_labels)
        check_distribution(student, "kd_lambda (logit distillation)")
        teacher, _, _ = supervised_positions(output_logits(batch.teacher), batch.labels, batch.shifts_labels)
        t = self.temperature
        if mask is not None:  # the supervised positions only, before any vocabulary-wide work
            student, teacher = student[mask], teacher[mask]
        count = student.shape[0] if student.dim() == 2 else student[..., 0].numel()
        log_q = F.log_softmax(student.float() / t if t != 1 else student.float(), dim=-1)
        with torch.no_grad():  # the teacher's side needs no graph
            teacher = teacher.to(student.device, torch.float32)
            log_p = F.log_softmax(teacher / t if t != 1 else teacher, dim=-1)
        # sum over positions of KL(p || q) = sum p (log p - log q), one fused kernel and its backward
        kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
        denominator = batch.token_denominator if batch.token_denominator is not None else max(count, 1)
        return self.weight * t * t * kl / denominator


class ProtectedFeatures:
    """Where protected features come from: a language model's hidden states (`feature_layers`), an
    encoder-decoder's encoder and decoder hidden states (the same indices in each stack), or the
    image embeddings of a CLIP model (the output of `visual_projection`, i.e. `get_image_features`).

    Args:
        model: the model trained (a peft model: its base model is read).
        layers: the hidden-state indices protected (`feature_layers`: 0 the embeddings, -1 the last
            layer), checked against the model's depth; ignored for CLIP.
    """

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if _visual_projection(base) is not None:
            self.kind, self.layers = "image_embeds", []
            return
        config = getattr(base, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is None:
            raise ValueError(
                f"feature protection supports language models (hidden states) and CLIP models (image embeddings), "
                f"not {type(base).__name__}"
            )
        self.kind = "encoder_decoder_states" if getattr(config, "is_encoder_decoder", False) else "hidden_states"
        stacks = {"hidden states": n_layers}
        if self.kind == "encoder_decoder_states":
            decoder = next(
                (getattr(config, k) for k in ("num_decoder_layers", "decoder_layers") if getattr(config, k, None)),
                n_layers,
            )
            stacks = {"encoder hidden states": n_layers, "decoder hidden states": decoder}
        for stack, count in stacks.items():
            for layer in layers:
                if not -(count + 1) <= layer <= count:
                    raise ValueError(
                        f"feature_layers entry {layer} is out of range: the model has {count + 1} {stack} "
                        f"(indices {-(count + 1)}..{count})"
                    )
        self.layers = list(layers)

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs if self.kind == "image_embeds" else {**inputs, "output_hidden_states": True}

    @contextlib.contextmanager
    def capture(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Collects the features of the forward passes of `model` run inside the block.

        Hidden states are read from the outputs by `select`, so only image embeddings are hooked."""
        captured: list[torch.Tensor] = []
        if self.kind != "image_embeds":
            yield captured
            return
        handle = _visual_projection(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            yield captured
        finally:
            handle.remove()

    def select(self, outputs: Any, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.kind == "image_embeds":
            return list(captured)
        if self.kind == "encoder_decoder_states":
            return [outputs.encoder_hidden_states[i] for i in self.layers] + [
                outputs.decoder_hidden_states[i] for i in self.layers
            ]
        return [outputs.hidden_states[i] for i in self.layers]

    def masks(self, inputs: dict[str, Any], labels: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per selected feature, the positions that count: real tokens (the attention mask), for a
        decoder the supervised ones (`decoder_attention_mask`, else labels != -100); None: all."""
        if self.kind == "image_embeds":
            return [None]
        attention = inputs.get("attention_mask")
        if self.kind == "hidden_states":
            return [attention] * len(self.layers)
        decoder = inputs.get("decoder_attention_mask")
        if decoder is None and labels is not None:
            decoder = labels != -100
        return [attention] * len(self.layers) + [decoder] * len(self.layers)


def _visual_projection(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.split(".")[-1] == "visual_projection":
            return module
    return None


class FeatureProtection(BatchRegularizer):
    """`lambda * mean ||h_theta(x) - h_pre(x)||^2`: squared L2 over the feature dimension, averaged
    over the real (masked) tokens or the images of the micro-batch, and over the features."""

    name = "feature"
    uses_features = True

    def __call__(self, batch: DistillationBatch) -> torch.Tensor:
        per_layer = []
        masks = batch.feature_masks or [None] * len(batch.student_features)
        for student, teacher, mask in zip(batch.student_features, batch.teacher_features, masks):
            squared = (student.float() - teacher.to(student.device, torch.float32)).pow(2).sum(-1)
            if squared.dim() == 2 and mask is not None:
                squared = squared[mask.to(squared.device).bool()]
            per_layer.append(squared.mean())
        return self.weight * torch.stack(per_layer).mean()
