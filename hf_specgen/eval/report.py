"""The speciality-vs-generality report: which run, merge or regularizer strength to keep.

Fine-tuning buys speciality (domain scores) with generality (general-task scores); WiSE-FT alpha
and a regularizer's strength move along that trade-off. One `ResultRecord` (one JSON file) holds
one evaluated model; the report ranks them by the two means, marks the Pareto front, and writes a
table (the one `hf_specgen.merge.wise_ft(..., scores=...)` embeds in the model card), a plot and
the JSON behind both. Methods are compared by their own curves too: each method's Pareto front (all its
strengths, alphas and early-stopping points, from the pre-trained point), the most general point keeping
a share of the fine-tuned model's speciality, and the area the front dominates (`method_summary`).
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


REFERENCE_METHODS = ("pre-trained", "zero-shot", "sft")  # the starting point (alignment starts from an SFT model)
SELECTION_RULES = ("auto", "hma")  # ResultRecord.selection["rule"]
KEEP_SPECIALITY = 0.95  # the summary's point: most general among those keeping this share of the best speciality
METHOD_KEEPS = (0.9, 0.95, 1.0)  # the per-method table's columns: shares of the fine-tuned model's speciality
FINETUNED_METHODS = ("full", "dpo")  # plain training: fine-tuning, or preference alignment by DPO
CHECKPOINT_KEYS = ("fraction", "step", "steps")  # ResultRecord.checkpoint
CHOSEN_MARKERS = {"auto": "D", "hma": "^"}  # the plot's markers of chosen points, by rule
FAINT = 0.35  # the plot's opacity of a method's points off its front
DEFAULT_TITLE = "Speciality vs generality"
_PATHS = {"json": "report.json", "markdown": "report.md", "plot": "report.png"}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _scores(name: str, scores: Any, required: bool, kind: str = "metric name to score") -> dict[str, float]:
    if not isinstance(scores, Mapping):
        raise ValueError(f"{name} must be a mapping of {kind}, got {scores!r}")
    if required and not scores:
        raise ValueError(f"{name} is empty: a record needs at least one {name} score")
    for key in scores:
        if not isinstance(key, str):
            raise ValueError(f"{name} names must be strings, got {key!r}")
    return {key: _number(f"{name}[{key!r}]", value) for key, value in scores.items()}


def _strengths(strengths: Any) -> dict[str, float] | None:
    if strengths is None:
        return None
    if isinstance(strengths, Mapping) and not strengths:
        raise ValueError("strengths is empty: give the training's strengths (e.g. {'l2_lambda': 0.1}) or null")
    return _scores("strengths", strengths, required=False, kind="strength name to number (e.g. {'l2_lambda': 0.1})")


def _checkpoint(checkpoint: Any, alpha: float | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, Mapping) or any(key not in checkpoint for key in CHECKPOINT_KEYS):
        raise ValueError(
            f"checkpoint must be a mapping with {', '.join(CHECKPOINT_KEYS)}, or null, got {checkpoint!r}"
        )
    fraction = _number("checkpoint['fraction']", checkpoint["fraction"])
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"checkpoint['fraction'] must lie strictly between 0 and 1, got {fraction!r}")
    for key in ("step", "steps"):
        count = checkpoint[key]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count <= 0:
            raise ValueError(f"checkpoint[{key!r}] must be a positive integer, got {count!r}")
    if checkpoint["step"] > checkpoint["steps"]:
        raise ValueError(f"checkpoint['step'] {checkpoint['step']} is past the training's {checkpoint['steps']} steps")
    if alpha is not None:
        raise ValueError(
            f"checkpoint and alpha exclude each other: an early-stopping point is scored as is, got alpha {alpha:g}"
        )
    return {**checkpoint, "fraction": fraction, "step": int(checkpoint["step"]), "steps": int(checkpoint["steps"])}


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


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
    # the strengths (or LoRA rank) of the training that made this point, e.g. {"kd_lambda": 1.0, "l2_lambda": 0.1}
    # or {"lora_r": 16}; None: at most the one in hyperparameter/value
    strengths: dict[str, float] | None = None
    # an early-stopping point: the checkpoint saved at `fraction` of training, scored as is (no alpha), e.g.
    # {"fraction": 0.25, "step": 60, "steps": 240}; None: the end of training (or a merge of it)
    checkpoint: dict[str, Any] | None = None

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
                raise ValueError(
                    f"merge must be a merge schedule (a mapping with a 'kind') or null, got {self.merge!r}"
                )
            if self.alpha is None:
                raise ValueError("merge describes a merge's schedule: it needs the merge's (mean) alpha")
            self.merge = dict(self.merge)
        if self.selection is not None:
            if not isinstance(self.selection, Mapping) or self.selection.get("rule") not in SELECTION_RULES:
                raise ValueError(
                    f"selection must be a mapping whose rule is one of {SELECTION_RULES}, or null, got {self.selection!r}"
                )
            if self.alpha is None:
                raise ValueError("selection describes a chosen merge: it needs the merge's (mean) alpha")
            self.selection = dict(self.selection)
        self.strengths = _strengths(self.strengths)
        if self.strengths is not None and self.strengths.get(self.hyperparameter, self.value) != self.value:
            raise ValueError(
                f"value {self.value:g} disagrees with strengths[{self.hyperparameter!r}] "
                f"= {self.strengths[self.hyperparameter]:g}"
            )
        self.checkpoint = _checkpoint(self.checkpoint, self.alpha)

    @property
    def speciality_score(self) -> float:
        return statistics.fmean(self.speciality.values())

    @property
    def generality_score(self) -> float:
        return statistics.fmean(self.generality.values())

    @property
    def strength_items(self) -> list[tuple[str, float]]:
        """The training's strengths, each name once: hyperparameter=value unless among `strengths`, then `strengths`."""
        strengths = self.strengths or {}
        single = [(self.hyperparameter, self.value)] if self.hyperparameter not in (None, *strengths) else []
        return single + list(strengths.items())

    @property
    def setting(self) -> str:
        """What distinguishes this record within its method, e.g. `kd_lambda=1, l2_lambda=0.1, alpha=0.5` or
        `l2_lambda=0.1, step 60 of 240 (25%)`."""
        parts = [f"{name}={value:g}" for name, value in self.strength_items]
        if self.checkpoint is not None:
            checkpoint = self.checkpoint
            parts.append(f"step {checkpoint['step']} of {checkpoint['steps']} ({_percent(checkpoint['fraction'])})")
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
    return _most_general(records, keep * max(r.speciality_score for r in records))


