"""Log-likelihood scoring of continuations with a decoder, no gradient, shared prefixes once.

For a (context, continuation) request the context's tokens are the tokenization of the
context alone and the continuation's tokens are ``whole[len(ctx):]``, where ``whole`` is the
tokenization of context + continuation: lm-evaluation-harness's split (``_encode_pair``),
robust to a merge across the boundary. All trailing whitespace of the context moves to the
continuation first. The score is the sum of the continuation tokens' log-probabilities;
``is_greedy`` says whether each of them was the argmax. Requests sharing a context (the
choices of one question) are scored together: the context runs once into a KV cache that
all choices continue from. A request too long for the model loses its oldest context tokens
exactly as lm-eval's HF model truncates: the model reads
``(ctx + cont)[-(max_length + 1):][:-1]``, so ``max_length`` tokens are read and a
continuation of up to ``max_length`` tokens is scored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class Score:
    logprob: float
    is_greedy: bool
    n_tokens: int


def split_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-eval's whitespace and boundary rules: the
    context's trailing whitespace (spaces, newlines) moves to the continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context = stripped
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} adds no token to the context")
    # The context is encoded alone, not whole[:len(ctx)]: when a merge crosses the boundary
    # the two differ, and lm-eval conditions on the context as it encodes by itself.
    return ctx, cont


@torch.no_grad()
def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], *,
                  bos_id: int | None = None, empty_context_id: int | None = None) -> list[Score]:
    """Score each (context, continuation). ``bos_id`` is prepended to contexts (needed when
    a context is empty, so the first token has something to be predicted from); without it,
    ``empty_context_id`` stands in for an empty context alone (lm-eval's prefix token)."""
    for name, token in (("bos_id", bos_id), ("empty_context_id", empty_context_id)):
        if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
            raise TypeError(f"{name} must be a token id (int) or None, got {type(token).__name__} {token!r}")
    pairs = []
    for i, request in enumerate(requests):
        if not (isinstance(request, (tuple, list)) and len(request) == 2 and
                all(isinstance(part, str) for part in request)):
            raise TypeError(f"requests[{i}] must be a (context, continuation) pair of strings, got "
                            f"{request!r:.80}")
        ctx, cont = split_request(tokenizer, *request)
        if bos_id is not None:
            ctx = [bos_id] + ctx
        elif not ctx and empty_context_id is not None:
            ctx = [empty_context_id]
        pairs.append((ctx, cont))
    return score_tokens(model, pairs)


def max_length(model) -> int | None:
    """The input tokens the model takes: ``max_position_embeddings`` (None: no such limit), less
    a prompt-tuned model's soft tokens, which take the first positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if limit is None else limit - getattr(model, "num_virtual_tokens", 0)


@torch.no_grad()
def score_tokens(model, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
    """Score token-level (context ids, continuation ids) pairs: the path :func:`loglikelihood`
    and lm-eval's rolling windows share. A pair longer than the model's
    :func:`max_length` + 1 loses its oldest context tokens (lm-eval's truncation).

    Raises:
        ValueError: an empty context or continuation, or a continuation longer than the model.
    """
    model.eval()
    limit = max_length(model)
    groups: OrderedDict[tuple, list] = OrderedDict()
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx:
            raise ValueError("empty context: pass bos_id so the first token can be scored")
        if not cont:
            raise ValueError(f"pair {i}: empty continuation")
        ctx = _fit(list(ctx), list(cont), limit)
        groups.setdefault(tuple(ctx), []).append((i, list(cont)))
    scores: list[Score | None] = [None] * len(pairs)
    for ctx, items in groups.items():
        for i, score in zip((i for i, _ in items), _score_group(model, list(ctx), [c for _, c in items])):
            scores[i] = score
    return scores


def _fit(ctx: list[int], cont: list[int], max_length: int | None) -> list[int]:
    """The context lm-eval's HF model conditions on: it reads
    ``(ctx + cont)[-(max_length + 1):][:-1]``. The last continuation token is predicted but
    never read, so max_length + 1 tokens take part; the continuation itself is never cut."""
    if max_length is None or len(ctx) + len(cont) <= max_length + 1:
        return ctx
    if len(cont) > max_length:
        raise ValueError(f"continuation of {len(cont)} tokens does not fit the model's "
                         f"{max_length} positions: expected at most {max_length} tokens")
    return ctx[len(ctx) + len(cont) - (max_length + 1):]


def _score_group(model, ctx: list[int], conts: list[list[int]]) -> list[Score]:
    """Score continuations of one context: the context runs once; its last logits predict
    every first token; each continuation but its last token then runs from a copy of the
    context's KV cache (the last token is only predicted, so it needs no position)."""
    n, L, longest = len(conts), len(ctx), max(len(c) for c in conts)
    device = next(model.parameters()).device
    prefix = model.new_cache(1, L)
    out = model(input_ids=torch.tensor([ctx], device=device), past_key_values=prefix,
                use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts each first token
    logp = first.expand(n, 1, -1)
    if longest > 1:
        logp = torch.cat([logp, _continuation_logprobs(model, prefix, L, conts, device)], 1)
    scores = []
    for r, c in enumerate(conts):
        lp = logp[r, :len(c)]
        target = torch.tensor(c, device=device)
        scores.append(Score(logprob=float(lp.gather(1, target[:, None]).sum()),
                            is_greedy=bool((lp.argmax(-1) == target).all()), n_tokens=len(c)))
    return scores


def _continuation_logprobs(model, prefix, L: int, conts: list[list[int]], device) -> torch.Tensor:
    """(n, longest - 1, V) log-probs of tokens 2.. of each continuation, from c[:-1]."""
    n, fed = len(conts), max(len(c) for c in conts) - 1
    cache = model.new_cache(n, L + fed)
    cache.fill_from(prefix)  # the context (and a prompt-tuned model's soft tokens), in every row
    ids = torch.zeros(n, fed, dtype=torch.long, device=device)
    for r, c in enumerate(conts):  # right padding: causal attention never looks ahead
        if len(c) > 1:
            ids[r, :len(c) - 1] = torch.tensor(c[:-1])
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits.float()
    return torch.log_softmax(logits, -1)
