"""Model cards: `write_card` (YAML front matter and a Markdown body, for every card hf_specgen writes) and the card
of a merged model (`write_model_card`: where it came from, the method, and what alpha means)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


TAGS = ["hf_specgen", "wise-ft", "merge"]


def write_model_card(
    directory: Path,
    pretrained: str,
    finetuned: str | Sequence[str],
    *,
    alpha: float,
    scores: str | None = None,
    record: Mapping[str, Any] | None = None,
) -> None:
    """`README.md` with YAML metadata (`base_model`: the sources that are Hub ids, tags, alpha) and,
    when known, the speciality/generality scores as a Markdown table; the body names the sources.

    Args:
        directory: the merged model's directory.
        pretrained: the pre-trained model as given.
        finetuned: the fine-tuned model (or adapter) as given, or several.
        alpha: the alpha (with a heterogeneous schedule: its mean).
        scores: a Markdown table for the card.
        record: what `merge_config.json` says (method, formula, schedule, every tensor's alpha), for
            any merge but plain WiSE-FT; None: plain WiSE-FT.
    """
    tuned = [finetuned] if isinstance(finetuned, str) else list(finetuned)
    hub_ids = [source for source in (pretrained, *tuned) if _is_hub_id(source)]  # the Hub refuses local paths there
    if record is None:
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
            f"- finetuned: `{tuned[0]}`",
            f"- alpha: {alpha:g}",
        ]
    else:
        data, body = _method_card(pretrained, tuned, hub_ids, alpha, record)
    if scores:
        body += ["", "## Speciality and generality", "", scores.strip()]
    write_card(directory, data, body)


def write_card(directory: Path, data: ModelCardData, body: Sequence[str]) -> None:
    """`README.md`, as on the Hub: `data` as the YAML front matter, then the Markdown `body`.

    Args:
        directory: the model's directory.
        data: the card's metadata (license, tags, base model, ...).
        body: the Markdown lines after the front matter.
    """
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").save(directory / "README.md")


def _method_card(
    pretrained: str, tuned: list[str], hub_ids: list[str], alpha: float, record: Mapping[str, Any]
) -> tuple[ModelCardData, list[str]]:
    from .methods import get_method  # the tags a method declares

    method, schedule = record["method"], record["schedule"]
    tags = ["hf_specgen", *get_method(method).tags]
    summary = {"method": method, "mean_alpha": alpha, "schedule": schedule, "parameters": dict(record["parameters"])}
    data = ModelCardData(base_model=hub_ids or None, tags=tags, specgen_merge=summary)
    body = [
        f"# {method} merge, mean alpha = {alpha:g}",
        "",
        f"Written by hf_specgen's `specgen merge --method {method}` (alpha = 0 is the pre-trained model, alpha = 1 "
        "the fine-tuned one):",
        "",
        f"`{record['formula']}`",
        "",
        f"- pretrained: `{pretrained}`",
        *[
            f"- finetuned: `{source}`" + (f" (weight {w:g})" if len(tuned) > 1 else "")
            for source, w in zip(tuned, record["weights"])
        ],
        *[f"- {name}: `{path}`" for name, path in record["inputs"].items()],
        *[f"- {name}: {value:g}" for name, value in record["parameters"].items()],
        f"- schedule: {_describe(schedule)}",
    ]
    if record.get("fallback"):
        fallback = record["fallback"]
        missing = fallback.get("missing") or dict.fromkeys(record["inputs"], len(fallback["tensors"]))
        lacking = ", ".join(f"no {name} for {count}" for name, count in missing.items())
        body.append(f"- merged with {fallback['method']}: {len(fallback['tensors'])} tensors ({lacking})")
    body += [
        "",
        "<details><summary>The alpha of every merged tensor (also in merge_config.json)</summary>",
        "",
        "| tensor | alpha |",
        "|---|---|",
    ]
    body += [f"| `{key}` | {value:g} |" for key, value in record["alphas"].items()]
    body += ["", "</details>"]
    return data, body


def _describe(schedule: Mapping[str, Any]) -> str:
    kind = schedule["kind"]
    if kind == "groups":
        text = (
            f"{len(schedule['group_alphas'])} groups of consecutive blocks, input side first: "
            f"{', '.join(f'{a:g}' for a in schedule['group_alphas'])}; "
            f"outside the blocks: {schedule['outside_alpha']:g}"
        )
    elif kind == "rules":
        rules = "; ".join(f"`{pattern}` -> {a:g}" for pattern, a in schedule["rules"])
        text = f"rules, first match wins: {rules}; others: {schedule['default_alpha']:g}"
    else:
        text = f"one alpha, {schedule['alpha']:g}"
    if schedule.get("linear_only"):
        text += f"; linear layers' weights only, every other tensor {schedule['non_linear_alpha']:g}"
    return text


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
