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

Run: ``python -m fastpt.benchmarks.models [--quick] [--cases train,decode,encoder]
[--dtypes fp32,bf16] [--memory] [--json PATH]`` or ``fastpt bench-models ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from fastpt._atomic import atomic_write_json

CASES = ("train", "decode", "encoder")
IMPLS = ("fastpt", "eager", "transformers")
DTYPES = ("fp32", "bf16")

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


def llama_config(quick: bool):
    from fastpt.models import from_name
    return from_name("llama-small", vocab_size=32000, max_position_embeddings=2048)


def bert_config(quick: bool):
    from fastpt.models import from_name
    return from_name("bert-base", num_layers=4 if quick else 12, dropout=0.0, attention_dropout=0.0)


def _autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _train_step_fn(impl, model, ids, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the fastest for every impl
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype):  # the forward and the loss only, as in a training loop
            if impl == "transformers":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
    return step


def _decode_fn(impl, model, ids, new, dtype):
    model.eval()

    def run():
        with torch.no_grad(), _autocast(dtype):
            if impl == "transformers":
                return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
            return model.generate(ids, max_new_tokens=new, eos_token_id=[])
    return run


def _encoder_fn(impl, model, ids, dtype):
    model.eval()

    def run():
        with torch.no_grad(), _autocast(dtype):
            if impl == "transformers":
                return model.bert(input_ids=ids).last_hidden_state
            return model.encode(ids)[0]
    return run


def _calls(case, dtype, impls, size):
    """One callable per implementation (each enters its own autocast), the shape label, and
    the number of new tokens (decode)."""
    quick = size == "quick"
    if case == "train":
        s = TRAIN[size]
        cfg = llama_config(quick)
        ids = torch.randint(0, cfg.vocab_size, (s["B"], s["T"]))
        models = _models(cfg, impls)
        return ({i: _train_step_fn(i, m, ids, dtype) for i, m in models.items()},
                f"B={s['B']} T={s['T']}", None)
    if case == "decode":
        s = DECODE[size]
        cfg = llama_config(quick)
        ids = torch.randint(0, cfg.vocab_size, (1, s["prompt"]))
        models = _models(cfg, impls)
        return ({i: _decode_fn(i, m, ids, s["new"], dtype) for i, m in models.items()},
                f"prompt={s['prompt']} new={s['new']}", s["new"])
    s = ENCODER[size]
    cfg = bert_config(quick)
    ids = torch.randint(0, cfg.vocab_size, (s["B"], s["T"]))
    models = _models(cfg, impls)
    return ({i: _encoder_fn(i, m, ids, dtype) for i, m in models.items()},
            f"L={cfg.num_layers} B={s['B']} T={s['T']}", None)


def alternate_rounds(calls: dict, budget_s: float, min_rounds: int, max_rounds: int) -> dict[str, list[tuple]]:
    """(wall, process CPU) seconds per call, one call of each impl per round, order rotating,
    for at least min_rounds and at most max_rounds, until budget_s has passed."""
    samples = {n: [] for n in calls}
    gc.collect()
    deadline = time.perf_counter() + budget_s
    names, r = list(calls), 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() < deadline):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            samples[name].append((time.perf_counter() - t0, time.process_time() - c0))
        r += 1
    return samples


def check_subsets(parser: argparse.ArgumentParser, **options: tuple[tuple, tuple]) -> None:
    """options: name=(values, allowed); a parser error unless each is a non-empty subset."""
    for name, (values, allowed) in options.items():
        if not values or any(v not in allowed for v in values):
            parser.error(f"--{name} must be a comma-separated subset of {','.join(allowed)}")


def measure(case: str, dtype: str, impls=IMPLS, size: str = "full", budget_s: float = 30.0,
            min_rounds: int = 3, max_rounds: int = 50) -> list[Result]:
    calls, shape, new_tokens = _calls(case, dtype, impls, size)
    for call in calls.values():  # warm-up (the first AdamW step allocates its state)
        call()
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


def peak_memory(impl: str, dtype: str, size: str) -> float:
    code = ("import sys, fastpt; from fastpt.benchmarks import models; "
            f"print(models._peak_memory_child({impl!r}, {dtype!r}, {size!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


def _row(r: Result) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    return (f"| {r.case} | {r.dtype} | {r.shape} | {r.impl} | {r.median_ms:.1f} | {f(r.ratio_vs_eager, '.2f')} | "
            f"{f(r.ratio_vs_transformers, '.2f')} | {f(r.tokens_per_s, '.1f')} | {f(r.peak_mem_mb, '.0f')} |")


HEADER = ("| case | dtype | shape | impl | median ms | x eager | x transformers | tokens/s | peak MB |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastpt bench-models", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes and budget")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {','.join(CASES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16 (bf16 = autocast)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated from {','.join(IMPLS)}")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also peak training memory (child processes)")
    p.add_argument("--json", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    cases, dtypes, impls = (tuple(s.split(",")) for s in (args.cases, args.dtypes, args.impls))
    check_subsets(p, cases=(cases, CASES), dtypes=(dtypes, DTYPES), impls=(impls, IMPLS))
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 30.0)
    results = []
    print(HEADER, flush=True)
    for case in cases:
        for dtype in dtypes:
            rows = measure(case, dtype, impls, size, budget_s=budget)
            if case == "train" and args.memory:
                for r in rows:
                    r.peak_mem_mb = peak_memory(r.impl, dtype, size)
            for r in rows:
                print(_row(r), flush=True)
            results += rows
    if args.json:
        atomic_write_json(args.json, [asdict(r) for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
