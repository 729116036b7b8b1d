"""SpecGenTrainingArguments: defaults, parsing, and clear errors on bad values."""

import json
import re

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.regularizers import REGULARIZERS, build_regularizers, get_regularizer
from hf_specgen.regularizers.distance import DecoupledL2, L2Distance


def test_is_training_arguments_with_every_weight_off(tmp_path):
    args = SpecGenTrainingArguments(output_dir=str(tmp_path))
    assert isinstance(args, TrainingArguments)
    assert [getattr(args, f"{name}_lambda") for name in REGULARIZERS] == [0.0] * len(REGULARIZERS) == [0.0] * 6
    assert build_regularizers(args) == []


def test_parses_from_command_line():
    (args,) = HfArgumentParser(SpecGenTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--l2_lambda",
            "0.5",
            "--l2_mode",
            "decoupled",
            "--kd_lambda",
            "2",
            "--kd_temperature",
            "3",
            "--feature_layers",
            "1",
            "-2",
            "--anchor_dtype",
            "bfloat16",
        ]
    )
    assert (args.l2_lambda, args.l2_mode, args.kd_lambda, args.kd_temperature) == (0.5, "decoupled", 2.0, 3.0)
    assert args.feature_layers == [1, -2] and args.anchor_dtype == "bfloat16"
    regs = build_regularizers(args)
    assert [type(r) for r in regs] == [DecoupledL2, get_regularizer("kd")]
    assert regs[1].temperature == 3.0


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_parses_from_json_and_yaml(tmp_path, suffix):
    values = {
        "output_dir": str(tmp_path),
        "l1_lambda": 0.01,
        "ewc_lambda": 5.0,
        "ewc_num_samples": 7,
        "ewc_fisher": "empirical",
        "feature_lambda": 0.3,
        "feature_layers": [2],
    }
    path = tmp_path / f"args.{suffix}"
    path.write_text(json.dumps(values))  # JSON is valid YAML
    parser = HfArgumentParser(SpecGenTrainingArguments)
    (args,) = parser.parse_json_file(str(path)) if suffix == "json" else parser.parse_yaml_file(str(path))
    assert (args.l1_lambda, args.ewc_lambda, args.ewc_num_samples, args.ewc_fisher) == (0.01, 5.0, 7, "empirical")
    assert args.feature_layers == [2]
    assert [r.name for r in build_regularizers(args)] == ["l1", "ewc", "feature"]
    assert isinstance(build_regularizers(SpecGenTrainingArguments(str(tmp_path), l2_lambda=1.0))[0], L2Distance)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"l1_lambda": -1.0}, "l1_lambda"),
        ({"l2_lambda": -0.1}, "l2_lambda"),
        ({"ewc_lambda": -2.0}, "ewc_lambda"),
        ({"kd_lambda": -1e-3}, "kd_lambda"),
        ({"feature_lambda": -5.0}, "feature_lambda"),
        ({"kd_temperature": 0.0}, "kd_temperature"),
        ({"kd_temperature": -1.0}, "kd_temperature"),
        ({"l2_mode": "sideways"}, "l2_mode"),
        ({"ewc_fisher": "exact"}, "ewc_fisher"),
        ({"ewc_num_samples": 0}, "ewc_num_samples"),
        ({"anchor_dtype": "int8"}, "anchor_dtype"),
        ({"feature_layers": []}, "feature_layers"),
        # NaN passes `x < 0`: it used to switch L2 off silently; inf trained to NaN weights
        ({"l2_lambda": float("nan")}, "l2_lambda must be a finite number"),
        ({"kd_lambda": float("inf")}, "kd_lambda must be a finite number"),
        ({"l1_lambda": float("-inf")}, "l1_lambda must be a finite number"),
        ({"ewc_lambda": float("nan")}, "ewc_lambda must be a finite number"),
        ({"feature_lambda": float("inf")}, "feature_lambda must be a finite number"),
        ({"kd_temperature": float("nan")}, "kd_temperature must be a finite number"),
        ({"kd_temperature": float("inf")}, "kd_temperature must be a finite number"),
        ({"learning_rate": float("nan")}, "learning_rate must be a number"),
        ({"anchor_device": "bogus"}, "anchor_device must be 'auto' or a torch device"),
        ({"anchor_device": "cuda:99"}, "anchor_device='cuda:99'"),
        ({"anchor_device": "meta"}, "anchor_device cannot be 'meta'"),
        # set in Python rather than parsed: a raw TypeError from `<` before
        ({"l2_lambda": "0.1"}, "l2_lambda must be a number, got '0.1'"),
        ({"kd_lambda": None}, "kd_lambda must be a number, got None"),
        ({"ewc_lambda": True}, "ewc_lambda must be a number, got True"),
        ({"feature_layers": "abc"}, "feature_layers must be a list of hidden-state indices"),
    ],
)
def test_bad_values_raise_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SpecGenTrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_unknown_regularizer_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown regularizer 'sp'.*l1, l2, ewc, mas, kd, feature"):
        get_regularizer("sp")
