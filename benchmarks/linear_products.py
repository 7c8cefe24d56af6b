"""The matrix products of the F5 Llama training step (4096 tokens, d 512, SwiGLU 1408,
vocabulary 32000 in the fused loss's chunks of 1024 rows): fastpt.ops.gemm against torch's
matmul (MKL), best of N calls each, and the max error of each against the float64 product of
the same fp32 inputs (relative to the largest output).

    python -m fastpt.benchmarks.linear_products [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from fastpt import ops

# name, a's shape, b's shape, trans_a, trans_b (op(a) @ op(b))
CASES = [("forward x W^T", (4096, 512), (1408, 512), False, True),
         ("input gradient dY W", (4096, 1408), (1408, 512), False, False),
         ("weight gradient dY^T X", (4096, 1408), (4096, 512), True, False),
         ("head logits", (1024, 512), (32000, 512), False, True),
         ("head weight gradient", (1024, 32000), (1024, 512), True, False)]


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| product | shape (m x k x n) | fastpt | torch (MKL) | speedup | max error / max abs, fastpt vs torch |")
    print("|---|---|---:|---:|---:|---|")
    for name, shape_a, shape_b, ta, tb in CASES:
        a, b = torch.randn(*shape_a), torch.randn(*shape_b)
        A, B = (a.t() if ta else a), (b.t() if tb else b)
        m, k, n = A.shape[0], A.shape[1], B.shape[1]
        ref = A.double() @ B.double()
        scale = ref.abs().max().item()
        err_fastpt = (ops.gemm(a, b, ta, tb).double() - ref).abs().max().item() / scale
        err_torch = ((A @ B).double() - ref).abs().max().item() / scale
        del ref
        t_fastpt = best_ms(lambda: ops.gemm(a, b, ta, tb), args.repeats)
        t_torch = best_ms(lambda: A @ B, args.repeats)
        gf = 2 * m * k * n / 1e6
        print(f"| {name} | {m} x {k} x {n} | {t_fastpt:.1f} ms, {gf / t_fastpt:.0f} GFLOP/s | {t_torch:.1f} ms, "
              f"{gf / t_torch:.0f} | {t_torch / t_fastpt:.2f}x | {err_fastpt:.1e} vs {err_torch:.1e} |")


if __name__ == "__main__":
    main()
