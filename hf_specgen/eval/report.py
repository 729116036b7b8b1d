"""The speciality-vs-generality report: which run, merge or regularizer strength to keep.

One `ResultRecord` (one JSON file, `records`) holds one evaluated model; the report ranks them by the two
means, marks the Pareto front and compares methods by their own curves (`pareto`), and writes a table
(`markdown`, the one `hf_specgen.merge.wise_ft(..., scores=...)` embeds in the model card), a plot (`plots`)
and the JSON behind both, all at once (`write_report`).

The names of those modules are importable from here too, as before they had modules of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, atomic_file
from .markdown import chosen_points, markdown_table, method_table, per_method_section, pick_summary
from .pareto import (
    FINETUNED_METHODS,
    KEEP_SPECIALITY,
    METHOD_KEEPS,
    REFERENCE_METHODS,
    best_generality,
    compared_methods,
    finetuned_point,
    hypervolume,
    method_fronts,
    method_summary,
    not_comparable,
    pareto_front,
)
from .plots import CHOSEN_MARKERS, DEFAULT_TITLE, FAINT, plot
from .records import (
    CHECKPOINT_KEYS,
    REPORT_JSON,
    SELECTION_RULES,
    ResultRecord,
    load_records,
    read_json,
    schedule_summary,
    selection_summary,
)


__all__ = [
    "CHECKPOINT_KEYS",
    "CHOSEN_MARKERS",
    "DEFAULT_TITLE",
    "FAINT",
    "FINETUNED_METHODS",
    "KEEP_SPECIALITY",
    "METHOD_KEEPS",
    "REFERENCE_METHODS",
    "SELECTION_RULES",
    "ResultRecord",
    "best_generality",
    "chosen_points",
    "combine_reports",
    "finetuned_point",
    "hypervolume",
    "load_records",
    "markdown_table",
    "method_fronts",
    "method_summary",
    "method_table",
    "pareto_front",
    "plot",
    "schedule_summary",
    "selection_summary",
    "write_report",
]

_PATHS = {"json": REPORT_JSON, "markdown": "report.md", "plot": "report.png"}


def write_report(
    records: Sequence[ResultRecord],
    output_dir: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    keep: float = KEEP_SPECIALITY,
) -> dict[str, Path]:
    """`report.json` (records, means, front, pick, per-method summary), `report.md` and `report.png` in
    `output_dir`. The per-method comparison (`method_summary`, `method_table`) is left out where the records hold
    no method, no pre-trained point or no fine-tuned point apart from it on both axes.

    All three are written at once (`_write_atomically`): a failure leaves no output (and no new `output_dir`);
    other files there are kept.

    Args:
        records: the records to report on.
        output_dir: the directory to write the three files in.
        title: the report's (and the plot's) title.
        keep: the pick is the most general point keeping this share of the best speciality (`best_generality`).

    Returns:
        `{"json", "markdown", "plot"}` -> the files written.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("write_report: no records")
    records = list(records)
    front = pareto_front(records)
    index = {id(r): i for i, r in enumerate(records)}
    report = {
        "title": title,
        "records": [r.to_dict() for r in records],
        "means": [{"speciality": r.speciality_score, "generality": r.generality_score} for r in records],
        "pareto_front": [index[id(r)] for r in front],  # indices into records, by speciality
        "best_generality": index[id(best_generality(records, keep))],
        "keep_speciality": keep,
    }
    per_method = ""
    missing = not_comparable(records)
    if missing is None:
        report["methods"] = [
            {key: _string_keys(value) for key, value in row.items()} for row in method_summary(records)
        ]
        per_method = per_method_section(records)
    elif compared_methods(records):  # methods to compare, but not here: say why rather than leave it out silently
        per_method = f"Per method: not compared ({missing}).\n\n"
    chosen = chosen_points(records)
    chosen = f"Chosen, not swept:\n\n{chosen}\n\n" if chosen else ""
    markdown = (
        f"# {title}\n\n{markdown_table(records)}\n\n{pick_summary(records, keep)}\n\n{per_method}{chosen}"
        f"![{title}]({_PATHS['plot']})\n"
    )
    return _write_atomically(output_dir, report, markdown, lambda path: plot(records, path, title=title, format="png"))


def _string_keys(value: Any) -> Any:
    """A keep -> value mapping with its keeps as JSON keys (`0.95`, `1`); anything else as is."""
    return {f"{keep:g}": item for keep, item in value.items()} if isinstance(value, Mapping) else value


def _write_atomically(
    output_dir: str | os.PathLike, report: Any, markdown: str, draw: Callable[[Path], Any] | None
) -> dict[str, Path]:
    """Writes the report's files (`report.json`, `report.md`, and `report.png` by `draw`) all at once
    (`hf_specgen.atomic`): a new `output_dir` as a whole (`atomic_directory`); into an existing one, each file
    beside its final name, all renamed in only once all are written (`atomic_file`), so that the other files
    there (records, other reports) are kept. A failure leaves no file behind and the previous report intact."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir}: not a directory, cannot write a report in it")
    writers: dict[str, Callable[[Path], Any]] = {
        "json": lambda path: path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n"),
        "markdown": lambda path: path.write_text(markdown),
    }
    if draw is not None:
        writers["plot"] = draw
    with contextlib.ExitStack() as stack:
        if output_dir.is_dir():
            temporary = {
                key: stack.enter_context(atomic_file(output_dir / _PATHS[key], what="the report")) for key in writers
            }
        else:
            directory = stack.enter_context(atomic_directory(output_dir, what="the report"))
            temporary = {key: directory / _PATHS[key] for key in writers}
        for key, write in writers.items():
            write(temporary[key])
    return {key: output_dir / _PATHS[key] for key in writers}


def combine_reports(directories: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict[str, Path]:
    """One `report.md` and `report.json` over the reports in `directories` (e.g. one per recipe), each section
    showing its own directory's plot.

    Args:
        directories: report directories (each holding `write_report`'s files).
        output_dir: where to write the combined report (e.g. the directories' parent).

    Returns:
        `{"json", "markdown"}` -> the files written; the JSON is `{"reports": {directory name: its report.json}}`.

    Raises:
        ValueError: a directory holds no `report.json`.
    """
    output_dir = Path(output_dir)
    sections, reports = [], {}
    for directory in map(Path, directories):
        if not (directory / _PATHS["json"]).is_file():
            raise ValueError(f"{directory} holds no {_PATHS['json']}: write its report first")
        reports[directory.name] = read_json(directory / _PATHS["json"])
        plot_path = os.path.relpath(directory / _PATHS["plot"], output_dir)
        markdown = (directory / _PATHS["markdown"]).read_text().replace(f"]({_PATHS['plot']})", f"]({plot_path})")
        sections.append("#" + markdown)  # each report's title becomes a section
    return _write_atomically(output_dir, {"reports": reports}, "\n".join(sections), None)
