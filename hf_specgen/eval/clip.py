"""Zero-shot image classification with a CLIP model, one score per distribution (domain).

The classifier is CLIP's zero-shot head: per class, every prompt template is encoded and
normalized, the normalized embeddings are averaged and renormalized, and the result is scaled by
`logit_scale.exp()`. Images are encoded and normalized, and the predicted class is the largest
`image_embedding @ head.T`. The same head scores the pre-trained, fine-tuned and merged models, so
their accuracies differ only by the image tower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import datasets
import torch
import torch.nn.functional as F
from transformers import CLIPModel, ProcessorMixin


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, restoring the previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def zero_shot_head(
    model: CLIPModel, processor: ProcessorMixin, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """The `[classes, projection_dim]` zero-shot classifier, already multiplied by `logit_scale.exp()`."""
    device = model.logit_scale.device
    rows = []
    with _inference(model):
        for name in class_names:
            text = processor(text=[t.format(name) for t in templates], padding=True, return_tensors="pt").to(device)
            embeds = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
            rows.append(F.normalize(embeds.mean(0), dim=-1))
        return torch.stack(rows) * model.logit_scale.exp()


def image_logits(
    model: CLIPModel,
    processor: ProcessorMixin,
    dataset: datasets.Dataset,
    head: torch.Tensor,
    batch_size: int = 256,
    image_column: str = "image",
) -> torch.Tensor:
    """`[len(dataset), classes]` logits of the normalized image embeddings against `head`."""
    device = model.logit_scale.device
    out = []
    with _inference(model):
        for batch in dataset.select_columns([image_column]).iter(batch_size):
            images = [image.convert("RGB") for image in batch[image_column]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            embeds = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            out.append(embeds @ head.to(embeds.dtype).T)
    return torch.cat(out)


def accuracy(
    model: CLIPModel,
    processor: ProcessorMixin,
    dataset: datasets.Dataset,
    head: torch.Tensor,
    batch_size: int = 256,
    image_column: str = "image",
    label_column: str = "label",
) -> float:
    """Top-1 accuracy of `head` on `dataset` (columns `image_column`, `label_column`)."""
    logits = image_logits(model, processor, dataset, head, batch_size, image_column)
    labels = torch.tensor(list(dataset[label_column]), device=logits.device)
    return (logits.argmax(-1) == labels).float().mean().item()


def domain_accuracies(
    model: CLIPModel,
    processor: ProcessorMixin,
    domains: Mapping[str, datasets.Dataset],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot accuracy on each dataset of `domains` (e.g. a `DatasetDict` of shifts), one head for all."""
    head = zero_shot_head(model, processor, class_names, templates)
    return {name: accuracy(model, processor, data, head, batch_size) for name, data in domains.items()}