def _most_general(records: Iterable[ResultRecord], floor: float) -> ResultRecord | None:
    """The most general record with at least `floor` speciality (ties: more speciality, then input order); None: none."""
    candidates = [r for r in records if r.speciality_score >= floor]
    return max(candidates, key=lambda r: (r.generality_score, r.speciality_score), default=None)


def _training(record: ResultRecord) -> tuple:
    """The training that made a record, hashable and ordered: its strengths by name (() without any)."""
    return tuple(sorted(record.strength_items))


def _order(record: ResultRecord) -> tuple:
    """Method, then strengths, then grid before chosen points, then the end of training before its early-stopping
    points (by fraction), then alpha (unmerged counts as alpha 1: the fine-tuned weights)."""
    chosen = "" if record.selection is None else record.selection["rule"]
    early = (0.0,) if record.checkpoint is None else (1.0, record.checkpoint["fraction"])
    return record.method, _training(record), chosen, early, 1.0 if record.alpha is None else record.alpha


def _methods(records: Sequence[ResultRecord]) -> list[str]:
    """The methods compared (all but the reference ones), in `_order`."""
    return list(dict.fromkeys(r.method for r in sorted(records, key=_order) if r.method not in REFERENCE_METHODS))


def method_fronts(records: Sequence[ResultRecord]) -> dict[str, list[ResultRecord]]:
    """Each method's own Pareto front: over all its points (strengths, alphas, early stops, chosen points) and
    the reference (pre-trained) points, which start every method's curve.

    Args:
        records: the records of every method and the reference point(s).

    Returns:
        method -> its front by speciality ascending (`pareto_front`), methods in `_order` (references excluded).
    """
    references = [r for r in records if r.method in REFERENCE_METHODS]
    return {
        method: pareto_front([*references, *(r for r in records if r.method == method)])
        for method in _methods(records)
    }


