"""Seconds of the exact per-row refit (unstructured and N:M) on real SmolLM2 layers, direct and by CG.

``solvers.refit_rows`` solves ``H_KK ŵ_K = (H w)_K`` for every output row ``r`` with its own kept set
``K_r``.  This script times both of its methods on the same mask:

- ``cholesky``: one Cholesky solve per row, rows sorted by kept count, batches of 2M elements;
- ``cg``: conjugate gradients on all rows at once preconditioned by ``(H⁻¹)_KK``, started from
  ``W ⊙ keep``, until the bound on the objective's excess is below 1e-11 of the objective: float32
  iterations first, then float64 ones from their result (the default);
- ``cg64``: the same with the float64 iterations only (``solvers.refit._FLOAT32_PHASE`` off).

``H⁻¹`` is computed before the clock starts (every second-order solver has it already).  The masks are
magnitude masks at 50% (chosen over the whole layer, so rows keep unequal counts) and at 2:4; the last
columns compare ``cg`` with ``cholesky`` (relative objective difference, largest weight difference
relative to the largest weight).  Timings are printed, never asserted; the header prints the load average.

    python benchmarks/row_refit.py --layers 5 --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

import real_layers
import solvers

METHODS = ("cholesky", "cg", "cg64")
refit_module = importlib.import_module("solvers.refit")


def time_refit(problem: solvers.LayerProblem, keep: torch.Tensor, method: str) -> tuple[float, torch.Tensor]:
    float32_phase = refit_module._FLOAT32_PHASE
    refit_module._FLOAT32_PHASE = method != "cg64"
    try:
        start = time.perf_counter()
        W = solvers.refit_rows(problem, keep, method="cg" if method == "cg64" else method)
        return time.perf_counter() - start, W
    finally:
        refit_module._FLOAT32_PHASE = float32_phase


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=int, default=[5])
    parser.add_argument("--linears", nargs="+", default=["mlp.down_proj", "mlp.gate_proj", "self_attn.q_proj"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = real_layers.load()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# benchmarks/row_refit.py {' '.join(sys.argv[1:])}\n# torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load:.2f}\n")
    print("| layer | linear | mask | kept per row (min-max) | " + " s | ".join(METHODS) + " s | cholesky/cg "
          "| cg64/cg | objective rel. diff | max weight diff |")
    print("|---|---|---|---|" + "---|" * len(METHODS) + "---|---|---|---|")
    for layer in args.layers:
        for linear in args.linears:
            for name, structure, target in (("50%", solvers.Unstructured(), {"sparsity": 0.5}), ("2:4", solvers.NM(2, 4), {})):
                p = real_layers.problem(data, layer, linear, structure, **target)
                keep = solvers.solve(p, "magnitude").keep
                p.hessian_inverse  # noqa: B018 (cached on the problem; not part of either time)
                counts = keep.sum(1)
                seconds, weights = zip(*(time_refit(p, keep, m) for m in METHODS))
                objectives = [p.objective(w) for w in weights]
                rel = (objectives[1] - objectives[0]) / objectives[0]
                diff = float((weights[1] - weights[0]).abs().max() / weights[0].abs().max())
                print(f"| {layer} | {linear} {tuple(p.shape)} | {name} | {int(counts.min())}-{int(counts.max())} | "
                      + " | ".join(f"{s:.2f}" for s in seconds) + f" | {seconds[0] / seconds[1]:.1f}x | "
                      f"{seconds[2] / seconds[1]:.2f}x | {rel:.1e} | "
                      f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
