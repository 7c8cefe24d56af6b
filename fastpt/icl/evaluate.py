"""Few-shot evaluation: multiple choice by log-likelihood (acc, acc_norm) and free
generation with stop strings. No gradient, no parameter changes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fastpt.icl.prompts import PromptFormat, build_prompt, requests_for, sample_examples
from fastpt.icl.scoring import loglikelihood, max_length


@dataclass
class ICLResult:
    k: int
    acc: float            # argmax of summed log-likelihood is the target
    acc_norm: float       # argmax of log-likelihood per character of the choice (as lm-eval)
    n: int
    predictions: list = field(default_factory=list)


def _check_items(items: list[dict], keys: tuple[str, ...], what: str) -> None:
    # A clear message instead of a KeyError from deep inside prompt building.
    if not items:
        raise ValueError(f"no {what} to evaluate")
    for i, item in enumerate(items):
        missing = [key for key in keys if not isinstance(item, dict) or key not in item]
        if missing:
            raise ValueError(f"{what}[{i}] lacks {missing}: each needs the keys {list(keys)}")


def evaluate_multiple_choice(model, tokenizer, items: list[dict], *, k: int, pool: list[dict],
                             fmt: PromptFormat = PromptFormat(), seed: int = 0,
                             bos_id: int | None = None) -> ICLResult:
    """k-shot accuracy on ``items`` ({"input", "target", "choices"}), examples from ``pool``."""
    _check_items(items, ("input", "target", "choices"), "items")
    if k and pool:  # an empty pool: sample_examples says how many examples it lacks
        _check_items(pool, ("input", "target"), "pool")
    correct = correct_norm = 0
    predictions = []
    for item in items:
        if not isinstance(item["choices"], (list, tuple)) or \
                not all(isinstance(c, str) for c in item["choices"]):
            raise TypeError(f"choices must be a list of strings, got {item['choices']!r}")
        if item["target"] not in item["choices"]:
            raise ValueError(f"target {item['target']!r} is not among the choices {item['choices']}")
        examples = sample_examples(pool, item, k, seed)
        reqs = requests_for(item, examples, fmt)
        scores = loglikelihood(model, tokenizer, reqs, bos_id=bos_id)
        ll = torch.tensor([s.logprob for s in scores])
        # lm-eval's acc_norm: per character of the choice itself, target prefix not counted
        per_char = ll / torch.tensor([float(len(c)) for c in item["choices"]])
        gold = item["choices"].index(item["target"])
        pred = int(ll.argmax())
        correct += pred == gold
        correct_norm += int(per_char.argmax()) == gold
        predictions.append(item["choices"][pred])
    n = len(items)
    return ICLResult(k=k, acc=correct / n, acc_norm=correct_norm / n, n=n, predictions=predictions)


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, *, stop: tuple[str, ...] = ("\n",),
                    max_new_tokens: int = 16, bos_id: int | None = None, **generate_options) -> str:
    """Greedy continuation of ``prompt`` (BOS first when ``bos_id`` is given), cut at the stop
    strings as lm-eval cuts (:func:`cut_at_stop`).

    A prompt too long for prompt + ``max_new_tokens`` to fit the model's
    ``max_position_embeddings`` (less a prompt-tuned model's soft tokens) keeps its last
    ``max_position_embeddings - max_new_tokens`` of them (lm-eval's left truncation, every
    model family; the BOS may go with it).
    ``generate_options`` (``do_sample``, ``temperature``, ``top_k``, ...) go to
    :func:`fastpt.models.generate`.

    Raises:
        ValueError: the prompt encodes to no tokens and there is no ``bos_id``, or
            ``max_new_tokens`` leaves no room for the prompt.
    """
    from fastpt.models import generate
    stop = stop_strings(stop)  # before generating: a bad one would fail only after the work
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if bos_id is not None:
        ids = [bos_id] + ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens: pass bos_id to generate from nothing")
    ids = _left_truncate(ids, max_new_tokens, max_length(model))
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, **generate_options)
    return cut_at_stop(tokenizer.decode(out[0, len(ids):].tolist()), stop)


def _left_truncate(ids: list[int], max_new_tokens, max_length: int | None) -> list[int]:
    """The last ``max_length - max_new_tokens`` prompt tokens, as lm-eval's HF model keeps
    them, so the prompt and every new token fit the model's positions."""
    if max_length is None or isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        return ids  # generate() names a bad max_new_tokens
    room = max_length - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                         f"{max_length} positions: expected max_new_tokens < {max_length}")
    return ids[-room:]


def cut_at_stop(text: str, stop) -> str:
    """``text`` up to its stop strings, as lm-eval's ``postprocess_generated_text``: each
    non-empty stop string in turn cuts the text at its first occurrence (an empty one would
    cut everything, so it is skipped). ``stop``: a string, a sequence of strings, or None."""
    for term in stop_strings(stop):
        if term:
            text = text.split(term)[0]
    return text


def stop_strings(stop) -> tuple[str, ...]:
    """``stop`` as a tuple of strings: None is none, a str is one; TypeError otherwise."""
    if stop is None:
        return ()
    terms = (stop,) if isinstance(stop, str) else stop
    if not isinstance(terms, (list, tuple)) or not all(isinstance(t, str) for t in terms):
        raise TypeError(f"stop must be a string, a list of strings or None, got {stop!r:.80}")
    return tuple(terms)


def evaluate_generation(model, tokenizer, items: list[dict], *, k: int, pool: list[dict],
                        fmt: PromptFormat = PromptFormat(), seed: int = 0, **kw) -> float:
    """Exact-match accuracy of greedy answers (stripped) against the targets."""
    _check_items(items, ("input", "target"), "items")
    if k and pool:  # an empty pool: sample_examples says how many examples it lacks
        _check_items(pool, ("input", "target"), "pool")
    hits = 0
    for item in items:
        prompt = build_prompt(item, sample_examples(pool, item, k, seed), fmt)
        hits += generate_answer(model, tokenizer, prompt, **kw).strip() == str(item["target"]).strip()
    return hits / len(items)


def few_shot_table(model, tokenizer, tasks: dict[str, tuple[list[dict], list[dict]]],
                   shots=(0, 1, 4), *, on_row=None, **kw) -> list[dict]:
    """:func:`evaluate_multiple_choice` for every task and every k in ``shots``.

    ``tasks`` maps a task name to (items, pool). Returns one row per (task, k):
    {"task", "k", "acc", "acc_norm", "n"}; ``on_row(row)`` is called as each is ready.
    """
    shots = list(shots) if isinstance(shots, Iterable) and not isinstance(shots, (str, bytes)) else shots
    if not isinstance(shots, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in shots):
        # ("1",) failed as "'<' not supported between instances of 'str' and 'int'"
        raise TypeError(f"shots must be a list of ints (examples per prompt), got {shots!r}")
    if any(k < 0 for k in shots):
        raise ValueError(f"shots must be >= 0, got {list(shots)}")
    rows = []
    for task, (items, pool) in tasks.items():
        for k in shots:
            r = evaluate_multiple_choice(model, tokenizer, items, k=k, pool=pool, **kw)
            rows.append({"task": task, "k": k, "acc": r.acc, "acc_norm": r.acc_norm, "n": r.n})
            if on_row is not None:
                on_row(rows[-1])
    return rows
