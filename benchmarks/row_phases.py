"""Where SPAP's time goes on one unstructured or N:M layer, next to ADMM and SparseGPT on the same layer.

SPAP's row path has four phases: the inverse Gram matrix (shared with every second-order method), the
penalty rounds (one Cholesky per ρ, two triangular solves per round, and the projection onto the
structure, timed apart as ``selection``), the exact refit of the final mask by conjugate gradients, and
the guard's refit of the OBS-score mask (stopped once it provably loses).  Each phase is timed by
wrapping the function that runs it, with a device synchronisation on both sides, so the phases add up
to the whole solve.  The layer is synthetic, with correlated inputs drawn on the device itself
(``2·d_in`` samples): ``X = diag(scale) U diag(σ) Z`` as in ``solvers.synthetic.make_problem(kind=
"correlated")``, but with singular values over ``--decades`` orders of magnitude (default 1).  With
make_problem's 3 the conjugate-gradient refit does not converge in its 40 iterations and every row is
solved directly, which real layers never needed (SmolLM2's converge in 17-20,
``benchmarks/row_refit.py``).  Any shape; timings are printed, never asserted.

    python benchmarks/row_phases.py --shape 576 1536 --structure 0.5          # a SmolLM2 down_proj shape, CPU
    python benchmarks/row_phases.py --real 5 mlp.down_proj --structure 2:4    # the real layer (benchmarks/real_layers.py)
    python benchmarks/row_phases.py --shape 14336 4096 --structure 2:4 --device cuda   # Llama-3-8B gate_proj
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections import defaultdict

import torch

import solvers
from solvers.synthetic import make_inputs, make_problem

penalty = importlib.import_module("solvers.penalty")  # the module, not the registered function


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(name: str, fn, clock: dict, device: torch.device):
    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        clock[name][0] += time.perf_counter() - start
        clock[name][1] += 1
        return out
    return wrapper


def structure_of(text: str) -> tuple[solvers.Structure, dict]:
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        return solvers.NM(n, m), {}
    return solvers.Unstructured(), {"sparsity": float(text)}


def correlated_problem(d_out: int, d_in: int, structure: solvers.Structure, target: dict, device: str,
                       decades: float = 1.0, seed: int = 0) -> solvers.LayerProblem:
    """``make_problem(kind="correlated")``'s distribution, drawn on ``device`` (an 8B layer's 14336 inputs
    would take minutes on the host)."""
    gen = torch.Generator(device).manual_seed(seed)
    X = make_inputs(d_in, 2 * d_in, "correlated", decades=decades, generator=gen)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64, device=device)
    return solvers.LayerProblem(W, X @ X.T, structure, damp=0.01, **target)


def phases(problem: solvers.LayerProblem) -> tuple[float, dict]:
    """Seconds of ``solve(problem, "spap")`` and ``{phase: [seconds, calls]}``."""
    clock: dict = defaultdict(lambda: [0.0, 0])
    device = problem.device
    wrapped = {"refit_rows": "final refit", "refit_rows_below": "guard", "_project_count": "selection",
               "cholesky": "Cholesky per ρ"}
    saved = {name: getattr(penalty, name) for name in wrapped}
    try:
        for name, label in wrapped.items():
            setattr(penalty, name, _timed(label, saved[name], clock, device))
        _sync(device)
        start = time.perf_counter()
        solvers.solve(problem, "spap")
        _sync(device)
        total = time.perf_counter() - start
    finally:
        for name, fn in saved.items():
            setattr(penalty, name, fn)
    clock["Ŵ-steps and the rest"] = [total - sum(v[0] for v in clock.values()), 0]
    return total, dict(clock)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=2, type=int, default=[576, 1536], metavar=("D_OUT", "D_IN"))
    parser.add_argument("--structure", default="0.5", help="a sparsity (unstructured) or N:M, e.g. 2:4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decades", type=float, default=1.0, help="spread of the inputs' singular values")
    parser.add_argument("--real", nargs=2, metavar=("BLOCK", "LINEAR"),
                        help="a real SmolLM2 layer instead, on the host (cached Gram matrices of benchmarks/real_layers.py)")
    parser.add_argument("--compare", nargs="*", default=["admm", "sparsegpt"], help="solvers timed on the same layer")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    structure, target = structure_of(args.structure)
    if args.real:
        import real_layers

        data = real_layers.load()
        problem = real_layers.problem(data, int(args.real[0]), args.real[1], structure, **target)  # on the host
    else:
        problem = correlated_problem(*args.shape, structure, target, args.device, args.decades)
    d_out, d_in = problem.shape
    device = problem.device
    small = make_problem(16, 64, structure=structure, device=args.device, **target)
    for method in ["spap", *args.compare]:  # compile kernels and warm the device outside the clock
        solvers.solve(small, method)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# benchmarks/row_phases.py {' '.join(sys.argv[1:])}\n# {name}, torch {torch.__version__}\n")
    _sync(device)
    start = time.perf_counter()
    problem.hessian_inverse  # noqa: B018 (cached on the problem, shared by every solver below)
    _sync(device)
    print(f"H⁻¹ ({d_in}×{d_in}, float64): {time.perf_counter() - start:.3f} s, before every solver\n")
    total, clock = phases(problem)
    print(f"| spap phase ({d_out}×{d_in}, {args.structure}) | s | share | calls |\n|---|---|---|---|")
    for label, (seconds, calls) in clock.items():
        print(f"| {label} | {seconds:.3f} | {seconds / total:.0%} | {calls or ''} |")
    print(f"| **spap total** | {total:.3f} | 100% | |\n")
    print("| solver | s | relative error |\n|---|---|---|")
    for method in ["spap", *args.compare]:
        _sync(device)
        start = time.perf_counter()
        sol = solvers.solve(problem, method)
        _sync(device)
        print(f"| {method} | {time.perf_counter() - start:.3f} | {sol.relative_error:.4f} |")


if __name__ == "__main__":
    main()
