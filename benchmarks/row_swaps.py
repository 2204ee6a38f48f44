"""SPAP's row swap search on real SmolLM2-135M layers: error and seconds with and without it, against ADMM.

For every linear of ``--blocks`` (W and the dense-input Gram matrix of ``benchmarks/real_layers.py``) at
unstructured ``--sparsity`` (default 60%) and 2:4, three solves: SPAP (penalty mask, guard, exact
per-row refit), SPAP with ``row_swap=True`` (the same, then the row swap search of
``solvers/row_swap.py``) and ADMM (Boža 2024).  Per problem: relative error (undamped, ``Solution.relative_error``) and seconds of
each, and the search's swaps; the summary sums the relative errors and seconds per structure.
Timings are printed, never asserted; the header prints the load average.

``--kernels`` instead times the search alone on each problem, from SPAP's mask (no row search), with the
Numba kernel and with the batched torch path (the CPU reason for the kernel), and checks that both
choose the same mask; ``--batches`` compares swaps tried per table.

    python benchmarks/row_swaps.py --blocks 0 15 29
    python benchmarks/row_swaps.py --blocks 0 15 29 --linears mlp.down_proj --admm-swap   # + admm swap=True
    python benchmarks/row_swaps.py --blocks 15 --linears self_attn.o_proj mlp.down_proj --kernels
    python benchmarks/row_swaps.py --blocks 15 --linears self_attn.o_proj --batches 1 8 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

import solvers
from solvers import kernels
from real_layers import LINEARS, load, problem
from solvers.row_swap import row_swap_search

METHODS = {"spap": ("spap", {}), "spap+row_swap": ("spap", {"row_swap": True}), "admm": ("admm", {})}
# --admm-swap: ADMM's mask finished by the same search (solve(method="admm", swap=True)).
ADMM_SWAP = {"admm+swap": ("admm", {"swap": True})}


def structures(sparsity: float):
    return [(f"unstructured {sparsity:.0%}", solvers.Unstructured(), {"sparsity": sparsity}), ("2:4", solvers.NM(2, 4), {})]


def compare(data, blocks, linears, sparsity: float, damp: float, methods: dict = METHODS) -> None:
    totals = defaultdict(lambda: defaultdict(float))
    print(f"{'block':>5} {'linear':<17}{'structure':<18}"
          + "".join(f"{name:>15}{'s':>8}" for name in methods) + f"{'swaps':>8}{'rows':>6}")
    for sname, structure, target in structures(sparsity):
        for block in blocks:
            for linear in linears:
                cells, swaps = [], ""
                for name, (method, options) in methods.items():
                    p = problem(data, block, linear, structure, damp=damp, **target)
                    sol = solvers.solve(p, method, **options)
                    seconds = sol.stats["seconds"]
                    totals[sname][name] += sol.relative_error
                    totals[sname][name + " s"] += seconds
                    cells.append(f"{sol.relative_error:>15.6f}{seconds:>8.2f}")
                    if name == "spap+row_swap":
                        rs = sol.stats["row_swap"]
                        swaps = f"{rs['swaps']:>8d}{rs['rows_not_at_optimum']:>6d}"
                print(f"{block:>5} {linear:<17}{sname:<18}" + "".join(cells) + swaps, flush=True)
    print("\nsummed relative error (seconds) over the problems of each structure")
    for sname, t in totals.items():
        print(f"  {sname:<18}" + "   ".join(f"{name} {t[name]:.6f} ({t[name + ' s']:.1f} s)" for name in methods))
    print("swaps: the row search's swaps in all; rows: rows stopped by max_swaps before a 1-swap optimum")


def kernels_and_batches(data, blocks, linears, sparsity: float, damp: float, batches: list[int] | None) -> None:
    runs = [(f"batch {b}", {"batch": b}) for b in batches] if batches else \
        [("numba", {"kernel": "numba"}), ("torch", {"kernel": "torch"})]
    print(f"{'block':>5} {'linear':<17}{'structure':<18}" + "".join(f"{label:>12}{'s':>8}{'swaps':>7}" for label, _ in runs)
          + f"{'same mask':>11}")
    for sname, structure, target in structures(sparsity):
        for block in blocks:
            for linear in linears:
                p = problem(data, block, linear, structure, damp=damp, **target)
                start = solvers.solve(p, "spap").keep
                p.hessian_inverse  # noqa: B018 - cached, shared by every run; not part of the search's time
                cells, masks = [], []
                for _, options in runs:
                    t = time.perf_counter()
                    keep, W_hat, st = row_swap_search(p, start, **options)
                    seconds = time.perf_counter() - t
                    masks.append(keep)
                    cells.append(f"{p.relative_error(W_hat):>12.6f}{seconds:>8.2f}{st['swaps']:>7d}")
                same = all(torch.equal(masks[0], k) for k in masks[1:])
                print(f"{block:>5} {linear:<17}{sname:<18}" + "".join(cells) + f"{str(same):>11}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--linears", nargs="+", default=LINEARS, choices=LINEARS)
    parser.add_argument("--sparsity", type=float, default=0.6, help="unstructured sparsity (default 0.6)")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", action="store_true", help="time the search alone with each kernel instead")
    parser.add_argument("--batches", type=int, nargs="+", help="time the search alone with these batch sizes instead")
    parser.add_argument("--admm-swap", action="store_true",
                        help="also ADMM's mask finished by the same search (admm with swap=True)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# benchmarks/row_swaps.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
          f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_avg:.2f}, damp {args.damp:g}")
    data = load()
    kernels.warm_up()
    warm = problem(data, args.blocks[0], "self_attn.o_proj", solvers.NM(2, 4), damp=args.damp)
    row_swap_search(warm, solvers.solve(warm, "magnitude").keep)  # compiles the row kernel: not a problem's time
    if args.kernels or args.batches:
        kernels_and_batches(data, args.blocks, args.linears, args.sparsity, args.damp, args.batches)
    else:
        compare(data, args.blocks, args.linears, args.sparsity, args.damp,
                {**METHODS, **ADMM_SWAP} if args.admm_swap else METHODS)


if __name__ == "__main__":
    main()
