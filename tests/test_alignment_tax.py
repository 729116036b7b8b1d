"""The alignment-tax recipe and its measures: the reward scorer, the win rate and the implicit-reward
accuracy against hand computations, best-of-n selection (RSF), the tiny preference organism, and the
recipe end to end through `accelerate launch` (1 process and DDP), re-runs, resuming and publishing."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FakeHub
from recipe_helpers import interrupt_training, launch, load_recipe, run_files, single_point, stop_message
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForSequenceClassification

from hf_specgen.alignment import (
    SequenceClassifierReward,
    best_of_n,
    completion_logps,
    implicit_reward_accuracy,
    load_reward,
    sample_best_of_n,
    win_rate,
)
from hf_specgen.data.preferences import explicit_prompt
from hf_specgen.eval.records import ResultRecord
from hf_specgen.experiment import ExperimentArguments, Method, parse_config, run_experiment
from hf_specgen.merge import generate_completions, wise_ft
from hf_specgen.tiny import GENERAL_TASKS, lm_path
from hf_specgen.tiny.names import TINY_INSTRUCTION_REWARD, tiny_dataset
from hf_specgen.tiny.preferences import InstructionReward, instruction_prompt


TINY_ALIGNMENT = single_point("alignment_tax_tiny.yaml")
QUICK = [
    "--config",
    str(TINY_ALIGNMENT),
    "--hma_groups",
    "0",
    "--max_train_samples",
    "16",
    "--max_eval_prompts",
    "4",
    "--eval_limit",
    "4",
    "--rsf_samples",
    "2",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def tiny_lm():
    return AutoModelForCausalLM.from_pretrained(lm_path()), AutoTokenizer.from_pretrained(lm_path())


# ---- the measures ------------------------------------------------------------------------------------


def test_reward_model_scores_each_text_at_its_last_token_whatever_the_padding(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    OPTForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = ["Instruction: sort the letters c a b\nResponse:", "2 plus 3 equals", "Q:"]
    completions = [" a b c", " 5", " a much longer answer than the others"]
    scores = SequenceClassifierReward(tmp_path / "rm", batch_size=2)(prompts, completions)  # padded batches of 2 and 1
    model = OPTForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        by_hand = [
            model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)
        ]
    assert scores == pytest.approx(by_hand, abs=1e-5) and len(set(scores)) == 3
    assert load_reward(str(tmp_path / "rm")).model.config.num_labels == 1
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        SequenceClassifierReward(tmp_path / "rm")(prompts, completions[:2])
    messages = [{"role": "user", "content": "sort c a b"}]
    with pytest.raises(ValueError, match="no chat template"):
        SequenceClassifierReward(tmp_path / "rm")([messages], [" a b c"])
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "rm")
    (score,) = SequenceClassifierReward(tmp_path / "rm")(
        [messages], ["a b c"]
    )  # rendered in the reward model's format
    with torch.no_grad():
        by_hand = model(**tokenizer("<user>sort c a b\n<assistant>a b c\n", return_tensors="pt")).logits[0, 0].item()
    assert score == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_reward(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is a rule: it takes no options"):
        load_reward(TINY_INSTRUCTION_REWARD, batch_size=4)


def test_win_rate_counts_a_win_one_a_tie_half():
    assert win_rate([1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 1.0, 2.0]) == (1 + 0.5 + 0 + 0.5) / 4
    assert win_rate([0.3, 0.7], [0.3, 0.7]) == 0.5  # a model against itself
    with pytest.raises(ValueError, match="one baseline reward per reward"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="not a finite number"):
        win_rate([float("nan")], [0.0])


def test_completion_logps_sum_the_answer_tokens_as_one_unpadded_forward_does(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["Instruction: drop the last letter a b c\nResponse:", "3 plus 4 equals"]
    answers = [" a b", " 7 and more words"]
    logps = completion_logps(model, tokenizer, prompts, answers, batch_size=2)
    for prompt, answer, value in zip(prompts, answers, logps):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[: len(prompt_ids)] == prompt_ids  # the answer starts right after the prompt here
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        by_hand = sum(logits[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))
        assert value == pytest.approx(by_hand, abs=1e-4)


def test_implicit_reward_accuracy_by_hand():
    # margins (c - rc) - (r - rr): 0.5 - 0 > 0, 0 - 0.5 < 0, 0 - 0 = 0 (a tie: 1/2)
    assert implicit_reward_accuracy([-1, -2, -3], [-2, -2, -1], [-1.5, -2, -3], [-2, -2.5, -1]) == pytest.approx(
        1.5 / 3
    )
    with pytest.raises(ValueError, match="one value per pair"):
        implicit_reward_accuracy([-1], [-1, -2], [-1], [-1])


def test_best_of_n_keeps_the_highest_reward_the_first_on_ties():
    samples = [("p", "a"), ("p", "b"), ("p", "c"), ("q", "x"), ("q", "y"), ("q", "z")]
    rows = best_of_n(samples, [0.1, 0.9, 0.3, 0.5, 0.5, 0.2], n=3)
    assert rows == [
        {"prompt": "p", "completion": "b", "reward": 0.9},
        {"prompt": "q", "completion": "x", "reward": 0.5},
    ]
    with pytest.raises(ValueError, match="not 3 samples of one prompt"):
        best_of_n([("p", "a"), ("q", "b"), ("p", "c")], [0, 0, 0], n=3)


def test_sampled_best_of_n_is_reproducible_and_picks_each_prompts_best_sample(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = [instruction_prompt("reverse the letters", "abc"), instruction_prompt("sort the letters", "cab")]

    def length(prompts, completions):
        return [float(len(c)) for c in completions]

    rows = sample_best_of_n(model, tokenizer, prompts, length, n=4, max_new_tokens=6, seed=3)
    samples = generate_completions(model, tokenizer, prompts, max_new_tokens=6, num_samples=4, temperature=1.0, seed=3)
    assert [p for p, _ in samples] == [prompts[0]] * 4 + [prompts[1]] * 4
    for row, start in zip(rows, (0, 4)):
        own = [c for _, c in samples[start : start + 4]]
        assert row["completion"] == max(own, key=len) and row["reward"] == len(row["completion"])
    assert len({c for _, c in samples}) > 2  # sampled, not greedy
    cut = generate_completions(model, tokenizer, prompts, max_new_tokens=12, stop="\n")
    assert all("\n" not in c for _, c in cut)


def test_tiny_preferences_ask_for_a_new_instruction_rewarded_by_rule():
    train, test = (tiny_dataset("hf_specgen/tiny-preferences", split) for split in ("train", "test"))
    assert (len(train), len(test)) == (300, 60) and not set(train["prompt"]) & set(test["prompt"])
    reward = load_reward(TINY_INSTRUCTION_REWARD)
    assert isinstance(reward, InstructionReward)
    assert (
        reward(test["prompt"], test["chosen"]) == [1.0] * 60 and reward(test["prompt"], test["rejected"]) == [0.0] * 60
    )
    assert test[0]["prompt"].startswith("Instruction: drop the last letter ")
    assert reward([instruction_prompt("reverse the letters", "abc")] * 3, [" c b a\nmore", " c b a b", "c b a"]) == [
        1.0,
        0.0,
        1.0,
    ]
    assert reward(["What is the capital of X?"], [" Y"]) == [0.0]
    assert reward([[{"role": "user", "content": test[0]["prompt"]}]], [test[0]["chosen"]]) == [1.0]  # as a message


def test_preference_rows_of_each_shape_get_an_explicit_prompt():
    text = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
    assert explicit_prompt(text) == text
    assert explicit_prompt({"prompt": "Q?", "chosen": "Q? yes", "rejected": "Q? no"}) == text  # answers repeating it
    chat = {
        "prompt": "hi",
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
    }
    assert explicit_prompt(chat) == {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    hh = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: bye!",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: no",
    }
    assert explicit_prompt(hh) == {
        "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:",
        "chosen": " bye!",
        "rejected": " no",
    }
    with pytest.raises(ValueError, match="prompt cannot be found"):
        explicit_prompt({"chosen": "a", "rejected": "b"})
    trl_chat = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    assert explicit_prompt(trl_chat) == trl_chat  # TRL's explicit conversational format keeps its prompt
    assert explicit_prompt({**chat, "prompt": trl_chat["prompt"]}) == trl_chat  # answers repeating the prompt lose it
    bad = {
        "rejected must be non-empty text or a list of messages, got None": {**text, "rejected": None},
        "prompt must be non-empty text": {**text, "prompt": ""},
        "both be text or both be messages": {**text, "chosen": chat["chosen"]},
        "differ before their answers": {
            "chosen": chat["chosen"],
            "rejected": [{"role": "user", "content": "yo"}, chat["rejected"][1]],
        },
    }
    for message, row in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            explicit_prompt(row)


def test_methods_name_their_algorithm_and_recipes_refuse_one_they_do_not_offer(tmp_path):
    assert Method.parse("dpo+l2") == Method("dpo+l2", ("l2",), False, None, "dpo")
    assert Method.parse("rsf+lora+ema") == Method("rsf+lora+ema", (), True, "ema", "rsf")
    assert Method.parse("l2").algorithm is None
    for bad in ("dpo+full", "dpo+rsf", "ppo"):
        with pytest.raises(ValueError, match="unknown method"):
            Method.parse(bad)
    med = load_recipe("galactica_med")
    message = stop_message(
        med.GalacticaMed.main,
        [
            "--config",
            str(single_point("galactica_med_tiny.yaml")),
            "--output_dir",
            str(tmp_path / "x"),
            "--methods",
            "dpo",
        ],
    )
    assert "method 'dpo' trains with dpo; recipe galactica_med trains with its own loss only" in message
    assert not (tmp_path / "x").exists()


def test_alignment_recipe_refuses_bad_options_before_any_work(tmp_path):
    main = load_recipe("alignment_tax").AlignmentTax.main
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    good = {"prompt": instruction_prompt("drop the last letter", "abc"), "chosen": " a b", "rejected": " b c"}
    (pairs / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": None}) + "\n")
    (pairs / "test.jsonl").write_text(json.dumps(good) + "\n")
    chat = {
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}],
    }
    (tmp_path / "chat").mkdir()
    for split in ("train", "test"):
        (tmp_path / "chat" / f"{split}.jsonl").write_text(json.dumps(chat) + "\n")
    cases = {
        ("--speciality_metrics", "reward", "bleu"): "speciality_metrics must name one or more of reward, win_rate",
        ("--eval_suites", "tiny_medmcqa"): r"eval_suites \['tiny_medmcqa'\] measure speciality",
        ("--rsf_temperature", "0"): "rsf_temperature > 0",
        ("--methods", "dpo", "ppo"): "unknown method 'ppo'",
        (
            "--reward_model_name_or_path",
            str(tmp_path / "no-rm"),
        ): r"reward_model_name_or_path '.*no-rm' does not exist",
        ("--reward_model_name_or_path", str(lm_path())): r"reward_model_name_or_path '.*' has 2 outputs",
        (
            "--dataset_name",
            str(pairs),
            "--train_split",
            "train",
        ): r"row 1: rejected must be non-empty text .* got None",
        ("--dataset_name", str(pairs / "test.jsonl")): "a single data file holds one split, train",
        (
            "--dataset_name",
            str(tmp_path / "chat"),
        ): r"holds conversational pairs, but model_name_or_path .* no chat template",
    }
    for args, expected in cases.items():
        message = stop_message(main, [*QUICK, "--output_dir", str(tmp_path / "x"), *args])
        assert message.startswith("alignment_tax.py: error: ") and re.search(expected, message), message
        assert not (tmp_path / "x").exists()


# ---- the recipe end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("alignment") / "demo"
    args = [*QUICK, "--methods", "dpo", "rsf+l2", "--alphas", "0.5", "1", "--max_steps", "3"]
    return output_dir, args, launch("alignment_tax.py", output_dir, *args)


def test_recipe_aligns_with_dpo_and_rsf_and_reports_reward_against_the_tax(aligned):
    output_dir, _, stdout = aligned
    report = json.loads((output_dir / "report.json").read_text())
    records = [ResultRecord.from_dict(r) for r in report["records"]]
    assert {(r.method, r.alpha) for r in records} == {
        ("sft", None),
        ("dpo", 0.5),
        ("dpo", 1.0),
        ("rsf+l2", 0.5),
        ("rsf+l2", 1.0),
    }
    for record in records:
        assert set(record.speciality) == {"reward", "win_rate", "preference_accuracy"}
        assert set(record.generality) == set(GENERAL_TASKS)
        assert all(
            v * 4 == round(v * 4) for v in (record.speciality["reward"], record.speciality["preference_accuracy"])
        )
    (sft,) = [r for r in records if r.method == "sft"]
    assert sft.speciality == {
        "reward": 0.0,
        "win_rate": 0.5,
        "preference_accuracy": 0.5,
    }  # the SFT model against itself
    (samples,) = run_files(output_dir, "rsf+l2-*/rsf_samples.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 16 and all(
        set(r) == {"prompt", "completion", "reward"} and "\n" not in r["completion"] for r in rows
    )
    assert (output_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dpo | alpha=0.5 |" in (output_dir / "report.md").read_text()
    lines = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[alignment_tax] ")]
    assert lines == [
        "[alignment_tax] sft",
        "[alignment_tax] 2 trainings",
        "[alignment_tax] dpo",
        "[alignment_tax] rsf",
        "[alignment_tax] rsf+l2 (l2_lambda=0.01)",
    ], lines  # the sampling's line, then the run's
    (finetuned,) = run_files(output_dir, "rsf+l2-*/finetuned")
    assert json.loads((finetuned / "specgen_training.json").read_text())["steps"] == 3  # the SFT step ran


def test_recipe_rerun_skips_what_is_done(aligned, capsys):
    output_dir, args, _ = aligned
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [*run_files(output_dir, "*/finetuned/*"), *run_files(output_dir, "*/records-*/*.json")]
    }
    (gone,) = run_files(output_dir, "dpo-*/records-*/alpha-0.5.json")
    before = json.loads(gone.read_text())
    gone.unlink()
    load_recipe("alignment_tax").AlignmentTax.main([*args, "--output_dir", str(output_dir)])
    assert {p: p.stat().st_mtime_ns for p in stamps if p != gone} == {p: s for p, s in stamps.items() if p != gone}
    assert "rsf: best of" not in capsys.readouterr().out  # neither resampled nor retrained
    again = json.loads(gone.read_text())
    assert {k: v for k, v in again.items() if k != "cost"} == {k: v for k, v in before.items() if k != "cost"}


def test_recipe_on_two_processes_trains_together_and_scores_once(tmp_path):
    stdout = launch(
        "alignment_tax.py",
        tmp_path / "ddp",
        *QUICK,
        "--methods",
        "dpo+l2",
        "--alphas",
        "1",
        "--max_steps",
        "2",
        processes=2,
    )
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[alignment_tax] ")] == [
        "[alignment_tax] sft",
        "[alignment_tax] 1 training",
        "[alignment_tax] dpo+l2 (l2_lambda=0.01)",
    ]
    (finetuned,) = run_files(tmp_path / "ddp", "dpo+l2-*/finetuned")
    assert json.loads((finetuned / "specgen_training.json").read_text())["steps"] == 2
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert [(r["method"], r["alpha"]) for r in report["records"]] == [("sft", None), ("dpo+l2", 1.0)]


def test_recipe_under_zero3_aligns_with_dpo_and_rsf(tmp_path):
    """ZeRO-3 on 2 processes: DPO's reference is loaded partitioned like the policy (TRL's own load of it, after
    the trainer has finalized DeepSpeed's configuration, failed), and RSF samples on the main process alone with
    a whole model (a ZeRO-3 `generate` would wait for the other process at every token)."""
    stdout = launch(
        "alignment_tax.py",
        tmp_path / "z3",
        *QUICK,
        "--methods",
        "dpo+l2",
        "rsf+kd",
        "--alphas",
        "1",
        "--max_steps",
        "2",
        "--kd_lambda",
        "1",
        processes=2,
        config="zero3",
    )
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[alignment_tax] ")] == [
        "[alignment_tax] sft",
        "[alignment_tax] 2 trainings",
        "[alignment_tax] dpo+l2 (l2_lambda=0.01)",
        "[alignment_tax] rsf",
        "[alignment_tax] rsf+kd (kd_lambda=1)",
    ]
    pretrained = load_file(lm_path() / "model.safetensors")
    for method in ("dpo+l2", "rsf+kd"):
        (finetuned,) = run_files(tmp_path / "z3", f"{method}-*/finetuned")
        weights = load_file(finetuned / "model.safetensors")  # consolidated from the partitions
        assert weights.keys() == pretrained.keys() and any(
            not torch.equal(weights[k], v) for k, v in pretrained.items()
        )
        assert json.loads((finetuned / "specgen_training.json").read_text())["steps"] == 2


def test_recipe_aligns_conversational_pairs_through_the_chat_template(tmp_path):
    """TRL's conversational format end to end: DPO on messages, generation after the chat template, the reward
    given the messages, RSF's samples kept as the assistant's messages."""
    shutil.copytree(lm_path(), tmp_path / "chat-lm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "chat-lm")
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"  # the tiny prompt, unchanged
    tokenizer.save_pretrained(tmp_path / "chat-lm")
    (tmp_path / "chat").mkdir()
    for split in ("train", "test"):
        rows = tiny_dataset("hf_specgen/tiny-preferences", split).select(range(16))
        (tmp_path / "chat" / f"{split}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": r["prompt"]}],
                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": [{"role": "assistant", "content": r["rejected"]}],
                    }
                )
                + "\n"
                for r in rows
            )
        )
    output_dir = tmp_path / "run"
    load_recipe("alignment_tax").AlignmentTax.main(
        [
            *QUICK,
            "--model_name_or_path",
            str(tmp_path / "chat-lm"),
            "--dataset_name",
            str(tmp_path / "chat"),
            "--output_dir",
            str(output_dir),
            "--methods",
            "dpo",
            "rsf",
            "--alphas",
            "1",
            "--max_steps",
            "2",
        ]
    )
    records = [ResultRecord.from_dict(r) for r in json.loads((output_dir / "report.json").read_text())["records"]]
    (sft,) = [r for r in records if r.method == "sft"]
    assert sft.speciality == {"reward": 0.0, "win_rate": 0.5, "preference_accuracy": 0.5} and len(records) == 3
    (samples,) = run_files(output_dir, "rsf-*/rsf_samples.jsonl")
    train = [json.loads(line)["prompt"] for line in (tmp_path / "chat" / "train.jsonl").read_text().splitlines()]
    assert [json.loads(line)["prompt"] for line in samples.read_text().splitlines()] == train  # the messages, as given


def alignment_experiment(output_dir: Path, **overrides):
    module = load_recipe("alignment_tax")
    options, experiment, training = parse_config(
        (module.AlignmentArguments, ExperimentArguments, module.SpecGenDPOConfig),
        [
            *QUICK,
            "--output_dir",
            str(output_dir),
            "--methods",
            "dpo",
            "--alphas",
            "0.5",
            "1",
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--logging_steps",
            "1",
        ],
    )
    return module.AlignmentTax(options, training.seed), experiment, dataclasses.replace(training, **overrides)


def test_interrupted_alignment_resumes_to_the_same_weights_then_publishes(tmp_path):
    recipe, experiment, training = alignment_experiment(tmp_path / "resumed")
    interrupt_training(recipe, experiment, training)
    assert [p.name for p in run_files(tmp_path / "resumed", "dpo-*/trainer/checkpoint-*")] == ["checkpoint-2"]
    run_experiment(recipe, experiment, training)
    (finetuned,) = run_files(tmp_path / "resumed", "dpo-*/finetuned")
    assert json.loads((finetuned / "specgen_training.json").read_text())["resumed_from"].endswith("checkpoint-2")
    run_experiment(*alignment_experiment(tmp_path / "straight"))
    (straight,) = run_files(tmp_path / "straight", "dpo-*/finetuned")
    resumed, reference = load_file(finetuned / "model.safetensors"), load_file(straight / "model.safetensors")
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)

    hub = FakeHub()
    records = run_experiment(
        *alignment_experiment(tmp_path / "resumed", push_to_hub=True, hub_model_id="me/tiny-aligned"), hub_api=hub
    )
    (upload,) = hub.uploads
    published = re.search(r"alpha: ([0-9.]+)", upload["files"]["README.md"].decode())
    assert upload["repo_id"] == "me/tiny-aligned" and float(published[1]) in {
        r.alpha for r in records if r.method == "dpo"
    }
    expected = wise_ft(lm_path(), finetuned, float(published[1]), tmp_path / "expected")
    assert upload["files"]["model.safetensors"] == (expected / "model.safetensors").read_bytes()
