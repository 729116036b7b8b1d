"""Merge methods as plug-ins (issue 15), through the Python API: `linear` (WiSE-FT, soups),
`task_arithmetic` and `fisher` against float64 computations by hand on sharded tiny OPT (tied
lm_head), Llama (6 blocks) and CLIP (3 text, 6 vision blocks) checkpoints with grown vocabularies;
alpha schedules (groups, rules, linear layers only); Fisher files and a training run's EWC Fisher;
soups and greedy soups; LoRA adapters under heterogeneous alphas; bad input refused before anything
is written; sweeps over a group shape; a method registered here, end to end."""

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import ADAPTER, VOCAB, lm_dataset, make_args, perturb_, read_weights, save, tiny_clip, tiny_opt
from merge_helpers import (
    LORA_CONFIGS,
    adapted,
    leftovers,
    lora_weights,
    merge_config,
    read_card,
    rule_tensors,
    tiny_llama,
    trained_full,
    write_checkpoint,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, OPTForCausalLM

import hf_specgen.merge.run as run_module
from hf_specgen import SpecGenTrainer
from hf_specgen.merge import (
    METHODS,
    AlphaSchedule,
    MergeError,
    MergeOptions,
    MergeWarning,
    Parameter,
    greedy_soup,
    iter_merge,
    merge,
    merge_sweep,
    register_method,
    wise_ft,
)


GROWN = VOCAB + 8  # the fine-tuned language models' vocabulary: 8 tokens added
EPS32 = torch.finfo(torch.float32).eps
FAMILIES = {  # builder, max_shard_size, whether the fine-tunes grow the vocabulary
    "opt": (lambda: tiny_opt(0), "4KB", True),  # 2 blocks, lm_head tied to the input embeddings
    "llama": (lambda: tiny_llama(0, layers=6), "8KB", True),  # 6 blocks, lm_head untied
    "clip": (lambda: tiny_clip(0, text_layers=3, vision_layers=6), "8KB", False),  # towers of 3 and 6 blocks
}
OPT_EMBED = "model.decoder.embed_tokens.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`models(family)`: the pre-trained checkpoint and two fine-tunes `a`, `b`, saved in shards, and
    their tensors as safetensors reads them (`pre_sd`, `a_sd`, `b_sd`); built once per family."""
    built = {}

    def get(family):
        if family not in built:
            build, shard, grows = FAMILIES[family]
            root = tmp_path_factory.mktemp(family)
            dirs = {"pre": save(build(), root / "pre", max_shard_size=shard)}
            for seed, name in ((101, "a"), (202, "b")):
                model = build()
                if grows:
                    model.resize_token_embeddings(GROWN)
                perturb_(model, seed=seed)
                dirs[name] = save(model, root / name, max_shard_size=shard)
            assert all(len(list(d.glob("model-*.safetensors"))) > 1 for d in dirs.values())
            built[family] = {**dirs, **{f"{k}_sd": read_weights(d) for k, d in dirs.items()}, "shard": shard}
        return built[family]

    return get


@pytest.fixture
def nothing_written(monkeypatch):
    """Fails the test if a merge gets as far as opening its output."""

    def refuse(*args, **kwargs):
        raise AssertionError("a merge with bad input reached the writing stage")

    monkeypatch.setattr(run_module, "atomic_directory", refuse)


# ---- by hand, in float64 ----------------------------------------------------------------------


def by_hand(method, pre, finetuned, alpha, weights=None, fisher_pre=None, fisher_ft=None, epsilon=1e-8):
    """The merged tensor in float64 from issue 15's formulas; rows past the pre-trained vocabulary are
    the fine-tunes' weighted mean.

    linear: (1 - a) pre + a sum w_i ft_i / sum w_i
    task_arithmetic: pre + a sum w_i (ft_i - pre)
    fisher: (a F_ft ft + (1 - a) F_pre pre) / (a F_ft + (1 - a) F_pre), each F at least epsilon
    """
    weights = list(weights or [1.0] * len(finetuned))
    pre64, tuned = pre.double(), [t.double() for t in finetuned]
    rows = pre.shape[0] if pre.shape != finetuned[0].shape else None
    head = tuned if rows is None else [t[:rows] for t in tuned]
    if method == "linear":
        out = (1 - alpha) * pre64 + alpha * sum(w * t for w, t in zip(weights, head)) / sum(weights)
    elif method == "task_arithmetic":
        out = pre64 + alpha * sum(w * (t - pre64) for w, t in zip(weights, head))
    elif method == "fisher":
        f_pre = fisher_pre.double().clamp_min(epsilon)
        f_ft = (fisher_ft.double() if rows is None else fisher_ft.double()[:rows]).clamp_min(epsilon)
        out = (alpha * f_ft * head[0] + (1 - alpha) * f_pre * pre64) / (alpha * f_ft + (1 - alpha) * f_pre)
    else:
        raise AssertionError(method)
    if rows is not None:
        out = torch.cat([out, sum(w * t[rows:] for w, t in zip(weights, tuned)) / sum(weights)])
    return out


def assert_by_hand(tensor, expected, key, rtol=1e-6, atol=1e-7):
    """Float32 arithmetic against float64: a few float32 roundings of the operands' size."""
    assert tensor.dtype == torch.float32 and tensor.shape == expected.shape, key
    torch.testing.assert_close(tensor.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def fisher_file(path, shapes, seed, low=0.0):
    """A diagonal Fisher for every `{name: shape}`: values in [low, 1) spread over orders of magnitude,
    every 7th exactly 0 (floored at epsilon by the method)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        values = low + (1 - low) * torch.rand(shape, generator=g).pow(4)
        if values.dim() and low == 0.0:
            values.view(-1)[::7] = 0.0
        tensors[key] = values.contiguous()
    save_file(tensors, path)
    return Path(path), tensors


def shapes_of(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items() if v.is_floating_point()}


def block_of(key):
    match = re.search(r"layers\.(\d+)\.", key)
    return int(match[1]) if match else None


# ---- each method by hand, on sharded OPT, Llama and CLIP ----------------------------------------


METHOD_CASES = {  # method, fine-tunes, weights, alpha
    "wise_ft": ("linear", ["a"], None, 0.3),
    "soup": ("linear", ["a", "b"], (1.0, 3.0), 0.6),
    "task_arithmetic": ("task_arithmetic", ["a", "b"], (0.5, 2.0), 0.7),
    "fisher": ("fisher", ["a"], None, 0.4),
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_method_against_float64_by_hand(models, tmp_path, family, case):
    m = models(family)
    method, tuned, weights, alpha = METHOD_CASES[case]
    options = {"method": method, "weights": weights, "max_shard_size": m["shard"]}
    fishers = {}
    if method == "fisher":
        ft_shapes = shapes_of(m["a_sd"])
        if family == "opt":  # named as the tied partner: read for the embeddings it shares
            ft_shapes["lm_head.weight"] = ft_shapes.pop(OPT_EMBED)
        pre_path, fishers["pre"] = fisher_file(tmp_path / "fisher_pre.safetensors", shapes_of(m["pre_sd"]), 1)
        ft_path, fishers["ft"] = fisher_file(tmp_path / "fisher_ft.safetensors", ft_shapes, 2)
        if family == "opt":
            fishers["ft"][OPT_EMBED] = fishers["ft"].pop("lm_head.weight")
        options["method_inputs"] = {"fisher_pre": pre_path, "fisher_finetuned": ft_path}
    out = merge(m["pre"], [m[t] for t in tuned], alpha, tmp_path / "out", MergeOptions(**options))

    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = read_weights(out)
    first = m[f"{tuned[0]}_sd"]
    assert set(merged) == set(first)
    if family == "opt":
        assert "lm_head.weight" not in merged  # tied: written once, as the inputs hold it
    grown = [k for k in merged if merged[k].shape != m["pre_sd"][k].shape]
    assert (len(grown) == {"opt": 1, "llama": 2, "clip": 0}[family]) and all(
        merged[k].shape[0] == GROWN for k in grown
    )
    for key, tensor in merged.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, m["pre_sd"][key]), key
            continue
        tensors = [m[f"{t}_sd"][key] for t in tuned]
        expected = by_hand(
            method,
            m["pre_sd"][key],
            tensors,
            alpha,
            weights,
            fishers.get("pre", {}).get(key),
            fishers.get("ft", {}).get(key),
        )
        assert_by_hand(tensor, expected, key, rtol=2e-6 if method == "fisher" else 1e-6)
        if key in grown and len(tuned) == 1:  # the added tokens: the fine-tuned rows, bit for bit
            assert torch.equal(tensor[VOCAB:], tensors[0][VOCAB:]), key

    if case == "wise_ft":
        assert not (out / "merge_config.json").exists()  # plain WiSE-FT writes what it wrote before methods
        return
    record = merge_config(out)
    assert record["method"] == method and record["formula"] == METHODS[method].formula
    assert record["weights"] == list(weights or [1.0])
    assert record["finetuned"] == ([str(m[t]) for t in tuned] if len(tuned) > 1 else str(m["a"]))
    assert record["alphas"] == {k: alpha for k, v in merged.items() if v.is_floating_point()}
    assert record["schedule"] == {"kind": "scalar", "alpha": alpha, "mean_alpha": alpha}
    assert record["inputs"] == {k: str(v) for k, v in options.get("method_inputs", {}).items()}
    assert "fallback" not in record
    if family == "opt":
        model = OPTForCausalLM.from_pretrained(out)
        assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
        assert torch.equal(model.lm_head.weight, merged[OPT_EMBED])


# ---- groups (HMA), rules, linear layers only ----------------------------------------------------


def test_one_group_is_scalar_wise_ft_bit_for_bit(models, tmp_path):
    m = models("llama")
    grouped = merge(
        m["pre"], m["a"], AlphaSchedule(group_alphas=(0.35,)), tmp_path / "grouped", MergeOptions(max_shard_size="8KB")
    )
    scalar = wise_ft(m["pre"], m["a"], 0.35, tmp_path / "scalar", max_shard_size="8KB")
    files = sorted(p.name for p in scalar.glob("model*"))
    assert len(files) > 2 and files == sorted(p.name for p in grouped.glob("model*"))
    for name in files:  # every shard and the index, byte for byte
        assert (grouped / name).read_bytes() == (scalar / name).read_bytes(), name
    assert set(merge_config(grouped)["alphas"].values()) == {0.35}


@pytest.mark.parametrize("outside", [None, 0.6])
def test_three_groups_on_six_blocks(models, tmp_path, outside):
    m = models("llama")
    groups = (0.0, 0.25, 0.875)  # mean 0.375, exact in binary
    schedule = AlphaSchedule(group_alphas=groups, outside_alpha=outside)
    out = merge(m["pre"], m["a"], schedule, tmp_path / "out", MergeOptions(max_shard_size="8KB"))
    merged = read_weights(out)
    outside_alpha = 0.375 if outside is None else outside
    expected_alphas = {}
    for key in merged:  # blocks 0-1: the first group, 2-3 the second, 4-5 the third
        expected_alphas[key] = outside_alpha if block_of(key) is None else groups[block_of(key) // 2]
    assert {block_of(k) for k in merged} == {None, 0, 1, 2, 3, 4, 5}
    record = merge_config(out)
    assert record["alphas"] == expected_alphas
    assert record["schedule"] == {
        "kind": "groups",
        "group_alphas": list(groups),
        "outside_alpha": outside_alpha,
        "mean_alpha": 0.375,
    }
    for key, tensor in merged.items():
        alpha = expected_alphas[key]
        assert_by_hand(tensor, by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], alpha), key)
        if alpha == 0.0:  # the input side's group at 0: the pre-trained tensors, bit for bit
            assert torch.equal(tensor, m["pre_sd"][key]), key
    assert {k for k, a in expected_alphas.items() if a == outside_alpha} == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    metadata, body = read_card(out)
    assert metadata["specgen_merge"]["schedule"] == record["schedule"]
    assert (
        f"3 groups of consecutive blocks, input side first: 0, 0.25, 0.875; outside the blocks: {outside_alpha:g}"
        in body
    )


def test_clip_towers_split_on_their_own(models, tmp_path):
    m = models("clip")
    groups = (0.2, 0.3, 0.7)
    out = merge(
        m["pre"], m["a"], AlphaSchedule(group_alphas=groups), tmp_path / "out", MergeOptions(max_shard_size="8KB")
    )
    merged = read_weights(out)
    record = merge_config(out)
    for key, tensor in merged.items():
        block = block_of(key)
        if key.startswith("text_model.encoder."):  # 3 blocks: one group each
            alpha = groups[block]
        elif key.startswith("vision_model.encoder."):  # 6 blocks: two per group
            alpha = groups[block // 2]
        else:  # embeddings, layer norms, projections, logit_scale
            assert block is None
            alpha = round(statistics.fmean(groups), 12)  # the mean, rounded as the schedule rounds it
        assert record["alphas"][key] == alpha, key
        assert_by_hand(tensor, by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], alpha), key)
    assert {block_of(k) for k in merged if k.startswith("text_model.")} == {None, 0, 1, 2}
    assert {block_of(k) for k in merged if k.startswith("vision_model.")} == {None, 0, 1, 2, 3, 4, 5}
    assert {"logit_scale", "visual_projection.weight", "text_projection.weight"} <= set(record["alphas"])


def test_rules_first_match_wins_with_a_default(models, tmp_path):
    m = models("opt")
    rules = ((r"fc1", 0.1), (r"layers\.1\.", 0.9), (r"self_attn\.q_proj", 0.3))
    out = merge(m["pre"], m["a"], AlphaSchedule(alpha=0.5, rules=rules), tmp_path / "out")
    merged = read_weights(out)
    record = merge_config(out)
    for key, tensor in merged.items():
        if ".fc1." in key:  # also layers.1.fc1: the first rule wins
            alpha = 0.1
        elif key.startswith("model.decoder.layers.1."):
            alpha = 0.9
        elif ".self_attn.q_proj." in key:
            alpha = 0.3
        else:
            alpha = 0.5
        assert record["alphas"][key] == alpha, key
        assert_by_hand(tensor, by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], alpha), key)
    assert record["alphas"]["model.decoder.layers.1.fc1.weight"] == 0.1
    assert record["alphas"]["model.decoder.layers.0.self_attn.q_proj.bias"] == 0.3
    assert record["schedule"] == {
        "kind": "rules",
        "rules": [list(r) for r in rules],
        "default_alpha": 0.5,
        "mean_alpha": 0.5,
    }
    assert (
        "rules, first match wins: `fc1` -> 0.1; `layers\\.1\\.` -> 0.9; `self_attn\\.q_proj` -> 0.3; others: 0.5"
        in read_card(out)[1]
    )


def test_linear_only_llama(models, tmp_path):
    """Only nn.Linear weights (attention, MLP, the untied lm_head) are averaged; embeddings and norms
    keep the fine-tuned tensors (non_linear_alpha 1 by default), bit for bit."""
    m = models("llama")
    out = merge(m["pre"], m["a"], AlphaSchedule(alpha=0.4, linear_only=True), tmp_path / "out")
    merged = read_weights(out)
    record = merge_config(out)
    linear = {
        f"{name}.weight"
        for name, module in LlamaForCausalLM.from_pretrained(m["pre"]).named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    assert "lm_head.weight" in linear and len(linear) == 6 * 7 + 1
    for key, tensor in merged.items():
        if key in linear:
            assert record["alphas"][key] == 0.4
            assert_by_hand(tensor, by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], 0.4), key)
        else:
            assert key.endswith(("norm.weight", "layernorm.weight")) or key == "model.embed_tokens.weight", key
            assert record["alphas"][key] == 1.0
            assert torch.equal(tensor, m["a_sd"][key]), key
    assert record["schedule"] == {
        "kind": "scalar",
        "alpha": 0.4,
        "linear_only": True,
        "non_linear_alpha": 1.0,
        "mean_alpha": 0.4,
    }


def test_linear_only_with_groups_opt(models, tmp_path):
    """OPT: biases, layer norms and the (tied) embeddings get non_linear_alpha; the stored tensor of the
    tied lm_head is the input embedding, which counts as an embedding."""
    m = models("opt")
    schedule = AlphaSchedule(group_alphas=(0.2, 0.6), linear_only=True, non_linear_alpha=0.0)
    out = merge(m["pre"], m["a"], schedule, tmp_path / "out")
    merged = read_weights(out)
    record = merge_config(out)
    projections = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    for key, tensor in merged.items():
        if key.endswith(".weight") and key.split(".")[-2] in projections:
            alpha = (0.2, 0.6)[block_of(key)]
        else:
            alpha = 0.0
        assert record["alphas"][key] == alpha, key
        assert_by_hand(tensor, by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], alpha), key)
        if alpha == 0.0 and key != OPT_EMBED:
            assert torch.equal(tensor, m["pre_sd"][key]), key
    assert torch.equal(merged[OPT_EMBED][:VOCAB], m["pre_sd"][OPT_EMBED])  # added tokens: the fine-tuned rows
    assert torch.equal(merged[OPT_EMBED][VOCAB:], m["a_sd"][OPT_EMBED][VOCAB:])
    assert sum(a == 0.0 for a in record["alphas"].values()) == len(merged) - 12


# ---- Fisher-weighted averaging ------------------------------------------------------------------


def fisher_options(fisher_pre, fisher_ft, **params):
    return MergeOptions(
        method="fisher", method_inputs={"fisher_pre": fisher_pre, "fisher_finetuned": fisher_ft}, method_params=params
    )


def test_fisher_with_equal_fishers_is_linear(models, tmp_path):
    """(a F x + (1 - a) F y) / (a F + (1 - a) F) = a x + (1 - a) y: equal up to float32 rounding (of the
    Fisher weights and of the interpolation), a few units of the last place of a |x| + (1 - a) |y|."""
    m = models("clip")
    alpha = 0.3
    path, _ = fisher_file(tmp_path / "fisher.safetensors", shapes_of(m["pre_sd"]), 3)
    fisher = read_weights(merge(m["pre"], m["a"], alpha, tmp_path / "fisher", fisher_options(path, path)))
    linear = read_weights(wise_ft(m["pre"], m["a"], alpha, tmp_path / "linear"))
    assert set(fisher) == set(linear)
    exact = 0
    for key, tensor in fisher.items():
        pre, ft = m["pre_sd"][key].double(), m["a_sd"][key].double()
        bound = 8 * EPS32 * (alpha * ft.abs() + (1 - alpha) * pre.abs())
        assert ((tensor.double() - linear[key].double()).abs() <= bound).all(), key
        exact += int((tensor == linear[key]).sum())
    assert exact > 0.5 * sum(t.numel() for t in fisher.values())  # most elements are the same float32


def test_fisher_zero_on_a_tensor_returns_the_pretrained_tensor(models, tmp_path):
    """F_ft = 0 on a tensor: theta - theta_pre = a eps (theta_ft - theta_pre) / (a eps + (1 - a) F_pre),
    with F_pre >= 0.5 and eps = 1e-8 at most 2e-8 |theta_ft - theta_pre| (a = 0.5), below float32's
    rounding of theta_pre: within that plus 2 eps32 |theta_pre| (a few roundings of half a unit). With eps = 0.01
    the same formula, by hand."""
    m = models("clip")
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    alpha = 0.5
    pre_path, f_pre = fisher_file(tmp_path / "pre.safetensors", shapes_of(m["pre_sd"]), 4, low=0.5)
    ft_path, f_ft = fisher_file(tmp_path / "ft.safetensors", shapes_of(m["a_sd"]), 5)
    f_ft[key] = torch.zeros_like(f_ft[key])
    save_file(f_ft, ft_path)
    merged = read_weights(merge(m["pre"], m["a"], alpha, tmp_path / "out", fisher_options(pre_path, ft_path)))
    pre, ft = m["pre_sd"][key].double(), m["a_sd"][key].double()
    deviation = (merged[key].double() - pre).abs()
    formula = alpha * 1e-8 * (ft - pre).abs() / ((1 - alpha) * f_pre[key].double())
    assert (formula <= 2e-8 * (ft - pre).abs()).all()
    assert (deviation <= formula + 2 * EPS32 * pre.abs()).all()
    assert not torch.equal(merged[key], m["a_sd"][key]) and (ft - pre).abs().min() > 0
    other = "text_model.encoder.layers.1.mlp.fc2.weight"  # a Fisher elsewhere: weighted, away from theta_pre
    assert_by_hand(
        merged[other],
        by_hand("fisher", m["pre_sd"][other], [m["a_sd"][other]], alpha, None, f_pre[other], f_ft[other]),
        other,
        rtol=2e-6,
    )
    assert (merged[other].double() - m["pre_sd"][other].double()).abs().max() > 1e-3

    coarse = read_weights(
        merge(m["pre"], m["a"], alpha, tmp_path / "coarse", fisher_options(pre_path, ft_path, epsilon=0.01))
    )
    expected = by_hand("fisher", m["pre_sd"][key], [m["a_sd"][key]], alpha, None, f_pre[key], f_ft[key], epsilon=0.01)
    assert_by_hand(coarse[key], expected, key, rtol=2e-6)
    assert (coarse[key].double() - pre).abs().max() > 1e-4  # the floor's effect, now visible
    assert merge_config(tmp_path / "coarse")["parameters"] == {"epsilon": 0.01}
    assert merge_config(tmp_path / "out")["parameters"] == {"epsilon": 1e-8}


def test_a_training_runs_ewc_fisher_is_accepted_as_fisher_pre(tmp_path):
    """SpecGenTrainer with EWC saves its Fisher (`ewc.fisher.<parameter>`, at the pre-trained weights)
    in each checkpoint's specgen_regularizers.safetensors: as fisher_pre, by file or by directory."""
    pre_dir = save(tiny_opt(0), tmp_path / "pre")
    args = make_args(
        tmp_path / "run", ewc_lambda=1.0, ewc_num_samples=8, max_steps=2, save_strategy="steps", save_steps=2
    )
    SpecGenTrainer(model=tiny_opt(0), args=args, train_dataset=lm_dataset(8)).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    state_path = checkpoint / "specgen_regularizers.safetensors"
    state = load_file(state_path)
    ewc = {k.removeprefix("ewc.fisher."): v for k, v in state.items() if k.startswith("ewc.fisher.")}
    ft_sd, pre_sd = read_weights(checkpoint), read_weights(pre_dir)
    assert set(ewc) == set(ft_sd) == set(pre_sd) and sum(float(f.sum()) for f in ewc.values()) > 0
    ft_path, f_ft = fisher_file(tmp_path / "fisher_ft.safetensors", shapes_of(ft_sd), 6)
    alpha = 0.4
    out = merge(pre_dir, checkpoint, alpha, tmp_path / "out", fisher_options(state_path, ft_path))
    merged = read_weights(out)
    assert set(merged) == set(ft_sd)
    for key, tensor in merged.items():
        expected = by_hand("fisher", pre_sd[key], [ft_sd[key]], alpha, None, ewc[key], f_ft[key])
        assert_by_hand(tensor, expected, key, rtol=2e-6)
    record = merge_config(out)
    assert (
        record["inputs"] == {"fisher_pre": str(state_path), "fisher_finetuned": str(ft_path)}
        and "fallback" not in record
    )
    linear = read_weights(wise_ft(pre_dir, checkpoint, alpha, tmp_path / "linear"))
    assert any(not torch.allclose(merged[k], linear[k], rtol=1e-4) for k in merged)  # the Fisher does weigh
    by_directory = merge(pre_dir, checkpoint, alpha, tmp_path / "by_dir", fisher_options(checkpoint, ft_path))
    again = read_weights(by_directory)
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    message = (
        "a training run's EWC Fisher is the pre-trained model's (estimated at theta_pre), given as "
        "fisher_finetuned (--fisher-finetuned)"
    )
    with pytest.warns(MergeWarning, match=re.escape(message)):  # the other way round: merged, with a warning
        merge(pre_dir, checkpoint, alpha, tmp_path / "swapped", fisher_options(ft_path, state_path))


def test_tensors_the_fisher_files_lack_fall_back_to_linear(models, tmp_path):
    m = models("opt")
    alpha = 0.3
    lacking = {
        "pre": "model.decoder.layers.0.fc1.weight",  # in fisher_finetuned only
        "ft": "model.decoder.layers.1.self_attn.k_proj.bias",  # in fisher_pre only
        "both": "model.decoder.final_layer_norm.weight",
    }
    pre_shapes, ft_shapes = shapes_of(m["pre_sd"]), shapes_of(m["a_sd"])
    for key in (lacking["pre"], lacking["both"]):
        pre_shapes.pop(key)
    for key in (lacking["ft"], lacking["both"]):
        ft_shapes.pop(key)
    pre_path, f_pre = fisher_file(tmp_path / "pre.safetensors", pre_shapes, 7)
    ft_path, f_ft = fisher_file(tmp_path / "ft.safetensors", ft_shapes, 8)
    out = merge(m["pre"], m["a"], alpha, tmp_path / "out", fisher_options(pre_path, ft_path))
    merged = read_weights(out)
    for key, tensor in merged.items():
        if key in lacking.values():
            expected = by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], alpha)
        else:
            expected = by_hand("fisher", m["pre_sd"][key], [m["a_sd"][key]], alpha, None, f_pre[key], f_ft[key])
        assert_by_hand(tensor, expected, key, rtol=2e-6)
    record = merge_config(out)
    assert record["method"] == "fisher"
    assert record["fallback"]["method"] == "linear"
    assert sorted(record["fallback"]["tensors"]) == sorted(lacking.values())
    assert record["fallback"]["missing"] == {"fisher_pre": 2, "fisher_finetuned": 2}
    assert "- merged with linear: 3 tensors (no fisher_pre for 2, no fisher_finetuned for 2)" in read_card(out)[1]


