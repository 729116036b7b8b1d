"""The speciality-vs-generality report: which run, merge or regularizer strength to keep.

Fine-tuning buys speciality (domain scores) with generality (general-task scores); WiSE-FT alpha
and a regularizer's strength move along that trade-off. One `ResultRecord` (one JSON file) holds
one evaluated model; the report ranks them by the two means, marks the Pareto front, and writes a
table (the one `hf_specgen.merge.wise_ft(..., scores=...)` embeds in the model card), a plot and
the JSON behind both.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

REFERENCE_METHODS = ("pre-trained", "zero-shot")  # the starting point, drawn apart from the curves
SELECTION_RULES = ("auto", "hma")  # ResultRecord.selection["rule"]
KEEP_SPECIALITY = 0.95  # the summary's point: most general among those keeping this share of the best speciality
DEFAULT_TITLE = "Speciality vs generality"
_PATHS = {"json": "report.json", "markdown": "report.md", "plot": "report.png"}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _scores(name: str, scores: Any, required: bool) -> dict[str, float]:
    if not isinstance(scores, Mapping):
        raise ValueError(f"{name} must be a mapping of metric name to score, got {scores!r}")
    if required and not scores:
        raise ValueError(f"{name} is empty: a record needs at least one {name} score")
    for key in scores:
        if not isinstance(key, str):
            raise ValueError(f"{name} metric names must be strings, got {key!r}")
    return {key: _number(f"{name}[{key!r}]", value) for key, value in scores.items()}


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string or null, got {value!r}")
    return value


@dataclass(kw_only=True)
class ResultRecord:
    """One evaluated model: how it was made and its scores (metric name -> score, higher is better)."""

    method: str
    alpha: float | None = None  # WiSE-FT alpha; None: not merged
    hyperparameter: str | None = None  # e.g. "l2_lambda"
    value: float | None = None  # e.g. 0.1
    speciality: dict[str, float]
    generality: dict[str, float]
    cost: dict[str, float] = field(default_factory=dict)  # e.g. {"train_s": 129.0}
    model: str | None = None  # path or Hub id
    # how the merge at `alpha` was made beyond one alpha for every tensor: `AlphaSchedule.describe()`
    # (e.g. {"kind": "groups", "group_alphas": [...], "mean_alpha": alpha, ...}); None: plain WiSE-FT
    merge: dict[str, Any] | None = None
    # how the point was chosen rather than swept: {"rule": "auto", "keep", "floor", "evaluations", ...}
    # (`select_alpha`'s pick) or {"rule": "hma", "held_out_loss", "uniform_loss", ...} (a ratio search's
    # merge); None: a grid point
    selection: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Validates every field here, so a bad record fails where it is made or read, not in a plot."""
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        self.alpha = None if self.alpha is None else _number("alpha", self.alpha)
        self.hyperparameter = _optional_str("hyperparameter", self.hyperparameter)
        self.value = None if self.value is None else _number("value", self.value)
        if (self.hyperparameter is None) != (self.value is None):
            raise ValueError(f"hyperparameter and value go together, got {self.hyperparameter!r} and {self.value!r}")
        self.speciality = _scores("speciality", self.speciality, required=True)
        self.generality = _scores("generality", self.generality, required=True)
        self.cost = _scores("cost", self.cost, required=False)
        self.model = _optional_str("model", self.model)
        if self.merge is not None:
            if not isinstance(self.merge, Mapping) or not isinstance(self.merge.get("kind"), str):
                raise ValueError(f"merge must be a merge schedule (a mapping with a 'kind') or null, got {self.merge!r}")
            if self.alpha is None:
                raise ValueError("merge describes a merge's schedule: it needs the merge's (mean) alpha")
            self.merge = dict(self.merge)
        if self.selection is not None:
            if not isinstance(self.selection, Mapping) or self.selection.get("rule") not in SELECTION_RULES:
                raise ValueError(f"selection must be a mapping whose rule is one of {SELECTION_RULES}, or null, got {self.selection!r}")
            if self.alpha is None:
                raise ValueError("selection describes a chosen merge: it needs the merge's (mean) alpha")
            self.selection = dict(self.selection)

    @property
    def speciality_score(self) -> float:
        return statistics.fmean(self.speciality.values())

    @property
    def generality_score(self) -> float:
        return statistics.fmean(self.generality.values())

    @property
    def setting(self) -> str:
        """What distinguishes this record within its method, e.g. `l2_lambda=0.1, alpha=0.5`."""
        parts = [f"{self.hyperparameter}={self.value:g}"] if self.hyperparameter is not None else []
        if self.alpha is not None:
            notes = [schedule_summary(self.merge)] if self.merge else []
            if self.selection is not None:
                notes.insert(0, selection_summary(self.selection))
            parts.append(f"alpha={self.alpha:g}" + (f" ({'; '.join(notes)})" if notes else ""))
        return ", ".join(parts)

    @property
    def label(self) -> str:
        return f"{self.method} ({self.setting})" if self.setting else self.method

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ResultRecord:
        """Strict: a missing or unknown field (a typo) is an error, not a silent default."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a record must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        for name in ("method", "speciality", "generality"):
            if name not in data:
                raise ValueError(f"missing field {name!r}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(names))})")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ResultRecord:
        """One record from a JSON file holding one object (`load_records` also takes lists and directories)."""
        data = _read_json(Path(path))
        if isinstance(data, list):
            raise ValueError(f"{path}: holds a list of {len(data)} records, not one; use load_records")
        return _record(data, str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error


def _record(data: Any, where: str) -> ResultRecord:
    try:
        return ResultRecord.from_dict(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from error


def load_records(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[ResultRecord]:
    """Records from JSON files (one record or a list of records each) and directories (every
    `*.json` below, recursively, in sorted order, but `report.json` and what lies in model
    directories), in the order given."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*.json") if _may_be_record(p)) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{path}: directory holds no *.json files")
        for file in files:
            data = _read_json(file)
            if isinstance(data, list):
                records += [_record(item, f"{file}, record {i}") for i, item in enumerate(data)]
            else:
                records.append(_record(data, str(file)))
    return records


