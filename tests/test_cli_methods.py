"""`specgen merge` / `specgen sweep` with merge methods and alpha schedules, and `specgen fisher`, run
in-process on a sharded 3-block OPT (tied head) and two fine-tunes of it: every output tensor against
a float64 computation by hand, every refusal one line with exit status 2 and nothing written."""

import json
import os
import re
import stat

import datasets
import pytest
import torch
from conftest import fisher_of, make_args, perturb_, read_weights, save, tiny_opt
from merge_helpers import leftovers, merge_config, run, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, OPTForCausalLM

from hf_specgen import SpecGenTrainer
from hf_specgen.merge import METHODS, MergeWriteError, Parameter, TensorInput, register_method
from hf_specgen.merge.fisher import estimate_fisher, read_texts, save_fisher


ALPHA_FREE = "model.decoder.final_layer_norm.weight"  # outside the blocks
# the OPT's tensors, by kind: OPT's linear layers, and what is in the blocks
LINEAR = re.compile(r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.weight$")
BLOCK = re.compile(r"\.layers\.(\d)\.")


@pytest.fixture(scope="module")
def opt3(tmp_path_factory):
    """A 3-block tiny OPT and two fine-tunes of it, each saved in 4KB shards with a tokenizer, and texts."""
    root = tmp_path_factory.mktemp("methods")
    config = tiny_opt().config
    config.num_hidden_layers = 3
    tokenizer = tiny_tokenizer()
    dirs = {}
    for name, seed in [("pre", None), ("ft1", 123), ("ft2", 7)]:
        torch.manual_seed(0)
        model = OPTForCausalLM(config)
        if seed is not None:
            perturb_(model, seed=seed)
        dirs[name] = save(model, root / name, max_shard_size="4KB")
        tokenizer.save_pretrained(dirs[name])
    assert len(list(dirs["pre"].glob("model-*-of-*.safetensors"))) > 2
    g = torch.Generator().manual_seed(3)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 29, (int(n),), generator=g))
        for n in torch.randint(4, 11, (12,), generator=g)
    ]
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return {**dirs, "texts": texts, "data": data, **{f"{k}_sd": read_weights(v) for k, v in dirs.items()}}


def sds(opt3, *names):
    return [opt3[f"{n}_sd"] for n in names]


def merge_cli(opt3, out, *extra, command="merge", finetuned=("ft1",)):
    return ["--pretrained", opt3["pre"], "--finetuned", *[opt3[f] for f in finetuned], "--output-dir", out, *extra]


def check_merged(out, pre_sd, expected_of):
    """Every tensor of `out` against `expected_of(key)` (float64), names and dtype as the checkpoint's."""
    merged = read_weights(out)
    assert set(merged) == set(pre_sd) and "lm_head.weight" not in merged
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected_of(key), rtol=1e-6, atol=1e-7, msg=key)
    return merged


def check_interpolated(out, opt3, alpha_of):
    """Every tensor of `out` is WiSE-FT between pre and ft1 at its own alpha, `alpha_of(key)`."""
    pre, ft = sds(opt3, "pre", "ft1")
    return check_merged(out, pre, lambda k: (1 - alpha_of(k)) * pre[k].double() + alpha_of(k) * ft[k].double())


# ---- methods, weights, schedules: end to end against float64 ------------------------------------


def test_soup_of_two_with_weights(opt3, tmp_path, capsys):
    out = tmp_path / "soup"
    assert (
        run(["merge", *merge_cli(opt3, out, "--alpha", "0.6", "--weights", "1", "3", finetuned=("ft1", "ft2"))]) == 0
    )
    assert capsys.readouterr().out == f"wrote {out}\n"
    pre, ft1, ft2 = sds(opt3, "pre", "ft1", "ft2")
    check_merged(out, pre, lambda k: 0.4 * pre[k].double() + 0.6 * (ft1[k].double() + 3 * ft2[k].double()) / 4)
    config = merge_config(out)
    assert (config["method"], config["weights"], config["finetuned"]) == (
        "linear",
        [1.0, 3.0],
        [str(opt3["ft1"]), str(opt3["ft2"])],
    )


