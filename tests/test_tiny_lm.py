"""The tiny LM's generators, task directory and shipped foundation (offline, from the package)."""

from __future__ import annotations

import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTForCausalLM

from hf_specgen.data.medmcqa import COLUMNS, answer, doc_to_choice, doc_to_text, tokenize_for_training
from hf_specgen.eval.lm import evaluate_lm
from hf_specgen.tiny import (
    GENERAL_FAMILIES,
    GENERAL_TASKS,
    MEDMCQA_TASK,
    general_corpus,
    general_eval,
    lm_path,
    medmcqa,
    task_dir,
    write_tasks,
)
from hf_specgen.tiny.lm_data import medical_facts
from hf_specgen.tiny.world import world


def test_general_corpus_is_seeded_and_has_every_family():
    a, b, c = general_corpus(0), general_corpus(0), general_corpus(1)
    assert a["text"] == b["text"]
    assert a["text"] != c["text"]

    def sums(corpus):
        return sorted(t for t, family in zip(corpus["text"], corpus["family"]) if family == "arithmetic")

    assert sums(a) == sums(c) and len(sums(a)) == 2 * 20 * 20  # every sum, in another order
    assert set(a["family"]) == {*GENERAL_FAMILIES, "medical_words"} and len(GENERAL_FAMILIES) >= 4


def test_domain_words_are_known_but_its_facts_absent_from_the_pretraining_corpus():
    lines = general_corpus(0)["text"]
    known = [fact for fact in medical_facts() if any(fact["subject"] in line for line in lines)]
    assert len(known) == len(medical_facts())  # every subject is a word the foundation has read
    stated = [
        fact
        for fact in medical_facts()
        for line in lines
        if fact["subject"] in line and fact["answer"] in line.replace(fact["subject"], "")
    ]
    assert not stated


def test_general_eval_forms_are_correct():
    evals = general_eval(0)
    assert set(evals) == set(GENERAL_FAMILIES)
    for row in evals["arithmetic"]:
        a, b = map(int, re.fullmatch(r"(\d+) plus (\d+) equals", row["context"]).groups())
        assert row["choices"][row["gold"]] == str(a + b) and len(set(row["choices"])) == 4
    capitals = dict(world().capitals)
    for row in evals["world_facts"]:
        if row["context"].startswith("The capital of "):
            country = row["context"][len("The capital of ") : -len(" is")]
            assert row["choices"][row["gold"]] == capitals[country]
    for row in evals["instructions"]:
        letters = row["prompt"].split("\n")[0].split()[-3:]
        if "reverse" in row["prompt"]:
            assert row["target"] == " ".join(reversed(letters))
        if "sort" in row["prompt"]:
            assert row["target"] == " ".join(sorted(letters))
    assert general_eval(0)["cause_effect"].to_list() == evals["cause_effect"].to_list()


def test_medmcqa_schema_answers_and_splits_without_leakage():
    data = medmcqa(0)
    assert list(data) == ["train", "validation", "test"]
    for split in data.values():
        assert split.column_names == list(COLUMNS)
        assert split.features["cop"].dtype == "int64" and set(split["cop"]) == {0, 1, 2, 3}
    truth = {fact["exp"]: fact["answer"] for fact in medical_facts()}
    for doc in data["test"]:
        assert answer(doc) == truth[doc["exp"]] and len(set(doc_to_choice(doc))) == 4
    # the same facts in every split, in wordings no other split uses
    facts = {name: set(split["exp"]) for name, split in data.items()}
    assert facts["train"] == facts["validation"] == facts["test"]
    questions = {name: set(split["question"]) for name, split in data.items()}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["validation"]
    assert not questions["validation"] & questions["test"]
    assert medmcqa(0)["test"].to_list() == data["test"].to_list()
    assert medmcqa(1)["test"].to_list() != data["test"].to_list()


def test_training_labels_cover_the_answer_only():
    tokenizer = AutoTokenizer.from_pretrained(lm_path())
    doc = medmcqa(0)["train"][0]
    row = tokenize_for_training(doc, tokenizer)
    supervised = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(supervised) == f" {answer(doc)}\n"
    assert tokenizer.decode(row["input_ids"]) == f"{doc_to_text(doc)} {answer(doc)}\n"


def test_task_dir_is_written_once_with_absolute_data_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPECGEN_HOME", str(tmp_path))
    directory = task_dir()
    assert directory.parent == tmp_path and task_dir() == directory
    for task in (*GENERAL_TASKS, MEDMCQA_TASK):
        text = (directory / f"{task}.yaml").read_text()
        assert f"task: {task}" in text and str(directory / task) in text
    written = write_tasks(tmp_path / "elsewhere")
    assert (written / "tiny_medmcqa_test.jsonl").read_text() == (directory / "tiny_medmcqa_test.jsonl").read_text()


@pytest.fixture(scope="module")
def foundation():
    model = AutoModelForCausalLM.from_pretrained(lm_path())
    return model.eval(), AutoTokenizer.from_pretrained(lm_path())


def test_shipped_lm_is_a_galactica_style_opt(foundation):
    model, tokenizer = foundation
    assert isinstance(model, OPTForCausalLM) and model.config.model_type == "opt"
    assert model.config.do_layer_norm_before and model.config.activation_function == "gelu"
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.tokenize(" The capital of") == ["ĠThe", "Ġcapital", "Ġof"]  # a trained BPE, not bytes
    assert len(tokenizer) == 1024
    size = sum(f.stat().st_size for f in lm_path().iterdir())
    assert size < 12 * 2**20


def test_shipped_lm_knows_the_general_skills_not_the_domain(foundation, tmp_path):
    model, tokenizer = foundation
    scores = evaluate_lm(
        model, [*GENERAL_TASKS, MEDMCQA_TASK], tokenizer=tokenizer, include_path=write_tasks(tmp_path)
    )
    for task in GENERAL_TASKS:
        assert scores[task].value >= 0.8, scores[task]  # chance: 0.25 (exact match: ~0)
    assert scores[MEDMCQA_TASK].value <= 0.4 and scores[MEDMCQA_TASK].n == len(medmcqa(0)["test"])
