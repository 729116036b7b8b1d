"""Measure catastrophic forgetting in the tiny foundations and what WiSE-FT alpha=0.5 recovers.

`python -m tools.tiny.phenomenon --workdir DIR [--output FILE.md]` (from the repository root, as
`make phenomenon` runs it) fine-tunes each foundation fully on its speciality (default
hyper-parameters), merges WiSE-FT, scores every model and prints (and writes) one table per
foundation plus the share of the speciality gain WiSE-FT keeps and of the generality loss it
recovers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hf_specgen.tiny.images import FINETUNE_DOMAIN
from hf_specgen.tiny.tasks import MEDMCQA_TASK

from .clip_phenomenon import clip_phenomenon
from .lm_phenomenon import lm_phenomenon


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(scores: dict[str, dict[str, float]], speciality: str) -> dict[str, dict[str, float]]:
    """Adds `speciality` (the `speciality` column) and `generality` (the mean of every other
    column) to each model's scores."""
    return {
        model: {
            **row,
            "speciality": row[speciality],
            "generality": _mean([v for c, v in row.items() if c != speciality]),
        }
        for model, row in scores.items()
    }


def recovery(summary: dict[str, dict[str, float]], base: str, finetuned: str, merged: str) -> tuple[float, float]:
    """(share of the speciality gain kept, share of the generality loss recovered) by `merged`."""
    b, f, m = summary[base], summary[finetuned], summary[merged]
    kept = (m["speciality"] - b["speciality"]) / (f["speciality"] - b["speciality"])
    recovered = (m["generality"] - f["generality"]) / (b["generality"] - f["generality"])
    return kept, recovered


def markdown(title: str, summary: dict[str, dict[str, float]], columns: list[str]) -> str:
    header = ["model", *columns, "generality"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in summary.items():
        lines.append("| " + " | ".join([model, *(f"{row[c]:.3f}" for c in header[1:])]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where fine-tuned and merged models go")
    parser.add_argument("--output", type=Path, help="also write the tables (Markdown) and a JSON next to it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sections, results = [], {}
    for name, run, speciality in (
        ("tiny-lm", lm_phenomenon, MEDMCQA_TASK),
        ("tiny-clip", clip_phenomenon, FINETUNE_DOMAIN),
    ):
        start = time.perf_counter()
        scores = run(args.workdir / name, seed=args.seed)
        base, finetuned, merged = scores
        summary = summarize(scores, speciality)
        kept, recovered = recovery(summary, base, finetuned, merged)
        columns = [speciality, *(c for c in scores[base] if c != speciality)]
        title = f"{name}: speciality = {speciality}, generality = mean of the other columns"
        sections.append(
            markdown(title, summary, columns)
            + f"\n\n{merged} keeps {kept:.0%} of the speciality gain and recovers {recovered:.0%} of the"
            f" generality loss ({time.perf_counter() - start:.0f} s)."
        )
        results[name] = {"scores": summary, "speciality_gain_kept": kept, "generality_loss_recovered": recovered}
    text = "\n\n".join(sections)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