def test_uniform_soup_by_default_and_sweep(opt3, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run(["sweep", *merge_cli(opt3, out, "--alphas", "0.5,1", finetuned=("ft1", "ft2"))]) == 0
    assert capsys.readouterr().out.splitlines() == [f"alpha=0.5: {out / 'alpha-0.5'}", f"alpha=1: {out / 'alpha-1'}"]
    pre, ft1, ft2 = sds(opt3, "pre", "ft1", "ft2")
    for alpha in (0.5, 1.0):
        check_merged(
            out / f"alpha-{alpha:g}",
            pre,
            lambda k: (1 - alpha) * pre[k].double() + alpha * (ft1[k].double() + ft2[k].double()) / 2,
        )


def test_task_arithmetic(opt3, tmp_path):
    out = tmp_path / "ta"
    argv = merge_cli(
        opt3, out, "--method", "task_arithmetic", "--alpha", "0.8", "--weights", "0.5", "1.5", finetuned=("ft1", "ft2")
    )
    assert run(["merge", *argv]) == 0
    pre, ft1, ft2 = sds(opt3, "pre", "ft1", "ft2")

    def expected(k):
        p = pre[k].double()
        return p + 0.8 * (0.5 * (ft1[k].double() - p) + 1.5 * (ft2[k].double() - p))

    check_merged(out, pre, expected)
    assert merge_config(out)["formula"] == METHODS["task_arithmetic"].formula


def test_group_alphas_and_outside_alpha(opt3, tmp_path):
    out = tmp_path / "groups"
    assert run(["merge", *merge_cli(opt3, out, "--group-alphas", "0.2,0.8", "--outside-alpha", "0.1")]) == 0
    group_of_block = [0, 0, 1]  # 3 blocks in 2 groups: block b in group b * 2 // 3

    def alpha_of(key):
        block = BLOCK.search(key)
        return 0.1 if block is None else (0.2, 0.8)[group_of_block[int(block[1])]]

    merged = check_interpolated(out, opt3, alpha_of)
    config = merge_config(out)
    assert config["schedule"] == {
        "kind": "groups",
        "group_alphas": [0.2, 0.8],
        "outside_alpha": 0.1,
        "mean_alpha": 0.5,
    }
    assert config["alphas"] == {k: alpha_of(k) for k in merged}


def test_sweep_scales_the_group_shape_to_each_mean(opt3, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = merge_cli(opt3, out, "--alphas", "0.2,0.4", "--group-alphas", "0.1,0.2,0.3")
    assert run(["sweep", *argv]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"alpha=0.2: {out / 'alpha-0.2'}",
        f"alpha=0.4: {out / 'alpha-0.4'}",
    ]
    for mean, groups in [(0.2, (0.1, 0.2, 0.3)), (0.4, (0.2, 0.4, 0.6))]:  # 3 blocks, 3 groups: one each

        def alpha_of(key):
            block = BLOCK.search(key)
            return mean if block is None else groups[int(block[1])]  # outside: the mean

        check_interpolated(out / f"alpha-{mean:g}", opt3, alpha_of)
        assert merge_config(out / f"alpha-{mean:g}")["schedule"]["group_alphas"] == pytest.approx(
            list(groups), abs=1e-15
        )
    marker = json.loads((out / "specgen_merge.json").read_text())
    assert marker["alphas"] == [0.2, 0.4] and marker["shape"]["kind"] == "groups"


def test_alpha_rules_in_order_split_at_the_last_equals(opt3, tmp_path):
    out = tmp_path / "rules"
    rules = [r"fc\d\.weight$=0.2", r"layers\.1\.=0.9", r"self_attn\.(?=q_proj)=0.7"]  # the last one's regex holds '='
    assert (
        run(["merge", *merge_cli(opt3, out, "--alpha", "0.5", *[a for r in rules for a in ("--alpha-rule", r)])]) == 0
    )

    def alpha_of(key):
        if key.endswith(("fc1.weight", "fc2.weight")):
            return 0.2  # first match wins: layers.1.fc1.weight too
        if ".layers.1." in key:
            return 0.9
        return 0.7 if "self_attn.q_proj" in key else 0.5

    assert (
        alpha_of("model.decoder.layers.1.fc1.weight") == 0.2
        and alpha_of("model.decoder.layers.2.self_attn.q_proj.bias") == 0.7
    )
    check_interpolated(out, opt3, alpha_of)
    assert merge_config(out)["schedule"]["rules"] == [
        [r"fc\d\.weight$", 0.2],
        [r"layers\.1\.", 0.9],
        [r"self_attn\.(?=q_proj)", 0.7],
    ]


def test_sweep_with_rules_sweeps_the_default_alpha(opt3, tmp_path):
    out = tmp_path / "sweep"
    assert run(["sweep", *merge_cli(opt3, out, "--alphas", "0,0.6", "--alpha-rule", "fc1=1")]) == 0
    for default in (0.0, 0.6):

        def alpha_of(key):
            return 1.0 if "fc1" in key else default

        check_interpolated(out / f"alpha-{default:g}", opt3, alpha_of)


def test_linear_only_with_non_linear_alpha(opt3, tmp_path):
    out = tmp_path / "linear"
    assert run(["merge", *merge_cli(opt3, out, "--alpha", "0.4", "--linear-only", "--non-linear-alpha", "0.25")]) == 0

    def alpha_of(key):  # the tied lm_head is stored as the input embedding: an embedding, not a linear layer
        return 0.4 if LINEAR.search(key) else 0.25

    merged = check_interpolated(out, opt3, alpha_of)
    assert sum(1 for k in merged if alpha_of(k) == 0.4) == 3 * 6


def test_linear_only_defaults_other_tensors_to_the_finetuned(opt3, tmp_path):
    out = tmp_path / "linear"
    assert run(["merge", *merge_cli(opt3, out, "--alpha", "0.4", "--linear-only")]) == 0
    merged = read_weights(out)
    pre, ft = sds(opt3, "pre", "ft1")
    assert torch.equal(merged[ALPHA_FREE], ft[ALPHA_FREE]) and torch.equal(
        merged["model.decoder.layers.0.fc1.bias"], ft["model.decoder.layers.0.fc1.bias"]
    )
    key = "model.decoder.layers.2.fc2.weight"
    torch.testing.assert_close(
        merged[key].double(), 0.6 * pre[key].double() + 0.4 * ft[key].double(), rtol=1e-6, atol=1e-7
    )


# ---- a method registered in Python gets its options ----------------------------------------------


@pytest.fixture
def scaled_step():
    """`theta = theta_pre + alpha * beta * scale * (theta_ft - theta_pre)`, registered for the test only."""

    @register_method(
        "scaled_step",
        formula="theta = theta_pre + alpha * beta * scale * (theta_ft - theta_pre)",
        parameters={"beta": Parameter(1.0, "step multiplier (100% is the task vector)")},
        inputs={"step_scale": TensorInput("pretrained", "per-element step scales")},
    )
    def scaled(pre, finetuned, *, alpha, weights, step_scale, beta):
        (ft,) = finetuned
        return pre.float() + alpha * beta * step_scale.float() * (ft.float() - pre.float())

    yield
    del METHODS["scaled_step"]


def test_a_registered_method_gets_its_cli_options(opt3, tmp_path, capsys, scaled_step):
    pre, ft = sds(opt3, "pre", "ft1")
    scale = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in pre.items()}
    save_file(scale, tmp_path / "scale.safetensors")
    assert run(["merge", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--scaled-step-beta X" in help_text and "--step-scale FILE" in help_text and "100%" in help_text
    out = tmp_path / "out"
    argv = merge_cli(
        opt3,
        out,
        "--method",
        "scaled_step",
        "--alpha",
        "0.5",
        "--scaled-step-beta",
        "0.3",
        "--step-scale",
        tmp_path / "scale.safetensors",
    )
    assert run(["merge", *argv]) == 0
    check_merged(out, pre, lambda k: pre[k].double() + 0.15 * scale[k].double() * (ft[k].double() - pre[k].double()))
    assert merge_config(out)["parameters"] == {"beta": 0.3} and capsys.readouterr().err == ""
    refused(
        ["merge", *merge_cli(opt3, tmp_path / "default", "--method", "scaled_step", "--alpha", "0.5")],
        capsys,
        "method 'scaled_step' needs step_scale (--step-scale)",
        output=tmp_path / "default",
    )


def test_a_method_without_fallback_needs_inputs_for_every_tensor(opt3, tmp_path, capsys, scaled_step):
    key = "model.decoder.layers.0.fc1.weight"
    save_file({key: torch.ones(32, 16)}, tmp_path / "scale.safetensors")  # one tensor only
    out = tmp_path / "out"
    argv = merge_cli(
        opt3, out, "--method", "scaled_step", "--alpha", "0.5", "--step-scale", tmp_path / "scale.safetensors"
    )
    assert run(["merge", *argv]) == 2
    err = capsys.readouterr().err
    head = (
        "specgen: error: method 'scaled_step' has no fallback method: its inputs (step_scale) must cover every"
        " merged tensor; they lack "
    )
    assert err.startswith(head) and err.endswith(" ...\n") and err.count("\n") == 1
    lacking = err.removeprefix(head).removesuffix(" ...\n").split(", ")
    assert len(lacking) == 8 and set(lacking) < set(opt3["pre_sd"]) - {key}
    assert not out.exists() and leftovers(tmp_path) == []


# ---- fisher: the file specgen fisher writes, and the merge it weights ------------------------------


def specgen_fisher(opt3, model, out, *extra):
    return run(["fisher", opt3[model], "--data", opt3["data"], "--num-samples", "6", "--output", out, *extra])


def trainer_fisher(opt3, tmp_path, fisher_type, seed):
    """The EWC Fisher SpecGenTrainer estimates at the pre-trained model, from the same texts, tokenized."""
    tokenizer = AutoTokenizer.from_pretrained(opt3["pre"])
    ids = [tokenizer(t)["input_ids"] for t in opt3["texts"]]
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": ids})
    args = make_args(
        tmp_path / "trainer",
        ewc_lambda=1.0,
        ewc_num_samples=6,
        ewc_fisher=fisher_type,
        seed=seed,
        per_device_train_batch_size=1,
    )
    trainer = SpecGenTrainer(model=OPTForCausalLM.from_pretrained(opt3["pre"]), args=args, train_dataset=data)
    return fisher_of(trainer)


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_fisher_file_is_the_trainers_ewc_fisher(opt3, tmp_path, capsys, fisher_type):
    out = tmp_path / "fisher.safetensors"
    assert specgen_fisher(opt3, "pre", out, "--fisher-type", fisher_type, "--seed", "5") == 0
    written = load_file(out)
    assert capsys.readouterr().out == f"wrote {out}: the {fisher_type} Fisher of {len(written)} tensors\n"
    expected = trainer_fisher(opt3, tmp_path, fisher_type, seed=5)
    assert set(written) == set(expected) == set(opt3["pre_sd"])  # checkpoint names, the tied head once
    for key, tensor in written.items():
        assert tensor.dtype == torch.float32 and tensor.shape == opt3["pre_sd"][key].shape
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-9, msg=key)
    assert all(bool((t > 0).any()) for t in written.values())
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {
            "format": "pt",
            "written_by": "hf_specgen",
            "model": str(opt3["pre"]),
            "fisher_type": fisher_type,
            "num_samples": "6",
            "seed": "5",
        }
    assert leftovers(tmp_path) == []


def test_fisher_batches_seed_and_data_formats(opt3, tmp_path):
    assert specgen_fisher(opt3, "pre", tmp_path / "one.safetensors") == 0
    one = load_file(tmp_path / "one.safetensors")
    texts = tmp_path / "texts.json"  # a JSON list of strings: the same texts
    texts.write_text(json.dumps(opt3["texts"]))
    argv = [
        "fisher",
        opt3["pre"],
        "--data",
        texts,
        "--num-samples",
        "6",
        "--batch-size",
        "4",
        "--output",
        tmp_path / "b.safetensors",
    ]
    assert run(argv) == 0
    batched = load_file(tmp_path / "b.safetensors")
    for key in one:
        torch.testing.assert_close(batched[key], one[key], rtol=1e-4, atol=1e-9, msg=key)
    assert specgen_fisher(opt3, "pre", tmp_path / "seed.safetensors", "--seed", "6") == 0
    reseeded = load_file(tmp_path / "seed.safetensors")
    assert not torch.allclose(reseeded["model.decoder.layers.0.fc1.weight"], one["model.decoder.layers.0.fc1.weight"])


def test_fisher_merge_from_specgen_fisher_files(opt3, tmp_path, capsys):
    f_pre, f_ft = tmp_path / "pre.safetensors", tmp_path / "ft.safetensors"
    assert (
        specgen_fisher(opt3, "pre", f_pre) == 0
        and specgen_fisher(opt3, "ft1", f_ft, "--fisher-type", "empirical") == 0
    )
    out = tmp_path / "merged"
    argv = merge_cli(
        opt3,
        out,
        "--method",
        "fisher",
        "--alpha",
        "0.3",
        "--fisher-pre",
        f_pre,
        "--fisher-finetuned",
        f_ft,
        "--fisher-epsilon",
        "1e-4",
    )
    assert run(["merge", *argv]) == 0
    pre, ft = sds(opt3, "pre", "ft1")
    fp, ff = load_file(f_pre), load_file(f_ft)
    assert any(bool((f < 1e-4).any()) for f in fp.values())  # the floor matters

    def expected(k):
        a_ft, a_pre = 0.3 * ff[k].double().clamp_min(1e-4), 0.7 * fp[k].double().clamp_min(1e-4)
        return (a_ft * ft[k].double() + a_pre * pre[k].double()) / (a_ft + a_pre)

    check_merged(out, pre, expected)
    config = merge_config(out)
    assert config["parameters"] == {"epsilon": 1e-4} and config["inputs"] == {
        "fisher_pre": str(f_pre),
        "fisher_finetuned": str(f_ft),
    }
    assert "fallback" not in config


def test_estimate_fisher_of_a_peft_model_names_the_base_weights(opt3):
    tokenizer = AutoTokenizer.from_pretrained(opt3["pre"])
    base = OPTForCausalLM.from_pretrained(opt3["pre"])
    plain = estimate_fisher(base, tokenizer, opt3["texts"], 4, "empirical", seed=2)
    lora = get_peft_model(
        OPTForCausalLM.from_pretrained(opt3["pre"]), LoraConfig(r=2, target_modules=["q_proj", "fc1"])
    )
    adapted = estimate_fisher(lora, tokenizer, opt3["texts"], 4, "empirical", seed=2)  # B = 0: the same model
    assert set(adapted) == set(plain) == set(opt3["pre_sd"])
    for key in plain:
        torch.testing.assert_close(adapted[key], plain[key], rtol=1e-5, atol=1e-10, msg=key)


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"text": ["x y", "z"]}))
    (tmp_path / "b.json").write_text(json.dumps([{"body": "x y"}, {"body": "z"}]))
    (tmp_path / "c.jsonl").write_text('"x y"\n\n"z"\n')
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x y", "z"]})}).save_to_disk(tmp_path / "d")
    assert read_texts(tmp_path / "a.json") == read_texts(tmp_path / "c.jsonl") == ["x y", "z"]
    assert read_texts(tmp_path / "b.json", "body") == read_texts(tmp_path / "d", "body") == ["x y", "z"]
    (tmp_path / "e.jsonl").write_text('{"text": "x"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'e.jsonl'}, line 2: no string field 'text'")):
        read_texts(tmp_path / "e.jsonl")


def test_save_fisher_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "f.safetensors"
    save_fisher({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        save_fisher({"w": torch.zeros(2)}, path)

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(MergeWriteError, match=re.escape(f"{path}: cannot write it: No space left on device")):
        save_fisher({"w": torch.zeros(2)}, path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"] and torch.equal(
        load_file(path)["w"], torch.ones(2)
    )
    monkeypatch.undo()
    previous = os.umask(0o027)
    try:
        save_fisher({"w": torch.zeros(2, dtype=torch.float16)}, path, overwrite=True)
    finally:
        os.umask(previous)
    assert load_file(path)["w"].dtype == torch.float32 and stat.S_IMODE(path.stat().st_mode) == 0o640  # the umask's


# ---- refusals: one line, exit 2, nothing written --------------------------------------------------


def refused(argv, capsys, message, *, output):
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"specgen: error: {message}\n"
    assert not output.exists() and leftovers(output.parent) == []


def test_bad_merge_options_exit_2_before_writing(opt3, tmp_path, capsys):
    out = tmp_path / "out"
    merge, help_ = ["merge", *merge_cli(opt3, out)], " (see specgen merge --help)"
    pre_fisher = tmp_path / "pre.safetensors"
    save_file({k: torch.ones_like(v) for k, v in opt3["pre_sd"].items()}, pre_fisher)
    cases = [
        (
            [*merge, "--group-alphas", "0.1,x"],
            "argument --group-alphas: --group-alphas takes comma-separated numbers (none empty), got '0.1,x'" + help_,
        ),
        (
            [*merge, "--group-alphas", "0.1,,0.3"],
            "argument --group-alphas: --group-alphas takes comma-separated numbers (none empty), got '0.1,,0.3'"
            + help_,
        ),
        (
            ["sweep", *merge_cli(opt3, out), "--alphas", "0.1;0.2"],
            "argument --alphas: --alphas takes comma-separated numbers (none empty), got '0.1;0.2'"
            + " (see specgen sweep --help)",
        ),
        ([*merge, "--alpha", "0.5", "--weights", "1", "x"], "argument --weights: invalid float value: 'x'" + help_),
        (
            [*merge, "--alpha", "0.5", "--alpha-rule", "mlp"],
            "argument --alpha-rule: --alpha-rule takes REGEX=ALPHA, got 'mlp' (no '=')" + help_,
        ),
        (
            [*merge, "--alpha", "0.5", "--alpha-rule", "fc1=high"],
            "argument --alpha-rule: --alpha-rule takes REGEX=ALPHA, got 'fc1=high': 'high' is not a number" + help_,
        ),
        (
            [*merge, "--method", "ties"],
            "argument --method: unknown merge method 'ties'; known: linear, task_arithmetic, fisher" + help_,
        ),
        (
            [*merge, "--group-alphas", "0.1,0.2,0.3,0.4"],
            "group alphas (--group-alphas): 4 groups, but model.decoder.layers has only 3 blocks",
        ),
        (
            [*merge, "--alpha", "0.5", "--alpha-rule", "fc1=0.1", "--alpha-rule", "mlp=0.3"],
            "alpha rule 'mlp' (--alpha-rule) matches no tensor of the model",
        ),
        (
            [*merge, "--alpha", "0.5", "--alpha-rule", "(fc=0.3"],
            "alpha rule '(fc' is not a regular expression (missing ), unterminated subpattern at position 0)",
        ),
        ([*merge, "--alpha", "0.5", "--non-linear-alpha", "0.2"], "--non-linear-alpha goes with --linear-only"),
        (
            [*merge, "--alpha", "0.5", "--outside-alpha", "0.2"],
            "outside_alpha (--outside-alpha) goes with group alphas (--group-alphas)",
        ),
        ([*merge], "no alpha given (--alpha, or --group-alphas)"),
        (
            [*merge, "--alpha", "0.5", "--group-alphas", "0.1,0.2"],
            "give either alpha (--alpha) or group alphas (--group-alphas), not both",
        ),
        (
            [*merge, "--alpha", "0.5", "--fisher-epsilon", "1e-6"],
            "--fisher-epsilon is an option of method fisher, not of linear (--method fisher to use it)",
        ),
        (
            [*merge, "--alpha", "0.5", "--method", "task_arithmetic", "--fisher-pre", pre_fisher],
            "--fisher-pre is an input of method fisher, not of task_arithmetic (--method fisher to use it)",
        ),
        (
            [*merge, "--alpha", "0.5", "--method", "fisher", "--fisher-pre", pre_fisher],
            "method 'fisher' needs fisher_finetuned (--fisher-finetuned)",
        ),
        (
            [
                *merge,
                "--alpha",
                "0.5",
                "--method",
                "fisher",
                "--fisher-pre",
                pre_fisher,
                "--fisher-finetuned",
                pre_fisher,
                "--fisher-epsilon",
                "0",
            ],
            "fisher parameter 'epsilon' must be a positive number, got 0.0",
        ),
        (
            ["merge", *merge_cli(opt3, out, "--alpha", "0.5", "--weights", "1", "-1", finetuned=("ft1", "ft2"))],
            "weights (--weights) must be finite numbers summing to a positive number, got [1.0, -1.0]",
        ),
        ([*merge, "--alpha", "0.5", "--weights", "1", "2"], "weights (--weights): 2 given for 1 fine-tuned model(s)"),
        (
            ["merge", *merge_cli(opt3, out, "--alpha", "0.5", "--method", "fisher", finetuned=("ft1", "ft2"))],
            "method 'fisher' merges 1 fine-tuned model(s), got 2",
        ),
    ]
    for argv, message in cases:
        refused(argv, capsys, message, output=out)


def test_mismatched_fisher_files_exit_2_before_writing(opt3, tmp_path, capsys):
    out = tmp_path / "out"
    pre = opt3["pre_sd"]
    good, renamed, reshaped = (tmp_path / f"{n}.safetensors" for n in ("good", "renamed", "reshaped"))
    save_file({k: torch.ones_like(v) for k, v in pre.items()}, good)
    save_file(
        {"model.decoder.layers.9.fc1.weight": torch.ones(32, 16), **{k: torch.ones_like(v) for k, v in pre.items()}},
        renamed,
    )
    key = "model.decoder.layers.1.fc2.weight"
    save_file({**{k: torch.ones_like(v) for k, v in pre.items()}, key: torch.ones(16, 16)}, reshaped)
    merge = ["merge", *merge_cli(opt3, out, "--alpha", "0.5", "--method", "fisher")]
    refused(
        [*merge, "--fisher-pre", renamed, "--fisher-finetuned", good],
        capsys,
        f"fisher_pre ({renamed}): names tensors the checkpoints do not have: model.decoder.layers.9.fc1.weight",
        output=out,
    )
    refused(
        [*merge, "--fisher-pre", good, "--fisher-finetuned", reshaped],
        capsys,
        f"fisher_finetuned ({reshaped}): {key} has shape (16, 16), the finetuned tensor (16, 32)",
        output=out,
    )
    refused(
        [*merge, "--fisher-pre", tmp_path / "nope.safetensors", "--fisher-finetuned", good],
        capsys,
        f"{tmp_path / 'nope.safetensors'}: no such safetensors file or directory",
        output=out,
    )


def test_bad_fisher_arguments_exit_2_before_writing(opt3, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    fisher = ["fisher", opt3["pre"], "--data", opt3["data"], "--output", out]
    refused(
        [*fisher[:1], tmp_path / "a" / "missing", *fisher[2:], "--num-samples", "4"],
        capsys,
        f"{tmp_path / 'a' / 'missing'}: no such directory (nor a Hub id)",
        output=out,
    )
    refused(
        [*fisher[:3], tmp_path / "none.jsonl", *fisher[4:], "--num-samples", "4"],
        capsys,
        f"{tmp_path / 'none.jsonl'}: no such file or directory (--data)",
        output=out,
    )
    refused([*fisher, "--num-samples", "0"], capsys, "--num-samples must be at least 1, got 0", output=out)
    refused(
        [*fisher, "--num-samples", "4", "--batch-size", "0"],
        capsys,
        "--batch-size must be at least 1, got 0",
        output=out,
    )
    refused(
        [*fisher, "--num-samples", "four"],
        capsys,
        "argument --num-samples: invalid int value: 'four' (see specgen fisher --help)",
        output=out,
    )
    refused(
        [*fisher[:-1], tmp_path / "f.bin", "--num-samples", "4"],
        capsys,
        f"{tmp_path / 'f.bin'}: a Fisher file's name ends in .safetensors (specgen merge reads it by that)",
        output=out,
    )
    inside = opt3["pre"] / "fisher.safetensors"
    refused(
        [*fisher[:-1], inside, "--num-samples", "4", "--overwrite"],
        capsys,
        f"{inside}: the output lies inside the input {opt3['pre']}; choose another output (nothing was written)",
        output=inside,
    )
    bare = save(tiny_opt(), tmp_path / "bare")  # no tokenizer saved with it
    capsys.readouterr()
    refused(
        [*fisher[:1], bare, *fisher[2:], "--num-samples", "4"],
        capsys,
        f"{bare}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...):"
        " save the tokenizer beside the model",
        output=out,
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    refused(
        [*fisher[:3], bad, *fisher[4:], "--num-samples", "4"],
        capsys,
        f"{bad}, line 2: no string field 'text'",
        output=out,
    )
    out.write_bytes(b"mine")
    assert run([*fisher, "--num-samples", "4"]) == 2
    assert (
        capsys.readouterr().err
        == f"specgen: error: {out}: already exists; pass overwrite=True (--overwrite) to replace it\n"
    )
    assert out.read_bytes() == b"mine"
    assert run([*fisher, "--num-samples", "4", "--overwrite"]) == 0 and set(load_file(out)) == set(opt3["pre_sd"])