def test_integer_tensors_are_copied_with_no_alpha_and_no_fallback(tmp_path):
    """Integer and bool tensors are copied (equal in both models): merge_config.json gives them no alpha,
    and a Fisher file need not cover them (they are not merged by the fallback either)."""
    pre = write_checkpoint(tmp_path / "pre", rule_tensors(0), {})
    ft = write_checkpoint(tmp_path / "ft", rule_tensors(1), {})
    path, fisher = fisher_file(tmp_path / "fisher.safetensors", {"w": (4, 3)}, 12)
    out = merge(pre, ft, 0.5, tmp_path / "out", fisher_options(path, path))
    merged, record = read_weights(out), merge_config(out)
    assert record["alphas"] == {"w": 0.5} and "fallback" not in record
    assert "merged with linear" not in read_card(out)[1]
    assert torch.equal(merged["steps"], rule_tensors(0)["steps"]) and torch.equal(
        merged["mask"], rule_tensors(0)["mask"]
    )
    w = by_hand("fisher", rule_tensors(0)["w"], [rule_tensors(1)["w"]], 0.5, None, fisher["w"], fisher["w"])
    assert_by_hand(merged["w"], w, "w", rtol=2e-6)
    ruled = merge(pre, ft, AlphaSchedule(alpha=0.5, rules=((r"^w$", 0.2),)), tmp_path / "ruled")
    assert merge_config(ruled)["alphas"] == {"w": 0.2}


