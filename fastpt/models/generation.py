"""Autoregressive generation with a static, preallocated KV cache.

Greedy, sampling (temperature, top-k, top-p), beam search, repetition penalty and stop
tokens, for :class:`~fastpt.models.Decoder` (prompt -> prompt + continuation) and
:class:`~fastpt.models.Seq2Seq` (encoder once, then one decoder step per token), bare or
under prompt tuning (:class:`~fastpt.finetune.prompt_tuning.PromptTuned`).

Batched prompts may have different lengths: pass a list of token lists, or a padded tensor
with its ``attention_mask`` (padding on either side). Rows are re-padded on the left
internally, so every row's last prompt token sits in the same column; each row's position
ids count its own tokens only, and pad keys are masked, so a row's continuation does not
depend on the other rows.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from fastpt.models._decode_weights import decode_weights as _decode_weights


def _as_batch(input_ids, attention_mask, pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask) left-padded: every row's real tokens at its right end, in order."""
    if not isinstance(input_ids, Tensor):
        if attention_mask is not None:  # a list is padded here: there is nothing for a mask to mark
            raise ValueError("attention_mask goes with a padded (B, T) tensor of input_ids; a list of "
                             "prompts of any lengths needs none")
        rows = [_token_list(r, i) for i, r in enumerate(input_ids)]
        if not rows:
            raise ValueError("input_ids holds no prompts (an empty list)")
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = True
        return ids, mask
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError(f"input_ids holds no prompts (shape {tuple(input_ids.shape)})")
    if input_ids.shape[1] == 0:
        raise ValueError("every prompt needs at least one token (input_ids has length 0)")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have input_ids' shape")
    mask = attention_mask.to(torch.bool)
    if not bool(mask.any(1).all()):
        raise ValueError("every prompt needs at least one token (a row of attention_mask is all 0)")
    # A stable sort of the mask moves pads to the front and keeps the tokens' order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    mask = mask.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(~mask, pad_id)
    first = mask.shape[1] - int(mask.sum(1).max())  # drop columns that are padding in every row
    return ids[:, first:], mask[:, first:]