def _may_be_record(path: Path) -> bool:
    """Not a report (a report of records, so re-reporting a results tree works) nor a file of a
    model directory (config.json, tokenizer files, ... of the models a recipe's runs keep)."""
    in_model_directory = any(p.is_file() for p in (path.parent / "config.json", path.parent / "adapter_config.json"))
    return path.is_file() and path.name != _PATHS["json"] and not in_model_directory


def _dominates(a: ResultRecord, b: ResultRecord) -> bool:
    sa, ga, sb, gb = a.speciality_score, a.generality_score, b.speciality_score, b.generality_score
    return sa >= sb and ga >= gb and (sa > sb or ga > gb)


def pareto_front(records: Sequence[ResultRecord]) -> list[ResultRecord]:
    """The records no other record beats on one mean without losing on the other, by speciality
    ascending (generality descending); records tied on both means are all kept, in input order."""
    front = [r for r in records if not any(_dominates(other, r) for other in records)]
    return sorted(front, key=lambda r: r.speciality_score)


def best_generality(records: Sequence[ResultRecord], keep: float = KEEP_SPECIALITY) -> ResultRecord:
    """The most general record among those with at least `keep` times the best speciality (ties:
    more speciality, then input order): the usual pick, a little domain score for much generality."""
    if not records:
        raise ValueError("no records")
    threshold = keep * max(r.speciality_score for r in records)
    candidates = [r for r in records if r.speciality_score >= threshold]
    return max(candidates, key=lambda r: (r.generality_score, r.speciality_score))


def _order(record: ResultRecord) -> tuple:
    """Method, then strength, then grid before chosen points, then alpha (unmerged counts as alpha 1:
    the fine-tuned weights)."""
    value = (record.value is not None, record.value or 0.0)
    chosen = "" if record.selection is None else record.selection["rule"]
    return record.method, value, chosen, 1.0 if record.alpha is None else record.alpha


def schedule_summary(schedule: Mapping[str, Any]) -> str:
    """A short label of a merge schedule, e.g. `groups 0.25/0.5/0.75` or `3 rules, linear only`."""
    kind = schedule["kind"]
    if kind == "groups":
        text = "groups " + "/".join(f"{a:.3g}" for a in schedule.get("group_alphas", []))
    elif kind == "rules":
        text = f"{len(schedule.get('rules', []))} rules"
    else:
        text = kind
    return text + (", linear only" if schedule.get("linear_only") else "")


