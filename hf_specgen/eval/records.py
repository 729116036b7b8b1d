"""One evaluated model as a record: how it was made and its scores, validated, saved and loaded as JSON.

A `ResultRecord` (one JSON file, or one item of a JSON list) holds one evaluated model: its method, the
training's strengths, the WiSE-FT alpha (and how the merge was made or chosen), an early-stopping point,
and its speciality and generality metrics. Records are read strictly: a typo or a bad value fails where
the record is made or read, naming the file, not later in a plot.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


SELECTION_RULES = ("auto", "hma")  # ResultRecord.selection["rule"]
CHECKPOINT_KEYS = ("fraction", "step", "steps")  # ResultRecord.checkpoint
REPORT_JSON = "report.json"  # a report's own JSON (it holds records too): `load_records` skips it in directories


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


def format_percent(share: float) -> str:
    """A share as a percentage with three significant digits.

    Args:
        share: e.g. 0.25.

    Returns:
        e.g. `25%`.
    """
    return f"{100 * share:.3g}%"


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string or null, got {value!r}")
    return value


def schedule_summary(schedule: Mapping[str, Any]) -> str:
    """A short label of a merge schedule (`ResultRecord.merge`).

    Args:
        schedule: `AlphaSchedule.describe()`, e.g. `{"kind": "groups", "group_alphas": [0.25, 0.5, 0.75]}`.

    Returns:
        e.g. `groups 0.25/0.5/0.75` or `3 rules, linear only`.
    """
    kind = schedule["kind"]
    if kind == "groups":
        text = "groups " + "/".join(f"{a:.3g}" for a in schedule.get("group_alphas", []))
    elif kind == "rules":
        text = f"{len(schedule.get('rules', []))} rules"
    else:
        text = kind
    return text + (", linear only" if schedule.get("linear_only") else "")


def selection_summary(selection: Mapping[str, Any]) -> str:
    """A short label of how a point was chosen (`ResultRecord.selection`).

    Args:
        selection: `{"rule": "auto", "keep", "evaluations", ...}` or `{"rule": "hma", "samples", ...}`.

    Returns:
        e.g. `auto: keeps 95% of the gain, 5 evaluations` or `HMA search, <its samples>`.
    """
    if selection["rule"] == "auto":
        text = (
            f"auto: keeps {selection.get('keep', 0):.0%} of the gain, {selection.get('evaluations', '?')} evaluations"
        )
        return text + ("" if selection.get("monotone", True) else ", not monotone")
    return f"HMA search, {selection.get('samples', 'samples')}"


@dataclass(kw_only=True)
class ResultRecord:
    """One evaluated model: how it was made and its scores (metric name -> score, higher is better).

    Args:
        method: the method that made it, e.g. `"l2"`, `"full"`, `"pre-trained"`.
        alpha: its WiSE-FT alpha (the mean alpha of a heterogeneous merge); None: not merged.
        hyperparameter: the strength's name, e.g. `"l2_lambda"`; given with `value` or not at all.
        value: the strength, e.g. 0.1.
        speciality: speciality scores by metric name (at least one).
        generality: generality scores by metric name (at least one).
        cost: costs by name, e.g. `{"train_s": 129.0}`.
        model: the scored model's path or Hub id.
        merge: how the merge at `alpha` was made beyond one alpha for every tensor
            (`AlphaSchedule.describe()`); None: plain WiSE-FT.
        selection: how the point was chosen rather than swept (`{"rule": "auto", ...}` or
            `{"rule": "hma", ...}`); None: a grid point.
        strengths: the strengths (or LoRA rank) of the training that made it, e.g. `{"l2_lambda": 0.1}`.
        checkpoint: an early-stopping point, `{"fraction", "step", "steps"}`; None: the end of training.
    """

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
                    f"selection must be a mapping whose rule is one of {SELECTION_RULES}, or null, "
                    f"got {self.selection!r}"
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
        """The training's strengths, each name once: hyperparameter=value unless among `strengths`, then
        `strengths`."""
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
            parts.append(
                f"step {checkpoint['step']} of {checkpoint['steps']} ({format_percent(checkpoint['fraction'])})"
            )
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
        data = read_json(Path(path))
        if isinstance(data, list):
            raise ValueError(f"{path}: holds a list of {len(data)} records, not one; use load_records")
        return _record(data, str(path))


def read_json(path: Path) -> Any:
    """A JSON file's content.

    Args:
        path: the file.

    Returns:
        what it holds.

    Raises:
        ValueError: not valid JSON, naming the file.
    """
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
    """Records from JSON files (one record or a list of records each) and directories, in the order given.

    Args:
        paths: files and directories; a directory gives every `*.json` below it, recursively, in sorted order,
            but `report.json` and what lies in model directories.

    Returns:
        the records.

    Raises:
        ValueError: a file is not valid JSON or holds an invalid record (naming it), or a directory holds no
            `*.json` file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*.json") if _may_be_record(p)) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{path}: directory holds no *.json files")
        for file in files:
            data = read_json(file)
            if isinstance(data, list):
                records += [_record(item, f"{file}, record {i}") for i, item in enumerate(data)]
            else:
                records.append(_record(data, str(file)))
    return records


def _may_be_record(path: Path) -> bool:
    """Not a report (a report of records, so re-reporting a results tree works) nor a file of a
    model directory (config.json, tokenizer files, ... of the models a recipe's runs keep)."""
    in_model_directory = any(p.is_file() for p in (path.parent / "config.json", path.parent / "adapter_config.json"))
    return path.is_file() and path.name != REPORT_JSON and not in_model_directory


def training_key(record: ResultRecord) -> tuple:
    """The training that made a record, hashable and ordered.

    Args:
        record: the record.

    Returns:
        its strengths as sorted (name, value) pairs; `()` without any.
    """
    return tuple(sorted(record.strength_items))


def record_order(record: ResultRecord) -> tuple:
    """The sort key records are listed by: method, then strengths, then grid before chosen points, then the end of
    training before its early-stopping points (by fraction), then alpha (unmerged counts as alpha 1: the
    fine-tuned weights).

    Args:
        record: the record.

    Returns:
        its key, for `sorted(records, key=record_order)`.
    """
    chosen = "" if record.selection is None else record.selection["rule"]
    early = (0.0,) if record.checkpoint is None else (1.0, record.checkpoint["fraction"])
    return record.method, training_key(record), chosen, early, 1.0 if record.alpha is None else record.alpha
