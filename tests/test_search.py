"""HMA's group-ratio search: the alpha gradient against finite differences, the fixed mean, K = 1, and a
problem whose answer is known (only one group of blocks was fine-tuned)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import read_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_specgen.merge import MergeError, wise_ft
from hf_specgen.merge.search import GroupAlphaObjective, _encode, ratios, search_group_alphas
from hf_specgen.tiny import lm_path


TEXTS = [
    "the patient takes two tablets a day",
    "a dose of the drug lowers the pressure",
    "the heart rate rises after the dose",
    "take the tablet with water",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny Galactica (4 blocks) and a fine-tune of it on four sentences that trained only blocks
    2 and 3 (group 1 of 2), with 24 samples of those sentences."""
    root = tmp_path_factory.mktemp("search")
    pre_dir, ft_dir = root / "pre", root / "ft"
    shutil.copytree(lm_path(), pre_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(pre_dir)
    tokenizer = AutoTokenizer.from_pretrained(pre_dir)
    trained = [p for n, p in model.named_parameters() if ".layers.2." in n or ".layers.3." in n]
    for param in model.parameters():
        param.requires_grad_(any(param is t for t in trained))
    optimizer = torch.optim.Adam(trained, lr=3e-3)
    batch = _encode(tokenizer, TEXTS, 32)
    for _ in range(30):
        optimizer.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        ).backward()
        optimizer.step()
    model.save_pretrained(ft_dir)
    tokenizer.save_pretrained(ft_dir)
    return pre_dir, ft_dir, TEXTS * 6


def objective_of(pre_dir, ft_dir, groups, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(pre_dir, dtype=dtype).eval()
    tuned = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=dtype)
    return GroupAlphaObjective(model, {n: p.detach() for n, p in tuned.named_parameters()}, groups)


def test_the_alpha_gradient_equals_finite_differences(pair):
    pre_dir, ft_dir, _ = pair
    objective = objective_of(pre_dir, ft_dir, groups=2)
    tokenizer = AutoTokenizer.from_pretrained(pre_dir)
    batch = _encode(tokenizer, [("the patient", " takes two tablets"), "a dose of the drug"], 32)
    alphas, mean, h = [0.3, 0.7], 0.5, 1e-5
    _, gradient = objective.loss_and_gradient(batch, alphas, mean)
    assert gradient[1] != 0.0
    for k in range(2):
        up, down = list(alphas), list(alphas)
        up[k] += h
        down[k] -= h
        objective.set_alphas(up, mean)
        with torch.no_grad():
            high = float(objective.loss(batch))
        objective.set_alphas(down, mean)
        with torch.no_grad():
            low = float(objective.loss(batch))
        finite = (high - low) / (2 * h)
        assert abs(gradient[k] - finite) <= 1e-3 * max(abs(finite), 1e-12), (k, gradient[k], finite)
    assert gradient[0] == 0.0  # group 0's blocks did not change: theta_ft - theta_pre is 0 there


@pytest.mark.parametrize("mean", [0.5, 0.9, 1.0])
def test_ratios_never_pass_1_keep_their_mean_and_carry_a_gradient(mean):
    """Plain rescaling at mean 0.5 with scores (-6, -6, 6) gives 1.36 to the last group: it is held at 1
    and the excess goes to the others in proportion to their weights."""
    scores = torch.tensor([-6.0, -6.0, 6.0], dtype=torch.float64, requires_grad=True)
    weights = torch.sigmoid(scores.detach()) + 0.05
    assert float(mean * 3 * weights[2] / weights.sum()) > 1  # what HMA's plain parameterization gives
    alphas = ratios(scores, mean, 0.05)
    values = alphas.detach()
    assert float(values.max()) <= 1.0 and float(values.min()) >= 0.0
    assert float(values.mean()) == pytest.approx(mean, abs=1e-15)
    assert float(values[2]) == 1.0
    if mean < 1:
        free = weights[:2]
        expected = (3 * mean - 1) * free / free.sum()  # the rest of the total, shared by weight
        torch.testing.assert_close(alphas[:2].detach(), expected, rtol=0, atol=1e-15)
        alphas[0].backward()
        assert float(scores.grad[0]) > 0 and float(scores.grad[2]) == 0.0  # the capped group no longer moves
    else:
        assert alphas.tolist() == [1.0, 1.0, 1.0]


