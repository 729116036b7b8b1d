"""The fixed fictional world the tiny LM knows (general facts) and learns (the medical domain).

It is generated once from a constant seed, so that the shipped model and every data set built
later agree on it; the `seed` arguments of the generators only choose which examples are drawn.
Names are made of syllables, so that no fact can be guessed from real-world knowledge.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache


WORLD_SEED = 1234

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr")
_VOWELS = ("a", "e", "i", "o", "u")

# Commonsense-style cause and effect: everyday (not fictional) pairs, so the skill is "world
# knowledge" the way common sense is for a real LM.
CAUSE_EFFECT = (
    ("drops a glass on the floor", "the glass breaks"),
    ("leaves ice in the sun", "the ice melts"),
    ("forgets to water the plant", "the plant dies"),
    ("runs for an hour", "the runner is tired"),
    ("skips breakfast", "the stomach growls"),
    ("turns off the lights", "the room is dark"),
    ("opens the window in winter", "the room gets cold"),
    ("puts bread in the toaster", "the bread turns brown"),
    ("stays up all night", "the student is sleepy"),
    ("walks in the rain", "the coat gets wet"),
    ("heats the water", "the water boils"),
    ("plants a seed", "a flower grows"),
    ("lights the candle", "the flame glows"),
    ("shakes the tree", "the apples fall"),
    ("pops the balloon", "a loud bang is heard"),
    ("feeds the dog", "the dog wags its tail"),
    ("rings the bell", "the class begins"),
    ("cuts the rope", "the swing falls"),
    ("closes the umbrella in the storm", "the hair gets wet"),
    ("eats too much cake", "the child feels sick"),
    ("winds the clock", "the clock ticks"),
    ("blows on the soup", "the soup cools down"),
    ("presses the switch", "the fan starts"),
    ("throws the ball at the window", "the window cracks"),
    ("sits in the sun all day", "the skin burns"),
    ("loses the key", "the door stays locked"),
    ("tells a funny joke", "the friends laugh"),
    ("paints the wall", "the wall changes colour"),
    ("adds sugar to the tea", "the tea tastes sweet"),
    ("leaves the milk out for a week", "the milk turns sour"),
    ("practises the piano every day", "the playing improves"),
    ("breaks the pencil", "the pencil cannot write"),
    ("opens the cage", "the bird flies away"),
    ("charges the phone", "the battery is full"),
    ("steps on the cat's tail", "the cat hisses"),
    ("drops the egg", "the egg cracks"),
    ("pulls the plug", "the bath drains"),
    ("wins the race", "the team cheers"),
    ("misses the bus", "the worker is late"),
    ("puts on a warm coat", "the body stays warm"),
)

SYMPTOMS = (
    "fever",
    "cough",
    "rash",
    "headache",
    "dizziness",
    "nausea",
    "joint pain",
    "chills",
    "fatigue",
    "blurred vision",
    "itching",
    "sore throat",
    "back pain",
    "swelling",
    "insomnia",
    "muscle cramps",
)
DISEASE_KINDS = ("fever", "syndrome", "disease", "palsy", "pox")
DRUG_SUFFIXES = ("mab", "zole", "cillin", "pril", "statin", "vir", "dine", "lol")
DRUG_CLASSES = (
    "antiviral",
    "antibiotic",
    "antifungal",
    "beta blocker",
    "steroid",
    "antihistamine",
)


@dataclass(frozen=True)
class Disease:
    name: str
    symptom: str
    drug: str


@dataclass(frozen=True)
class Drug:
    name: str
    drug_class: str


@dataclass(frozen=True)
class World:
    capitals: tuple[tuple[str, str], ...]  # (country, capital)
    diseases: tuple[Disease, ...]
    drugs: tuple[Drug, ...]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def _unique_words(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        word = _word(rng, syllables)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@cache
def world(num_countries: int = 60, num_diseases: int = 16) -> World:
    """The fictional world: countries and capitals (general), diseases and drugs (domain)."""
    rng = random.Random(WORLD_SEED)
    taken: set[str] = set()
    countries = [w.capitalize() + "ia" for w in _unique_words(rng, num_countries, 2, taken)]
    capitals = [w.capitalize() for w in _unique_words(rng, num_countries, 2, taken)]
    disease_stems = _unique_words(rng, num_diseases, 2, taken)
    drug_stems = _unique_words(rng, num_diseases, 2, taken)
    drugs = tuple(Drug(stem + rng.choice(DRUG_SUFFIXES), rng.choice(DRUG_CLASSES)) for stem in drug_stems)
    diseases = tuple(
        Disease(
            f"{stem.capitalize()} {rng.choice(DISEASE_KINDS)}",
            rng.choice(SYMPTOMS),
            drug.name,
        )
        for stem, drug in zip(disease_stems, drugs)
    )
    return World(tuple(zip(countries, capitals)), diseases, drugs)