# ---- soups and task arithmetic ------------------------------------------------------------------


def test_uniform_soup_of_two_is_linear_halfway_between_them(models, tmp_path):
    m = models("opt")
    soup = read_weights(merge(m["pre"], [m["a"], m["b"]], 1.0, tmp_path / "soup"))
    halfway = read_weights(wise_ft(m["a"], m["b"], 0.5, tmp_path / "halfway"))
    assert set(soup) == set(halfway) == set(m["a_sd"])
    for key, tensor in soup.items():
        a, b = m["a_sd"][key].double(), m["b_sd"][key].double()
        assert_by_hand(tensor, 0.5 * a + 0.5 * b, key)  # the pre-trained model plays no part at alpha 1
        bound = 2 * EPS32 * (a.abs() + b.abs())  # one rounding each way: 0.5 a + 0.5 b against b - 0.5 (b - a)
        assert ((tensor.double() - halfway[key].double()).abs() <= bound).all(), key
    record = merge_config(tmp_path / "soup")
    assert record["weights"] == [1.0, 1.0] and record["finetuned"] == [str(m["a"]), str(m["b"])]
    metadata, body = read_card(tmp_path / "soup")
    assert f"- finetuned: `{m['a']}` (weight 1)" in body and f"- finetuned: `{m['b']}` (weight 1)" in body


