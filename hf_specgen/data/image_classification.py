"""Image classification as CLIP sees it: images scored against one text prompt per class.

`ClassPromptCollator` turns rows with an image and a label into a `CLIPModel` batch whose text
side is the class prompts, so `logits_per_image` is a `[batch, classes]` classifier's output and
`class_prompt_loss` its cross-entropy. The model stays a plain `CLIPModel` (saved, merged and
evaluated like the pre-trained one) and the Trainer's regularizers see its usual outputs
(`logits_per_image` for KD, `image_embeds` for feature protection).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import CLIPModel, ProcessorMixin
from transformers.loss.loss_utils import fixed_cross_entropy


@dataclass
class ClassPromptCollator:
    """Collates `{image_column: PIL image, label_column: int}` rows into `CLIPModel` inputs plus `labels`.

    `class_prompts[i]` is the text for class `i`, e.g. `"a photo of a {}.".format(name)`: they are
    tokenized once and sent with every batch. Use it with `remove_unused_columns=False` (the
    Trainer would otherwise drop the image column, which `CLIPModel.forward` does not name).

    Args:
        processor: the model's `CLIPProcessor`.
        class_prompts: one text per class, in label order.
        image_column: the rows' image column.
        label_column: the rows' label column (class indices).
    """

    processor: ProcessorMixin
    class_prompts: Sequence[str]
    image_column: str = "image"
    label_column: str = "label"
    _text: dict[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._text = dict(self.processor(text=list(self.class_prompts), padding=True, return_tensors="pt"))

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [row[self.image_column].convert("RGB") for row in rows]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([row[self.label_column] for row in rows])
        return {**self._text, "pixel_values": pixels, "labels": labels}


def class_prompt_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of `logits_per_image` against the class labels; a `compute_loss_func` for the Trainer.

    Summed and divided by `num_items_in_batch` when the Trainer gives it, so that gradient
    accumulation averages over the whole accumulated batch.

    Args:
        outputs: the `CLIPModel` output (with `logits_per_image`).
        labels: the class indices.
        num_items_in_batch: the accumulated batch's example count, when the Trainer gives it.

    Returns:
        The loss.
    """
    return fixed_cross_entropy(outputs.logits_per_image, labels, num_items_in_batch)


def freeze_text_tower(model: CLIPModel) -> None:
    """Freezes the text encoder, its projection and the temperature: the class prompts' embeddings
    (the classifier) stay the pre-trained ones and only the image tower learns.

    Args:
        model: the CLIP model, changed in place.
    """
    for module in (model.text_model, model.text_projection):
        module.requires_grad_(False)
    model.logit_scale.requires_grad_(False)


def load_image_set(source: str | os.PathLike, split: str = "test") -> datasets.Dataset:
    """An evaluation or training set: a local folder in `imagefolder` layout (one sub-folder per
    class, or `split/class/...`) or a `datasets` id (ImageNet-R, DomainNet, ...) with `image` and
    `label` columns.

    Args:
        source: a local folder or a `datasets` id.
        split: the split to load.

    Returns:
        The data set.
    """
    if not Path(source).is_dir():
        return datasets.load_dataset(str(source), split=split)
    sets = datasets.load_dataset("imagefolder", data_dir=str(source))
    if split in sets:
        return sets[split]
    if len(sets) == 1:  # class sub-folders only: the folder is the set
        return next(iter(sets.values()))
    raise ValueError(f"{source} has the splits {sorted(sets)}, not {split!r}")
