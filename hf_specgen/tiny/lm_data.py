"""Generators of the tiny LM's data: four general skills and a MedMCQA-style medical domain.

Each general family has a pre-training text form (plain sentences the foundation is trained on)
and an evaluation form: multiple choice scored by log-likelihood (`context`, `choices`, `gold`)
or, for instruction following, a generation checked by exact match (`prompt`, `target`). The
domain follows the MedMCQA schema exactly and never appears in the pre-training corpus, so the
foundation starts near chance on it, as Galactica starts on a speciality it was not taught.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import datasets

from ..data.medmcqa import COLUMNS, OPTION_KEYS, doc_to_text
from .world import CAUSE_EFFECT, DRUG_CLASSES, SYMPTOMS, world


GENERAL_FAMILIES = ("arithmetic", "instructions", "world_facts", "cause_effect")
MAX_ADDEND = 19
LETTERS = "abcdefghij"


def _choices(rng: random.Random, correct: str, pool: list[str], k: int = 4) -> tuple[list[str], int]:
    """`correct` and k-1 other members of `pool`, in a random order; returns (choices, gold)."""
    options = [correct, *rng.sample(sorted(set(pool) - {correct}), k - 1)]
    rng.shuffle(options)
    return options, options.index(correct)


def _quiz(rng: random.Random, question: str, correct: str, pool: list[str]) -> str:
    """A general fact as a multiple-choice exam question, in the prompt format of the domain:
    the foundation knows the exam format (as Galactica saw exams), not the domain's facts."""
    options, gold = _choices(rng, correct, pool)
    return f"{doc_to_text({'question': question, **dict(zip(OPTION_KEYS, options))})} {options[gold]}"


# ---- arithmetic --------------------------------------------------------------------------------
def _addition_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_ADDEND + 1) for b in range(MAX_ADDEND + 1)]


def _arithmetic_text(rng: random.Random) -> list[str]:
    return [
        sentence
        for a, b in _addition_pairs()
        for sentence in (f"{a} plus {b} equals {a + b}.", f"The sum of {a} and {b} is {a + b}.")
    ]


