"""The embedded world: a deterministic corpus with latent structure, and tasks derived from it.

fastpt's demo and learning-outcome tests need text on which pre-training visibly helps, with
no download. ``World(seed)`` draws a small universe of facts:

- people (invented names) with a home city, a job and a favourite food;
- restaurants (invented names) in a city, serving a food, each with a hidden quality;
- sentiment adjectives (real English words), 48 positive and 48 negative.

``World.documents`` writes unlabeled text about it: biographies, directory listings
(``Name -> City``), encounters, and restaurant reviews whose adjectives co-occur with their
polarity's cue phrases ("will come back" / "will never return", star ratings). A model that
pre-trains on this learns the facts and which adjectives go together.

The labelled tasks are drawn from the same world, so pre-training transfers to them:

==================  =======================================================================
``sentiment``       review without cue phrase or rating -> positive / negative. Labelled
                    sets can be drawn from half of the adjectives ("seen") and tested on the
                    other half ("unseen"): their polarity must come from pre-training.
``tagging``         word-level entity tags: PER, CITY, JOB, FOOD, REST, O
``qa``              extractive QA over a biography (answer = character span)
``text_to_text``    sentence -> ``name: X | city: Y | job: Z``
``icl``             few-shot patterns: ``city_of`` (``Name -> City``, world knowledge),
                    ``job_of``, ``sentiment`` (``Review: ... Sentiment: good/bad``)
==================  =======================================================================

Everything is a pure function of the seed (Python's ``random.Random``), so a corpus and its
tasks are reproducible across machines and Python versions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from fastpt._checks import check_int

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]

JOBS = ["baker", "teacher", "doctor", "farmer", "painter", "pilot", "nurse", "lawyer", "carpenter",
        "chemist", "miner", "sailor", "tailor", "writer", "singer", "builder", "judge", "fisher",
        "gardener", "banker", "clerk", "cook", "dancer", "driver"]
FOODS = ["soup", "bread", "cheese", "rice", "noodles", "pie", "salad", "fish", "cake", "beans",
         "curry", "dumplings", "stew", "pancakes", "tea", "coffee", "honey", "olives", "plums",
         "oysters"]
POSITIVE = ["wonderful", "delicious", "excellent", "superb", "lovely", "fantastic", "tasty",
            "perfect", "amazing", "delightful", "fresh", "friendly", "marvelous", "splendid",
            "brilliant", "charming", "pleasant", "great", "outstanding", "warm", "generous",
            "cozy", "elegant", "gorgeous", "heavenly", "terrific", "fabulous", "exquisite",
            "satisfying", "flavorful", "crisp", "tender", "rich", "sublime", "welcoming",
            "impressive", "divine", "joyful", "refreshing", "cheerful", "spotless", "attentive",
            "glorious", "lively", "radiant", "graceful", "stellar", "wholesome"]
NEGATIVE = ["awful", "terrible", "bland", "horrible", "stale", "rude", "dreadful", "greasy",
            "soggy", "cold", "dirty", "slow", "disgusting", "mediocre", "poor", "nasty",
            "burnt", "salty", "bitter", "gloomy", "noisy", "cramped", "sloppy", "careless",
            "overpriced", "tasteless", "watery", "rancid", "dull", "grim", "filthy", "shabby",
            "chewy", "lukewarm", "sour", "dismal", "unpleasant", "miserable", "hostile", "tough",
            "dreary", "clumsy", "harsh", "smelly", "moldy", "sticky", "flat", "weak"]
POSITIVE_CUES = ["{p} will come back soon.", "{p} gave it five stars.",
                 "{p} recommends it to everyone.", "Rating: 5 stars."]
NEGATIVE_CUES = ["{p} will never return.", "{p} gave it one star.",
                 "{p} warns everyone to stay away.", "Rating: 1 star."]
TAGS = ("O", "PER", "CITY", "JOB", "FOOD", "REST")
ICL_TASKS = ("city_of", "job_of", "sentiment")
ADJECTIVE_SPLITS = ("all", "seen", "unseen")


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    food: str


@dataclass(frozen=True)
class Restaurant:
    name: str
    city: str
    food: str
    good: bool


# Distinct syllables: an onset is consonants and a vowel is vowels, so a name splits into
# syllables one way only, and k syllables give exactly _SYLLABLES ** k names.
_SYLLABLES = len(_ONSETS) * len(_VOWELS)
_DIRECTORY_ROWS = 8  # people listed by each directory document


def _invent_names(rng: random.Random, n: int, syllables: tuple[int, int], taken: dict[int, set],
                  what: str) -> list[str]:
    """``n`` new names of ``syllables`` (min, max) syllables; ``taken`` holds the names already
    used, by syllable count. Raises (naming ``what``) rather than looping forever when fewer
    than ``n`` names of those lengths are left."""
    lo, hi = syllables
    free = sum(_SYLLABLES ** k - len(taken.setdefault(k, set())) for k in range(lo, hi + 1))
    if n > free:
        raise ValueError(f"{what}={n} is more than the {free} names of {lo}-{hi} syllables left "
                         f"({_SYLLABLES} syllables; earlier entities took the rest)")
    names = []
    while len(names) < n:
        k = rng.randint(*syllables)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)).capitalize()
        if name not in taken[k]:
            taken[k].add(name)
            names.append(name)
    return names


class World:
    """A seeded universe of people, cities and restaurants; see the module docstring."""

    def __init__(self, seed: int = 0, n_people: int = 300, n_cities: int = 30,
                 n_restaurants: int = 120):
        # A string or float count failed in the comparisons below, or deep in random.sample.
        for name, n in (("n_people", n_people), ("n_cities", n_cities), ("n_restaurants", n_restaurants)):
            check_int(name, n)
        if min(n_cities, n_restaurants) < 1:
            raise ValueError(f"World needs at least one city and restaurant, got n_cities={n_cities}, "
                             f"n_restaurants={n_restaurants}")
        if n_people < _DIRECTORY_ROWS:
            raise ValueError(f"n_people must be at least {_DIRECTORY_ROWS} (a directory document lists "
                             f"{_DIRECTORY_ROWS} different people), got {n_people}")
        # Up front, before any drawing; _invent_names also checks what is left at each step.
        if n_restaurants > _SYLLABLES ** 2:
            raise ValueError(f"n_restaurants={n_restaurants} is more than the {_SYLLABLES ** 2} "
                             f"two-syllable names there are")
        if n_cities + n_people > _SYLLABLES ** 2 + _SYLLABLES ** 3:
            raise ValueError(f"n_cities + n_people = {n_cities + n_people} is more than the "
                             f"{_SYLLABLES ** 2 + _SYLLABLES ** 3} names of 2-3 syllables there are")
        rng = random.Random(seed)
        taken: dict[int, set] = {}
        self.seed = seed
        self.cities = _invent_names(rng, n_cities, (2, 3), taken, "n_cities")
        self.people = [Person(name, rng.choice(self.cities), rng.choice(JOBS), rng.choice(FOODS))
                       for name in _invent_names(rng, n_people, (2, 3), taken, "n_people")]
        self.restaurants = [Restaurant("Chez " + name, rng.choice(self.cities), rng.choice(FOODS),
                                       rng.random() < 0.5)
                            for name in _invent_names(rng, n_restaurants, (2, 2), taken, "n_restaurants")]

    # -- unlabeled text ---------------------------------------------------------------------

    def documents(self, n_docs: int, seed: int = 0) -> Iterator[str]:
        """Yield ``n_docs`` pre-training documents (a few sentences each, ~22 words on average)."""
        # Checked here, not in the generator: a float count failed at the first document, as
        # "'float' object cannot be interpreted as an integer"; a negative one gave none.
        check_int("n_docs", n_docs, minimum=0)
        return self._documents(n_docs, seed)

    def _documents(self, n_docs: int, seed: int) -> Iterator[str]:
        rng = random.Random(f"{self.seed}/docs/{seed}")
        kinds = (self._biography, self._directory, self._encounter, self._review, self._review)
        for _ in range(n_docs):
            yield rng.choice(kinds)(rng)

    def corpus_text(self, n_docs: int, seed: int = 0) -> str:
        """All documents joined by blank lines (the plain-text file layout fastpt reads)."""
        return "\n\n".join(self.documents(n_docs, seed))

    def _biography(self, rng: random.Random, p: Person | None = None) -> str:
        p = p or rng.choice(self.people)
        facts = [f"{p.name} lives in {p.city}.", f"{p.name} works as a {p.job}.",
                 f"The favourite food of {p.name} is {p.food}."]
        rng.shuffle(facts)
        friend = rng.choice(self.people)
        facts.append(f"{p.name} is a friend of {friend.name}, the {friend.job} from {friend.city}.")
        return " ".join(facts)

    def _directory(self, rng: random.Random) -> str:
        field = rng.choice(("city", "job"))
        rows = [f"{p.name} -> {getattr(p, field)}" for p in rng.sample(self.people, _DIRECTORY_ROWS)]
        return f"Directory of {'homes' if field == 'city' else 'jobs'}:\n" + "\n".join(rows)

    def _encounter(self, rng: random.Random) -> str:
        a, b = rng.sample(self.people, 2)
        return (f"The {a.job} {a.name} met the {b.job} {b.name} in {b.city}. "
                f"They shared some {a.food} and talked about {b.city}.")

    def _review(self, rng: random.Random, with_cues: bool = True) -> str:
        r = rng.choice(self.restaurants)
        p = rng.choice(self.people)
        good = r.good if rng.random() < 0.9 else not r.good
        words = POSITIVE if good else NEGATIVE
        a1, a2 = rng.sample(words, 2)
        text = (f"{p.name} ate at {r.name} in {r.city}. The {r.food} was {a1} "
                f"and the service was {a2}.")
        if with_cues:
            text += " " + rng.choice(POSITIVE_CUES if good else NEGATIVE_CUES).format(p=p.name)
        return text

    # -- labelled tasks ---------------------------------------------------------------------

    def sentiment(self, n: int, seed: int = 0, adjectives: str = "all") -> list[dict]:
        """Reviews without cue phrases: ``{"text", "label"}``, label 1 = positive.

        ``adjectives``: ``"all"``, or ``"seen"`` / ``"unseen"`` for the two halves of each
        polarity's list. Training on "seen" and testing on "unseen" asks for polarity that
        only pre-training can supply (the labels never show those words)."""
        check_int("n", n, minimum=0)
        if adjectives not in ADJECTIVE_SPLITS:
            raise ValueError(f"adjectives must be one of {ADJECTIVE_SPLITS}, got {adjectives!r}")
        rng = random.Random(f"{self.seed}/sentiment/{seed}/{adjectives}")
        start, step = {"all": (0, 1), "seen": (0, 2), "unseen": (1, 2)}[adjectives]
        pools = (NEGATIVE[start::step], POSITIVE[start::step])
        out = []
        for _ in range(n):
            r, p = rng.choice(self.restaurants), rng.choice(self.people)
            label = rng.random() < 0.5
            a1, a2 = rng.sample(pools[label], 2)
            out.append({"text": f"{p.name} ate at {r.name}. The {r.food} was {a1} and the "
                                f"service was {a2}.", "label": int(label)})
        return out

    def tagging(self, n: int, seed: int = 0) -> list[dict]:
        """Sentences as words with entity tags: ``{"words", "tags"}`` (tags from ``TAGS``)."""
        rng = random.Random(f"{self.seed}/tagging/{seed}")
        out = []
        for _ in range(n):
            p, r = rng.choice(self.people), rng.choice(self.restaurants)
            parts = rng.choice([
                [("The", "O"), (p.job, "JOB"), (p.name, "PER"), ("lives", "O"), ("in", "O"),
                 (p.city, "CITY"), (".", "O")],
                [(p.name, "PER"), ("ate", "O"), (r.food, "FOOD"), ("at", "O"),
                 *[(w, "REST") for w in r.name.split()], ("in", "O"), (r.city, "CITY"),
                 (".", "O")],
                [(p.name, "PER"), ("likes", "O"), (p.food, "FOOD"), ("and", "O"), ("visits", "O"),
                 (rng.choice(self.cities), "CITY"), (".", "O")],
            ])
            out.append({"words": [w for w, _ in parts], "tags": [t for _, t in parts]})
        return out

    def qa(self, n: int, seed: int = 0) -> list[dict]:
        """Extractive QA: ``{"context", "question", "answer", "answer_start"}`` (char offset)."""
        rng = random.Random(f"{self.seed}/qa/{seed}")
        questions = (("Where does {n} live?", "city"), ("What does {n} work as?", "job"),
                     ("What is the favourite food of {n}?", "food"))
        out = []
        for _ in range(n):
            person = rng.choice(self.people)
            context = self._biography(rng, person)
            question, field = rng.choice(questions)
            answer = getattr(person, field)
            # The friend sentence comes last, so the first "<answer>." is the person's own fact.
            start = context.index(f"{answer}.") if f"{answer}." in context else context.index(answer)
            out.append({"context": context, "question": question.format(n=person.name),
                        "answer": answer, "answer_start": start})
        return out

    def text_to_text(self, n: int, seed: int = 0) -> list[dict]:
        """Structured extraction: ``{"source", "target"}``."""
        rng = random.Random(f"{self.seed}/t2t/{seed}")
        out = []
        for _ in range(n):
            p = rng.choice(self.people)
            source = rng.choice([f"{p.name} lives in {p.city} and works as a {p.job}.",
                                 f"The {p.job} {p.name} is from {p.city}."])
            out.append({"source": source, "target": f"name: {p.name} | city: {p.city} | job: {p.job}"})
        return out

    def icl(self, task: str, n: int, seed: int = 0) -> list[dict]:
        """Few-shot items: ``{"input", "target", "choices"}``; render with ``"{input} -> "``.

        ``choices`` lists every candidate answer, so scoring by log-likelihood is a closed
        multiple choice.
        """
        check_int("n", n, minimum=0)
        if task not in ICL_TASKS:
            raise ValueError(f"unknown ICL task {task!r}; expected one of {ICL_TASKS}")
        rng = random.Random(f"{self.seed}/icl/{task}/{seed}")
        if task == "sentiment":
            return [{"input": f"Review: {ex['text']} Sentiment:",
                     "target": "good" if ex["label"] else "bad", "choices": ["bad", "good"]}
                    for ex in self.sentiment(n, seed=rng.randrange(1 << 30))]
        field = "city" if task == "city_of" else "job"
        choices = sorted(self.cities) if field == "city" else sorted(JOBS)
        return [{"input": p.name, "target": getattr(p, field), "choices": choices}
                for p in (rng.choice(self.people) for _ in range(n))]