def test_greedy_soup_keeps_exactly_the_models_it_should(tmp_path):
    """The score is a known function of the state dict: -|w - 2|, w the soup's (uniform mean's) value.
    Individually a = 1 and b = 3 score -1, c = -1 scores -3, d = 10 scores -8: ranked a, b (a tie keeps
    the given order), c, d. The soup [a] scores -1; [a, b] has w = 2, score 0: kept; [a, b, c] has
    w = 1, score -1: refused; [a, b, d] has w = 14/3, score -8/3: refused."""
    pre = write_checkpoint(tmp_path / "pre", {"w": torch.zeros(3)}, {})
    values = {"a": 1.0, "b": 3.0, "c": -1.0, "d": 10.0}
    dirs = {name: write_checkpoint(tmp_path / name, {"w": torch.full((3,), v)}, {}) for name, v in values.items()}
    seen = []

    def evaluate(state_dict):
        seen.append(state_dict["w"].clone())
        return -abs(float(state_dict["w"][0]) - 2.0)

    order = [dirs[n] for n in ("c", "a", "d", "b")]  # given out of rank order: a precedes b among the ties
    soup = greedy_soup(pre, order, evaluate)
    name = {str(d): n for n, d in dirs.items()}
    assert [name[i] for i in soup.ingredients] == ["a", "b"]
    assert soup.score == 0.0
    assert {name[k]: v for k, v in soup.individual.items()} == {"a": -1.0, "b": -1.0, "c": -3.0, "d": -8.0}
    tried = [([name[i] for i in ingredients], score) for ingredients, score in soup.tried]
    assert tried == [
        (["a"], -1.0),
        (["a", "b"], 0.0),
        (["a", "b", "c"], pytest.approx(-1.0, abs=1e-6)),
        (["a", "b", "d"], pytest.approx(-8 / 3, abs=1e-6)),
    ]
    assert len(seen) == 4 + 3 and all(s.dtype == torch.float32 and s.shape == (3,) for s in seen)
    with pytest.raises(MergeError, match="uniformly"):
        greedy_soup(pre, order, evaluate, MergeOptions(weights=(1, 1, 1, 1)))
    # writing the soup it found: the uniform mean
    out = read_weights(merge(pre, soup.ingredients, 1.0, tmp_path / "soup"))
    assert torch.equal(out["w"], torch.full((3,), 2.0))


