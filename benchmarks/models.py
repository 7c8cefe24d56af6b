"""Model benchmarks: fastpt models vs the same weights with ``use_fused=False`` vs
``transformers`` with the same config, in fp32 and under bf16 autocast.

Cases (issue F5):

- ``train``: one training step (forward + backward + AdamW) of a Llama decoder, 6 layers,
  d 512, 8 heads / 2 kv heads, SwiGLU 1408, vocab 32000, B=8, T=512;
- ``decode``: greedy decoding of 128 new tokens after a 512-token prompt, batch 1 (the
  whole ``generate`` call, prefill included), reported as new tokens/s;
- ``encoder``: BERT-base encoder forward (12 layers, d 768), B=8, T=128, inference.

The implementations run in one process, alternating call by call, so drift of the shared
host hits them alike; ratios (baseline time / fastpt time) are the steadier numbers.
``--memory`` adds the peak training memory of each implementation, each in a fresh child
process (peak RSS, VmHWM, over two steps minus the RSS before the first).

Agreement (as ``fastpt bench``, :mod:`fastpt.benchmarks.harness`): before timing, each
implementation's first call (the first training step, one ``generate``, one forward) runs
on the same inputs from the same weights and is compared with the reference implementation,
``eager`` (``use_fused=False``; built for the check even when ``--impls`` leaves it out):
``train`` the loss and every parameter gradient of that step, ``decode`` the generated
tokens, ``encoder`` the last hidden state (tolerances: :data:`agreement.FP32_TOL`,
:func:`agreement.bf16_tolerance` and :func:`_decode_compare`). One that disagrees is still
timed, but its Result has ``agrees=False`` and the error, its ratio cells (and tokens/s)
print as ``FAIL``, and the table is followed by a list of the disagreements.

Run: ``python -m fastpt.benchmarks.models [--quick] [--cases train,decode,encoder]
[--dtypes fp32,bf16] [--memory] [--json PATH]`` or ``fastpt bench-models ...``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fastpt._atomic import atomic_write_json
from fastpt.benchmarks.agreement import (FP32_TOL, LOW_PRECISION_FACTOR, autocast, bf16_tolerance,
                                         check_first_calls, hf_to_ours, param_grads, tensor_compare)
from fastpt.benchmarks.harness import disagreement_line, fail_or, failure_note, max_rel_error, rounding_floor
from fastpt.benchmarks.rounds import (add_threads_and_budget, alternate_rounds, check_json_path, check_subsets,
                                      split_list)

CASES = ("train", "decode", "encoder")
IMPLS = ("fastpt", "eager", "transformers")
DTYPES = ("fp32", "bf16")
REFERENCE = "eager"  # every other implementation is compared with it before timing

# (full, quick) shapes.
TRAIN = {"full": dict(B=8, T=512), "quick": dict(B=2, T=128)}
DECODE = {"full": dict(prompt=512, new=128), "quick": dict(prompt=128, new=32)}
ENCODER = {"full": dict(B=8, T=128), "quick": dict(B=2, T=128)}


@dataclass
class Result:
    case: str
    dtype: str
    impl: str
    shape: str
    median_ms: float
    ratio_vs_eager: float | None = None
    ratio_vs_transformers: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mb: float | None = None
    rounds: int = 0
    # Whether this implementation's outputs matched the reference's before timing (None: the
    # reference itself). A disagreeing one is still timed; its ratios print as FAIL.
    agrees: bool | None = None
    # Its largest error against the reference relative to max |reference| over the outputs
    # (train: loss and gradients; encoder: hidden state; decode: 0.0 for identical tokens, else
    # see _decode_compare). None when not checked or the outputs differ in shape or are not finite.
    max_rel_error: float | None = None
    # Why the case has no measurement (impl "missing"): the exception it raised.
    failed: str | None = None


def llama_config(quick: bool):
    from fastpt.models import from_name
    return from_name("llama-small", vocab_size=32000, max_position_embeddings=2048)


def bert_config(quick: bool):
    from fastpt.models import from_name
    return from_name("bert-base", num_layers=4 if quick else 12, dropout=0.0, attention_dropout=0.0)


def _models(config, impls):
    """Same weights three ways: fastpt fused, fastpt eager, transformers."""
    from fastpt.models import to_hf
    from fastpt.models.hf import model_for_config
    torch.manual_seed(0)
    base = model_for_config(config)
    out = {}
    for impl in impls:
        if impl == "transformers":
            m = to_hf(base)
        else:
            m = model_for_config(config, use_fused=impl == "fastpt")
            m.load_state_dict(base.state_dict())
        out[impl] = m
    return out


def _loss(impl, model, ids, dtype):
    with autocast(dtype):  # the forward and the loss only, as in a training loop
        if impl == "transformers":
            return model(input_ids=ids, labels=ids).loss
        return model(input_ids=ids, labels=ids, return_logits=False).loss


def _train_step_fn(impl, model, ids, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the fastest for every impl
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _loss(impl, model, ids, dtype)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _decode_fn(impl, model, ids, new, dtype):
    model.eval()

    def run():
        with torch.no_grad(), autocast(dtype):
            if impl == "transformers":
                return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
            return model.generate(ids, max_new_tokens=new, eos_token_id=[])
    return run


def _encoder_fn(impl, model, ids, dtype):
    model.eval()

    def run():
        with torch.no_grad(), autocast(dtype):
            if impl == "transformers":
                return model.bert(input_ids=ids).last_hidden_state
            return model.encode(ids)[0]
    return run


def _decode_compare(ref_model, prompt: int, dtype: str):
    """compare(got, ref) for decode's tokens ((1, prompt + new) tensors).

    Identical tokens agree (error 0.0). Greedy decoding cannot demand more than that the
    tokens agree up to ties: where the best two logits are closer than the implementations'
    rounding differences (likely somewhere in 128 bf16 steps, and then every later token
    follows a different context), either token is right. So where the tokens differ, the
    reference model is run (teacher-forced, in fp32: the exact stand-in) on the
    implementation's own tokens, and each token it chose from the first difference on must be
    within the tolerance of the best logit at its position: error = the largest gap
    (best logit - chosen token's logit) / max |logit|. An implementation whose logits are
    within t (relative) of the exact ones picks tokens at most 2t below the best: fp32
    t = FP32_TOL["fwd"]; bf16 t = 2 x the reference's own bf16 logits error on those tokens
    (the FlashAttention rule), never below bf16's rounding. Measured on the full shapes in
    bf16: fastpt's and transformers' tokens part from eager's, each token they chose being the
    fp32 argmax (error 0, tolerance 0.035-0.038); in fp32 all three are identical.
    """
    def logits(seq, dt):
        with torch.no_grad(), autocast(dt):
            out = ref_model(input_ids=seq).logits
        return out[0, prompt - 1:-1].float()  # the positions that predict the new tokens

    def compare(got, ref):
        (seq,), (ref_seq,) = got, ref
        if not isinstance(seq, torch.Tensor) or seq.shape != ref_seq.shape or seq.shape[1] <= prompt \
                or not torch.equal(seq[:, :prompt], ref_seq[:, :prompt]):
            return None, 0.0
        if torch.equal(seq, ref_seq):
            return 0.0, 0.0
        try:
            exact = logits(seq, "fp32")
            chosen = exact.gather(1, seq[0, prompt:, None]).squeeze(1)
        except (ValueError, IndexError, RuntimeError):  # e.g. a token id outside the vocabulary
            return None, 0.0
        first = int((seq[0, prompt:] != ref_seq[0, prompt:]).nonzero()[0, 0])
        gaps = (exact.max(dim=1).values - chosen)[first:]
        err = float(gaps.max()) / max(float(exact.abs().max()), 1e-30)
        if dtype == "fp32":
            t = FP32_TOL["fwd"]
        else:
            e = max_rel_error((logits(seq, dtype),), (exact,))
            t = LOW_PRECISION_FACTOR * e if e is not None else 0.0
        return err, rounding_floor(2 * t, torch.bfloat16 if dtype == "bf16" else torch.float32)
    return compare


@dataclass
class _Case:
    calls: dict                 # impl -> the timed call (the implementations asked for)
    first: dict                 # impl -> its first call, returning the outputs compared (reference included)
    compare: Callable           # (got, ref) -> (error, tolerance)
    shape: str
    new_tokens: int | None = None


def _calls(case, dtype, impls, size) -> _Case:
    """Per implementation: the timed call (each enters its own autocast) and its first call,
    which returns what the agreement check compares; how to compare; the shape label; the
    number of new tokens (decode). The reference is built even when ``impls`` leaves it out."""
    quick = size == "quick"
    built = tuple(impls) + ((REFERENCE,) if REFERENCE not in impls else ())
    if case == "train":
        s = TRAIN[size]
        cfg = llama_config(quick)
        ids = torch.randint(0, cfg.vocab_size, (s["B"], s["T"]))
        models = _models(cfg, built)
        ref_model = models[REFERENCE]
        names = [n for n, p in ref_model.named_parameters() if p.requires_grad]
        hf_names = hf_to_ours(cfg)
        tol = FP32_TOL["bwd"]
        if dtype != "fp32":  # the reference once in fp32 from the same weights, before any step
            ref_model.train()
            exact_loss = _loss(REFERENCE, ref_model, ids, "fp32")
            exact_loss.backward()
            exact = (exact_loss.detach(), *param_grads(ref_model, names))
            ref_model.zero_grad(set_to_none=True)
            tol = lambda ref: bf16_tolerance(ref, exact)  # noqa: E731
        steps = {i: _train_step_fn(i, m, ids, dtype) for i, m in models.items()}

        def first_step(i):
            rename = hf_names if i == "transformers" else None
            return lambda: (steps[i](), *param_grads(models[i], names, rename))
        return _Case({i: steps[i] for i in impls}, {i: first_step(i) for i in built},
                     tensor_compare(tol), f"B={s['B']} T={s['T']}")
    if case == "decode":
        s = DECODE[size]
        cfg = llama_config(quick)
        ids = torch.randint(0, cfg.vocab_size, (1, s["prompt"]))
        models = _models(cfg, built)
        runs = {i: _decode_fn(i, m, ids, s["new"], dtype) for i, m in models.items()}
        return _Case({i: runs[i] for i in impls}, {i: (lambda r=r: (r(),)) for i, r in runs.items()},
                     _decode_compare(models[REFERENCE], s["prompt"], dtype),
                     f"prompt={s['prompt']} new={s['new']}", s["new"])
    s = ENCODER[size]
    cfg = bert_config(quick)
    ids = torch.randint(0, cfg.vocab_size, (s["B"], s["T"]))
    models = _models(cfg, built)
    runs = {i: _encoder_fn(i, m, ids, dtype) for i, m in models.items()}
    tol = FP32_TOL["fwd"]
    if dtype != "fp32":
        exact = (_encoder_fn(REFERENCE, models[REFERENCE], ids, "fp32")(),)
        tol = lambda ref: bf16_tolerance(ref, exact)  # noqa: E731
    return _Case({i: runs[i] for i in impls}, {i: (lambda r=r: (r(),)) for i, r in runs.items()},
                 tensor_compare(tol), f"L={cfg.num_layers} B={s['B']} T={s['T']}")


def measure(case: str, dtype: str, impls=IMPLS, size: str = "full", budget_s: float = 30.0,
            min_rounds: int = 3, max_rounds: int = 50) -> list[Result]:
    c = _calls(case, dtype, impls, size)
    # The first call of each implementation is the agreement check and the warm-up (the first
    # AdamW step allocates its state).
    agreement, _ = check_first_calls(c.first, REFERENCE, c.compare, f"bench-models {case} {dtype} {c.shape}")
    shape, new_tokens, calls = c.shape, c.new_tokens, c.calls
    del c  # frees what only the check needed: an untimed reference, the fp32 outputs
    samples = alternate_rounds(calls, budget_s, min_rounds, max_rounds)
    ms = {i: 1e3 * statistics.median(wall for wall, _ in v) for i, v in samples.items()}
    out = []
    for impl in calls:
        res = Result(case, dtype, impl, shape, ms[impl], rounds=len(samples[impl]))
        if impl == "fastpt":
            res.ratio_vs_eager = ms["eager"] / ms[impl] if "eager" in ms else None
            res.ratio_vs_transformers = ms["transformers"] / ms[impl] if "transformers" in ms else None
        if new_tokens:
            res.tokens_per_s = new_tokens / (ms[impl] / 1e3)
        res.agrees, res.max_rel_error = agreement.get(impl, (None, None))
        out.append(res)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    # NOTE: VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve, so a
    # child started by a large benchmark process would report its parent's size.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_memory_child(impl: str, dtype: str, size: str) -> float:
    """In this (child) process: MB of peak RSS added by two training steps."""
    s = TRAIN[size]
    cfg = llama_config(size == "quick")
    ids = torch.randint(0, cfg.vocab_size, (s["B"], s["T"]))
    model = _models(cfg, (impl,))[impl]
    step = _train_step_fn(impl, model, ids, dtype)
    gc.collect()
    before = _rss_mb()
    step()
    step()
    return _peak_rss_mb() - before


def peak_memory(impl: str, dtype: str, size: str, threads: int | None = None) -> float:
    """MB of peak RSS added by two training steps, in a fresh child process running with
    ``threads`` torch threads (default: this process's), as the timed steps."""
    threads = threads or torch.get_num_threads()
    code = ("import sys, torch, fastpt; from fastpt.benchmarks import models; "
            f"torch.set_num_threads({threads}); "
            f"print(models._peak_memory_child({impl!r}, {dtype!r}, {size!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


def _row(r: Result, transformers_failed: bool = False) -> str:
    """One table row. The ratio cells of an implementation that disagreed with the reference
    read FAIL (its tokens/s too), and so does fastpt's x transformers when transformers did."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    bad = r.agrees is False
    bad_vs_transformers = bad or (transformers_failed and r.ratio_vs_transformers is not None)
    return (f"| {r.case} | {r.dtype} | {r.shape} | {r.impl} | {r.median_ms:.1f} | "
            f"{fail_or(bad, r.ratio_vs_eager, '.2f')} | "
            f"{fail_or(bad_vs_transformers, r.ratio_vs_transformers, '.2f')} | "
            f"{fail_or(bad and r.tokens_per_s is not None, r.tokens_per_s, '.1f')} | {f(r.peak_mem_mb, '.0f')} |")


def case_rows(results: list[Result]) -> list[str]:
    """The table rows of one case's results (one ``measure`` call)."""
    transformers_failed = any(r.impl == "transformers" and r.agrees is False for r in results)
    return [_row(r, transformers_failed) for r in results]


def disagreements(results: list[Result]) -> list[str]:
    """One line per result that failed the agreement check."""
    return [disagreement_line(r.impl, REFERENCE, f"{r.case} {r.dtype} {r.shape}", r.max_rel_error)
            for r in results if r.agrees is False]


HEADER = ("| case | dtype | shape | impl | median ms | x eager | x transformers | tokens/s | peak MB |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastpt bench-models", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes and budget")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {','.join(CASES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16 (bf16 = autocast)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated from {','.join(IMPLS)}")
    add_threads_and_budget(p)
    p.add_argument("--memory", action="store_true", help="also peak training memory (child processes)")
    p.add_argument("--json", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    cases, dtypes, impls = (split_list(s) for s in (args.cases, args.dtypes, args.impls))
    check_subsets(p, cases=(cases, CASES), dtypes=(dtypes, DTYPES), impls=(impls, IMPLS))
    check_json_path(p, args.json)
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 30.0)
    results, crashed = [], []
    print(HEADER, flush=True)
    for case in cases:
        for dtype in dtypes:
            try:
                rows = measure(case, dtype, impls, size, budget_s=budget)
                if case == "train" and args.memory:
                    for r in rows:
                        r.peak_mem_mb = peak_memory(r.impl, dtype, size, args.threads)
            except Exception as e:  # noqa: BLE001  (one case's crash must not lose the others' results)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"{case} {dtype}: failed, {reason}", file=sys.stderr, flush=True)
                crashed.append(Result(case, dtype, "missing", "", None, failed=reason))
                continue
            for line in case_rows(rows):
                print(line, flush=True)
            results += rows
    print(failure_note(disagreements(results), REFERENCE, "the tolerance"), end="", flush=True)
    if crashed:
        print(f"INCOMPLETE: {len(crashed)} of {len(cases) * len(dtypes)} cases have no record: "
              + "; ".join(f"{r.case} {r.dtype} ({r.failed})" for r in crashed), flush=True)
    if args.json:
        atomic_write_json(args.json, [asdict(r) for r in results + crashed])
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
