"""The model card of a merged model: where it came from and what alpha means."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["hf_specgen", "wise-ft", "merge"]


def write_model_card(directory: Path, pretrained: str, finetuned: str, *, alpha: float, scores: str | None = None) -> None:
    """`README.md` with YAML metadata (`base_model`: both sources, tags, alpha) and, when known,
    the speciality/generality scores as a Markdown table."""
    data = ModelCardData(base_model=[pretrained, finetuned], tags=TAGS, wise_ft={"alpha": alpha})
    body = [
        f"# WiSE-FT merge, alpha = {alpha:g}",
        "",
        "Weight-space ensemble of a pre-trained model and its fine-tuned version, written by hf_specgen's "
        "`specgen merge`:",
        "",
        "`theta = (1 - alpha) * theta_pretrained + alpha * theta_finetuned`, "
        "so alpha = 0 is the pre-trained model and alpha = 1 the fine-tuned one.",
        "",
        f"- pretrained: `{pretrained}`",
        f"- finetuned: `{finetuned}`",
        f"- alpha: {alpha:g}",
    ]
    if scores:
        body += ["", "## Speciality and generality", "", scores.strip()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    card.save(directory / "README.md")
