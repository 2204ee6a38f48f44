"""Seconds of the exact per-row refit (unstructured and N:M) on real SmolLM2 layers, three batchings.

``solvers.refit.refit_rows`` solves one ``|K_r|×|K_r|`` system per output row, in batches padded to a
common size.  This script times the same refit (same mask, same result) three ways:

- ``pad to layer max``: rows in their own order, every system padded to the largest kept count of the
  layer, 64M-element batches (how the refit worked before the batching was changed);
- ``sorted, 64M``: rows sorted by kept count, each batch padded to its own largest count;
- ``sorted, 2M``: the same with small batches that stay in cache (the CPU default).

The masks are magnitude masks at 50% (chosen over the whole layer, so rows keep unequal counts) and
2:4 (every row keeps half).  Timings are printed, never asserted; the header prints the load average.

    python benchmarks/row_refit.py --layers 5 --threads 1
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

refit_module = importlib.import_module("solvers.refit")
_sorted_chunks = refit_module._chunks_by_count


def _layer_max_chunks(rows: torch.Tensor, counts: torch.Tensor, budget: int):
    """Rows in their own order, every batch padded to the layer's largest kept count."""
    if rows.numel() == 0:
        return
    kmax = int(counts[rows].max())
    step = max(1, budget // (kmax * kmax))
    for start in range(0, rows.numel(), step):
        yield rows[start : start + step], kmax


VARIANTS = {
    "pad to layer max": (_layer_max_chunks, 64_000_000),
    "sorted, 64M": (_sorted_chunks, 64_000_000),
    "sorted, 2M": (_sorted_chunks, 2_000_000),
}


def time_refit(problem: solvers.LayerProblem, keep: torch.Tensor, variant: str) -> tuple[float, torch.Tensor]:
    chunks, budget = VARIANTS[variant]
    saved = refit_module._chunks_by_count, refit_module._ROW_CHUNK_ELEMENTS
    refit_module._chunks_by_count = chunks
    refit_module._ROW_CHUNK_ELEMENTS = budget
    try:
        start = time.perf_counter()
        W = refit_module.refit_rows(problem, keep)
        return time.perf_counter() - start, W
    finally:
        refit_module._chunks_by_count, refit_module._ROW_CHUNK_ELEMENTS = saved


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
    print("| layer | linear | mask | kept per row (min-max) | " + " | ".join(VARIANTS) + " | max diff |")
    print("|---|---|---|---|" + "---|" * len(VARIANTS) + "---|")
    for layer in args.layers:
        for linear in args.linears:
            for name, structure, target in (("50%", solvers.Unstructured(), {"sparsity": 0.5}), ("2:4", solvers.NM(2, 4), {})):
                p = real_layers.problem(data, layer, linear, structure, **target)
                keep = solvers.solve(p, "magnitude").keep
                counts = keep.sum(1)
                seconds, weights = zip(*(time_refit(p, keep, v) for v in VARIANTS))
                diff = max(float((w - weights[0]).abs().max()) for w in weights)
                print(f"| {layer} | {linear} {tuple(p.shape)} | {name} | {int(counts.min())}-{int(counts.max())} | "
                      + " | ".join(f"{s:.2f} s" for s in seconds) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
