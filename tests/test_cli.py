"""`specgen merge` / `specgen sweep`, run in-process: what they write, print, and exit with."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import VOCAB, FakeHub, read_weights, save
from merge_helpers import (
    adapted,
    assert_interpolated,
    check_full_merge,
    expect_usage_error,
    merge_args,
    read_card,
    run,
)
from transformers import GPT2Config, GPT2LMHeadModel

import hf_specgen
from hf_specgen.cli import build_parser
from hf_specgen.merge import MergeError, wise_ft


def same_files(a, b):
    a_files = {p.name: p.read_bytes() for p in Path(a).iterdir()}
    b_files = {p.name: p.read_bytes() for p in Path(b).iterdir()}
    return a_files == b_files


def test_merge_writes_what_the_api_writes(opt, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(merge_args(opt, out, "0.3", "--dtype", "bfloat16", "--max-shard-size", "2KB")) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {out}" and captured.err == ""
    api = wise_ft(str(opt["pre"]), str(opt["ft"]), 0.3, tmp_path / "api", dtype="bfloat16", max_shard_size="2KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert same_files(out, api)
    merged = read_weights(out)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        expected = ((1 - 0.3) * opt["pre_sd"][key].double() + 0.3 * opt["ft_sd"][key].double()).to(torch.bfloat16)
        torch.testing.assert_close(tensor.float(), expected.float(), rtol=1e-2, atol=1e-3)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_scores_go_into_the_card(opt, tmp_path, capsys):
    scores = tmp_path / "scores.md"
    scores.write_text("| task | score |\n|---|---|\n| speciality | 0.91 |\n")
    assert run(merge_args(opt, tmp_path / "out", "0.5", "--scores", scores)) == 0
    metadata, body = read_card(tmp_path / "out")
    assert metadata["wise_ft"]["alpha"] == 0.5 and "| speciality | 0.91 |" in body


def test_sweep_writes_every_alpha(opt, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        run(
            ["sweep", "--pretrained", opt["pre"], "--finetuned", opt["ft"], "--alphas", "0,0.5,1", "--output-dir", out]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"alpha=0: {out / 'alpha-0'}", f"alpha=0.5: {out / 'alpha-0.5'}", f"alpha=1: {out / 'alpha-1'}"]
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0", "alpha-0.5", "alpha-1", "specgen_merge.json"]
    for alpha in (0.0, 0.5, 1.0):
        single = wise_ft(str(opt["pre"]), str(opt["ft"]), alpha, tmp_path / f"single-{alpha}")
        assert same_files(out / f"alpha-{alpha:g}", single)
    zero, one = read_weights(out / "alpha-0"), read_weights(out / "alpha-1")
    assert all(torch.equal(zero[k], opt["pre_sd"][k]) and torch.equal(one[k], opt["ft_sd"][k]) for k in zero)
    half = read_weights(out / "alpha-0.5")
    for key, tensor in half.items():
        assert_interpolated(tensor, opt["pre_sd"][key], opt["ft_sd"][key], 0.5)


def test_sweep_of_a_lora_adapter(tmp_path, capsys):
    base_dir, adapter_dir, model = adapted(tmp_path)
    out = tmp_path / "sweep"
    assert (
        run(
            [
                "sweep",
                "--pretrained",
                base_dir,
                "--finetuned",
                adapter_dir,
                "--alphas",
                "0.25,0.75",
                "--output-dir",
                out,
            ]
        )
        == 0
    )
    base_sd = read_weights(base_dir)
    for alpha in (0.25, 0.75):
        check_full_merge(read_weights(out / f"alpha-{alpha:g}"), base_sd, model, alpha)
    assert (
        run(
            [
                "sweep",
                "--pretrained",
                base_dir,
                "--finetuned",
                adapter_dir,
                "--alphas",
                "0.5",
                "--output-dir",
                tmp_path / "kept",
                "--keep-adapter",
            ]
        )
        == 0
    )
    assert (tmp_path / "kept" / "alpha-0.5" / "adapter_model.safetensors").is_file()


def test_existing_output_exit_2_and_overwrite(opt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = expect_usage_error(merge_args(opt, out), capsys, str(out), "already exists", "--overwrite")
    assert err.startswith("specgen: error:")
    expect_usage_error(
        ["sweep", "--pretrained", opt["pre"], "--finetuned", opt["ft"], "--alphas", "0,1", "--output-dir", out],
        capsys,
        "already exists",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run(merge_args(opt, out, "0.3", "--overwrite-any")) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_alpha_range_exit_2_unless_extrapolate(opt, tmp_path, capsys):
    expect_usage_error(
        merge_args(opt, tmp_path / "out", "1.5"), capsys, "alpha must be in [0, 1]", "1.5", "--extrapolate"
    )
    expect_usage_error(
        [
            "sweep",
            "--pretrained",
            opt["pre"],
            "--finetuned",
            opt["ft"],
            "--alphas",
            "0,-0.5",
            "--output-dir",
            tmp_path / "out",
        ],
        capsys,
        "-0.5",
    )
    assert not (tmp_path / "out").exists()
    assert run(merge_args(opt, tmp_path / "out", "1.5", "--extrapolate")) == 0
    merged = read_weights(tmp_path / "out")
    for key, tensor in merged.items():
        ft, pre = opt["ft_sd"][key].double(), opt["pre_sd"][key].double()
        torch.testing.assert_close(tensor.double(), ft + 0.5 * (ft - pre), rtol=1e-6, atol=1e-6)


def test_bad_inputs_exit_2_naming_the_problem(opt, tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = save(
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
        tmp_path / "gpt2",
    )
    out = tmp_path / "out"
    base = ["--output-dir", out, "--alpha", "0.5"]
    expect_usage_error(
        ["merge", "--pretrained", opt["pre"], "--finetuned", gpt2, *base],
        capsys,
        "mismatched architectures",
        "'opt'",
        "'gpt2'",
    )
    expect_usage_error(
        ["merge", "--pretrained", tmp_path / "missing", "--finetuned", opt["ft"], *base],
        capsys,
        f"{tmp_path / 'missing'}: no such directory",
    )
    expect_usage_error(
        ["merge", "--pretrained", opt["pre"], "--finetuned", opt["ft"], "--keep-adapter", *base],
        capsys,
        "keep_adapter",
    )
    config = opt["ft"] / "config.json"
    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_bytes(config.read_bytes())
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in opt["ft_sd"].items() if k != "model.decoder.final_layer_norm.bias"},
        short / "model.safetensors",
        metadata={"format": "pt"},
    )
    expect_usage_error(
        ["merge", "--pretrained", opt["pre"], "--finetuned", short, *base],
        capsys,
        "missing in finetuned: model.decoder.final_layer_norm.bias",
    )
    assert not out.exists() and not any(".partial" in p.name for p in tmp_path.iterdir())


def test_argument_errors_exit_2(opt, tmp_path, capsys):
    sweep = ["sweep", "--pretrained", opt["pre"], "--finetuned", opt["ft"], "--output-dir", tmp_path / "out"]
    expect_usage_error([*sweep, "--alphas", "0,x"], capsys, "--alphas takes comma-separated numbers")
    expect_usage_error([*sweep, "--alphas", "0,0.5", "--dtype", "int8"], capsys, "--dtype", "int8")
    expect_usage_error([*sweep, "--alphas", "0.5,0.5"], capsys, "repeat")
    expect_usage_error(
        ["merge", "--pretrained", opt["pre"], "--output-dir", tmp_path / "out", "--alpha", "0.5"],
        capsys,
        "--finetuned",
    )
    expect_usage_error(merge_args(opt, tmp_path / "out", "half"), capsys, "--alpha")
    expect_usage_error(
        merge_args(opt, tmp_path / "out", "0.5", "--scores", tmp_path / "nope.md"), capsys, "--scores", "nope.md"
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture
def fake_hub(monkeypatch):
    """`huggingface_hub.HfApi`, which the push uses by default, replaced by a recorder."""
    hubs = []

    def factory(fail=False):
        def make(*args, **kwargs):
            hubs.append(FakeHub(fail=fail))
            return hubs[-1]

        monkeypatch.setattr(huggingface_hub, "HfApi", make)
        return hubs

    return factory


def test_push_to_hub_private(opt, tmp_path, capsys, fake_hub):
    hubs = fake_hub()
    out = tmp_path / "out"
    assert run(merge_args(opt, out, "0.4", "--push-to-hub", "me/merged", "--private")) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} and pushed it to me/merged"
    (hub,) = hubs
    assert hub.created[0]["repo_id"] == "me/merged" and hub.created[0]["private"] is True
    (upload,) = hub.uploads
    assert Path(upload["folder_path"]) == out and upload["repo_id"] == "me/merged"
    assert {"model.safetensors", "config.json", "README.md"} <= upload["files"].keys()
    assert upload["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "alpha: 0.4" in upload["files"]["README.md"].decode()
    assert run(merge_args(opt, tmp_path / "public", "0.4", "--push-to-hub", "me/public")) == 0
    assert hubs[1].created[0]["private"] is False
    assert run(merge_args(opt, tmp_path / "local", "0.4")) == 0
    assert len(hubs) == 2  # no push asked, no Hub client made


def test_failed_push_exits_1_and_keeps_the_output(opt, tmp_path, capsys, fake_hub):
    hubs = fake_hub(fail=True)
    out = tmp_path / "out"
    assert run(merge_args(opt, out, "0.4", "--push-to-hub", "me/merged")) == 1
    captured = capsys.readouterr()
    assert "specgen: error:" in captured.err and "me/merged" in captured.err and "503" in captured.err
    assert "intact" in captured.err and f"`specgen push {out} me/merged` retries" in captured.err and hubs[0].uploads
    merged = read_weights(out)
    assert set(merged) == set(opt["ft_sd"]) and (out / "README.md").is_file()


def test_invalid_repo_id_refused_before_merging(opt, tmp_path, capsys, fake_hub):
    hubs = fake_hub()
    out = tmp_path / "out"
    for repo_id in ("me/bad id", "a/b/c", "me/x--y"):
        expect_usage_error(
            merge_args(opt, out, "0.4", "--push-to-hub", repo_id),
            capsys,
            f"specgen: error: push_to_hub (--push-to-hub): {repo_id!r} is not a valid Hub repository id",
        )
    with pytest.raises(MergeError, match="push_to_hub"):  # before the inputs are looked for
        wise_ft(tmp_path / "nope", opt["ft"], 0.5, out, "me/bad id")
    assert not out.exists() and hubs == []


def test_push_publishes_an_existing_merge(opt, tmp_path, capsys, fake_hub):
    hubs = fake_hub()
    out = wise_ft(opt["pre"], opt["ft"], 0.4, tmp_path / "out")
    assert run(["push", out, "me/merged", "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"pushed {out} to me/merged"
    (hub,) = hubs
    assert hub.created[0]["repo_id"] == "me/merged" and hub.created[0]["private"] is True
    (upload,) = hub.uploads
    assert upload["files"] == {p.name: p.read_bytes() for p in out.iterdir()}
    assert upload["commit_message"] == "WiSE-FT merge, alpha=0.4"
    assert run(["push", out, "me/public"]) == 0 and hubs[1].created[0]["private"] is False

    fake_hub(fail=True)
    assert run(["push", out, "me/merged"]) == 1  # as a merge's failed push: exit 1, the directory intact
    err = capsys.readouterr().err
    assert err.startswith(f"specgen: error: pushing {out} to me/merged failed") and "503" in err
    assert upload["files"] == {p.name: p.read_bytes() for p in out.iterdir()}


def test_push_refuses_what_is_not_a_model_directory(opt, tmp_path, capsys, fake_hub):
    hubs = fake_hub()
    out = wise_ft(opt["pre"], opt["ft"], 0.4, tmp_path / "out")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text("{}")  # a config but no weights
    for directory, what in [
        (tmp_path / "nope", "no such directory"),
        (out / "config.json", "not a directory"),
        (tmp_path / "notes", "no model.safetensors"),
        (tmp_path, "not a model directory (no config.json or adapter_config.json)"),
    ]:
        expect_usage_error(["push", directory, "me/merged"], capsys, f"specgen: error: {directory}: {what}")
    expect_usage_error(
        ["push", out, "me/bad id"], capsys, "specgen: error: repo_id: 'me/bad id' is not a valid Hub repository id"
    )
    assert hubs == []


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"specgen (hf_specgen) {hf_specgen.__version__}\n"


def test_every_option_and_argument_has_help():
    parsers = [build_parser()]
    undocumented = []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
                undocumented += [
                    f"{parser.prog} {name}"
                    for name, sub in action.choices.items()
                    if not any(c.dest == name and c.help for c in action._choices_actions)
                ]
            elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                undocumented.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert undocumented == []


def test_merge_package_and_merge_help_start_without_the_model_stack():
    """`import hf_specgen.merge` and `specgen merge --help` load neither torch nor transformers (start-up under a
    second, measured in `make bench`); the first merge imports them, and names are the functions, not modules."""
    code = (
        "import sys, types\n"
        "import hf_specgen.merge\n"
        "from hf_specgen.cli import main\n"
        "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
        "import hf_specgen.merge.run\n"
        "from hf_specgen.merge import merge, wise_ft\n"
        "print('HEAVY', heavy, callable(wise_ft) and not isinstance(wise_ft, types.ModuleType),"
        " 'torch' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--pretrained PRETRAINED" in run.stdout  # the help was printed, from the registry of methods
    assert run.stdout.splitlines()[-1] == "HEAVY [] True True"
