"""SPAP's penalty rounds in float32 against float64, on real SmolLM2 layers (unstructured and N:M).

The rounds (``round_precision``) only choose the mask; the refit of the final mask is float64 either
way.  For every linear of the chosen blocks this script solves the layer both ways and prints each
one's relative error and seconds, the relative difference of the errors and the share of weights on
which the two masks agree; the last line sums them.  The layers are the dense-input Gram matrices of
``benchmarks/real_layers.py`` (cached on disk).  Timings are printed, never asserted.

    python benchmarks/row_precision.py --structure 0.5 --blocks 1 8 15 22 29 --threads 2
    python benchmarks/row_precision.py --structure 2:4 --blocks 1 15 29 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import real_layers
import solvers
from row_phases import structure_of

PRECISIONS = ("float64", "float32")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structure", default="0.5", help="a sparsity (unstructured) or N:M, e.g. 2:4")
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 8, 15, 22, 29])
    parser.add_argument("--linears", nargs="+", default=real_layers.LINEARS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    structure, target = structure_of(args.structure)
    data = real_layers.load()
    small = solvers.synthetic.make_problem(16, 64, structure=structure, **target)
    for precision in PRECISIONS:  # compile kernels and start the thread pools outside the clock
        solvers.solve(small, "spap", round_precision=precision)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# benchmarks/row_precision.py {' '.join(sys.argv[1:])}\n# torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load:.2f}\n")
    print("| block | linear | float64 rel. err | s | float32 rel. err | s | err change | masks agree |")
    print("|---|---|---|---|---|---|---|---|")
    errors = {p: 0.0 for p in PRECISIONS}
    seconds = {p: 0.0 for p in PRECISIONS}
    changes = []
    for block in args.blocks:
        for linear in args.linears:
            problem = real_layers.problem(data, block, linear, structure, **target)
            problem.hessian_inverse  # noqa: B018 (cached on the problem; shared by both solves)
            solved, took = {}, {}
            for precision in PRECISIONS:
                start = time.perf_counter()
                solved[precision] = solvers.solve(problem, "spap", round_precision=precision)
                took[precision] = time.perf_counter() - start
                seconds[precision] += took[precision]
                errors[precision] += solved[precision].relative_error
            a, b = solved["float64"], solved["float32"]
            change = b.relative_error / a.relative_error - 1
            changes.append(change)
            agree = float((a.keep == b.keep).float().mean())
            print(f"| {block} | {linear} | {a.relative_error:.6f} | {took['float64']:.2f} | {b.relative_error:.6f} | "
                  f"{took['float32']:.2f} | {change:+.2e} | {agree:.4f} |", flush=True)
    print(f"\nsum of relative errors: float64 {errors['float64']:.5f}, float32 {errors['float32']:.5f}; "
          f"per-layer change {min(changes):+.2e} to {max(changes):+.2e}, mean {sum(changes) / len(changes):+.2e}; "
          f"seconds: float64 {seconds['float64']:.1f}, float32 {seconds['float32']:.1f} "
          f"({seconds['float32'] / seconds['float64']:.2f}x)")


if __name__ == "__main__":
    main()
