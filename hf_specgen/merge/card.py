"""The model card of a merged model: where it came from and what alpha means."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["hf_specgen", "wise-ft", "merge"]


def write_model_card(directory: Path, pretrained: str, finetuned: str, *, alpha: float, scores: str | None = None) -> None:
    """`README.md` with YAML metadata (`base_model`: the sources that are Hub ids, tags, alpha) and,
    when known, the speciality/generality scores as a Markdown table; the body names both sources."""
    hub_ids = [source for source in (pretrained, finetuned) if _is_hub_id(source)]  # the Hub refuses local paths there
    data = ModelCardData(base_model=hub_ids or None, tags=TAGS, wise_ft={"alpha": alpha})
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


def _is_hub_id(source: str) -> bool:
    """A Hub model id (`name` or `namespace/name`), not a local directory."""
    from huggingface_hub.utils import validate_repo_id

    if Path(source).exists():
        return False
    try:
        validate_repo_id(source)
    except ValueError:
        return False
    return True