def _token_list(row, i: int) -> list[int]:
    """Prompt ``i`` of a list as ints: a list of integers, not a number or floats (which
    int() would truncate silently)."""
    if isinstance(row, (int, float, Tensor)) and not (isinstance(row, Tensor) and row.dim() == 1):
        raise TypeError("input_ids as a list must be a list of prompts, each a list of token ids "
                        f"(got {type(row).__name__} {row!r} as prompt {i}; one prompt: [[...]])")
    values = row.tolist() if isinstance(row, Tensor) else list(row)
    bad = [t for t in values if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise TypeError(f"prompt {i} holds {bad[:3]}: token ids must be integers")
    return values


def _check_token(name: str, token, vocab_size: int) -> None:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise ValueError(f"generate: {name} must be a token id in [0, {vocab_size}), got {token!r}")


def _apply_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty (as HF): seen tokens' logits divided by penalty if positive,
    multiplied if negative."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _filter(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus: the smallest set of tokens whose
    probability reaches top_p, at least one); removed tokens get -inf. The temperature divides
    the logits less their row max (same softmax): a tiny temperature then sends the others to
    -inf instead of overflowing to +inf, which would make the softmax NaN."""
    if temperature != 1.0:
        logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        remove = mass_before >= top_p
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def _is_seq2seq(model) -> bool:
    """A Seq2Seq, or a wrapper of one (prompt tuning's), which shares its config."""
    from fastpt.models.config import Seq2SeqConfig
    return isinstance(model.config, Seq2SeqConfig)


class _Stepper:
    """Runs the model one call at a time with the cache; hides Decoder vs Seq2Seq."""

    def __init__(self, model, ids: Tensor, mask: Tensor, batch_rows: int, max_new_tokens: int,
                 decoder_start: int | None, cache_dtype):
        self.model, self.seq2seq = model, _is_seq2seq(model)
        device = ids.device
        self.has_pad = not bool(mask.all())
        if self.seq2seq:
            enc_mask = mask if self.has_pad else None
            self.memory = model.encode(ids, enc_mask)[0].repeat_interleave(batch_rows, 0)
            self.memory_mask = None if enc_mask is None else enc_mask.repeat_interleave(batch_rows, 0)
            B = self.memory.shape[0]
            self.cache = model.new_cache(B, max_new_tokens + 1, dtype=cache_dtype)
            self.first = torch.full((B, 1), decoder_start, dtype=torch.long, device=device)
        else:
            ids, mask = ids.repeat_interleave(batch_rows, 0), mask.repeat_interleave(batch_rows, 0)
            B, T = ids.shape
            self.cache = model.new_cache(B, T + max_new_tokens, dtype=cache_dtype)
            self.mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
            self.mask[:, :T] = mask
            self.next_pos = mask.long().sum(1, keepdim=True)
            self.first = ids
            self.fed = 0  # columns of self.mask fed so far (a wrapper's cache may hold more)

    def reorder(self, rows: Tensor) -> None:
        self.cache.reorder(rows)
        if self.seq2seq:
            self.memory = self.memory.index_select(0, rows)
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, rows)
        else:
            self.mask = self.mask.index_select(0, rows)
            self.next_pos = self.next_pos.index_select(0, rows)

    def __call__(self, tokens: Tensor | None) -> Tensor:
        """Feed the prompt (tokens None) or one new token per row; last logits (B, V) fp32."""
        m = self.model
        if self.seq2seq:
            dec = self.first if tokens is None else tokens.unsqueeze(1)
            out = m(encoder_outputs=self.memory, attention_mask=self.memory_mask, decoder_input_ids=dec,
                    past_key_values=self.cache, logits_to_keep=1)
            return out.logits[:, -1].float()
        if tokens is None:
            T = self.first.shape[1]
            mask = self.mask[:, :T] if self.has_pad else None
            out = m(input_ids=self.first, attention_mask=mask, past_key_values=self.cache, logits_to_keep=1)
            self.fed = T
        else:
            self.fed += 1
            kw = dict(attention_mask=self.mask[:, :self.fed], position_ids=self.next_pos) if self.has_pad else {}
            out = m(input_ids=tokens.unsqueeze(1), past_key_values=self.cache, logits_to_keep=1, **kw)
            self.next_pos = self.next_pos + 1
        return out.logits[:, -1].float()


def stop_token_ids(config, eos_token_id=None) -> list[int]:
    """The ids generation stops at: ``eos_token_id`` (an id, a list or tensor of ids), else
    the config's (an id or a list, as config.json gives it); [] for none: generation then
    runs to max_new_tokens. Ids outside the vocabulary raise ValueError."""
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.tolist()
    # (anything but a list or tuple is one id, which _check_token refuses unless it is an int)
    stops = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for t in stops:  # one outside the vocabulary would never stop anything
        _check_token("eos_token_id", t, config.vocab_size)
    return stops


def _check_positions(model, mask: Tensor, max_new_tokens: int) -> None:
    """A model with a table of learned positions (GPT-2) cannot go past it: say so before
    generating, not when the position runs out mid-way. The last new token is not fed back,
    so a prompt of L tokens needs positions up to L + max_new_tokens - 2. Prompt tuning's
    soft tokens take the first positions."""
    config = model.config
    if getattr(config, "flavour", None) != "gpt2":
        return
    longest = int(mask.sum(1).max()) + getattr(model, "num_virtual_tokens", 0)
    limit = config.max_position_embeddings
    if longest + max_new_tokens - 1 > limit:
        raise ValueError(f"generate: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                         f"needs {longest + max_new_tokens - 1} positions, and this model has "
                         f"{limit} (learned positions): at most {max(limit - longest + 1, 0)} new tokens")


