"""Drop-in benchmarks (issue F10): fastpt inside the tools people already use.

Cases:

- ``llama``: one training step (forward + backward + AdamW) of ``transformers``'
  LlamaForCausalLM with the F5 benchmark config (6 layers, d 512, 8 heads / 2 kv heads,
  SwiGLU 1408, vocab 32000, B=8, T=512), unpatched (``hf``, HF's default sdpa attention) vs
  ``fastpt.patch(model)`` (``hf+patch``) vs ``fastpt.patch(model, fused_cross_entropy=True)``
  (``hf+patch+ce``: the loss without materialising the logits), fp32 and bf16 autocast,
  with peak memory;
- ``lora``: the same model wrapped by ``peft`` LoRA (r=16, alpha=32, all linear layers),
  unpatched vs patched (with and without the fused loss), against fastpt's own F7 LoRA on
  fastpt's Decoder with the same weights (``fastpt-lora``);
- ``int8``: bitsandbytes' CPU ``Linear8bitLt`` (threshold 6.0, int8 weights) vs fastpt's
  ``Int8Linear`` on the F4 int8 shapes (x (M, K) with 0.1% outlier features, K -> N), forward
  speed and max error relative to the fp32 ``F.linear`` of the same weights. ``bnb``: in
  eval mode (LLM.int8: int8 matmul, outlier columns in fp32); ``bnb-dequant``: the same layer
  in training mode, where bitsandbytes' CPU path dequantizes the weight and runs an fp32 GEMM.

Implementations of a case run in one process, alternating call by call, so drift of the
shared host hits them alike; ratios are the steadier numbers. Peak memory: the most memory
torch's CPU allocator holds during one training step beyond what existed before it (the
profiler's allocation records, :func:`fastpt.benchmarks.harness.peak_memory_bytes`).

Run: ``python -m fastpt.benchmarks.dropin [--quick] [--cases llama,lora,int8]
[--dtypes fp32,bf16] [--json PATH]`` or ``fastpt bench-dropin ...``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fastpt._atomic import atomic_write_json
from fastpt.benchmarks.harness import peak_memory_bytes
from fastpt.benchmarks.models import _autocast, alternate_rounds, check_subsets

CASES = ("llama", "lora", "int8")
DTYPES = ("fp32", "bf16")
TRAIN = {"full": dict(B=8, T=512, layers=6), "quick": dict(B=2, T=128, layers=2)}
INT8 = {"full": (4096, 4096, 4096), "quick": (1024, 1024, 1024)}  # M, K, N as benchmarks/int8_linear.py
LORA_R, LORA_ALPHA = 16, 32
LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=2)  # the F5 benchmark decoder (fastpt's llama-small)


@dataclass
class Result:
    case: str
    dtype: str
    impl: str
    shape: str
    median_ms: float
    speedup: float | None = None     # baseline time / this time (baseline: first impl of the case)
    cpu_ms: float | None = None      # median CPU time of the process per call (both threads)
    cpu_speedup: float | None = None  # the same ratio on CPU time, less sensitive to other load
    peak_mib: float | None = None
    rel_error: float | None = None   # int8: max |y - y_fp32| / max |y_fp32|
    rounds: int = 0
    failed: str | None = None        # the error of an implementation that could not run


def hf_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**LLAMA, num_hidden_layers=layers, max_position_embeddings=2048, attention_dropout=0.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _peft(model):
    import peft
    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model, cfg)


def _fastpt_lora(hf_model):
    """fastpt's Decoder with the weights of ``hf_model`` and fastpt's own (F7) LoRA."""
    from fastpt.finetune import add_lora
    from fastpt.models import from_hf
    model = from_hf(hf_model)
    add_lora(model, r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear")
    return model


def _train_step(model, ids, dtype: str, fastpt_model: bool = False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype):
            if fastpt_model:
                loss = model(input_ids=ids, labels=ids, return_logits=False).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    # Peak memory is measured from the same state for every implementation: no gradients held.
    step.release_grads = lambda: opt.zero_grad(set_to_none=True)
    return step


def _train_calls(case: str, dtype: str, size: str):
    import fastpt
    s = TRAIN[size]
    base = hf_llama(s["layers"])
    ids = torch.randint(0, base.config.vocab_size, (s["B"], s["T"]))
    if case == "llama":
        patched, patched_ce = copy.deepcopy(base), copy.deepcopy(base)
        fastpt.patch(patched)
        fastpt.patch(patched_ce, fused_cross_entropy=True)
        models = {"hf": (base, False), "hf+patch": (patched, False), "hf+patch+ce": (patched_ce, False)}
    else:
        fastpt_lora = _fastpt_lora(base)
        patched = _peft(copy.deepcopy(base))  # get_peft_model wraps in place: copy first
        patched_ce = _peft(copy.deepcopy(base))
        fastpt.patch(patched)
        fastpt.patch(patched_ce, fused_cross_entropy=True)
        unpatched = _peft(base)
        models = {"peft": (unpatched, False), "peft+patch": (patched, False), "peft+patch+ce": (patched_ce, False),
                  "fastpt-lora": (fastpt_lora, True)}
    shape = f"L={s['layers']} B={s['B']} T={s['T']}"
    return {name: _train_step(m, ids, dtype, own) for name, (m, own) in models.items()}, shape


def _warm_up(calls: dict) -> dict[str, str]:
    """Run each call once (the first AdamW step allocates its state); drop the ones that
    fail and return their errors, so one broken implementation does not end the run."""
    failed = {}
    for name, call in list(calls.items()):
        try:
            call()
        except Exception as e:  # noqa: BLE001  (reported in the table)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            del calls[name]
    return failed


def _medians_ms(samples: dict) -> tuple[dict, dict]:
    wall = {n: 1e3 * statistics.median(w for w, _ in v) for n, v in samples.items()}
    cpu = {n: 1e3 * statistics.median(c for _, c in v) for n, v in samples.items()}
    return wall, cpu


def measure_train(case: str, dtype: str, size: str, budget_s: float) -> list[Result]:
    calls, shape = _train_calls(case, dtype, size)
    names = list(calls)
    failed = _warm_up(calls)
    samples = alternate_rounds(calls, budget_s, min_rounds=3, max_rounds=50)
    ms, cpu = _medians_ms(samples)
    baseline, cpu_baseline = ms.get(names[0]), cpu.get(names[0])
    out = []
    for name in names:
        if name in failed:
            out.append(Result(case, dtype, name, shape, float("nan"), failed=failed[name]))
            continue
        calls[name].release_grads()
        gc.collect()
        peak = peak_memory_bytes(calls[name]) / 2**20
        out.append(Result(case, dtype, name, shape, ms[name], baseline / ms[name] if baseline else None,
                          cpu[name], cpu_baseline / cpu[name] if cpu_baseline else None, peak,
                          rounds=len(samples[name])))
    return out


def _int8_layers(m: int, k: int, n: int):
    import bitsandbytes as bnb
    from fastpt.nn import Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    x = torch.randn(m, k)
    cols = torch.randperm(k)[: max(1, k // 1000)]
    x[:, cols] *= 20  # outlier features (|x| > 6), as in LLM activations and benchmarks/int8_linear.py
    bnb_layer = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=6.0)
    bnb_layer.load_state_dict(lin.state_dict())
    bnb_layer = bnb_layer.to("cpu")  # quantizes the weight to int8 (row-wise absmax)
    # NOTE: in training mode bitsandbytes' CPU path skips LLM.int8 (MatMul8bitFp: dequantize the
    # weight, fp32 GEMM); eval() runs the int8 x int8 matmul with outlier columns in fp32.
    bnb_dequant = copy.deepcopy(bnb_layer).train()
    ours = Int8Linear.from_linear(lin)  # default outlier threshold 6.0, as bitsandbytes
    return x, lin, {"bnb": bnb_layer.eval(), "bnb-dequant": bnb_dequant, "fastpt": ours.eval()}


def measure_int8(size: str, budget_s: float) -> list[Result]:
    m, k, n = INT8[size]
    x, lin, layers = _int8_layers(m, k, n)

    def call(layer):
        def run():
            with torch.no_grad():
                return layer(x)
        return run

    calls = {name: call(layer) for name, layer in layers.items()}
    calls["fp32"] = call(lin)
    names = list(calls)
    # An implementation that fails (e.g. a bitsandbytes build without a CPU path) gets a
    # "failed" row; the others are still measured.
    failed = _warm_up(calls)
    with torch.no_grad():
        ref = lin(x)
    errors = {"fp32": 0.0}
    for name in [n for n in layers if n in calls]:
        try:
            with torch.no_grad():
                errors[name] = float((layers[name](x).float() - ref).abs().max() / ref.abs().max())
        except Exception as e:  # noqa: BLE001  (reported in the table)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            del calls[name]
    samples = alternate_rounds(calls, budget_s, min_rounds=5, max_rounds=200)
    ms, cpu = _medians_ms(samples)
    base, cpu_base = ms.get("bnb"), cpu.get("bnb")  # speedups vs bitsandbytes, when it ran
    shape = f"x={m}x{k} w={n}x{k}"
    return [Result("int8", "fp32", name, shape, float("nan"), failed=failed[name]) if name in failed
            else Result("int8", "fp32", name, shape, ms[name], base / ms[name] if base else None,
                        cpu[name], cpu_base / cpu[name] if cpu_base else None,
                        rel_error=errors[name], rounds=len(samples[name]))
            for name in names]


def _row(r: Result) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    return (f"| {r.case} | {r.dtype} | {r.shape} | {r.impl} | {r.median_ms:.1f} | {f(r.speedup, '.2f')} | "
            f"{f(r.cpu_ms, '.1f')} | {f(r.cpu_speedup, '.2f')} | "
            f"{f(r.peak_mib, '.0f')} | {f(r.rel_error, '.2e')} | {r.rounds} |"
            + (f" failed: {r.failed} |" if r.failed else ""))


HEADER = ("| case | dtype | shape | impl | wall ms | speedup vs first | CPU ms | CPU-time speedup | peak MiB "
          "| rel. error vs fp32 | rounds |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastpt bench-dropin", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, B=2, T=128; int8 at 1024; short budget")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {','.join(CASES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16 (bf16 = autocast; llama and lora)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    cases, dtypes = tuple(args.cases.split(",")), tuple(args.dtypes.split(","))
    check_subsets(p, cases=(cases, CASES), dtypes=(dtypes, DTYPES))
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else (5.0 if args.quick else 60.0)
    results = []
    print(HEADER, flush=True)
    for case in cases:
        rows_per_dtype = [measure_int8(size, budget)] if case == "int8" else \
            (measure_train(case, d, size, budget) for d in dtypes)
        for rows in rows_per_dtype:
            for r in rows:
                print(_row(r), flush=True)
            results += rows
    if args.json:
        atomic_write_json(args.json, [asdict(r) for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
