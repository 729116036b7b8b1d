"""Zero-shot image classification with a CLIP model, one score per distribution (domain).

The classifier is CLIP's zero-shot head: per class, every prompt template is encoded and
normalized, the normalized embeddings are averaged and renormalized, and the result is scaled by
`logit_scale.exp()`. Images are encoded and normalized, and the predicted class is the largest
`image_embedding @ head.T`. The same head scores the pre-trained, fine-tuned and merged models, so
their accuracies differ only by the image tower. Evaluation sets that cover a subset of the
classes (ImageNet-R and ImageNet-A: 200 of ImageNet's 1,000) are scored with the logits masked to
that subset, as their authors do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPModel, ProcessorMixin

from ..modes import eval_mode


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, restoring the previous mode on exit."""
    with eval_mode(model), torch.no_grad():
        yield


def zero_shot_head(
    model: CLIPModel, processor: ProcessorMixin, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """The `[classes, projection_dim]` zero-shot classifier, already multiplied by `logit_scale.exp()`.

    Args:
        model: the CLIP model.
        processor: its processor.
        class_names: the class names, in label order.
        templates: prompt templates, `{}` the class name; each class's embeddings are averaged over them.

    Returns:
        The head.
    """
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
    """`[len(dataset), classes]` logits of the normalized image embeddings against `head`.

    Args:
        model: the CLIP model.
        processor: its processor.
        dataset: the images.
        head: a `zero_shot_head`.
        batch_size: images per forward.
        image_column: the dataset's image column.

    Returns:
        The logits, on the model's device.
    """
    device = model.logit_scale.device
    out = []
    with _inference(model):
        batches = dataset.select_columns([image_column]).iter(batch_size)
        total = -(-len(dataset) // batch_size)
        for batch in tqdm(batches, total=total, desc="images", unit="batch", leave=False):
            images = [image.convert("RGB") for image in batch[image_column]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            out.append(pixel_logits(model, pixels, head))
    return torch.cat(out)


def pixel_logits(model: CLIPModel, pixel_values: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """`[batch, classes]` logits of processed images against `head`: the normalized image embeddings
    times the head (differentiable with respect to the image tower).

    Args:
        model: the CLIP model.
        pixel_values: the processor's `pixel_values`.
        head: a `zero_shot_head`.

    Returns:
        The logits.
    """
    embeds = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    return embeds @ head.to(embeds.dtype).T


def accuracy(
    model: CLIPModel,
    processor: ProcessorMixin,
    dataset: datasets.Dataset,
    head: torch.Tensor,
    batch_size: int = 256,
    image_column: str = "image",
    label_column: str = "label",
    class_subset: Sequence[int] | None = None,
) -> float:
    """Top-1 accuracy of `head` on `dataset` (columns `image_column`, `label_column`).

    With `class_subset` (indices into the head's classes; labels stay in the head's index space)
    the prediction is the best class of the subset only.

    Args:
        model: the CLIP model.
        processor: its processor.
        dataset: the images and labels.
        head: a `zero_shot_head`.
        batch_size: images per forward.
        image_column: the dataset's image column.
        label_column: the dataset's label column.
        class_subset: the classes the set covers; None: all.

    Returns:
        The accuracy, in [0, 1].
    """
    logits = image_logits(model, processor, dataset, head, batch_size, image_column)
    labels = torch.tensor(list(dataset[label_column]), device=logits.device)
    if class_subset is None:
        predictions = logits.argmax(-1)
    else:
        subset = torch.tensor(list(class_subset), device=logits.device)
        predictions = subset[logits[:, subset].argmax(-1)]
    return (predictions == labels).float().mean().item()


def domain_accuracies(
    model: CLIPModel,
    processor: ProcessorMixin,
    domains: Mapping[str, datasets.Dataset],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy on each dataset of `domains` (e.g. a `DatasetDict` of shifts), one head
    for all; `class_subsets[name]` masks the logits of a set that covers only those classes.

    Args:
        model: the CLIP model.
        processor: its processor.
        domains: the evaluation sets by name.
        class_names: the class names, in label order.
        templates: the prompt templates of the head.
        batch_size: images per forward.
        class_subsets: the classes of the sets that cover part of them, by set name.

    Returns:
        Each set's accuracy, by name.
    """
    head = zero_shot_head(model, processor, class_names, templates)
    subsets = class_subsets or {}
    return {
        name: accuracy(model, processor, data, head, batch_size, class_subset=subsets.get(name))
        for name, data in domains.items()
    }