def _reference(records: Sequence[ResultRecord]) -> ResultRecord | None:
    """The pre-trained point: the first record of a reference method, else the first at alpha 0; None: none."""
    return next(
        (r for r in records if r.method in REFERENCE_METHODS), next((r for r in records if r.alpha == 0.0), None)
    )


def _finetuned(records: Sequence[ResultRecord]) -> ResultRecord | None:
    """`finetuned_point`, or None where the records hold no candidate."""
    ends = [
        r
        for r in records
        if r.method not in REFERENCE_METHODS
        and r.alpha in (None, 1.0)
        and r.selection is None
        and r.checkpoint is None
        and r.merge is None
    ]
    full = sorted((r for r in ends if r.method in FINETUNED_METHODS), key=lambda r: r.strengths is not None)  # stable
    return full[0] if full else max(ends, key=lambda r: r.speciality_score, default=None)


def finetuned_point(records: Sequence[ResultRecord]) -> ResultRecord:
    """The fine-tuned model the methods are measured against: the first record of method `full` (or `dpo`) at alpha 1
    (or unmerged) with no selection, early stop or merge schedule, those without strengths first; without
    one, the most special such record of any method.

    Args:
        records: the records to look in.

    Returns:
        the fine-tuned point.

    Raises:
        ValueError: no record is a whole training's end (alpha 1 or unmerged, not chosen, not an early stop).
    """
    finetuned = _finetuned(records)
    if finetuned is None:
        raise ValueError(
            f"no fine-tuned point: no record of a method (not {' or '.join(REFERENCE_METHODS)}) at alpha 1 "
            "or unmerged without selection, checkpoint or merge schedule"
        )
    return finetuned


def _scale(axis: str, pre: float, finetuned: float) -> Callable[[float], float]:
    """Maps `axis`'s scores so that the lower of `pre` and `finetuned` is 0 and the higher 1."""
    low, high = sorted((pre, finetuned))
    if high == low:
        raise ValueError(
            f"hypervolume: the pre-trained and fine-tuned points have the same {axis} ({low:.4g}), "
            f"so the {axis} axis has no span to scale by"
        )
    return lambda score: (score - low) / (high - low)


def hypervolume(points: Iterable[ResultRecord], reference: ResultRecord, finetuned: ResultRecord) -> float:
    """The area of the (speciality, generality) plane the points dominate above the corner
    (min(s_pre, s_ft), min(g_pre, g_ft)), both axes scaled so that the pre-trained and fine-tuned points span
    [0, 1]: the union of the rectangles from the corner to each point. Points below the corner on an axis add
    nothing; points beyond 1 are not clipped.

    Args:
        points: the records, e.g. a method's front.
        reference: the pre-trained point.
        finetuned: the fine-tuned point.

    Returns:
        the area, 0 for no points; the pre-trained and fine-tuned points alone make 0.

    Raises:
        ValueError: the two points tie on an axis (nothing to scale it by).
    """
    speciality = _scale("speciality", reference.speciality_score, finetuned.speciality_score)
    generality = _scale("generality", reference.generality_score, finetuned.generality_score)
    corners = sorted(((speciality(p.speciality_score), generality(p.generality_score)) for p in points), reverse=True)
    area, height = 0.0, 0.0
    for x, y in corners:  # by x descending: each point adds the strip above the highest one before it
        if x > 0.0 and y > height:
            area, height = area + x * (y - height), y
    return area


def _comparison(records: Sequence[ResultRecord], keeps: Sequence[float]) -> tuple[list[dict[str, Any]], ResultRecord]:
    """`method_summary`'s rows with the most general records themselves (or None), and the fine-tuned point."""
    reference = _reference(records)
    if reference is None:
        raise ValueError(
            f"no pre-trained point to compare methods from: no record of {' or '.join(REFERENCE_METHODS)} "
            "nor at alpha 0"
        )
    finetuned = finetuned_point(records)
    rows = []
    for method, front in method_fronts(records).items():
        own = [r for r in records if r.method == method]
        rows.append(
            {
                "method": method,
                "points": len(own),
                "trainings": len({_training(r) for r in own}),
                "best": {keep: _most_general(own, keep * finetuned.speciality_score) for keep in keeps},
                "hypervolume": hypervolume(front, reference, finetuned),
            }
        )
    return rows, finetuned


