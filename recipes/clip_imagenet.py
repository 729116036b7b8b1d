"""CLIP on ImageNet (or one DomainNet domain): accuracy on the fine-tuning distribution (speciality)
against accuracy under distribution shift (generality), for every method and WiSE-FT alpha.

    accelerate launch recipes/clip_imagenet.py --config recipes/configs/clip_imagenet.yaml
    python recipes/clip_imagenet.py --config recipes/configs/clip_tiny.yaml   # offline, CPU

The classifier is the zero-shot head: the frozen text tower applied to `templates[0]` with each
class name, so fine-tuning starts from CLIP's zero-shot predictions and the model stays a plain
`CLIPModel` that WiSE-FT merges and that is scored like the pre-trained one. Scoring uses the
ensemble of `templates`, each set over its own class names (ImageNet-R/A: their 200 classes).
Sets are `NAME=SOURCE[:SPLIT]`, SOURCE a `datasets` id or a local `imagefolder` (class
sub-folders); a set whose class names are numbers (e.g. ImageNet-V2's folders 0-999) takes the
training set's names by index, and `class_names_file` maps raw names such as the WordNet ids of
ImageNet-R/A folders to readable ones. DomainNet: train on one domain, list the others as generality.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from hf_specgen import SpecGenTrainer, SpecGenTrainingArguments
from hf_specgen.data.image_classification import ClassPromptCollator, class_prompt_loss, freeze_text_tower
from hf_specgen.eval.clip import accuracy, pixel_logits, zero_shot_head
from hf_specgen.experiment import ConfigError, ExperimentArguments, Recipe, check_model, is_local_path, load_split
from hf_specgen.merge import GroupSearch
from hf_specgen.merge.search import GroupAlphaObjective, optimize_group_alphas, row_batches


TEMPLATES = [
    "a photo of a {}.",
    "a low-resolution photo of a {}.",
    "a close-up photo of the {}.",
    "a drawing of a {}.",
    "a painting of the {}.",
    "a cartoon of a {}.",
    "a 3D rendering of a {}.",
    "a sculpture of a {}.",
]


@dataclass
class ImageClassificationArguments:
    """The CLIP model, the fine-tuning set and the sets that score each side."""

    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch16", metadata={"help": "CLIP model: Hub id or directory."}
    )
    train_dataset: str = field(
        default="ILSVRC/imagenet-1k", metadata={"help": "Fine-tuning images: `datasets` id or imagefolder."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Fine-tune on the first N images only."})
    image_column: str = field(default="image", metadata={"help": "Image column of every set."})
    label_column: str = field(default="label", metadata={"help": "Label column (a ClassLabel) of every set."})
    speciality_sets: list[str] = field(
        default_factory=lambda: ["imagenet=ILSVRC/imagenet-1k:validation"],
        metadata={"help": "NAME=SOURCE[:SPLIT] sets from the fine-tuning distribution."},
    )
    generality_sets: list[str] = field(
        default_factory=lambda: ["imagenet_sketch=songweig/imagenet_sketch:train"],
        metadata={
            "help": "NAME=SOURCE[:SPLIT] distribution shifts (ImageNet-V2/R/A/Sketch, ObjectNet, other DomainNet "
            "domains)."
        },
    )
    templates: list[str] = field(
        default_factory=lambda: list(TEMPLATES), metadata={"help": "Prompt templates, '{}' the class name."}
    )
    class_names_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON object from raw class names (e.g. WordNet ids n01440764 of ImageNet-R/A folders) to "
            "readable names."
        },
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Score at most N images per set (quick runs)."}
    )

    def __post_init__(self) -> None:
        if not self.speciality_sets or not self.generality_sets:
            raise ValueError("speciality_sets and generality_sets each need at least one NAME=SOURCE[:SPLIT]")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"templates must each contain '{{}}' for the class name, got {self.templates}")


def parse_set(spec: str, field_name: str = "evaluation set") -> tuple[str, str, str]:
    """`NAME=SOURCE[:SPLIT]` -> (name, source, split), split `test` by default."""
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise ConfigError(f"{field_name}: {spec!r} is not NAME=SOURCE[:SPLIT]")
    source, _, split = source.partition(":")
    return name, source, split or "test"


def class_names(
    data: datasets.Dataset, label_column: str, readable: dict[str, str], fallback: list[str] | None = None
) -> list[str]:
    """Class names from the label feature, through `readable` (e.g. WordNet id -> name); numeric
    names (folders 0-999) index `fallback`; first synonym ("tench, Tinca tinca" -> "tench")."""
    feature = data.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise ConfigError(f"column {label_column!r} is not a ClassLabel, so it names no classes")
    names = [readable.get(n, n) for n in feature.names]
    if fallback is not None and all(n.isdigit() for n in names):
        names = [fallback[int(n)] for n in names]
    return [n.split(",")[0].replace("_", " ").strip() for n in names]


def readable_names(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"class_names_file {path!r} cannot be read: {error}") from error
    if not isinstance(names, dict):
        raise ConfigError(f"class_names_file {path!r} must hold a JSON object of raw name -> readable name")
    return names


class ClipImageNet(Recipe):
    name = "clip_imagenet"
    arguments = ImageClassificationArguments
    unkeyed_fields = ("eval_batch_size",)  # change no result: in no key
    reference_method = "zero-shot"
    default_lora_targets = r".*vision_model.*\.(q_proj|v_proj)"  # the text tower is the frozen classifier

    def __init__(self, options: ImageClassificationArguments, seed: int) -> None:
        super().__init__(options, seed)
        self._sets: dict[str, dict[str, tuple[datasets.Dataset, list[str]]]] = {}  # role -> name -> (set, class names)
        self._train_names: list[str] = []

    def evaluation_sets(self) -> dict[str, list[tuple[str, str, str]]]:
        """Role -> its sets as (name, source, split)."""
        o = self.options
        return {
            role: [parse_set(spec, f"{role}_sets") for spec in specs]
            for role, specs in (("speciality", o.speciality_sets), ("generality", o.generality_sets))
        }

    def local_paths(self) -> dict[str, str]:
        o = self.options
        sources = {"train_dataset": o.train_dataset}
        for role, sets in self.evaluation_sets().items():
            sources.update({f"{role}_sets ({name})": source for name, source, _ in sets})
        paths = {**super().local_paths(), **{k: v for k, v in sources.items() if is_local_path(v)}}
        if o.class_names_file is not None:  # always a local file
            paths["class_names_file"] = o.class_names_file
        return paths

    def prepare(self) -> None:
        o = self.options
        sets = self.evaluation_sets()
        readable = readable_names(o.class_names_file)
        self.pretrained = check_model(o.model_name_or_path)
        self.train_data = self._load(o.train_dataset, o.train_split, o.max_train_samples)
        self._train_names = class_names(self.train_data, o.label_column, readable)
        for role, role_sets in sets.items():
            self._sets[role] = {}
            for name, source, split in role_sets:
                data = self._load(source, split, o.eval_max_samples)
                self._sets[role][name] = (
                    data,
                    class_names(data, o.label_column, readable, fallback=self._train_names),
                )

    def _load(self, source: str, split: str, max_samples: int | None) -> datasets.Dataset:
        o = self.options
        return load_split(
            source, split, [o.image_column, o.label_column], images=True, seed=self.seed, max_samples=max_samples
        )

    def load_model(self) -> tuple[Any, Any]:
        model = CLIPModel.from_pretrained(self.pretrained)
        freeze_text_tower(model)
        return model, CLIPProcessor.from_pretrained(self.pretrained)

    def build_trainer(
        self, model: Any, processor: Any, args: SpecGenTrainingArguments, algorithm: str | None = None
    ) -> SpecGenTrainer:
        o = self.options
        prompts = [o.templates[0].format(n) for n in self._train_names]
        return SpecGenTrainer(
            model=model,
            args=dataclasses.replace(args, remove_unused_columns=False),  # keep the image column
            train_dataset=self.train_data,
            compute_loss_func=class_prompt_loss,
            data_collator=ClassPromptCollator(processor, prompts, o.image_column, o.label_column),
        )

    def evaluate(self, model_dir: Path) -> dict[str, dict[str, float]]:
        model, processor = CLIPModel.from_pretrained(model_dir), CLIPProcessor.from_pretrained(model_dir)
        o = self.options
        return {
            role: {
                name: accuracy(
                    model,
                    processor,
                    data,
                    zero_shot_head(model, processor, names, o.templates),
                    o.eval_batch_size,
                    o.image_column,
                    o.label_column,
                )
                for name, (data, names) in sets.items()
            }
            for role, sets in self._sets.items()
        }

    def search_group_alphas(
        self, finetuned: Path, groups: int, mean_alpha: float, experiment: ExperimentArguments
    ) -> GroupSearch:
        """HMA's ratios on the first `hma_max_samples` training images: the merged model's cross-entropy,
        under the training classifier (`templates[0]`), against the fine-tuned model's predicted classes
        (`generated`, the paper's proxy) or the labels (`targets`)."""
        o = self.options
        data = self.train_data.select(range(min(experiment.hma_max_samples, len(self.train_data))))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        processor = CLIPProcessor.from_pretrained(self.pretrained)
        model = CLIPModel.from_pretrained(self.pretrained, dtype=torch.float32).to(device)
        tuned = CLIPModel.from_pretrained(finetuned, dtype=torch.float32).to(device).eval()
        head = zero_shot_head(
            model, processor, self._train_names, o.templates[:1]
        )  # the frozen text tower's: every merge's
        images = [image.convert("RGB") for image in data[o.image_column]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        if experiment.hma_samples == "generated":
            with torch.no_grad():
                labels = pixel_logits(tuned, pixels, head).argmax(-1)
        else:
            labels = torch.tensor(data[o.label_column], device=device)
        objective = GroupAlphaObjective(
            model,
            {name: p.detach() for name, p in tuned.named_parameters()},
            groups,
            loss=lambda merged, batch: F.cross_entropy(
                pixel_logits(merged, batch["pixel_values"], head), batch["labels"]
            ),
        )
        train_batch, held_batch = row_batches(
            {"pixel_values": pixels, "labels": labels}, batch_size=16, seed=self.seed
        )
        return optimize_group_alphas(
            objective, train_batch, held_batch, mean_alpha=mean_alpha, steps=experiment.hma_steps
        )

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "recipe": self.name,
            "model": o.model_name_or_path,
            "train": [o.train_dataset, o.train_split, o.max_train_samples],
            "columns": [o.image_column, o.label_column],
            "prompt": o.templates[0],
            "names": o.class_names_file,
        }

    def eval_fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "sets": [o.speciality_sets, o.generality_sets],
            "templates": o.templates,
            "max": o.eval_max_samples,
            "names": o.class_names_file,
        }


if __name__ == "__main__":
    ClipImageNet.main()