def _arithmetic_eval(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for a, b in rng.sample(_addition_pairs(), n):
        total = a + b
        pool = [str(total + d) for d in (-10, -2, -1, 1, 2, 10) if total + d >= 0]
        choices, gold = _choices(rng, str(total), pool)
        rows.append({"context": f"{a} plus {b} equals", "choices": choices, "gold": gold})
    return rows


# ---- instruction following (word manipulation) -------------------------------------------------
# The instructions the foundation is pre-trained on (`hf_specgen.tiny.preferences` aligns it to a fifth).
OPERATIONS: dict[str, Callable[[list[str]], list[str]]] = {
    "reverse the letters": lambda s: s[::-1],
    "repeat the letters twice": lambda s: s + s,
    "drop the first letter": lambda s: s[1:],
    "sort the letters": sorted,
}


def instruction_prompt(name: str, letters: Sequence[str]) -> str:
    """A letter instruction's prompt, as the pre-training, `tiny_instructions` and the preference set word it."""
    return f"Instruction: {name} {' '.join(letters)}\nResponse:"


def _instruction(rng: random.Random) -> tuple[str, str]:
    name, operation = rng.choice(list(OPERATIONS.items()))
    letters = rng.sample(LETTERS, 3)
    return instruction_prompt(name, letters), " ".join(operation(letters))


def _instructions_text(rng: random.Random, n: int = 4000) -> list[str]:
    return [f"{prompt} {target}" for prompt, target in (_instruction(rng) for _ in range(n))]


def _instructions_eval(rng: random.Random, n: int) -> list[dict]:
    return [{"prompt": prompt, "target": target} for prompt, target in (_instruction(rng) for _ in range(n))]


# ---- fact recall about the fictional world ----------------------------------------------------
# One fact, many wordings: the foundation learns that paraphrases ask the same thing.
_CAPITAL_QUESTIONS = (
    "What is the capital of {}?",
    "Which city is the capital of {}?",
    "{} has which city as its capital?",
    "The capital of {} is which of the following?",
    "Which city do travellers to {} land in?",
)


def _world_facts_text(rng: random.Random) -> list[str]:
    capitals = [capital for _, capital in world().capitals]
    return [
        sentence
        for country, capital in world().capitals
        for sentence in (
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital of {country}.",
            f"Travellers to {country} land in its capital, {capital}.",
            *(_quiz(rng, wording.format(country), capital, capitals) for wording in _CAPITAL_QUESTIONS),
        )
    ]


def _world_facts_eval(rng: random.Random, n: int) -> list[dict]:
    capitals = [capital for _, capital in world().capitals]
    countries = [country for country, _ in world().capitals]
    rows = []
    for country, capital in world().capitals:
        choices, gold = _choices(rng, capital, capitals)
        rows.append({"context": f"The capital of {country} is", "choices": choices, "gold": gold})
        choices, gold = _choices(rng, country, countries)
        rows.append({"context": f"{capital} is the capital of", "choices": choices, "gold": gold})
    return rng.sample(rows, min(n, len(rows)))


# ---- commonsense cause and effect -------------------------------------------------------------
_AGENTS = ("Someone", "A boy", "A girl", "The man", "The woman")


def _cause_effect_text(rng: random.Random) -> list[str]:
    effects = [effect for _, effect in CAUSE_EFFECT]
    sentences = [
        sentence
        for cause, effect in CAUSE_EFFECT
        for agent in _AGENTS
        for sentence in (f"{agent} {cause}, so {effect}.", f"Because {agent.lower()} {cause}, {effect}.")
    ]
    quizzes = [
        _quiz(rng, wording.format(cause), effect, effects)
        for cause, effect in CAUSE_EFFECT
        for wording in (
            "What happens when someone {}?",
            "Someone {}. What is the result?",
            "Which effect follows when a person {}?",
        )
    ]
    return sentences + quizzes


def _cause_effect_eval(rng: random.Random, n: int) -> list[dict]:
    effects = [effect for _, effect in CAUSE_EFFECT]
    rows = []
    for cause, effect in CAUSE_EFFECT:
        for agent in rng.sample(_AGENTS, 2):
            choices, gold = _choices(rng, effect, effects)
            rows.append({"context": f"{agent} {cause}, so", "choices": choices, "gold": gold})
    return rng.sample(rows, min(n, len(rows)))


# ---- the domain's vocabulary, without its facts --------------------------------------------------
def _medical_words_text(rng: random.Random) -> list[str]:
    """Sentences that use the domain's words (drug, disease, symptom and class names) but state no
    domain fact: a foundation has read the words of a speciality it does not know, so its
    fine-tuning learns facts, not a vocabulary."""
    w = world()
    return (
        [
            sentence
            for drug in w.drugs
            for sentence in (f"The pharmacy sells {drug.name}.", f"{drug.name.capitalize()} is a medicine.")
        ]
        + [
            sentence
            for disease in w.diseases
            for sentence in (f"The doctor read about {disease.name}.", f"{disease.name} is an illness.")
        ]
        + [f"{symptom.capitalize()} is a symptom." for symptom in SYMPTOMS]
        + [f"A {drug_class} is a kind of drug." for drug_class in DRUG_CLASSES]
    )


_TEXT = {
    "arithmetic": _arithmetic_text,
    "instructions": _instructions_text,
    "world_facts": _world_facts_text,
    "cause_effect": _cause_effect_text,
}
_EVAL = {
    "arithmetic": _arithmetic_eval,
    "instructions": _instructions_eval,
    "world_facts": _world_facts_eval,
    "cause_effect": _cause_effect_eval,
}


def general_corpus(seed: int = 0) -> datasets.Dataset:
    """The pre-training corpus: one sentence per row (`text`, `family`), shuffled by `seed`; the
    general families plus `medical_words`, the domain's vocabulary without its facts.

    Args:
        seed: the seed of the generated sentences and of their order.

    Returns:
        The corpus, one split.
    """
    rng = random.Random(seed)
    rows = [{"text": text, "family": family} for family in GENERAL_FAMILIES for text in _TEXT[family](rng)]
    rows += [{"text": text, "family": "medical_words"} for text in _medical_words_text(rng)]
    rng.shuffle(rows)
    return datasets.Dataset.from_list(rows)


def general_eval(seed: int = 0, n: int = 200) -> datasets.DatasetDict:
    """Evaluation forms per family (at most `n` rows each): multiple choice, or generation for
    `instructions`.

    Args:
        seed: the seed of the generated questions.
        n: rows per family at most.

    Returns:
        One split per general family.
    """
    rng = random.Random(seed + 1)  # a stream of its own: the corpus's draws do not shift it
    return datasets.DatasetDict(
        {family: datasets.Dataset.from_list(_EVAL[family](rng, n)) for family in GENERAL_FAMILIES}
    )


# ---- the speciality: MedMCQA-style questions over a fictional pharmacology ---------------------
# Nine wordings per relation. Each fact is asked in 6 of them in train, in another in validation
# and in the remaining 2 in test, so that every split asks about the same (trained) facts, but a
# validation or test question words its fact in a way the training questions about that fact never
# did (with the options in new orders).
_WORDINGS = {
    "treatment": (
        "Which drug is used to treat {}?",
        "What is the drug of choice for {}?",
        "A patient with {} should be treated with which drug?",
        "Which drug treats {}?",
        "{} is treated with which drug?",
        "Which drug is prescribed to treat {}?",
        "Which drug is the treatment for {}?",
        "Which drug is given to treat {}?",
        "Which drug would a doctor use to treat {}?",
    ),
    "symptom": (
        "What is the main symptom of {}?",
        "Patients with {} typically present with which symptom?",
        "Which symptom is typical of {}?",
        "Which symptom does {} cause?",
        "{} presents with which symptom?",
        "Which symptom is seen in {}?",
        "What is the typical symptom of {}?",
        "Which symptom do patients with {} have?",
        "What symptom is seen in {}?",
    ),
    "indication": (
        "{} is prescribed for which disease?",
        "Which disease is treated with {}?",
        "A doctor gives {} for which disease?",
        "Which disease does {} treat?",
        "{} is the drug of choice for which disease?",
        "{} is given to patients with which disease?",
        "Which disease is {} used to treat?",
        "{} is used for which disease?",
        "For which disease is {} prescribed?",
    ),
    "drug_class": (
        "{} belongs to which class of drugs?",
        "What is the drug class of {}?",
        "Which class of drugs includes {}?",
        "{} is a drug of which class?",
        "To which drug class does {} belong?",
        "{} is classified as which type of drug?",
        "Which class does the drug {} belong to?",
        "{} is which type of drug?",
        "What class of drug is {}?",
    ),
}
_WORDINGS_PER_SPLIT = {"train": 6, "validation": 1, "test": 2}
_SUBJECT = {
    "treatment": "Pharmacology",
    "symptom": "Medicine",
    "indication": "Pharmacology",
    "drug_class": "Pharmacology",
}
SPLITS = ("train", "validation", "test")


def medical_facts() -> list[dict]:
    """Every domain fact: (relation, subject, answer, pool of same-type answers, explanation)."""
    w = world()
    diseases, drugs = [d.name for d in w.diseases], [g.name for g in w.drugs]
    disease_of = {d.drug: d.name for d in w.diseases}
    facts = []
    for d in w.diseases:
        facts += [
            ("treatment", d.name, d.drug, drugs, f"{d.name} is treated with {d.drug}."),
            ("symptom", d.name, d.symptom, list(SYMPTOMS), f"The main symptom of {d.name} is {d.symptom}."),
        ]
    for g in w.drugs:
        facts += [
            ("indication", g.name, disease_of[g.name], diseases, f"{g.name} is prescribed for {disease_of[g.name]}."),
            ("drug_class", g.name, g.drug_class, list(DRUG_CLASSES), f"{g.name} is a {g.drug_class}."),
        ]
    return [dict(zip(("relation", "subject", "answer", "pool", "exp"), fact)) for fact in facts]


def medmcqa(seed: int = 0) -> datasets.DatasetDict:
    """The speciality in the MedMCQA schema: train / validation / test over the same facts, each
    fact worded differently in each split, with the options in new orders.

    Args:
        seed: the seed of the wordings' assignment to splits and of the option orders.

    Returns:
        `train`, `validation` and `test` in the MedMCQA schema.
    """
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for fact in medical_facts():
        wordings = rng.sample(_WORDINGS[fact["relation"]], len(_WORDINGS[fact["relation"]]))
        for split in SPLITS:
            taken, wordings = wordings[: _WORDINGS_PER_SPLIT[split]], wordings[_WORDINGS_PER_SPLIT[split] :]
            for wording in taken:
                options, cop = _choices(rng, fact["answer"], fact["pool"])
                question = wording.format(fact["subject"])
                splits[split].append(
                    {
                        "id": f"{split}-{len(splits[split]):05d}",
                        "question": question[0].upper() + question[1:],
                        **dict(zip(OPTION_KEYS, options)),
                        "cop": cop,
                        "choice_type": "single",
                        "exp": fact["exp"],
                        "subject_name": _SUBJECT[fact["relation"]],
                        "topic_name": fact["relation"],
                    }
                )
    for rows in splits.values():
        rng.shuffle(rows)
    features = datasets.Features({c: datasets.Value("int64" if c == "cop" else "string") for c in COLUMNS})
    return datasets.DatasetDict({s: datasets.Dataset.from_list(rows, features=features) for s, rows in splits.items()})