def method_summary(records: Sequence[ResultRecord], keeps: Sequence[float] = METHOD_KEEPS) -> list[dict[str, Any]]:
    """Each method against the fine-tuned model (`finetuned_point`), from the pre-trained point.

    Args:
        records: the records of every method and the reference (pre-trained) point.
        keeps: shares of the fine-tuned speciality a point must keep to count for `best_generality`.

    Returns:
        one row per method, in `_order`: {"method", "points" (its records), "trainings" (distinct strengths),
        "best_generality": {keep: the highest generality among its points with speciality >= keep * s_ft, or None},
        "best_point": {keep: that point's label, or None}, "hypervolume": `hypervolume` of its `method_fronts` front}.

    Raises:
        ValueError: no pre-trained point (a reference method's record or alpha 0), no fine-tuned point, or the two
            tie on an axis.
    """
    rows, _ = _comparison(records, keeps)
    for row in rows:
        best = row.pop("best")
        row["best_generality"] = {keep: None if r is None else r.generality_score for keep, r in best.items()}
        row["best_point"] = {keep: None if r is None else r.label for keep, r in best.items()}
        row["hypervolume"] = row.pop("hypervolume")  # last, as documented
    return rows


def method_table(records: Sequence[ResultRecord], keeps: Sequence[float] = METHOD_KEEPS) -> str:
    """GitHub Markdown: one row per method (`method_summary`), each keep's most general point as its generality
    and setting ("-": no point keeps that much), then a line naming the largest dominated area and its margin.

    Args:
        records: as for `method_summary`.
        keeps: as for `method_summary`.

    Returns:
        the table and the line under it.
    """
    rows, finetuned = _comparison(records, keeps)
    floors = [
        f"best generality at speciality >= {keep * finetuned.speciality_score:.3f} ({_percent(keep)})"
        for keep in keeps
    ]
    header = ["method", "trainings", "points", *floors, "hypervolume"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        best = [
            "-" if r is None else f"{r.generality_score:.3f}" + (f" ({r.setting})" if r.setting else "")
            for r in row["best"].values()
        ]
        cells = [row["method"], str(row["trainings"]), str(row["points"]), *best, f"{row['hypervolume']:.3f}"]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines + ["", _winner(rows)] if rows else lines)


def _winner(rows: Sequence[Mapping[str, Any]]) -> str:
    first, *others = sorted(rows, key=lambda row: -row["hypervolume"])
    if first["hypervolume"] <= 0.0:
        return "No method's front dominates any area beyond the pre-trained and fine-tuned points."
    text = f"Largest dominated area: {first['method']} ({first['hypervolume']:.3f})"
    if not others:
        return text + ", the only method."
    second = others[0]
    margin = first["hypervolume"] - second["hypervolume"]
    return text + f", {margin:.3f} more than {second['method']} ({second['hypervolume']:.3f})."


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
        text = (
            f"auto: keeps {selection.get('keep', 0):.0%} of the gain, {selection.get('evaluations', '?')} evaluations"
        )
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
    """PNG of generality against speciality (`_figure`).

    Args:
        records: the records to draw.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        `path`.
    """
    path = Path(path)
    _figure(records, title).savefig(path, dpi=120)
    return path


