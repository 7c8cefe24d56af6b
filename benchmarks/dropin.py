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

Agreement (as ``fastpt bench`` and ``fastpt bench-models``): before timing, each
implementation's first call runs on the same inputs from the same weights and is compared
with the case's reference (:data:`REFERENCE`): ``llama`` and ``lora`` the loss and every
trainable parameter's gradient of the first training step against the unpatched model's
(``hf``, ``peft``; fastpt's LoRA model gets PEFT's LoRA factors, so all start equal), at
the tolerances of :mod:`fastpt.benchmarks.agreement`; ``int8`` the output against the fp32
``F.linear`` (the error column), which must stay within the int8 quantization error
bound of ``fastpt bench``'s int8_linear (5e-2 of max |y|; measured 4e-3 to 1.1e-2). One that
disagrees is still timed, but its Result has ``agrees=False`` and ``max_rel_error``, and its
speedup cells (and those compared with it, when it is the speedup baseline) print ``FAIL``.

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

from fastpt._atomic import atomic_write_json
from fastpt.benchmarks import int8_linear
from fastpt.benchmarks.harness import (agree_tolerance, disagreement_line, fail_or, failure_note, max_rel_error,
                                       peak_memory_bytes)
from fastpt.benchmarks.agreement import (FP32_TOL, autocast, bf16_tolerance, check_first_calls, hf_to_ours,
                                         param_grads, tensor_compare)
from fastpt.benchmarks.rounds import (add_threads_and_budget, alternate_rounds, check_json_path, check_subsets,
                                      split_list)

CASES = ("llama", "lora", "int8")
REFERENCE = {"llama": "hf", "lora": "peft", "int8": "fp32"}  # what each case's impls are compared with
# int8 against the fp32 product: the int8 quantization error bound of benchmarks/int8_linear.py
# (the harness's int8_linear spec: 5e-2 of max |y|, ~5x the error LLM.int8 layers show here).
INT8_TOL = agree_tolerance(int8_linear.SPEC, "fastpt", torch.float32)
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
    median_ms: float | None          # None: the implementation failed to run (see failed)
    speedup: float | None = None     # baseline time / this time (baseline: first impl of the case)
    cpu_ms: float | None = None      # median CPU time of the process per call (both threads)
    cpu_speedup: float | None = None  # the same ratio on CPU time, less sensitive to other load
    peak_mib: float | None = None
    rel_error: float | None = None   # int8: max |y - y_fp32| / max |y_fp32|
    rounds: int = 0
    failed: str | None = None        # the error of an implementation that could not run
    # Whether the outputs matched the case's REFERENCE before timing (None: the reference, or
    # an implementation that failed to run); a disagreeing one is timed, its speedups print FAIL.
    agrees: bool | None = None
    max_rel_error: float | None = None  # its largest error against the reference (int8: = rel_error)


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


def _peft_names(fastpt_model) -> dict[str, str]:
    """fastpt LoRA model's factor names -> the PEFT model's names of the same factors."""
    modules = {ours[:-len(".weight")]: hf[:-len(".weight")]
               for hf, ours in hf_to_ours(fastpt_model.config).items() if ours.endswith(".weight")}
    out = {}
    for name, _ in fastpt_model.named_parameters():
        module, lora, rest = name.partition(".lora_")
        if lora and module in modules:
            out[name] = f"base_model.model.{modules[module]}.lora_{rest}"
    return out


def _copy_lora_factors(fastpt_model, peft_model) -> None:
    """Give fastpt's LoRA model the PEFT model's (randomly initialised) LoRA factors."""
    theirs = dict(peft_model.named_parameters())
    ours = dict(fastpt_model.named_parameters())
    with torch.no_grad():
        for name, peft_name in _peft_names(fastpt_model).items():
            ours[name].copy_(theirs[peft_name])


def _loss(model, ids, dtype: str, fastpt_model: bool = False):
    with autocast(dtype):
        if fastpt_model:
            return model(input_ids=ids, labels=ids, return_logits=False).loss
        return model(input_ids=ids, labels=ids).loss


def _train_step(model, ids, dtype: str, fastpt_model: bool = False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, ids, dtype, fastpt_model)
        loss.backward()
        opt.step()
        return loss.detach()
    # Peak memory is measured from the same state for every implementation: no gradients held.
    step.release_grads = lambda: opt.zero_grad(set_to_none=True)
    return step


