"""Numba kernels against their torch twins: the same solver call with ``kernel="numba"`` and ``"torch"``.

For each shape the problem is built once (its factorizations cached), both paths run ``--repeats``
times after one warm-up (which also compiles the kernel), and the table gives the median seconds, the
speedup, and the largest difference between the two results.  Timings are printed, never asserted.

    python benchmarks/kernels.py                          # SmolLM2 shapes, 2 threads
    python benchmarks/kernels.py --threads 1 --repeats 5
    python benchmarks/kernels.py --real-layers            # + SPAP on the 30 real down_proj layers

SPAP's problem here is synthetic (correlated inputs); on the 30 real down_proj layers the end-to-end
effect of its kernel is in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import solvers
from solvers import kernels
from solvers.synthetic import make_problem

# (label, d_out, d_in): SmolLM2-135M's linears.
SHAPES = [("q/o_proj", 576, 576), ("gate/up_proj", 1536, 576), ("down_proj", 576, 1536)]
# (method, structure, sparsity, shapes): SparseGPT's in-block sweep on every linear shape; SPAP's channel
# swap table on down_proj (channels are pruned as down_proj columns).
CASES = [("sparsegpt", solvers.Unstructured(), 0.5, SHAPES), ("sparsegpt", solvers.NM(2, 4), None, SHAPES),
         ("spap", None, 0.3, SHAPES[2:])]


def timed(problem, method: str, kernel: str, repeats: int) -> tuple[float, solvers.Solution]:
    sol = solvers.solve(problem, method, kernel=kernel)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sol = solvers.solve(problem, method, kernel=kernel)
        times.append(time.perf_counter() - t)
    return statistics.median(times), sol


def real_layers_comparison() -> None:
    """SPAP with either kernel on the 30 real SmolLM2 down_proj layers (30% channels), ``H⁻¹`` computed
    beforehand; both orders alternate to cancel drift.  Needs the cache of ``benchmarks/real_layers.py``."""
    from real_layers import load, n_layers, problem

    data = load()
    times = {"torch": [], "numba": []}
    same = 0
    for layer in range(n_layers(data)):
        p = problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=0.3)
        p.hessian_inverse  # noqa: B018
        order = ["torch", "numba"] if layer % 2 == 0 else ["numba", "torch"]
        sols = {k: solvers.solve(p, "spap", kernel=k) for k in order}
        for k, sol in sols.items():
            times[k].append(sol.stats["seconds"])
        same += bool(torch.equal(sols["torch"].keep, sols["numba"].keep))
    t, n = statistics.mean(times["torch"]), statistics.mean(times["numba"])
    print(f"spap on {len(times['torch'])} real down_proj layers: mean s torch {t:.3f}, numba {n:.3f} ({t / n:.2f}x); "
          f"same mask on {same}/{len(times['torch'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-layers", action="store_true", help="also SPAP on the 30 real SmolLM2 down_proj layers")
    args = parser.parse_args(argv)
    if not kernels.HAVE_NUMBA:
        sys.exit("numba is not importable")
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    kernels.warm_up()
    print(f"torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads; median of {args.repeats}")
    print(f"{'method':<11}{'structure':<15}{'layer':<14}{'shape':>11}{'torch s':>10}{'numba s':>10}{'speedup':>9}{'max |ΔW|':>11}{'same mask':>11}")
    for method, structure, sparsity, shapes in CASES:
        for label, d_out, d_in in shapes:
            p = make_problem(d_out, d_in, kind="correlated", structure=structure, sparsity=sparsity,
                             n_samples=2 * d_in, seed=0)
            p.hessian  # noqa: B018 - factor once, outside the timings
            t_torch, a = timed(p, method, "torch", args.repeats)
            t_numba, b = timed(p, method, "numba", args.repeats)
            diff = float((a.weight - b.weight).abs().max())
            print(f"{method:<11}{repr(structure) if structure else 'channels':<15}{label:<14}{f'{d_out}x{d_in}':>11}{t_torch:>10.3f}{t_numba:>10.3f}"
                  f"{t_torch / t_numba:>8.2f}x{diff:>11.1e}{str(bool(torch.equal(a.keep, b.keep))):>11}", flush=True)
    if args.real_layers:
        real_layers_comparison()


if __name__ == "__main__":
    main()
