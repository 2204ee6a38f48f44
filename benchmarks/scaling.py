"""Per-layer solve time and peak memory of each solver as the layer grows, with a fitted cost exponent.

Problems come from :func:`solvers.synthetic.make_factor_problem` (a factor-model Gram matrix with uneven
channels, built in ``O(d_in²·rank)``), 30% of the input channels pruned by default.  Each (solver, shape)
runs in its own process, so its peak memory is its own: peak RSS on CPU, ``torch.cuda.max_memory_allocated``
on CUDA.  The time is the solver call alone (``Solution.stats["seconds"]``, CUDA synchronised); building
the problem and factoring ``H`` are timed separately ("setup s", shared by every solver in practice,
since a problem caches its factorizations).  The exponent is the least-squares slope of
log(seconds) against log(d_in) over the shapes that finished.  Timings are printed, never asserted.

Shapes (``--shapes``): ``smollm2-down`` 576×1536, ``w3072`` 1152×3072, ``w6144`` 2304×6144,
``llama3-8b-attn`` 4096×4096, ``llama3-8b-down`` 4096×14336, ``llama3-70b-down`` 8192×28672.

    python benchmarks/scaling.py                                   # CPU: up to 6144 wide
    python benchmarks/scaling.py --device cuda --shapes all        # GPU: up to Llama-3-70B's down_proj
    python benchmarks/scaling.py --json scaling.json --plot docs/scaling.png
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "smollm2-down": (576, 1536),
    "w3072": (1152, 3072),
    "w6144": (2304, 6144),
    "llama3-8b-attn": (4096, 4096),
    "llama3-8b-down": (4096, 14336),
    "llama3-70b-down": (8192, 28672),
}
CPU_SHAPES = ["smollm2-down", "w3072", "w6144"]
METHODS = ["spap", "obs", "admm", "wanda_sp", "magnitude"]


def worker(payload: dict) -> dict:
    import resource

    import torch

    import solvers
    from solvers.synthetic import make_factor_problem

    torch.set_num_threads(payload["threads"])
    device = payload["device"]
    d_out, d_in = SHAPES[payload["shape"]]
    t = time.perf_counter()
    problem = make_factor_problem(d_out, d_in, sparsity=payload["sparsity"], device=device)
    problem.hessian_inverse  # noqa: B018 - the factorization every solver shares, timed as setup
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup = time.perf_counter() - t
    sol = solvers.solve(problem, payload["method"])
    out = {"seconds": sol.stats["seconds"], "setup_s": setup, "relative_error": sol.relative_error,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["device_name"] = torch.cuda.get_device_name(0)
    return out


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) on log(d_in)."""
    if len(points) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--shapes", nargs="+", default=CPU_SHAPES, help=f"from {list(SHAPES)}, or 'all'")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (method, shape) before it is abandoned")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    shapes = list(SHAPES) if args.shapes == ["all"] else args.shapes
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)} or 'all'")
    if not 0 < args.sparsity < 1:
        parser.error("--sparsity must be in (0, 1)")
    print(f"device {args.device}, {args.threads} threads, {args.sparsity:.0%} channels, factor-model Gram "
          f"(solvers.synthetic.make_factor_problem); timeout {args.timeout:.0f} s per run", flush=True)
    print(f"{'method':<11}{'shape':<17}{'d_out x d_in':>14}{'solve s':>10}{'setup s':>10}{'peak GiB':>10}{'rel.err':>10}", flush=True)
    rows = []
    for method in args.methods:
        for shape in shapes:
            payload = {"method": method, "shape": shape, "sparsity": args.sparsity, "device": args.device,
                       "threads": args.threads}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(payload)]
            d_out, d_in = SHAPES[shape]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{method:<11}{shape:<17}{f'{d_out}x{d_in}':>14}  over {args.timeout:.0f} s: abandoned", flush=True)
                break  # larger shapes of this method would only take longer
            if proc.returncode != 0:
                print(f"{method:<11}{shape:<17}{f'{d_out}x{d_in}':>14}  failed: {proc.stderr.strip().splitlines()[-1]}", flush=True)
                break
            r = {"method": method, "shape": shape, "d_out": d_out, "d_in": d_in,
                 **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(r)
            peak = r.get("peak_cuda_gib", r["peak_rss_gib"])
            print(f"{method:<11}{shape:<17}{f'{d_out}x{d_in}':>14}{r['seconds']:>10.3f}{r['setup_s']:>10.2f}{peak:>10.2f}"
                  f"{r['relative_error']:>10.5f}", flush=True)
    print()
    print("fitted exponent of solve time in d_in (seconds ∝ d_in^e):")
    for method in args.methods:
        e = exponent([(r["d_in"], r["seconds"]) for r in rows if r["method"] == method])
        print(f"  {method:<11}{'n/a' if e is None else f'{e:.2f}'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for method in args.methods:
            rs = [r for r in rows if r["method"] == method]
            ax1.loglog([r["d_in"] for r in rs], [r["seconds"] for r in rs], "o-", label=method)
            ax2.loglog([r["d_in"] for r in rs], [r.get("peak_cuda_gib", r["peak_rss_gib"]) for r in rs], "o-", label=method)
        ax1.set(xlabel="d_in", ylabel="solve seconds", title=f"solve time, {args.device}")
        ax2.set(xlabel="d_in", ylabel="peak memory (GiB)", title="peak memory of the process")
        ax1.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