# ---- LoRA under heterogeneous alphas ------------------------------------------------------------


LORA_CONFIG = {**LORA_CONFIGS["rank_pattern"], "modules_to_save": ["fc2"]}  # per-module ranks and scales


def test_lora_full_merge_with_group_alphas(tmp_path):
    """W0 + alpha_module * scale * B @ A for every adapted weight, alpha that of the module's block."""
    base_dir, adapter_dir, model = adapted(tmp_path, **LORA_CONFIG)
    groups = (0.25, 0.75)
    out = merge(base_dir, adapter_dir, AlphaSchedule(group_alphas=groups), tmp_path / "out")
    merged, base_sd = read_weights(out), read_weights(base_dir)
    layers, full = lora_weights(model), trained_full(model)
    assert len(layers) == 4 and {layers[k].scaling[ADAPTER] for k in layers} == {0.75, 0.5, 4.0}
    assert set(merged) == set(base_sd)
    for key, tensor in merged.items():
        if key in layers:
            with torch.no_grad():
                delta = layers[key].get_delta_weight(ADAPTER).double()
            expected = base_sd[key].double() + groups[block_of(key)] * delta
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6)
        elif key in full:  # modules_to_save: interpolated at its block's alpha
            assert_by_hand(tensor, by_hand("linear", base_sd[key], [full[key]], groups[block_of(key)]), key)
        else:
            assert torch.equal(tensor, base_sd[key]), key
    record = merge_config(out)
    assert record["alphas"] == {k: groups[block_of(k)] for k in [*layers, *full]}


def test_lora_keep_adapter_scales_per_module(tmp_path):
    """An adapter whose effect is alpha_module times the original one, per module: peft loads it and its
    delta weights are the scaled ones; modules_to_save interpolated at their own alpha."""
    base_dir, adapter_dir, model = adapted(tmp_path, **LORA_CONFIG)
    schedule = AlphaSchedule(alpha=0.7, rules=((r"q_proj", 0.2), (r"layers\.1\.fc2", 0.4)))
    out = merge(base_dir, adapter_dir, schedule, tmp_path / "out", MergeOptions(keep_adapter=True))
    assert (out / "adapter_config.json").read_bytes() == (adapter_dir / "adapter_config.json").read_bytes()
    loaded = PeftModel.from_pretrained(tiny_opt(), out)
    original, scaled = lora_weights(model), lora_weights(loaded)
    assert original.keys() == scaled.keys()

    def alpha_of(key):
        return 0.2 if "q_proj" in key else 0.4 if "layers.1.fc2" in key else 0.7

    with torch.no_grad():
        for key, layer in scaled.items():
            torch.testing.assert_close(
                layer.get_delta_weight(ADAPTER).double(),
                alpha_of(key) * original[key].get_delta_weight(ADAPTER).double(),
                rtol=1e-6,
                atol=1e-7,
            )
    base_sd, full = read_weights(base_dir), trained_full(model)
    loaded_full = trained_full(loaded, like=model)
    assert loaded_full.keys() == full.keys() and len(full) == 4
    for key, tensor in full.items():
        assert_by_hand(loaded_full[key], by_hand("linear", base_sd[key], [tensor], alpha_of(key)), key)
    record = merge_config(out)
    lora_b = [k for k in record["alphas"] if "lora_B" in k]
    assert len(lora_b) == 4 and not any("lora_A" in k for k in record["alphas"])
    assert all(record["alphas"][k] == alpha_of(k) for k in record["alphas"])