def selection_summary(selection: Mapping[str, Any]) -> str:
    """A short label of how a point was chosen, e.g. `auto: keeps 95% of the gain, 5 evaluations` or `HMA search`."""
    if selection["rule"] == "auto":
        text = f"auto: keeps {selection.get('keep', 0):.0%} of the gain, {selection.get('evaluations', '?')} evaluations"
        return text + ("" if selection.get("monotone", True) else ", not monotone")
    return f"HMA search, {selection.get('samples', 'samples')}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(records: Sequence[ResultRecord]) -> str:
    """GitHub Markdown: one row per record, every metric (blank where a record lacks it), the two
    means and `*` on the Pareto front."""
    speciality = list(dict.fromkeys(name for r in records for name in r.speciality))
    generality = list(dict.fromkeys(name for r in records for name in r.generality))
    front = {id(r) for r in pareto_front(records)}
    header = ["method", "setting", *speciality, *generality, "speciality", "generality", "Pareto"]
    lines = [
        "| " + " | ".join(map(_cell, header)) + " |",
        "|---|---|" + "---:|" * (len(header) - 3) + ":---:|",
    ]
    for r in sorted(records, key=_order):
        scores = [r.speciality.get(name) for name in speciality] + [r.generality.get(name) for name in generality]
        scores += [r.speciality_score, r.generality_score]
        cells = [_cell(r.method), _cell(r.setting), *("" if s is None else f"{s:.3f}" for s in scores)]
        lines.append("| " + " | ".join(cells + ["*" if id(r) in front else ""]) + " |")
    return "\n".join(lines)


def _is_reference(record: ResultRecord) -> bool:
    return record.method in REFERENCE_METHODS or record.alpha == 0.0