def _train_calls(case: str, dtype: str, size: str):
    """(timed calls, first calls returning (loss, *gradients in the reference's parameter
    order), compare, shape label) of one training case."""
    import fastpt
    s = TRAIN[size]
    base = hf_llama(s["layers"])
    ids = torch.randint(0, base.config.vocab_size, (s["B"], s["T"]))
    renames = {}
    if case == "llama":
        patched, patched_ce = copy.deepcopy(base), copy.deepcopy(base)
        fastpt.patch(patched)
        fastpt.patch(patched_ce, fused_cross_entropy=True)
        models = {"hf": (base, False), "hf+patch": (patched, False), "hf+patch+ce": (patched_ce, False)}
    else:
        fastpt_lora = _fastpt_lora(base)
        unpatched = _peft(base)  # get_peft_model wraps in place; fastpt's model was built first
        # copies of one PEFT model: the same (random) LoRA factors everywhere
        patched, patched_ce = copy.deepcopy(unpatched), copy.deepcopy(unpatched)
        fastpt.patch(patched)
        fastpt.patch(patched_ce, fused_cross_entropy=True)
        _copy_lora_factors(fastpt_lora, unpatched)
        renames["fastpt-lora"] = _peft_names(fastpt_lora)
        models = {"peft": (unpatched, False), "peft+patch": (patched, False), "peft+patch+ce": (patched_ce, False),
                  "fastpt-lora": (fastpt_lora, True)}
    ref_model = models[REFERENCE[case]][0].train()
    names = [n for n, p in ref_model.named_parameters() if p.requires_grad]
    tol = FP32_TOL["bwd"]
    if dtype != "fp32":  # the reference once in fp32 from the same weights (agreement.bf16_tolerance)
        exact_loss = _loss(ref_model, ids, "fp32")
        exact_loss.backward()
        exact = (exact_loss.detach(), *param_grads(ref_model, names))
        ref_model.zero_grad(set_to_none=True)
        tol = lambda ref: bf16_tolerance(ref, exact)  # noqa: E731
    calls = {name: _train_step(m, ids, dtype, own) for name, (m, own) in models.items()}

    def first(name):
        return lambda: (calls[name](), *param_grads(models[name][0], names, renames.get(name)))
    shape = f"L={s['layers']} B={s['B']} T={s['T']}"
    return calls, {name: first(name) for name in calls}, tensor_compare(tol), shape


def _medians_ms(samples: dict) -> tuple[dict, dict]:
    wall = {n: 1e3 * statistics.median(w for w, _ in v) for n, v in samples.items()}
    cpu = {n: 1e3 * statistics.median(c for _, c in v) for n, v in samples.items()}
    return wall, cpu


def _check(first: dict, calls: dict, case: str, compare, label: str):
    """The agreement check, which is also each call's warm-up (the first AdamW step allocates
    its state): ({impl: (agrees, error)}, {impl: error message}); an implementation that
    raises is dropped from ``calls``, so one broken implementation does not end the run."""
    agreement, failed = check_first_calls(first, REFERENCE[case], compare, f"bench-dropin {label}", catch=True)
    for name in failed:
        calls.pop(name, None)
    return agreement, failed