def _check_arguments(max_new_tokens, num_beams, top_k, do_sample, temperature, top_p,
                     repetition_penalty, length_penalty) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"generate: {name} must be an int, got {type(value).__name__} {value!r}")
    checks = [("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
              ("num_beams", num_beams, num_beams >= 1, ">= 1"),
              ("top_k", top_k, top_k >= 0, ">= 0 (0: off)"),
              ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
              ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0"),
              ("length_penalty", length_penalty, math.isfinite(length_penalty), "finite")]
    if do_sample:  # greedy and beam search do not use the temperature
        checks.append(("temperature", temperature, temperature > 0 and math.isfinite(temperature),
                       "> 0 and finite"))
    for name, value, ok, want in checks:
        if not ok:  # (NaN fails every comparison)
            raise ValueError(f"generate: {name} must be {want}, got {value!r}")


@torch.no_grad()
def generate(model, input_ids, attention_mask: Tensor | None = None, *, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             decoder_start_token_id: int | None = None, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None) -> Tensor:
    """Generate up to ``max_new_tokens`` tokens per prompt.

    Args:
        input_ids: (B, T) tensor, or a list of token-id lists of any lengths.
        attention_mask: (B, T), 1 = real token; padding on the left or right.
        do_sample: sample (after ``temperature``, ``top_k``, ``top_p``) instead of argmax.
        repetition_penalty: > 1 discourages tokens already in the prompt or output.
        num_beams: > 1 runs beam search (no sampling); a beam ends at a stop token; the search
            of a prompt ends when ``num_beams`` beams have ended (or at max_new_tokens); the
            best by sum of log-probs / generated length ** ``length_penalty`` is returned.
        eos_token_id: stop token id(s); default the config's ``eos_token_id`` (an id or a list
            of ids; none: run to max_new_tokens). A row stops at its first stop token (any of
            them); later columns hold ``pad_token_id`` (default: the first stop id).
        generator: the random generator for sampling.
        cache_dtype: KV cache dtype; default the autocast dtype when autocast is on, else the
            model's.

    Returns:
        Decoder: (B, T' + n) = left-padded prompts then the new tokens. Seq2Seq: (B, 1 + n),
        starting with the decoder start token. n <= max_new_tokens (all rows stopped early).
    """
    config = model.config
    stops = stop_token_ids(config, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    _check_token("pad_token_id", pad_token_id, config.vocab_size)  # it is fed back to the model
    _check_arguments(max_new_tokens, num_beams, top_k, do_sample, temperature, top_p,
                     repetition_penalty, length_penalty)
    if num_beams > 1 and do_sample:
        raise ValueError("beam search does not sample: use num_beams=1 with do_sample=True")
    if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
        raise TypeError(f"generate: cache_dtype must be a floating-point dtype, got {cache_dtype!r} "
                        "(keys and values would be truncated)")
    if decoder_start_token_id is None:
        decoder_start_token_id = getattr(config, "decoder_start_token_id", None)
    if _is_seq2seq(model):
        _check_token("decoder_start_token_id", decoder_start_token_id, config.vocab_size)
    device = next(model.parameters()).device
    if cache_dtype is None and torch.is_autocast_enabled(device.type):
        cache_dtype = torch.get_autocast_dtype(device.type)
    was_training = model.training
    model.eval()
    try:
        ids, mask = _as_batch(input_ids, attention_mask, pad_token_id)
        _check_positions(model, mask, max_new_tokens)
        ids, mask = ids.to(device), mask.to(device)
        step = _Stepper(model, ids, mask, num_beams, max_new_tokens, decoder_start_token_id, cache_dtype)
        B = ids.shape[0]
        prefix = step.first[::num_beams] if step.seq2seq else ids
        seen = None  # (B, V): tokens the repetition penalty applies to
        if repetition_penalty != 1.0:
            seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
            if step.seq2seq:
                seen[:, decoder_start_token_id] = True
            else:
                rows = torch.arange(B, device=device).unsqueeze(1).expand_as(ids)
                seen[rows[mask], ids[mask]] = True
        args = (step, prefix, seen, max_new_tokens, stops, pad_token_id)
        # The decode copies of the weights are made once (then cached): worth it for 8+ tokens.
        with _decode_weights(model, device.type, copies=max_new_tokens >= 8):
            if num_beams > 1:
                return _beam_search(*args, num_beams, length_penalty, repetition_penalty)
            return _sample(*args, do_sample, temperature, top_k, top_p, repetition_penalty, generator)
    finally:
        model.train(was_training)


def _sample(step, prefix, seen, max_new_tokens, stops, pad_id, do_sample, temperature, top_k,
            top_p, repetition_penalty, generator) -> Tensor:
    B = prefix.shape[0]
    stop_t = torch.tensor(stops, device=prefix.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
    out = []
    logits = step(None)
    for i in range(max_new_tokens):
        if seen is not None:
            logits = _apply_penalty(logits, seen, repetition_penalty)
        if do_sample:
            probs = _filter(logits, temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(done, pad_id)
        out.append(token)
        if seen is not None:
            seen[torch.arange(B), token] |= ~done
        if len(stops):
            done |= torch.isin(token, stop_t)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(token)
    return torch.cat([prefix, torch.stack(out, 1)], dim=1)


def _beam_search(step, prefix, seen, max_new_tokens, stops, pad_id, num_beams, length_penalty,
                 repetition_penalty) -> Tensor:
    B, K = prefix.shape[0], num_beams
    device = prefix.device
    seqs = prefix.repeat_interleave(K, 0)                       # (B*K, L)
    if seen is not None:
        seen = seen.repeat_interleave(K, 0)
    running = torch.full((B, K), float("-inf"), device=device)
    running[:, 0] = 0.0                                         # identical beams: start from one
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    batch_done = [False] * B
    done_at = [None] * B  # the step at which a prompt's K-th hypothesis finished
    logits = step(None)
    for i in range(max_new_tokens):
        if seen is not None:
            logits = _apply_penalty(logits, seen, repetition_penalty)
        logp = logits.log_softmax(-1) + running.view(-1, 1)     # (B*K, V)
        V = logp.shape[-1]
        cand_scores, cand = logp.view(B, K * V).topk(2 * K, dim=1)
        cand_beam, cand_tok = cand // V, cand % V
        next_rows, next_tok, next_score = [], [], []
        for b in range(B):
            rows, toks, scores = [], [], []
            for r in range(2 * K):
                beam, tok, score = int(cand_beam[b, r]), int(cand_tok[b, r]), float(cand_scores[b, r])
                if tok in stops:
                    if r < K and not batch_done[b]:
                        hyp = torch.cat([seqs[b * K + beam], seqs.new_tensor([tok])])
                        finished[b].append((score / (i + 1) ** length_penalty, hyp))
                    continue
                rows.append(b * K + beam)
                toks.append(tok)
                scores.append(score)
                if len(rows) == K:
                    break
            while len(rows) < K:  # more than K of the 2K candidates were stop tokens: dead beams
                rows.append(b * K)
                toks.append(pad_id)
                scores.append(float("-inf"))
            if len(finished[b]) >= K and not batch_done[b]:
                batch_done[b], done_at[b] = True, i
            next_rows += rows
            next_tok += toks
            next_score += scores
        rows_t = torch.tensor(next_rows, dtype=torch.long, device=device)
        tok_t = torch.tensor(next_tok, device=device)
        running = torch.tensor(next_score, device=device).view(B, K)
        seqs = torch.cat([seqs.index_select(0, rows_t), tok_t.unsqueeze(1)], dim=1)
        if seen is not None:
            seen = seen.index_select(0, rows_t)
            seen[torch.arange(B * K, device=device), tok_t] = True
        if all(batch_done) or i == max_new_tokens - 1:
            break
        step.reorder(rows_t)
        logits = step(tok_t)
    results = []
    for b in range(B):
        # Beams still running at the end compete at their current length, also where the K-th
        # hypothesis finished on the last step (as in transformers: beams at max length finish).
        if not batch_done[b] or done_at[b] == max_new_tokens - 1:
            n = seqs.shape[1] - prefix.shape[1]
            finished[b] += [(float(running[b, k]) / n ** length_penalty, seqs[b * K + k]) for k in range(K)]
        results.append(max(finished[b], key=lambda h: h[0])[1])
    width = max(len(r) for r in results)
    out = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    for b, r in enumerate(results):
        out[b, :len(r)] = r
    return out