def plot(records: Sequence[ResultRecord], path: str | os.PathLike, title: str = DEFAULT_TITLE) -> Path:
    """PNG of generality against speciality: one curve per method in order of strength and alpha
    (points marked with their alpha when the method has one strength, given in the legend), the
    pre-trained point as a star, the Pareto front as a dashed staircase with ringed points.

    Drawn on a bare `Figure` (Agg), so it needs no display and leaves pyplot's state alone."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.add_subplot()
    methods = dict.fromkeys(r.method for r in sorted(records, key=_order) if r.method not in REFERENCE_METHODS)
    origin = [r for r in records if r.method in REFERENCE_METHODS][:1]  # alpha 0 of every WiSE-FT curve
    chosen_markers = {"auto": "D", "hma": "^"}
    for method in methods:
        curve = sorted((r for r in records if r.method == method and r.selection is None), key=_order)
        line = origin + curve if all(r.alpha is not None for r in curve) else curve
        strengths = {(r.hyperparameter, r.value) for r in curve}
        label, annotate = method, (lambda r: r.setting)
        if len(strengths) == 1 and all(r.alpha is not None for r in curve):  # one strength: in the legend; alphas on the points
            (name, value), annotate = strengths.pop(), (lambda r: f"{r.alpha:g}")
            label = f"{method} ({name}={value:g})" if name is not None else method
        (drawn,) = ax.plot([r.speciality_score for r in line], [r.generality_score for r in line], marker="o", label=label,
                           markevery=slice(len(line) - len(curve), None))  # fmt: skip
        for r in curve:
            ax.annotate(annotate(r), (r.speciality_score, r.generality_score), xytext=(4, 4),
                        textcoords="offset points", fontsize=7)  # fmt: skip
        for r in (r for r in records if r.method == method and r.selection is not None):  # chosen, not swept: apart
            rule = r.selection["rule"]
            ax.scatter([r.speciality_score], [r.generality_score], marker=chosen_markers[rule], s=70, color=drawn.get_color(),
                       edgecolors="black", zorder=5)  # fmt: skip
            ax.annotate(f"{'auto' if rule == 'auto' else 'HMA'} {r.alpha:g}", (r.speciality_score, r.generality_score),
                        xytext=(4, -9), textcoords="offset points", fontsize=7)  # fmt: skip
    for rule, what in (("auto", "auto-alpha pick"), ("hma", "HMA ratio search")):
        if any(r.selection is not None and r.selection["rule"] == rule for r in records):
            ax.scatter([], [], marker=chosen_markers[rule], s=70, color="white", edgecolors="black", label=what)
    references = [r for r in records if _is_reference(r)]
    if references:
        ax.scatter([r.speciality_score for r in references], [r.generality_score for r in references],
                   marker="*", s=250, color="black", zorder=3, label="pre-trained")  # fmt: skip
    front = pareto_front(records)
    fx, fy = [r.speciality_score for r in front], [r.generality_score for r in front]
    ax.step(fx, fy, where="pre", linestyle="--", color="grey", zorder=1, label="Pareto front")
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=4)
    ax.set(xlabel="speciality (mean domain score)", ylabel="generality (mean general score)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def chosen_points(records: Sequence[ResultRecord]) -> str:
    """Markdown lines on the points chosen rather than swept: each auto-alpha pick (its alpha, floor
    and evaluations) and each HMA merge beside the uniform merge of its method at the same mean
    alpha, where the records hold one. Empty without chosen points."""
    lines = []
    for r in sorted((r for r in records if r.selection is not None), key=_order):
        chosen = r.selection
        if chosen["rule"] == "auto":
            lines.append(f"- {r.method}: auto alpha {r.alpha:g} (speciality {r.speciality_score:.3f} >= floor "
                         f"{chosen.get('floor', math.nan):.3f}, generality {r.generality_score:.3f}) after "
                         f"{chosen.get('evaluations', '?')} evaluations ({chosen.get('reused', 0)} reused from the grid)"
                         + ("" if chosen.get("monotone", True) else "; " + chosen.get("reason", "")))  # fmt: skip
            continue
        uniform = [u for u in records if u.method == r.method and u.value == r.value and u.alpha == r.alpha
                   and u.selection is None and u.merge is None]  # fmt: skip
        ratios = "/".join(f"{a:.3g}" for a in (r.merge or {}).get("group_alphas", []))
        text = (f"- {r.method}: HMA ratios {ratios} (mean {r.alpha:g}): speciality {r.speciality_score:.3f}, "
                f"generality {r.generality_score:.3f}")  # fmt: skip
        if uniform:
            u = uniform[0]
            text += (f"; uniform alpha {u.alpha:g}: {u.speciality_score:.3f}, {u.generality_score:.3f} "
                     f"(HMA {r.speciality_score - u.speciality_score:+.3f} speciality, "
                     f"{r.generality_score - u.generality_score:+.3f} generality)")  # fmt: skip
        lines.append(text)
    return "\n".join(lines)


def _summary(records: Sequence[ResultRecord], keep: float) -> str:
    best_s = max(records, key=lambda r: r.speciality_score)
    pick = best_generality(records, keep)
    return (
        f"{len(pareto_front(records))} of {len(records)} points are on the Pareto front (marked *). "
        f"The best speciality is {best_s.speciality_score:.3f} ({best_s.label}). Keeping at least "
        f"{keep:.0%} of it, the most general point is {pick.label}: speciality "
        f"{pick.speciality_score:.3f}, generality {pick.generality_score:.3f}."
    )


def write_report(
    records: Sequence[ResultRecord], output_dir: str | os.PathLike, title: str = DEFAULT_TITLE,
    keep: float = KEEP_SPECIALITY,
) -> dict[str, Path]:  # fmt: skip
    """`report.json` (records, means, front, pick), `report.md` and `report.png` in `output_dir`;
    the pick is the most general point keeping `keep` of the best speciality.

    All three are written in a temporary directory beside `output_dir` and moved in only once all
    succeeded: a failure leaves no output (and no new `output_dir`); other files there are kept."""
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
    chosen = chosen_points(records)
    chosen = f"Chosen, not swept:\n\n{chosen}\n\n" if chosen else ""
    markdown = f"# {title}\n\n{markdown_table(records)}\n\n{_summary(records, keep)}\n\n{chosen}![{title}]({_PATHS['plot']})\n"
    return _write_atomically(output_dir, report, markdown, lambda path: plot(records, path, title=title))


def _write_atomically(
    output_dir: str | os.PathLike, report: Any, markdown: str, draw: Callable[[Path], Any] | None
) -> dict[str, Path]:
    """Writes the report's files in a temporary directory beside `output_dir`, then moves them in."""
    output_dir = Path(output_dir)
    names = {key: name for key, name in _PATHS.items() if draw is not None or key != "plot"}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        (temporary / _PATHS["json"]).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (temporary / _PATHS["markdown"]).write_text(markdown)
        if draw is not None:
            draw(temporary / _PATHS["plot"])
        output_dir.mkdir(exist_ok=True)
        for name in names.values():
            os.replace(temporary / name, output_dir / name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return {key: output_dir / name for key, name in names.items()}


def combine_reports(directories: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict[str, Path]:
    """One `report.md` and `report.json` over the reports in `directories` (e.g. one per recipe),
    each section showing its own directory's plot: `{"reports": {directory name: its report.json}}`."""
    output_dir = Path(output_dir)
    sections, reports = [], {}
    for directory in map(Path, directories):
        if not (directory / _PATHS["json"]).is_file():
            raise ValueError(f"{directory} holds no {_PATHS['json']}: write its report first")
        reports[directory.name] = _read_json(directory / _PATHS["json"])
        plot_path = os.path.relpath(directory / _PATHS["plot"], output_dir)
        markdown = (directory / _PATHS["markdown"]).read_text().replace(f"]({_PATHS['plot']})", f"]({plot_path})")
        sections.append("#" + markdown)  # each report's title becomes a section
    return _write_atomically(output_dir, {"reports": reports}, "\n".join(sections), None)
