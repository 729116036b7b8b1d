"""Build the tiny CLIP: a CLIP BPE tokenizer trained on the captions and a `CLIPModel` pre-trained
contrastively on rendered images of every domain, saved as a standard HuggingFace model directory.

`python -m tools.tiny.build_clip [--output-dir DIR] [--seed N]` (from the repository root) rebuilds the shipped model.
The result is a function of the seed (and of the torch build and thread count, which fix the
floating-point summation order).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_specgen.tiny.images import CLASS_NAMES, DOMAINS, IMAGE_SIZE, image_domains
from hf_specgen.tiny.paths import CLIP_DIR

from .bpe import canonical_vocab
from .card import write_foundation_card


VOCAB_SIZE = 512  # a ceiling: merges stop once every caption word is one token (~400 with the 256 bytes)
MAX_TEXT_LENGTH = 16
PRETRAIN_PER_CLASS = 500  # per domain: 20,000 image-caption pairs
PRETRAIN_STEPS = 1500
BATCH_SIZE = 128
LEARNING_RATE = 1e-3


def train_tokenizer(captions: list[str], vocab_size: int = VOCAB_SIZE) -> CLIPTokenizer:
    """CLIP's own tokenizer pipeline (lower-casing, `</w>` word ends, byte-level BPE), merges
    learnt from `captions`, ids numbered reproducibly."""
    trained = CLIPTokenizer().train_new_from_iterator(captions, vocab_size=vocab_size)
    model = json.loads(trained.backend_tokenizer.to_str())["model"]
    merges = [tuple(pair) for pair in model["merges"]]
    vocab = canonical_vocab(model["vocab"], merges, trained.all_special_tokens)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LENGTH)


def clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """A small ViT (patch 4 on 32x32: 64 patches) and text transformer; the text tower pools at the tokenizer's eos."""
    return CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_TEXT_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": 4,
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
        },
        projection_dim=64,
    )


@dataclass
class CaptionCollator:
    """Image-caption rows to a contrastive `CLIPModel` batch."""

    processor: CLIPProcessor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        captions, images = [row["caption"] for row in rows], [row["image"] for row in rows]
        batch = self.processor(text=captions, images=images, padding=True, return_tensors="pt")
        return {**batch, "return_loss": True}


def build_clip(output_dir: str | Path = CLIP_DIR, seed: int = 0) -> Path:
    """Trains the tokenizer and the model from `seed` and saves model, processor and model card to `output_dir`."""
    corpus = datasets.concatenate_datasets(list(image_domains("pretrain", seed, PRETRAIN_PER_CLASS).values()))
    tokenizer = train_tokenizer(corpus["caption"])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    set_seed(seed)
    model = CLIPModel(clip_config(tokenizer))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=PRETRAIN_STEPS,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            weight_decay=0.1,
            warmup_steps=PRETRAIN_STEPS // 20,
            lr_scheduler_type="cosine",
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            remove_unused_columns=False,
            dataloader_drop_last=True,
            save_strategy="no",
            report_to=[],
            logging_steps=50,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=corpus, data_collator=CaptionCollator(processor)).train()
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    description = _card_description(model, tokenizer)
    write_foundation_card(
        output_dir, "tiny-clip", model, description, pipeline_tag="zero-shot-image-classification", seed=seed
    )
    return output_dir


def _card_description(model: CLIPModel, tokenizer: CLIPTokenizer) -> list[str]:
    vision, text = model.config.vision_config, model.config.text_config
    return [
        "The offline stand-in for a CLIP foundation model in hf_specgen's tests, demo and benchmarks.",
        "",
        f"- Data: {PRETRAIN_PER_CLASS * len(CLASS_NAMES) * len(DOMAINS):,} image-caption pairs rendered by"
        f" `hf_specgen.tiny.images` ({IMAGE_SIZE}x{IMAGE_SIZE}; classes: {', '.join(CLASS_NAMES)};"
        f" domains: {', '.join(DOMAINS)}), `pretrain` split.",
        f"- Model: ViT (patch {vision.patch_size}, {vision.num_hidden_layers} layers, width {vision.hidden_size}),"
        f" text transformer ({text.num_hidden_layers} layers, width {text.hidden_size}),"
        f" projection {model.config.projection_dim}; CLIP tokenizer (byte-level BPE, {len(tokenizer)} tokens)"
        " trained on the captions.",
        f"- Training: CLIP contrastive loss, {PRETRAIN_STEPS} steps of {BATCH_SIZE} pairs, AdamW lr {LEARNING_RATE},"
        " cosine schedule.",
        "- Zero-shot use: `hf_specgen.eval.clip.zero_shot_head` with `hf_specgen.tiny.zero_shot_templates()`.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=CLIP_DIR)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    start = time.perf_counter()
    path = build_clip(options.output_dir, options.seed)
    print(f"tiny CLIP written to {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
