"""T5 span corruption (Raffel et al. 2020), following T5's ``random_spans_noise_mask``.

A raw run of ``raw_length`` tokens gets round(raw_length * noise_density) noise tokens in
round(noise / mean_span_length) spans; noise and non-noise lengths are each split at random
into that many non-empty segments and interleaved, non-noise first. Each noise span becomes
one sentinel in the input; the target lists each sentinel followed by the tokens it hid.
Sentinel k is ``vocab_size - 1 - k`` (``<extra_id_0>`` is the top id). EOS ends both.
``span_corruption_lengths(512)`` gives the raw length that yields exactly 512 input and
114 target tokens: (568, 114).
"""

from __future__ import annotations

import torch

from fastpt.data.datasets import reseed_in_worker


def _noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a run of ``length`` >= 2 tokens: at least one noise and
    one non-noise token, at least one span (T5's random_spans_noise_mask clamps the same way)."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return noise, max(int(round(noise / mean_span_length)), 1)


def _lengths(raw_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    # The counts noise_mask uses: without its clamps, short runs or long mean spans (0 spans
    # by rounding) gave lengths the collator could not produce, and feasible sizes were refused.
    noise, spans = _noise_counts(max(raw_length, 2), noise_density, mean_span_length)
    return raw_length - noise + spans + 1, noise + spans + 1


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens to take, target length) so inputs come out at exactly ``inputs_length``."""
    if inputs_length < 3:  # the shortest corruption: one kept token, one sentinel, EOS
        raise ValueError(f"inputs_length {inputs_length} is too short for span corruption (need at least 3)")
    raw = inputs_length - 1
    while _lengths(raw + 1, noise_density, mean_span_length)[0] <= inputs_length:
        raw += 1
    return raw, _lengths(raw, noise_density, mean_span_length)[1]


def _segment(n_items: int, n_segments: int, g: torch.Generator) -> torch.Tensor:
    """Random split of n_items into n_segments non-empty parts (T5's _random_segmentation)."""
    first = torch.zeros(n_items, dtype=torch.long)
    cut_points = torch.randperm(n_items - 1, generator=g)[:n_segments - 1] + 1
    first[cut_points] = 1
    segment = first.cumsum(0)
    return torch.bincount(segment, minlength=n_segments)


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               g: torch.Generator) -> torch.Tensor:
    """Bool (length,) mask of noise positions, in spans, starting with non-noise."""
    n = max(length, 2)
    noise, spans = _noise_counts(n, noise_density, mean_span_length)
    lengths = torch.stack([_segment(n - noise, spans, g), _segment(noise, spans, g)], 1).flatten()
    span_index = torch.repeat_interleave(torch.arange(2 * spans), lengths)
    return (span_index % 2 == 1)[:length]


class SpanCorruptionCollator:
    """Turn raw token runs of ``raw_length`` into fixed-size T5 (input_ids, labels) batches.

    The spans come from ``generator``: reseeded per DataLoader worker (``reseed_in_worker``),
    or per batch under the ``Trainer`` (``seed_collator``), as ``MLMCollator``'s masks."""

    def __init__(self, vocab_size: int, eos_id: int, inputs_length: int = 512,
                 noise_density: float = 0.15, mean_span_length: float = 3.0, seed: int = 0):
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_span_length < 1:
            raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
        self.raw_length, self.targets_length = span_corruption_lengths(
            inputs_length, noise_density, mean_span_length)
        self.inputs_length, self.vocab_size, self.eos_id = inputs_length, vocab_size, eos_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._check_lengths_and_sentinels()

    def _check_lengths_and_sentinels(self) -> None:
        # The output lengths and the number of sentinels depend on the lengths only, not on
        # where the spans fall: one trial run (the generator's state restored) checks them.
        state = self.generator.get_state()
        inputs, targets = self.corrupt(torch.zeros(max(self.raw_length, 1), dtype=torch.long))
        self.generator.set_state(state)
        if (len(inputs), len(targets)) != (self.inputs_length, self.targets_length):
            raise ValueError(f"inputs_length {self.inputs_length} is too short for span corruption at noise "
                             f"density {self.noise_density} (its inputs would come out at {len(inputs)} tokens)")
        lowest = int(torch.cat([inputs, targets]).min())
        if lowest < 0:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for the sentinel ids "
                             f"(vocab_size - 1 downwards) that inputs of {self.inputs_length} tokens need: "
                             f"they would reach {lowest}")

    def corrupt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One raw run (L,) -> (inputs, targets), each ending in EOS."""
        mask = noise_mask(len(tokens), self.noise_density, self.mean_span_length, self.generator)
        starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
        span_id = starts.cumsum(0) - 1  # which noise span a noise token belongs to
        sentinel = self.vocab_size - 1 - span_id
        keep_in_input = ~mask | starts
        inputs = torch.where(starts, sentinel, tokens)[keep_in_input]
        nonnoise_starts = ~mask & torch.cat([torch.tensor([True]), mask[:-1]])
        # Target = sentinel_k then the tokens of noise span k; the sentinel stands where the
        # preceding non-noise run was (T5 replaces non-noise runs by sentinels in the target).
        keep_in_target = mask | nonnoise_starts
        target_sentinel = self.vocab_size - 1 - (nonnoise_starts.cumsum(0) - 1)
        targets = torch.where(nonnoise_starts, target_sentinel, tokens)[keep_in_target]
        eos = torch.tensor([self.eos_id])
        return torch.cat([inputs, eos]), torch.cat([targets, eos])

    def __call__(self, runs: list) -> dict:
        if not len(runs):
            raise ValueError("cannot collate an empty batch")
        reseed_in_worker(self, self.seed)  # else every DataLoader worker draws the same spans
        pairs = []
        for run in runs:
            run = torch.as_tensor(run, dtype=torch.long)
            if run.shape != (self.raw_length,):
                raise ValueError(f"span corruption needs runs of {self.raw_length} tokens "
                                 f"(for {self.inputs_length} inputs), got {tuple(run.shape)}")
            pairs.append(self.corrupt(run))
        return {"input_ids": torch.stack([p[0] for p in pairs]),
                "labels": torch.stack([p[1] for p in pairs])}