def test_one_group_is_exactly_the_mean_with_a_zero_gradient():
    """With one group, mean / w * w rounds off the mean for some w (mean 0.7 at score 0 gave
    0.7000000000000001; the search's Adam steps on a rounding-sized gradient reached such a w on one
    machine): the ratio is the mean itself, and its gradient is exactly 0."""
    for score in (-3.0, -0.1, 0.0, 0.3, 2.5):
        for mean in (0.1, 0.4, 0.7, 1.0):
            scores = torch.tensor([score], dtype=torch.float64, requires_grad=True)
            alphas = ratios(scores, mean, 0.05)
            assert alphas.tolist() == [mean]
            alphas.sum().backward()
            assert scores.grad.tolist() == [0.0]


def test_ratios_keep_their_mean_and_one_group_is_wise_ft(pair, tmp_path):
    pre_dir, ft_dir, _ = pair
    scores = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64)
    assert float(ratios(scores, 0.4, 0.05).mean()) == pytest.approx(0.4, abs=1e-15)
    objective = objective_of(pre_dir, ft_dir, groups=1, dtype=torch.float32)
    objective.set_alphas([0.3], 0.3)
    expected = read_weights(wise_ft(pre_dir, ft_dir, 0.3, tmp_path / "wise"))
    for name, param in objective.params.items():
        key = name if name in expected else "model.decoder.embed_tokens.weight"  # lm_head is tied to it
        torch.testing.assert_close(param.detach(), expected[key], rtol=0, atol=1e-6)


def test_the_search_raises_the_ratio_of_the_group_that_was_fine_tuned_at_a_fixed_mean(pair):
    pre_dir, ft_dir, samples = pair
    found = search_group_alphas(
        pre_dir,
        ft_dir,
        samples,
        groups=2,
        mean_alpha=0.4,
        steps=12,
        learning_rate=0.5,
        batch_size=8,
        held_out=0.25,
        patience=12,
    )
    assert found.group_alphas[1] > found.group_alphas[0] + 0.1
    assert all(abs(sum(e["group_alphas"]) / 2 - 0.4) < 1e-12 for e in found.history)  # the mean at every step
    assert found.held_out_loss < found.uniform_loss
    assert found.state_bytes == 2 * 4 * sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(pre_dir).parameters()
    )
    one = search_group_alphas(pre_dir, ft_dir, samples, groups=1, mean_alpha=0.4, steps=2, held_out=0.25)
    assert one.group_alphas == (0.4,) and all(e["group_alphas"] == [0.4] for e in one.history)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": 5}, "5 groups, but model.decoder.layers has only 4 blocks"),
        ({"mean_alpha": 0.0}, "mean_alpha must be in (0, 1]"),
        ({"held_out": 1.0}, "held_out must be in [0, 1)"),
        ({"groups": 0}, "groups must be an integer >= 1"),
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ],
)
def test_bad_arguments_are_one_merge_error(pair, kwargs, message):
    pre_dir, ft_dir, samples = pair
    with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        search_group_alphas(pre_dir, ft_dir, samples, **kwargs)


