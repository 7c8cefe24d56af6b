"""T5 span corruption (Raffel et al. 2020), following T5's ``random_spans_noise_mask``.

A raw run of ``raw_length`` tokens gets round(raw_length * noise_density) noise tokens in
round(noise / mean_span_length) spans; noise and non-noise lengths are each split at random
into that many non-empty segments and interleaved, non-noise first. Each noise span becomes
one sentinel in the input; the target lists each sentinel followed by the tokens it hid.
Sentinel k is ``vocab_size - 1 - k`` (``<extra_id_0>`` is the top id). EOS ends both.
``span_corruption_lengths(512)`` gives the raw length that yields exactly 512 input and
114 target tokens: (568, 114); at noise density 0.5 T5's helper trims one raw token so the
targets match the inputs: (766, 512) rather than (767, 513).

The sentinels of a collator take the top ``n_spans`` ids; the run tokens, ``eos_id`` and
``pad_id`` must lie below them, which the collator checks (the runs with one max per batch).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastpt.data.datasets import reseed_in_worker
from fastpt._checks import check_int


def _check_noise(noise_density: float, mean_span_length: float) -> None:
    """Finite numbers in range: a NaN passed the range checks (every comparison with it is
    False) and failed later as "cannot convert float NaN to integer"."""
    for name, value in (("noise_density", noise_density), ("mean_span_length", mean_span_length)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
    # Written so that NaN fails them: "not (x in range)" rather than "x out of range".
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not 1 <= mean_span_length < math.inf:
        raise ValueError(f"mean_span_length must be a finite number >= 1, got {mean_span_length}")


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
    """(raw tokens to take, target length) so inputs come out at exactly ``inputs_length``,
    as T5's ``random_spans_helper`` computes them (with noise_mask's clamps for short runs).

    At noise_density 0.5 the targets can come out one longer than the inputs (767 raw ->
    512 / 513); T5 then takes one raw token less (766 -> 512 / 512), and so does this, where
    the shorter run still fills ``inputs_length``. Where it would not (the span count rounds
    down with the noise, e.g. 11 inputs: T5 pads both), the untrimmed lengths are kept.
    Raises ValueError below 3 inputs, or where the noise spans outnumber the non-noise
    tokens that must separate them, and TypeError for an ``inputs_length`` that is not an int
    or a ``noise_density`` / ``mean_span_length`` that is not a number."""
    _check_noise(noise_density, mean_span_length)
    check_int("inputs_length", inputs_length)
    if inputs_length < 3:  # the shortest corruption: one kept token, one sentinel, EOS
        raise ValueError(f"inputs_length {inputs_length} is too short for span corruption (need at least 3)")
    raw = inputs_length - 1
    while _lengths(raw + 1, noise_density, mean_span_length)[0] <= inputs_length:
        raw += 1
    inputs, targets = _lengths(raw, noise_density, mean_span_length)
    if (noise_density == 0.5 and targets > inputs
            and _lengths(raw - 1, noise_density, mean_span_length) == (inputs, targets - 1)):
        raw, targets = raw - 1, targets - 1
    _check_spans_are_separable(raw, inputs_length, noise_density, mean_span_length)
    return raw, targets


def _check_spans_are_separable(raw_length: int, inputs_length: int, noise_density: float,
                               mean_span_length: float) -> None:
    """Each noise span needs a non-noise token before it: with more spans than non-noise
    tokens some segments would be empty and spans would merge (T5 merges them silently), so
    the inputs would come out short whatever the length."""
    n = max(raw_length, 2)
    noise, spans = _noise_counts(n, noise_density, mean_span_length)
    if spans <= n - noise:
        return
    # spans / non-noise -> (noise_density / mean_span_length) / (1 - noise_density) as runs grow
    hopeless = noise_density / mean_span_length > 1 - noise_density
    fix = ("no inputs_length fixes this beyond the shortest runs" if hopeless
           else "another inputs_length may round differently")
    raise ValueError(f"noise_density {noise_density} with mean_span_length {mean_span_length} makes more "
                     f"noise spans ({spans}) than non-noise tokens ({n - noise}) to separate them at "
                     f"inputs_length {inputs_length} ({raw_length} raw tokens), so spans would merge: {fix}; "
                     f"lower noise_density or raise mean_span_length (spans need "
                     f"noise_density / mean_span_length <= 1 - noise_density)")


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
    check_int("length", length)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    _check_noise(noise_density, mean_span_length)
    n = max(length, 2)
    noise, spans = _noise_counts(n, noise_density, mean_span_length)
    lengths = torch.stack([_segment(n - noise, spans, g), _segment(noise, spans, g)], 1).flatten()
    span_index = torch.repeat_interleave(torch.arange(2 * spans), lengths)
    return (span_index % 2 == 1)[:length]


class SpanCorruptionCollator:
    """Turn raw token runs of ``raw_length`` into fixed-size T5 (input_ids, labels) batches.

    Runs of ``raw_length`` tokens make ``n_spans`` noise spans each, whose sentinels take ids
    ``lowest_sentinel = vocab_size - n_spans`` .. ``vocab_size - 1``. ``eos_id`` (and
    ``pad_id``, the model's pad / decoder start, if given) must lie below them, and so must
    every run token: a run token equal to a sentinel could not be told from it in the target.
    The runs are checked per batch (one min and max), the ids when the collator is built.
    The spans come from ``generator``: reseeded per DataLoader worker (``reseed_in_worker``),
    or per batch under the ``Trainer`` (``seed_collator``), as ``MLMCollator``'s masks.
    Raises ValueError for any of these, and for lengths span corruption cannot produce."""

    def __init__(self, vocab_size: int, eos_id: int, inputs_length: int = 512,
                 noise_density: float = 0.15, mean_span_length: float = 3.0, seed: int = 0,
                 *, pad_id: int | None = None):
        # A float vocab_size made float sentinels, and with them float input_ids and labels.
        check_int("vocab_size", vocab_size)
        check_int("seed", seed)
        self.raw_length, self.targets_length = span_corruption_lengths(
            inputs_length, noise_density, mean_span_length)
        self.inputs_length, self.vocab_size, self.eos_id = inputs_length, vocab_size, eos_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        # The span count depends on the run length only: every run uses the same sentinels.
        self.n_spans = _noise_counts(max(self.raw_length, 2), noise_density, mean_span_length)[1]
        self.lowest_sentinel = vocab_size - self.n_spans
        self._check_reserved_ids({"eos_id": eos_id} if pad_id is None else {"eos_id": eos_id, "pad_id": pad_id})
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._check_lengths()

    def _check_reserved_ids(self, reserved: dict) -> None:
        """eos (and pad) ids: ints inside the vocabulary, below every sentinel."""
        for name, i in reserved.items():
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise ValueError(f"{name} must be an int token id, got {i!r}")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{name} {i} must lie in [0, vocab_size={self.vocab_size})")
        sentinels = (f"the sentinel ids that inputs of {self.inputs_length} tokens need "
                     f"({self.n_spans}, from vocab_size - 1 downwards)")
        if self.lowest_sentinel < 0:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for {sentinels}: "
                             f"they would reach {self.lowest_sentinel}")
        for name, i in reserved.items():
            if i >= self.lowest_sentinel:
                raise ValueError(f"{name}={i} collides with {sentinels}, {self._sentinel_ids()}: "
                                 f"{name} must lie below {self.lowest_sentinel} "
                                 f"(or vocab_size be at least {i + 1 + self.n_spans})")

    def _sentinel_ids(self) -> str:
        top = self.vocab_size - 1
        return f"id {top}" if self.n_spans == 1 else f"ids {self.lowest_sentinel}..{top}"

    def _check_lengths(self) -> None:
        # The output lengths depend on the lengths only, not on where the spans fall: one trial
        # run (the generator's state restored) checks them.
        state = self.generator.get_state()
        inputs, targets = self.corrupt(torch.zeros(max(self.raw_length, 1), dtype=torch.long))
        self.generator.set_state(state)
        if (len(inputs), len(targets)) != (self.inputs_length, self.targets_length):
            raise ValueError(f"inputs_length {self.inputs_length} cannot be built by span corruption at noise "
                             f"density {self.noise_density} (its inputs would come out at {len(inputs)} tokens)")

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
        runs = [torch.as_tensor(run) for run in runs]
        for i, run in enumerate(runs):
            # Not as_tensor(run, dtype=long): it cut float ids (2.7 -> 2) and took True for 1.
            if run.is_floating_point() or run.is_complex() or run.dtype == torch.bool:
                raise TypeError(f"run {i} must hold integer token ids, got {run.dtype}")
            if run.shape != (self.raw_length,):
                raise ValueError(f"span corruption needs runs of {self.raw_length} tokens "
                                 f"(for {self.inputs_length} inputs), got {tuple(run.shape)}")
        runs = [run.long() for run in runs]
        self._check_run_tokens(torch.stack(runs))
        pairs = [self.corrupt(run) for run in runs]
        return {"input_ids": torch.stack([p[0] for p in pairs]),
                "labels": torch.stack([p[1] for p in pairs])}

    def _check_run_tokens(self, runs: torch.Tensor) -> None:
        lo, hi = (int(v) for v in torch.aminmax(runs))
        if lo < 0 or hi >= self.lowest_sentinel:
            raise ValueError(f"run token ids must lie in [0, {self.lowest_sentinel}), got values in [{lo}, {hi}]: "
                             f"the sentinels of inputs of {self.inputs_length} tokens take {self._sentinel_ids()} "
                             f"(a run token equal to one cannot be told from it), "
                             f"and ids >= vocab_size {self.vocab_size} are outside the vocabulary")