def measure_train(case: str, dtype: str, size: str, budget_s: float) -> list[Result]:
    calls, first, compare, shape = _train_calls(case, dtype, size)
    names = list(calls)
    agreement, failed = _check(first, calls, case, compare, f"{case} {dtype} {shape}")
    del first, compare
    samples = alternate_rounds(calls, budget_s, min_rounds=3, max_rounds=50)
    ms, cpu = _medians_ms(samples)
    baseline, cpu_baseline = ms.get(names[0]), cpu.get(names[0])
    out = []
    for name in names:
        if name in failed:
            out.append(Result(case, dtype, name, shape, None, failed=failed[name]))
            continue
        calls[name].release_grads()
        gc.collect()
        peak = peak_memory_bytes(calls[name]) / 2**20
        agrees, err = agreement.get(name, (None, None))
        out.append(Result(case, dtype, name, shape, ms[name], baseline / ms[name] if baseline else None,
                          cpu[name], cpu_baseline / cpu[name] if cpu_baseline else None, peak,
                          rounds=len(samples[name]), agrees=agrees, max_rel_error=err))
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
    shape = f"x={m}x{k} w={n}x{k}"

    def compare(got, ref):  # max |y - y_fp32| / max |y_fp32| within the int8 error bound
        return max_rel_error(tuple(t.float() for t in got), ref), INT8_TOL
    # An implementation that fails (e.g. a bitsandbytes build without a CPU path) gets a
    # "failed" row; the others are still measured.
    agreement, failed = _check({name: (lambda c=c: (c(),)) for name, c in calls.items()}, calls, "int8",
                               compare, f"int8 fp32 {shape}")
    samples = alternate_rounds(calls, budget_s, min_rounds=5, max_rounds=200)
    ms, cpu = _medians_ms(samples)
    base, cpu_base = ms.get("bnb"), cpu.get("bnb")  # speedups vs bitsandbytes, when it ran
    out = []
    for name in names:
        if name in failed:
            out.append(Result("int8", "fp32", name, shape, None, failed=failed[name]))
            continue
        agrees, err = agreement.get(name, (None, 0.0 if name == REFERENCE["int8"] else None))
        out.append(Result("int8", "fp32", name, shape, ms[name], base / ms[name] if base else None,
                          cpu[name], cpu_base / cpu[name] if cpu_base else None, rel_error=err,
                          rounds=len(samples[name]), agrees=agrees, max_rel_error=err))
    return out


def _row(r: Result, baseline_failed: bool = False) -> str:
    """One table row. The speedup cells read FAIL where this implementation, or the one the
    speedups are against (``baseline_failed``), disagreed with the reference."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    bad = r.agrees is False or (baseline_failed and r.speedup is not None)
    return (f"| {r.case} | {r.dtype} | {r.shape} | {r.impl} | {f(r.median_ms, '.1f')} | {fail_or(bad, r.speedup, '.2f')} | "
            f"{f(r.cpu_ms, '.1f')} | {fail_or(bad, r.cpu_speedup, '.2f')} | "
            f"{f(r.peak_mib, '.0f')} | {f(r.rel_error, '.2e')} | {r.rounds} |"
            + (f" failed: {r.failed} |" if r.failed else ""))


def case_rows(results: list[Result]) -> list[str]:
    """The table rows of one case's results (one measure_train / measure_int8 call), whose
    speedups are against its first implementation."""
    baseline_failed = bool(results) and results[0].agrees is False
    return [_row(r, baseline_failed) for r in results]


def disagreements(results: list[Result]) -> list[str]:
    """One line per result that failed the agreement check."""
    return [disagreement_line(r.impl, REFERENCE[r.case], f"{r.case} {r.dtype} {r.shape}", r.max_rel_error)
            for r in results if r.agrees is False]


HEADER = ("| case | dtype | shape | impl | wall ms | speedup vs first | CPU ms | CPU-time speedup | peak MiB "
          "| rel. error vs fp32 | rounds |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastpt bench-dropin", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, B=2, T=128; int8 at 1024; short budget")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {','.join(CASES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16 (bf16 = autocast; llama and lora)")
    add_threads_and_budget(p)
    p.add_argument("--json", help="write the results as JSON to this path")
    args = p.parse_args(argv)
    cases, dtypes = split_list(args.cases), split_list(args.dtypes)
    check_subsets(p, cases=(cases, CASES), dtypes=(dtypes, DTYPES))
    check_json_path(p, args.json)
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else (5.0 if args.quick else 60.0)
    results = []
    print(HEADER, flush=True)
    for case in cases:
        rows_per_dtype = [measure_int8(size, budget)] if case == "int8" else \
            (measure_train(case, d, size, budget) for d in dtypes)
        for rows in rows_per_dtype:
            for line in case_rows(rows):
                print(line, flush=True)
            results += rows
    print(failure_note(disagreements(results), "the reference (" + ", ".join(
        f"{case}: {ref}" for case, ref in REFERENCE.items() if case in cases) + ")", "the tolerance"),
          end="", flush=True)
    if args.json:
        atomic_write_json(args.json, [asdict(r) for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