@pytest.mark.parametrize("method", ["fisher", "task_arithmetic"])
def test_adapter_refused_for_methods_without_a_low_rank_form(tmp_path, method):
    base_dir, adapter_dir, _ = adapted(tmp_path)
    options = MergeOptions(method=method)
    if method == "fisher":
        path, _ = fisher_file(tmp_path / "fisher.safetensors", shapes_of(read_weights(base_dir)), 9)
        options = fisher_options(path, path)
    message = (
        f"{adapter_dir}: method '{method}' has no exact form on a LoRA adapter: merge the adapter into the full "
        "model first (specgen merge --alpha 1) and pass that"
    )
    with pytest.raises(MergeError, match=f"^{re.escape(message)}$"):
        merge(base_dir, adapter_dir, 0.5, tmp_path / "out", options)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---- bad input: a MergeError before anything is written -----------------------------------------


def _fisher_inputs(m, tmp_path, edit=None):
    pre_shapes, ft_shapes = shapes_of(m["pre_sd"]), shapes_of(m["a_sd"])
    if edit is not None:
        edit(pre_shapes, ft_shapes)
    pre_path, _ = fisher_file(tmp_path / "fisher_pre.safetensors", pre_shapes, 10)
    ft_path, _ = fisher_file(tmp_path / "fisher_ft.safetensors", ft_shapes, 11)
    return {"fisher_pre": pre_path, "fisher_finetuned": ft_path}


def _extra_name(pre, ft):
    pre["model.decoder.layers.9.fc1.weight"] = (32, 16)


def _transposed(pre, ft):
    ft["model.decoder.layers.0.fc1.weight"] = (16, 32)