def _figure(records: Sequence[ResultRecord], title: str) -> Figure:
    """One line per method along its own front from the pre-trained point (`method_fronts`), its other points
    faint, early stops as squares, chosen points as diamonds (auto) and triangles (HMA); the pre-trained point
    a star, the fine-tuned one an X; the overall Pareto front a dashed staircase with ringed points.

    Drawn on a bare `Figure` (Agg), so it needs no display and leaves pyplot's state alone."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.add_subplot()
    for method, front in method_fronts(records).items():
        _draw_method(ax, [r for r in records if r.method == method], front)
    for rule, what in (("auto", "auto-alpha pick"), ("hma", "HMA ratio search")):
        if any(r.selection is not None and r.selection["rule"] == rule for r in records):
            ax.scatter([], [], marker=CHOSEN_MARKERS[rule], s=70, color="white", edgecolors="black", label=what)
    if any(r.checkpoint is not None for r in records):
        ax.scatter([], [], marker="s", s=20, color="grey", label="early stop")
    references = [r for r in records if _is_reference(r)]
    if references:
        named = next((r.method for r in references if r.method in REFERENCE_METHODS), "pre-trained")  # e.g. sft
        ax.scatter(*_means(references), marker="*", s=250, color="black", zorder=3, label=named)
    finetuned = _finetuned(records)
    if finetuned is not None:
        ax.scatter(*_means([finetuned]), marker="X", s=110, color="black", zorder=6, label="fine-tuned")
    front = pareto_front(records)
    ax.step(*_means(front), where="pre", linestyle="--", color="grey", zorder=1, label="Pareto front")
    ax.scatter(*_means(front), s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=4)
    ax.set(xlabel="speciality (mean domain score)", ylabel="generality (mean general score)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def _means(records: Sequence[ResultRecord]) -> tuple[list[float], list[float]]:
    return [r.speciality_score for r in records], [r.generality_score for r in records]


def _short_setting(record: ResultRecord) -> str:
    """A point's place on its training's curve: its alpha, or its share of training for an early stop."""
    if record.checkpoint is not None:
        return _percent(record.checkpoint["fraction"])
    return "" if record.alpha is None else f"{record.alpha:g}"


def _draw_method(ax: Any, own: Sequence[ResultRecord], front: Sequence[ResultRecord]) -> None:
    """A method's front as one line (its strength in the legend if it has one), its other points faint, early
    stops as squares, chosen points apart; annotations: every grid point with one strength, else the front's."""
    method, on_front = own[0].method, {id(r) for r in front}
    one_training = len({_training(r) for r in own}) == 1
    strengths = ", ".join(f"{name}={value:g}" for name, value in own[0].strength_items) if one_training else ""
    marked = [i for i, r in enumerate(front) if r.method == method and r.selection is None and r.checkpoint is None]
    (line,) = ax.plot(
        *_means(front), marker="o", markevery=marked, label=f"{method} ({strengths})" if strengths else method
    )
    color = line.get_color()
    for r in own:
        if r.selection is not None:
            _draw_chosen(ax, r, color)
        elif r.checkpoint is not None or id(r) not in on_front:
            ax.scatter(
                *_means([r]),
                marker="s" if r.checkpoint is not None else "o",
                s=18,
                color=color,
                alpha=1.0 if id(r) in on_front else FAINT,
                linewidths=0,
                zorder=2,
            )
    for r in own:
        text = _short_setting(r) if r.selection is None and (one_training or id(r) in on_front) else ""
        if text:
            ax.annotate(
                text, (r.speciality_score, r.generality_score), xytext=(4, 4), textcoords="offset points", fontsize=7
            )


def _draw_chosen(ax: Any, record: ResultRecord, color: Any) -> None:
    """A point chosen, not swept: its rule's marker, edged black, and its alpha."""
    rule = record.selection["rule"]
    ax.scatter(*_means([record]), marker=CHOSEN_MARKERS[rule], s=70, color=color, edgecolors="black", zorder=5)
    ax.annotate(
        f"{'auto' if rule == 'auto' else 'HMA'} {record.alpha:g}",
        (record.speciality_score, record.generality_score),
        xytext=(4, -9),
        textcoords="offset points",
        fontsize=7,
    )