def test_specgen_hma_searches_then_writes_the_merge_and_the_search(pair, tmp_path, capsys):
    from hf_specgen.cli import main

    pre_dir, ft_dir, samples = pair
    data = tmp_path / "samples.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": text.split()[0], "text": " " + " ".join(text.split()[1:])}) + "\n"
            for text in samples
        )
    )
    out = tmp_path / "hma"
    argv = [
        "hma",
        "--pretrained",
        str(pre_dir),
        "--finetuned",
        str(ft_dir),
        "--data",
        str(data),
        "--prompt-field",
        "prompt",
        "--groups",
        "2",
        "--mean-alpha",
        "0.4",
        "--steps",
        "6",
        "--learning-rate",
        "0.5",
        "--held-out",
        "0.25",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    search = json.loads((out / "hma_search.json").read_text())
    config = json.loads((out / "merge_config.json").read_text())
    assert config["schedule"]["group_alphas"] == search["group_alphas"] and search["samples"] == len(samples)
    assert search["group_alphas"][1] > search["group_alphas"][0] and len(search["history"]) == 6
    assert search["held_out_loss"] < search["uniform_loss"]
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert capsys.readouterr().out.startswith(f"wrote {out}: group alphas ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--output-dir": "PRE/inside"}, "lies inside"),
        ({"--data": "missing.jsonl"}, "missing.jsonl: no such file or directory (--data)"),
        ({"--groups": "5"}, "5 groups, but model.decoder.layers has only 4 blocks"),
        ({"--steps": "0"}, "--steps must be at least 1, got 0"),
    ],
)
def test_specgen_hma_bad_input_is_one_line_and_writes_nothing(pair, tmp_path, capsys, change, message):
    from hf_specgen.cli import main

    pre_dir, ft_dir, samples = pair
    data = tmp_path / "samples.json"
    data.write_text(json.dumps(samples))
    options = {
        "--pretrained": str(pre_dir),
        "--finetuned": str(ft_dir),
        "--data": str(data),
        "--output-dir": str(tmp_path / "out"),
        "--steps": "2",
    }
    options.update(
        {
            k: v.replace("PRE", str(pre_dir)) if k == "--output-dir" else str(tmp_path / v) if k == "--data" else v
            for k, v in change.items()
        }
    )
    with pytest.raises(SystemExit) as exited:
        main(["hma", *[x for pair_ in options.items() for x in pair_]])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("specgen: error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (pre_dir / "inside").exists()


def test_generate_completions_are_the_models_greedy_answers_and_restore_the_tokenizer(pair):
    from hf_specgen.merge import generate_completions

    _, ft_dir, _ = pair
    model = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(ft_dir)
    prompts = ["the patient", "a dose of the drug lowers", "take"]  # different lengths: left padding matters
    pairs = generate_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert [p for p, _ in pairs] == prompts
    for prompt, completion in pairs:  # each equals the answer generated alone, without padding
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        alone = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert completion == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True)
    assert pairs[0][1].endswith(
        "es two"
    )  # the fine-tune's sentence, "the patient takes two tablets", in tiny BPE pieces
    assert tokenizer.padding_side == "right" and not model.training


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "needs prompts"),
        (["ok", " "], {}, "prompt 1 is empty"),
        (["ok"], {"max_new_tokens": 0}, "max_new_tokens must be"),
    ],
)
def test_generate_completions_bad_input(pair, prompts, kwargs, message):
    from hf_specgen.merge import generate_completions

    _, ft_dir, _ = pair
    with pytest.raises(MergeError, match=message):
        generate_completions(
            AutoModelForCausalLM.from_pretrained(ft_dir), AutoTokenizer.from_pretrained(ft_dir), prompts, **kwargs
        )


def test_specgen_hma_generate_from_scores_the_finetuned_models_answers(pair, tmp_path):
    from hf_specgen.cli import main

    pre_dir, ft_dir, _ = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": text.split()[0] + " " + text.split()[1]}) + "\n" for text in TEXTS * 3)
    )
    out = tmp_path / "hma"
    argv = [
        "hma",
        "--pretrained",
        str(pre_dir),
        "--finetuned",
        str(ft_dir),
        "--generate-from",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--groups",
        "2",
        "--mean-alpha",
        "0.4",
        "--steps",
        "4",
        "--learning-rate",
        "0.5",
        "--held-out",
        "0.25",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    search = json.loads((out / "hma_search.json").read_text())
    generated = search["generated"]
    assert len(generated) == search["samples"] == 12 and generated[0]["prompt"] == "the patient"
    assert generated[0]["completion"].startswith("kes two")  # "the patient takes two ...", in tiny BPE pieces
    assert search["group_alphas"][1] > search["group_alphas"][0]  # the fine-tuned group's answers pull its ratio up
    with pytest.raises(SystemExit):  # --data and --generate-from exclude each other
        main([*argv[:5], "--data", str(prompts), *argv[5:]])
    with pytest.raises(SystemExit):  # nothing is generated from --data: --max-new-tokens would be ignored
        main([*argv[:5], "--data", str(prompts), *argv[7:]])
