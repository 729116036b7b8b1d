"""A recipe's configuration: a YAML preset, then command-line overrides, into typed dataclasses.

`HfArgumentParser` reads either a file or the command line; recipes need both (`--config
preset.yaml --learning_rate 1e-4`). The preset becomes the parser's defaults, converted by each
field's own type (YAML reads `1e-4` as a string), so the command line wins and a wrong key or
value is reported with the file's name before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


_BOOLEAN_WORDS = {"true", "false", "yes", "no", "1", "0"}


class ConfigError(ValueError):
    """A recipe's configuration cannot run: raised before any model or data set is trained."""


def parse_config(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *, grid_fields: Collection[str] = ()
) -> tuple[Any, ...]:
    """Instances of `dataclass_types` from `--config FILE` (YAML) overridden by the other arguments.

    `--push-to-hub REPO_ID` is accepted as a shorthand for `--push_to_hub --hub_model_id REPO_ID`.

    Args:
        dataclass_types: the argument dataclasses, e.g. a recipe's options, `ExperimentArguments`,
            `SpecGenTrainingArguments`.
        argv: the command line (default `sys.argv[1:]`).
        grid_fields: fields that may take a list of values (`l2_lambda: [0.01, 0.1]` in the YAML,
            `--l2_lambda 0.01 0.1` on the command line); the instances hold each list's first value.

    Returns:
        One instance per dataclass type, in order; with `grid_fields`, then a dict of the lists given,
        `{field: [values converted by the field's type]}` (the command line's replacing the file's).
    """
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=Path, help="YAML preset; command-line arguments override it")
    argv = _hub_shorthand(list(sys.argv[1:] if argv is None else argv))
    actions = {action.dest: action for action in parser._actions}
    argv, command_line_grids = _command_line_grids(argv, grid_fields, actions)
    known, _ = parser.parse_known_args(argv)  # only to find --config: the full parse comes below
    grids: dict[str, list[Any]] = {}
    if known.config is not None:
        preset = _preset(parser, known.config, grid_fields)
        grids = {name: value for name, value in preset.items() if name in grid_fields and isinstance(value, list)}
        parser.set_defaults(**{name: value[0] if name in grids and value else value for name, value in preset.items()})
    grids.update(command_line_grids)
    try:
        # the outputs: one instance per dataclass, a namespace of the other options (--config), the rest
        *instances, _, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        for instance in instances:
            check_finite(instance)
    except (ValueError, TypeError) as error:  # a dataclass' own validation (e.g. TrainingArguments')
        raise ConfigError(f"invalid configuration: {error}") from error
    if rest:
        several = (
            f" (only {', '.join(grid_fields)} take several values)"
            if grid_fields and all(map(_is_number, rest))
            else ""
        )
        raise ConfigError(f"unknown arguments {rest}{several}")
    return (*instances, grids) if grid_fields else tuple(instances)


def _command_line_grids(
    argv: list[str], grid_fields: Collection[str], actions: dict[str, argparse.Action]
) -> tuple[list[str], dict[str, list[Any]]]:
    """`--l2_lambda 0.01 0.1` -> (`--l2_lambda 0.01`, {"l2_lambda": [0.01, 0.1]}) for the grid fields."""
    if not grid_fields:
        return argv, {}
    kept, grids, i = [], {}, 0
    while i < len(argv):
        token = argv[i]
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name not in grid_fields:
            kept.append(token)
            i += 1
            continue
        if "=" in token:
            values, i = [token.split("=", 1)[1]], i + 1
        else:
            j = i + 1
            while j < len(argv) and not (argv[j].startswith("-") and not _is_number(argv[j])):
                j += 1
            values, i = argv[i + 1 : j], j
        if not values:
            raise ConfigError(f"invalid configuration: --{name} needs one value or more")
        try:
            grids[name] = [_convert_one(actions[name], value) for value in values]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            kind = getattr(actions[name].type, "__name__", "value")
            what = {"int": "whole numbers", "float": "numbers"}.get(kind, f"{kind} values")
            raise ConfigError(
                f"invalid configuration: --{name} {' '.join(values)}: {what} expected ({error})"
            ) from error
        kept += [f"--{name}", values[0]]
    return kept, grids


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def check_finite(instance: Any) -> None:
    """Every float of a dataclass instance, in a field or a list field, is finite; else a `ValueError`
    naming the field. Range checks alone let NaN through (`nan < 0` and `nan <= 0` are false)."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in items):
            raise ValueError(
                f"{f.name} must be {'finite numbers' if items is value else 'a finite number'}, got {value}"
            )


def _preset(parser: argparse.ArgumentParser, path: Path, grid_fields: Collection[str] = ()) -> dict[str, Any]:
    """The YAML file's values, checked against the parser's fields and converted by their types
    (a list for a grid field: each item converted)."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of field names to values")
    actions = {action.dest: action for action in parser._actions}
    values = _flatten(values, actions, path)
    unknown = sorted(key for key in values if key not in actions or key == "config")
    if unknown:
        raise ConfigError(f"config {path}: unknown field(s) {unknown}")
    converted = {}
    for key, value in values.items():
        action = actions[key]
        try:
            if key in grid_fields and isinstance(value, list):
                if not value:
                    raise ValueError("an empty list: give one value or more")
                converted[key] = [_convert_one(action, item) for item in value]
            else:
                converted[key] = _convert(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise ConfigError(f"config {path}: invalid value {value!r} for {key}: {error}") from error
        action.required = False  # given by the preset
    return converted


def _flatten(values: dict[str, Any], actions: dict[str, Any], path: Path) -> dict[str, Any]:
    """A mapping under a key that is no field stands for the fields it prefixes:
    `hma: {groups: 3, mean_alphas: [0.2]}` is `hma_groups: 3` and `hma_mean_alphas: [0.2]`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in actions:
            unknown = sorted(sub for sub in value if f"{key}_{sub}" not in actions)
            if unknown:
                raise ConfigError(f"config {path}: unknown field(s) {[f'{key}.{sub}' for sub in unknown]}")
            items = {f"{key}_{sub}": item for sub, item in value.items()}
        else:
            items = {key: value}
        for name, item in items.items():
            if name in flat:
                raise ConfigError(f"config {path}: {name} is given twice")
            flat[name] = item
    return flat


def _convert(action: argparse.Action, value: Any) -> Any:
    if action.nargs in ("+", "*") and value is not None:
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item) for item in items]
    if isinstance(value, (list, dict)):
        raise ValueError(f"a {type(value).__name__} where one value is expected")
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, str) and action.type is not None:
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose from {list(action.choices)}")
    return value


def _hub_shorthand(argv: list[str]) -> list[str]:
    """`--push-to-hub ID` -> `--push_to_hub --hub_model_id ID` (TrainingArguments' flag takes no id)."""
    for i, token in enumerate(argv[:-1]):
        following = argv[i + 1]
        if (
            token in ("--push-to-hub", "--push_to_hub")
            and not following.startswith("-")
            and following.lower() not in _BOOLEAN_WORDS
        ):
            return [*argv[:i], "--push_to_hub", "--hub_model_id", following, *argv[i + 2 :]]
    return argv