def chosen_points(records: Sequence[ResultRecord]) -> str:
    """Markdown lines on the points chosen rather than swept: each auto-alpha pick (its alpha, floor
    and evaluations) and each HMA merge beside the uniform merge of its method at the same mean
    alpha, where the records hold one. Empty without chosen points."""
    lines = []
    for r in sorted((r for r in records if r.selection is not None), key=_order):
        chosen = r.selection
        if chosen["rule"] == "auto":
            lines.append(
                f"- {r.method}: auto alpha {r.alpha:g} (speciality {r.speciality_score:.3f} >= floor "
                f"{chosen.get('floor', math.nan):.3f}, generality {r.generality_score:.3f}) after "
                f"{chosen.get('evaluations', '?')} evaluations ({chosen.get('reused', 0)} reused from the grid)"
                + ("" if chosen.get("monotone", True) else "; " + chosen.get("reason", ""))
            )
            continue
        uniform = [
            u
            for u in records
            if u.method == r.method
            and u.value == r.value
            and u.alpha == r.alpha
            and u.selection is None
            and u.merge is None
        ]
        ratios = "/".join(f"{a:.3g}" for a in (r.merge or {}).get("group_alphas", []))
        text = (
            f"- {r.method}: HMA ratios {ratios} (mean {r.alpha:g}): speciality {r.speciality_score:.3f}, "
            f"generality {r.generality_score:.3f}"
        )
        if uniform:
            u = uniform[0]
            text += (
                f"; uniform alpha {u.alpha:g}: {u.speciality_score:.3f}, {u.generality_score:.3f} "
                f"(HMA {r.speciality_score - u.speciality_score:+.3f} speciality, "
                f"{r.generality_score - u.generality_score:+.3f} generality)"
            )
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
    records: Sequence[ResultRecord],
    output_dir: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    keep: float = KEEP_SPECIALITY,
) -> dict[str, Path]:
    """`report.json` (records, means, front, pick, per-method summary), `report.md` and `report.png` in
    `output_dir`; the pick is the most general point keeping `keep` of the best speciality. The per-method
    comparison (`method_summary`, `method_table`) is left out where the records hold no method, no pre-trained
    point or no fine-tuned point apart from it on both axes.

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
    per_method = ""
    missing = _not_comparable(records)
    if missing is None:
        report["methods"] = [
            {key: _string_keys(value) for key, value in row.items()} for row in method_summary(records)
        ]
        per_method = _per_method_section(records)
    elif _methods(records):  # methods to compare, but not here: say why rather than leave the section out silently
        per_method = f"Per method: not compared ({missing}).\n\n"
    chosen = chosen_points(records)
    chosen = f"Chosen, not swept:\n\n{chosen}\n\n" if chosen else ""
    markdown = (
        f"# {title}\n\n{markdown_table(records)}\n\n{_summary(records, keep)}\n\n{per_method}{chosen}"
        f"![{title}]({_PATHS['plot']})\n"
    )
    return _write_atomically(output_dir, report, markdown, lambda path: plot(records, path, title=title))


def _not_comparable(records: Sequence[ResultRecord]) -> str | None:
    """Why the records lack what `method_summary` needs (a method, a pre-trained point and a fine-tuned point apart
    from it on both axes), or None when they hold it."""
    reference, finetuned = _reference(records), _finetuned(records)
    if not _methods(records):
        return "no method"
    if reference is None or finetuned is None:
        return "no pre-trained point" if reference is None else "no fine-tuned point (a method at alpha 1)"
    for axis in ("speciality", "generality"):
        if getattr(reference, f"{axis}_score") == getattr(finetuned, f"{axis}_score"):
            return (
                f"the pre-trained and fine-tuned points have the same {axis}, "
                f"{getattr(reference, f'{axis}_score'):.3f}: nothing to scale the areas by"
            )
    return None


def _string_keys(value: Any) -> Any:
    """A keep -> value mapping with its keeps as JSON keys (`0.95`, `1`); anything else as is."""
    return {f"{keep:g}": item for keep, item in value.items()} if isinstance(value, Mapping) else value


def _per_method_section(records: Sequence[ResultRecord]) -> str:
    finetuned = finetuned_point(records)
    return (
        f"## Per method\n\nEach method is measured against the fine-tuned model, {finetuned.label}, whose speciality is "
        f"{finetuned.speciality_score:.3f}: its most general point keeping each share of that speciality, and the "
        "area its own Pareto front dominates, both axes scaled so that the pre-trained and fine-tuned points span "
        "[0, 1] (1: as special as the fine-tuned and as general as the pre-trained model).\n\n"
        f"{method_table(records)}\n\n"
    )


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
