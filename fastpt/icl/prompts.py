"""Zero/one/few-shot prompt construction (GPT-3 style, as lm-evaluation-harness builds them).

A prompt is: optional task description, k solved examples, then the query without its
answer. Example ``{"input": "Ruza", "target": "Varna"}`` with the default format renders as
``"Ruza -> Varna"``; the query as context ``"Ruza ->"`` and continuation ``" Varna"``: the
space between them belongs to the continuation (lm-eval's rule), so the tokenizer sees the
answer word as it appears mid-text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    description: str = ""            # first line(s), e.g. "Where does each person live?"
    description_separator: str = "\n"
    input_prefix: str = ""
    answer_separator: str = " ->"    # between input and answer
    target_prefix: str = " "         # before the answer (moved into the continuation)
    example_separator: str = "\n"

    def __post_init__(self):
        for name, value in vars(self).items():  # None would render as the text "None"
            if not isinstance(value, str):
                raise TypeError(f"PromptFormat.{name} must be a str, got {type(value).__name__} {value!r}")

    def example(self, item: dict) -> str:
        return f"{self.input_prefix}{item['input']}{self.answer_separator}{self.target_prefix}{item['target']}"

    def query(self, item: dict) -> str:
        return f"{self.input_prefix}{item['input']}{self.answer_separator}"


def sample_examples(pool: list[dict], query: dict, k: int, seed: int) -> list[dict]:
    """k examples drawn without replacement from ``pool``, never the query itself (nor a pool
    entry with its input and target, which would show the answer); the same (seed, query)
    always gives the same examples."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    _check_item("query", query)
    if not isinstance(pool, (list, tuple)):  # None failed as "'NoneType' object is not iterable"
        raise TypeError(f"pool must be a list of examples (dicts with 'input' and 'target'), got "
                        f"{type(pool).__name__}")
    for i, ex in enumerate(pool):
        _check_item(f"pool[{i}]", ex)
    key = (query.get("input"), query.get("target"))
    candidates = [ex for ex in pool if ex is not query and (ex.get("input"), ex.get("target")) != key]
    if k > len(candidates):
        raise ValueError(f"asked for {k} examples but the pool has only {len(candidates)} "
                         "besides the query")
    rng = random.Random(f"{seed}/{query.get('input')}")
    return rng.sample(candidates, k)


def _check_item(name: str, item, target: bool = True) -> None:
    """An example or query: a dict with an "input" (and a "target" where one is needed)."""
    if not isinstance(item, dict):
        raise TypeError(f"{name} must be a dict with 'input' and 'target', got {type(item).__name__}")
    missing = [k for k in ("input", "target")[:2 if target else 1] if k not in item]
    if missing:
        raise ValueError(f"{name} lacks {missing}: an item has 'input' and 'target' (keys: {sorted(item)})")


def build_prompt(query: dict, examples: list[dict], fmt: PromptFormat = PromptFormat()) -> str:
    """The context string for ``query`` after ``examples`` (k = len(examples) shots)."""
    _check_item("query", query, target=False)
    for i, ex in enumerate(examples):
        _check_item(f"examples[{i}]", ex)
    parts = [fmt.example(ex) for ex in examples] + [fmt.query(query)]
    body = fmt.example_separator.join(parts)
    return f"{fmt.description}{fmt.description_separator}{body}" if fmt.description else body


def requests_for(query: dict, examples: list[dict], fmt: PromptFormat = PromptFormat()) -> list[tuple[str, str]]:
    """(context, continuation) for every candidate answer of a multiple-choice item."""
    context = build_prompt(query, examples, fmt)
    choices = query.get("choices")
    if choices is not None and (isinstance(choices, str) or not isinstance(choices, (list, tuple))):
        raise TypeError(f"query['choices'] must be a list of answers, got {type(choices).__name__} "
                        f"{choices!r}")  # a str would be split into characters
    if not choices:
        _check_item("query", query)
        choices = [query["target"]]
    return [(context, f"{fmt.target_prefix}{c}") for c in choices]
