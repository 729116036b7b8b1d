"""The short model card each tiny foundation ships with."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from torch import nn

from hf_specgen.merge.card import write_card


def write_foundation_card(
    directory: Path, title: str, model: nn.Module, description: list[str], *, pipeline_tag: str, seed: int
) -> None:
    """`README.md`: YAML metadata (license, tags, pipeline) and what the model is and how it was
    built, so that it reads like any Hub model's card.

    Args:
        directory: the model's directory.
        title: the card's heading (the model's name).
        model: the model, whose parameters the card counts.
        description: Markdown lines on what the model is.
        pipeline_tag: the Hub pipeline (e.g. `text-generation`).
        seed: the seed it was built from.
    """
    data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag=pipeline_tag,
        tags=["hf_specgen", "tiny-foundation", "synthetic-data"],
    )
    parameters = sum(p.numel() for p in model.parameters())
    body = [
        f"# {title}",
        "",
        *description,
        "",
        f"- parameters: {parameters:,}",
        f"- built by `make foundations` (hf_specgen.tiny) from procedurally generated data only: seed {seed},"
        f" torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
        " (the thread count fixes the summation order)",
        "- purpose: a model organism of catastrophic forgetting for tests, benchmarks and `make demo`;"
        " not for real use",
    ]
    write_card(directory, data, body)
