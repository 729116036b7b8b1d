"""`evaluate_lm` (lm-eval on an in-memory model) against scores computed here, independently,
from the model's own log-likelihoods and greedy generations."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_specgen.data.medmcqa import doc_to_choice, doc_to_text
from hf_specgen.eval.lm import evaluate_lm
from hf_specgen.tiny import lm_path, write_tasks


@pytest.fixture(scope="module")
def lm():
    return AutoModelForCausalLM.from_pretrained(lm_path()).eval(), AutoTokenizer.from_pretrained(lm_path())


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(ids).logits.float().log_softmax(-1)[0, len(context_ids) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()


def accuracy(model, tokenizer, docs) -> float:
    correct = 0
    for context, choices, gold in docs:
        scores = [loglikelihood(model, tokenizer, context, " " + choice) for choice in choices]
        correct += max(range(len(choices)), key=scores.__getitem__) == gold
    return correct / len(docs)


def test_multiple_choice_accuracy_matches_direct_loglikelihoods(lm, tasks):
    model, tokenizer = lm
    scores = evaluate_lm(
        model, ["tiny_world_facts", "tiny_medmcqa"], tokenizer=tokenizer, include_path=tasks, limit=40
    )
    facts = [(r["context"], r["choices"], r["gold"]) for r in rows(tasks / "tiny_world_facts.jsonl")[:40]]
    exams = [(doc_to_text(r), doc_to_choice(r), r["cop"]) for r in rows(tasks / "tiny_medmcqa_test.jsonl")[:40]]
    assert scores["tiny_world_facts"].value == pytest.approx(accuracy(model, tokenizer, facts))
    assert scores["tiny_medmcqa"].value == pytest.approx(accuracy(model, tokenizer, exams))
    assert scores["tiny_world_facts"].metric == "acc" and scores["tiny_world_facts"].n == 40
    assert scores["tiny_medmcqa"].stderr > 0


def test_generation_exact_match_matches_greedy_decoding(lm, tasks):
    model, tokenizer = lm
    score = evaluate_lm(model, ["tiny_instructions"], tokenizer=tokenizer, include_path=tasks, limit=30)[
        "tiny_instructions"
    ]
    hits = 0
    for row in rows(tasks / "tiny_instructions.jsonl")[:30]:
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += tokenizer.decode(out[0, ids.shape[1] :]).split("\n")[0].strip() == row["target"]
    assert score.metric == "exact_match" and score.value == pytest.approx(hits / 30)


def test_in_memory_model_needs_its_tokenizer(lm, tasks):
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_lm(lm[0], ["tiny_world_facts"], include_path=tasks)
