"""How far the two dense kernels of every solver are from what the device's matmul rate allows.

1. The device's GEMM rate: the best of ``--repeats`` square products of size ``--gemm``, in float32 and
   float64 (GFLOP/s).
2. Gram accumulation (``solvers.GramAccumulator.add_batch``): ``tokens × d²`` useful flops (the
   symmetric product, upper triangle only) at the float32 rate; the pipeline's default products are
   float32 with a float64 sum.
3. The factorization every second-order solver starts with (``LayerProblem.hessian_inverse``: Cholesky
   ``d³/3``, triangular inverse ``d³/3``, product ``d³/3`` useful flops) at the float64 rate.

For each: flops, floor = flops / rate, measured seconds (best of ``--repeats``), and the gap
(measured / floor).  Timings are printed, never asserted.

    python benchmarks/floors.py                          # SmolLM2 widths, CPU
    python benchmarks/floors.py --device cuda --widths 4096 14336
"""

from __future__ import annotations

import argparse
import time

import torch

import solvers


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", nargs="+", type=int, default=[576, 1536], help="Gram widths d (SmolLM2: 576, 1536)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per Gram batch (8 sequences of 1024)")
    parser.add_argument("--gemm", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    rate = {}
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(args.gemm, args.gemm, dtype=dtype, device=dev)
        t = best_time(lambda: a @ a, args.repeats, dev)
        rate[dtype] = 2 * args.gemm**3 / t
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}: GEMM {args.gemm}² float32 {rate[torch.float32] / 1e9:.1f} GFLOP/s, "
          f"float64 {rate[torch.float64] / 1e9:.1f} GFLOP/s (best of {args.repeats})")
    print(f"{'kernel':<40}{'d':>7}{'GFLOP':>9}{'floor s':>10}{'measured s':>12}{'gap':>7}")
    for d in args.widths:
        x = torch.randn(args.tokens, d, device=dev)
        acc = solvers.GramAccumulator(d, device=dev, product_dtype=torch.float32)
        flops = args.tokens * d * d
        t = best_time(lambda: acc.add_batch(x), args.repeats, dev)
        floor = flops / rate[torch.float32]
        print(f"{f'Gram add_batch, {args.tokens} tokens, fp32':<40}{d:>7}{flops / 1e9:>9.2f}{floor:>10.4f}{t:>12.4f}{t / floor:>7.1f}")
        X = torch.randn(d, 2 * d, dtype=torch.float64, device=dev)
        H = X @ X.T
        W = torch.randn(8, d, dtype=torch.float64, device=dev)

        def factor():
            p = solvers.LayerProblem(W, H, solvers.channels(d), sparsity=0.3)
            return p.hessian_inverse

        flops = d**3  # Cholesky d³/3 + triangular inverse d³/3 + L⁻ᵀL⁻¹ d³/3
        t = best_time(factor, args.repeats, dev)
        floor = flops / rate[torch.float64]
        print(f"{'hessian_inverse (Cholesky, inverse), fp64':<40}{d:>7}{flops / 1e9:>9.2f}{floor:>10.4f}{t:>12.4f}{t / floor:>7.1f}")


if __name__ == "__main__":
    main()