BAD = {  # family, fine-tunes, alpha or schedule, options (a callable for Fisher inputs), message
    "more_groups_than_blocks": (
        "llama",
        ["a"],
        AlphaSchedule(group_alphas=(0.1,) * 7),
        {},
        "group alphas (--group-alphas): 7 groups, but model.layers has only 6 blocks",
    ),
    "more_groups_than_text_blocks": (
        "clip",
        ["a"],
        AlphaSchedule(group_alphas=(0.1, 0.2, 0.3, 0.4)),
        {},
        "group alphas (--group-alphas): 4 groups, but text_model.encoder.layers has only 3 blocks",
    ),
    "rule_matches_nothing": (
        "opt",
        ["a"],
        AlphaSchedule(alpha=0.5, rules=((r"fc1", 0.1), (r"lora_", 0.2))),
        {},
        "alpha rule 'lora_' (--alpha-rule) matches no tensor of the model",
    ),
    "invalid_regex": (
        "opt",
        ["a"],
        AlphaSchedule(alpha=0.5, rules=((r"fc1(", 0.1),)),
        {},
        "alpha rule 'fc1(' is not a regular expression (missing ), unterminated subpattern at position 3)",
    ),
    "fisher_unknown_name": (
        "opt",
        ["a"],
        0.5,
        {"method": "fisher", "method_inputs": _extra_name},
        "names tensors the checkpoints do not have: model.decoder.layers.9.fc1.weight",
    ),
    "fisher_wrong_shape": (
        "opt",
        ["a"],
        0.5,
        {"method": "fisher", "method_inputs": _transposed},
        "model.decoder.layers.0.fc1.weight has shape (16, 32), the finetuned tensor (32, 16)",
    ),
    "weights_sum_to_zero": (
        "opt",
        ["a", "b"],
        0.5,
        {"weights": (1.0, -1.0)},
        "weights (--weights) must be finite numbers summing to a positive number, got [1.0, -1.0]",
    ),
    "negative_weights": (
        "opt",
        ["a", "b"],
        0.5,
        {"method": "task_arithmetic", "weights": (-1.0, -2.0)},
        "weights (--weights) must be finite numbers summing to a positive number, got [-1.0, -2.0]",
    ),
    "wrong_number_of_weights": (
        "opt",
        ["a", "b"],
        0.5,
        {"weights": (1.0, 2.0, 3.0)},
        "weights (--weights): 3 given for 2 fine-tuned model(s)",
    ),
    "unknown_method": (
        "opt",
        ["a"],
        0.5,
        {"method": "ties"},
        "unknown merge method 'ties'; known: linear, task_arithmetic, fisher",
    ),
    "unknown_parameter": (
        "opt",
        ["a"],
        0.5,
        {"method": "linear", "method_params": {"epsilon": 1e-6}},
        "method 'linear' has no parameter 'epsilon' (its parameters: none)",
    ),
    "bad_parameter": (
        "opt",
        ["a"],
        0.5,
        {"method": "fisher", "method_params": {"epsilon": 0.0}, "method_inputs": None},
        "fisher parameter 'epsilon' must be a positive number, got 0.0",
    ),
    "missing_input": (
        "opt",
        ["a"],
        0.5,
        {"method": "fisher", "method_inputs": lambda inputs: {"fisher_pre": inputs["fisher_pre"]}},
        "method 'fisher' needs fisher_finetuned (--fisher-finetuned)",
    ),
    "unknown_input": (
        "opt",
        ["a"],
        0.5,
        {"method": "linear", "method_inputs": lambda inputs: {"fisher_pre": inputs["fisher_pre"]}},
        "method 'linear' takes no input 'fisher_pre' (its inputs: none)",
    ),
    "groups_and_alpha": (
        "llama",
        ["a"],
        AlphaSchedule(alpha=0.5, group_alphas=(0.1, 0.2)),
        {},
        "give either alpha (--alpha) or group alphas (--group-alphas), not both",
    ),
    "fisher_two_finetuned": (
        "opt",
        ["a", "b"],
        0.5,
        {"method": "fisher", "method_inputs": None},
        "method 'fisher' merges 1 fine-tuned model(s), got 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(models, tmp_path, nothing_written, case):
    family, tuned, alpha, options, message = BAD[case]
    m = models(family)
    options = dict(options)
    inputs = options.get("method_inputs", {})
    if inputs is None:  # well-formed Fisher files
        options["method_inputs"] = _fisher_inputs(m, tmp_path)
    elif inputs in (_extra_name, _transposed):
        options["method_inputs"] = _fisher_inputs(m, tmp_path, inputs)
    elif callable(inputs):
        options["method_inputs"] = inputs(_fisher_inputs(m, tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MergeError) as error:
        merge(m["pre"], [m[t] for t in tuned], alpha, tmp_path / "out", MergeOptions(**options))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == before
    shape = alpha if isinstance(alpha, AlphaSchedule) else None  # the same through a sweep
    with pytest.raises(MergeError, match=re.escape(message)):
        merge_sweep(
            m["pre"], [m[t] for t in tuned], [0.1, 0.2], tmp_path / "sweep", MergeOptions(**options), shape=shape
        )
    assert not (tmp_path / "sweep").exists()


# ---- sweeps over a group shape ------------------------------------------------------------------


def test_sweep_with_a_group_shape(models, tmp_path):
    m = models("llama")
    shape = AlphaSchedule(group_alphas=(0.1, 0.2, 0.3))
    means = [0.2, 0.4]
    outs = merge_sweep(m["pre"], m["a"], means, tmp_path / "sweep", MergeOptions(max_shard_size="8KB"), shape=shape)
    assert outs == {0.2: tmp_path / "sweep" / "alpha-0.2", 0.4: tmp_path / "sweep" / "alpha-0.4"}
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["alpha-0.2", "alpha-0.4", "specgen_merge.json"]
    marker = json.loads((tmp_path / "sweep" / "specgen_merge.json").read_text())
    assert marker["alphas"] == means and marker["method"] == "linear"
    assert marker["shape"]["kind"] == "groups" and marker["shape"]["group_alphas"] == [0.1, 0.2, 0.3]
    for mean, out in outs.items():
        record = merge_config(out)
        groups = record["schedule"]["group_alphas"]
        assert groups == pytest.approx([0.1 * mean / 0.2, 0.2 * mean / 0.2, 0.3 * mean / 0.2], rel=1e-12)
        assert record["schedule"]["mean_alpha"] == pytest.approx(mean, rel=1e-12)
        assert record["schedule"]["outside_alpha"] == record["schedule"]["mean_alpha"]
        merged = read_weights(out)
        for key, tensor in merged.items():
            alpha = record["schedule"]["outside_alpha"] if block_of(key) is None else groups[block_of(key) // 2]
            assert record["alphas"][key] == alpha, key
            assert_by_hand(tensor, by_hand("linear", m["pre_sd"][key], [m["a_sd"][key]], alpha), key)
        single = read_weights(merge(m["pre"], m["a"], shape.at_mean(mean), tmp_path / f"single-{mean}"))
        assert all(torch.equal(single[k], merged[k]) for k in merged)
        own = json.loads((out / "specgen_merge.json").read_text())
        assert own["method"] == "linear" and own["schedule"] == record["schedule"]
        metadata, body = read_card(out)
        assert metadata["tags"] == ["hf_specgen", "wise-ft", "merge"]
        assert (
            metadata["specgen_merge"]["method"] == "linear"
            and metadata["specgen_merge"]["schedule"] == record["schedule"]
        )
        assert f"# linear merge, mean alpha = {mean:g}" in body
        assert f"`{METHODS['linear'].formula}`" in body
        scaled = ", ".join(f"{a:g}" for a in groups)
        assert (
            f"- schedule: 3 groups of consecutive blocks, input side first: {scaled}; outside the blocks: {mean:g}"
            in body
        )
        assert f"| `model.layers.5.mlp.down_proj.weight` | {groups[2]:g} |" in body


# ---- a method registered here -------------------------------------------------------------------


@pytest.fixture
def sign_step():
    """`sign_step`: theta = theta_pre + alpha * beta * sign(theta_ft - theta_pre), unregistered afterwards."""

    @register_method(
        "sign_step",
        formula="theta = theta_pre + alpha * beta * sign(theta_ft - theta_pre)",
        parameters={"beta": Parameter(0.01, "step size", positive=True)},
        max_finetuned=1,
        tags=("sign-step", "merge"),
    )
    def sign_step(pre, finetuned, *, alpha, weights, beta):
        """A step of beta toward the fine-tuned model, element by element."""
        (ft,) = finetuned
        return pre.float() + alpha * beta * torch.sign(ft.float() - pre.float())

    yield "sign_step"
    METHODS.pop("sign_step")


def test_a_method_registered_in_one_function_works_end_to_end(models, tmp_path, sign_step):
    m = models("opt")
    options = MergeOptions(method=sign_step, method_params={"beta": 0.02}, max_shard_size="4KB")
    schedule = AlphaSchedule(group_alphas=(0.5, 1.0))
    out = merge(m["pre"], m["a"], schedule, tmp_path / "out", options)
    merged = read_weights(out)
    assert set(merged) == set(m["a_sd"])
    for key, tensor in merged.items():
        pre, ft = m["pre_sd"][key].double(), m["a_sd"][key].double()
        alpha = 0.75 if block_of(key) is None else (0.5, 1.0)[block_of(key)]
        rows = pre.shape[0]
        expected = pre + alpha * 0.02 * torch.sign(ft[:rows] - pre)
        if key == OPT_EMBED:  # added tokens: the fine-tuned rows
            expected = torch.cat([expected, ft[rows:]])
        assert_by_hand(tensor, expected, key)
    record = merge_config(out)
    assert record["method"] == "sign_step" and record["parameters"] == {"beta": 0.02}
    assert record["formula"] == "theta = theta_pre + alpha * beta * sign(theta_ft - theta_pre)"
    metadata, body = read_card(out)
    assert metadata["tags"] == ["hf_specgen", "sign-step", "merge"] and "# sign_step merge, mean alpha = 0.75" in body
    ((_, state),) = list(iter_merge(m["pre"], m["a"], [0.5], MergeOptions(method=sign_step)))  # beta's default
    key = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(state[key], m["pre_sd"][key] + 0.5 * 0.01 * torch.sign(m["a_sd"][key] - m["pre_sd"][key]))
    with pytest.raises(MergeError, match="method 'sign_step' merges 1 fine-tuned model"):
        merge(m["pre"], [m["a"], m["b"]], 0.5, tmp_path / "two", options)
    with pytest.raises(MergeError, match="sign_step parameter 'beta' must be a positive number"):
        merge(m["pre"], m["a"], 0.5, tmp_path / "bad", MergeOptions(method=sign_step, method_params={"beta": -1.0}))


def test_registered_method_was_removed():
    """The method registered above is gone (its fixture pops it): other tests see the built-in ones."""
    assert "sign_step" not in METHODS and list(METHODS)[:3] == ["linear", "task_arithmetic", "fisher"]


# ---- found by a new user's trial ------------------------------------------------------------------


def test_keep_adapter_counts_the_blocks_of_the_base_model(tmp_path):
    """An adapter on blocks 0-1 of a 4-block model: with two groups both blocks are in the input group, for
    the written adapter as for the full merge (the adapter's own names showed only 2 blocks)."""
    base_dir, adapter_dir, _ = adapted(tmp_path, build=lambda: tiny_llama(layers=4), layers_to_transform=[0, 1])
    groups = AlphaSchedule(group_alphas=(0.2, 0.6))
    full = merge_config(merge(base_dir, adapter_dir, groups, tmp_path / "full"))["alphas"]
    kept = merge_config(merge(base_dir, adapter_dir, groups, tmp_path / "kept", MergeOptions(keep_adapter=True)))[
        "alphas"
    ]
    adapted_weights = {k for k in full if re.search(r"layers\.[01]\.self_attn\.[qv]_proj", k)}
    assert len(adapted_weights) == 4 and all(full[k] == 0.2 for k in adapted_weights)
    assert len(kept) == 4 and all(k.endswith("lora_B.weight") and a == 0.2 for k, a in kept.items())
    three = AlphaSchedule(group_alphas=(0.2, 0.4, 0.6))  # 3 groups of 4 blocks: blocks 0 and 1 in groups 0 and 0
    kept = merge_config(merge(base_dir, adapter_dir, three, tmp_path / "three", MergeOptions(keep_adapter=True)))[
        "alphas"
    ]
    assert all(a == 0.2 for a in kept.values())
    rule = AlphaSchedule(alpha=0.5, rules=((r"mlp\.", 0.1),))  # matches the model, not the adapter: accepted
    kept = merge_config(merge(base_dir, adapter_dir, rule, tmp_path / "rule", MergeOptions(keep_adapter=True)))[
        "alphas"
    ]
    assert set(kept.values()) == {0.5}


def test_fisher_refuses_alphas_outside_0_1_even_with_extrapolate(models, tmp_path, nothing_written):
    m = models("opt")
    options = MergeOptions(method="fisher", method_inputs=_fisher_inputs(m, tmp_path), extrapolate=True)
    message = (
        "method 'fisher' is defined for alphas in [0, 1] only, extrapolate or not; got 2 (a F_ft and (1 - a) "
        "F_pre must both be non-negative, or the denominator can vanish)"
    )
    with pytest.raises(MergeError, match=f"^{re.escape(message)}$"):
        merge(m["pre"], m["a"], 2.0, tmp_path / "out", options)
    with pytest.raises(MergeError, match=re.escape("got -0.5")):
        merge(m["pre"], m["a"], AlphaSchedule(alpha=0.5, rules=(("fc1", -0.5),)), tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("value", "shown"), [(-1.0, "min -1, max 1"), (float("nan"), "min nan, max nan"), (float("inf"), "min 0, max inf")]
)
def test_fisher_values_that_are_negative_nan_or_inf_are_refused_and_nothing_is_left(models, tmp_path, value, shown):
    """A Fisher diagonal is finite and non-negative: anything else (e.g. the weights file passed by
    mistake) was floored at epsilon or made the pre-trained value win, silently."""
    m = models("opt")
    inputs = _fisher_inputs(m, tmp_path)
    bad = load_file(inputs["fisher_finetuned"])
    key = "model.decoder.layers.1.fc1.weight"
    bad[key] = torch.ones_like(bad[key])
    bad[key][0, 0] = value if value != float("inf") else value
    if value == float("inf"):
        bad[key][0, 1] = 0.0
    save_file(bad, inputs["fisher_finetuned"])
    with pytest.raises(MergeError) as error:
        merge(m["pre"], m["a"], 0.5, tmp_path / "out", MergeOptions(method="fisher", method_inputs=inputs))
    assert str(error.value) == (
        f"{key}: fisher_finetuned (--fisher-finetuned) holds negative, NaN or inf values ({shown}); "
        "method 'fisher' needs finite, non-negative ones"
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_negative_share_of_a_soup_needs_extrapolate(models, tmp_path):
    m = models("opt")
    with pytest.raises(MergeError, match=re.escape("a negative share of method 'linear''s mean extrapolates")):
        merge(m["pre"], [m["a"], m["b"]], 1.0, tmp_path / "out", MergeOptions(weights=(1.0, -0.5)))
    assert not (tmp_path / "out").exists()
    out = read_weights(
        merge(m["pre"], [m["a"], m["b"]], 1.0, tmp_path / "x", MergeOptions(weights=(1.0, -0.5), extrapolate=True))
    )
    key = "model.decoder.layers.0.fc1.weight"
    assert_by_hand(out[key], 2 * m["a_sd"][key].double() - m["b_sd"][key].double(), key)  # (A - B / 2) / (1 / 2)
    options = MergeOptions(method="task_arithmetic", weights=(1.0, -0.5))  # a negated task vector: no extrapolation
    out = read_weights(merge(m["pre"], [m["a"], m["b"]], 1.0, tmp_path / "ta", options))
    pre = m["pre_sd"][key].double()
    assert_by_hand(out[key], pre + (m["a_sd"][key].double() - pre) - 0.5 * (m["b_sd"][key].double() - pre), key)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: AlphaSchedule(alpha=0.5, rules=("fc1=0.3",)),
            "an alpha rule is a (regular expression, alpha) pair, got 'fc1=0.3'",
        ),
        (lambda: AlphaSchedule(group_alphas="0.1,0.2"), "group_alphas and rules take sequences"),
        (lambda: AlphaSchedule(alpha=0.5, rules=(("", 0.3),)).check(False), "alpha rule '' (--alpha-rule) is empty"),
    ],
)
def test_malformed_schedules_are_one_merge_error(build, message):
    with pytest.raises(MergeError, match=re.escape(message)):
        build()


def test_a_sweep_says_which_scaled_group_alpha_is_out_of_range(models, tmp_path):
    m = models("llama")
    message = (
        "the group shape scaled to mean alpha 0.8 is 0.533333, 1.06667: group alpha 2 must be in [0, 1] (0: "
        "pretrained, 1: finetuned), got 1.06666666667"
    )
    with pytest.raises(MergeError, match=f"^{re.escape(message)}"):
        merge_sweep(m["pre"], m["a"], [0.2, 0.8], tmp_path / "sweep", shape=AlphaSchedule(group_alphas=(1, 2)))
    assert AlphaSchedule(group_alphas=(1, 2, 3)).at_mean(0.2).group_alphas == (
        0.1,
        0.2,
        0.3,
    )  # not 0.30000000000000004
