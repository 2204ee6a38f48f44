"""SPAP on the real SmolLM2-135M ``down_proj`` layers at 30% channel sparsity.

For each of the 30 ``down_proj`` layers (W 576×1536, H from 64 C4 windows of 1024 tokens, dense inputs;
see ``benchmarks/real_layers.py``), prune 30% of the 1536 intermediate channels with SPAP and with
magnitude and Wanda-score selection followed by the exact refit.  Prints relative reconstruction error
and seconds per layer and a summary.  ``--grid`` runs the experiment behind SPAP's defaults instead.

    python benchmarks/down_proj.py                         # all 30 layers
    python benchmarks/down_proj.py --layers 0 14 29 --plot down_proj.png
    python benchmarks/down_proj.py --grid --layers 0 5 10 15 20 25 29
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import solvers  # noqa: E402
from real_layers import load, n_layers, problem  # noqa: E402

BASELINES = {"magnitude+refit": ("magnitude", {"refit": True}), "wanda+refit": ("wanda", {"refit": True})}

# The settings compared by --grid (the first is the default).
GRID = {
    "default (10 steps, gradual, swap)": {},
    "default, again (timing noise)": {},
    "5 steps": {"steps": 5},
    "20 steps": {"steps": 20},
    "not gradual": {"gradual": False},
    "1 inner round": {"max_inner": 1},
    "rho 1e-3 .. 1e3": {"rho0": 1e-3, "rho_max": 1e3},
    "no swap": {"swap": False},
    "no swap, no guard": {"swap": False, "guard": False},
}

def run(layers, sparsity: float, spap_options: dict, damp: float = 0.01) -> list[dict]:
    data = load()
    rows = []
    for layer in layers:
        p = problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=sparsity, damp=damp)
        row = {"layer": layer}
        sol = solvers.solve(p, "spap", **spap_options)
        row["spap"] = (sol.relative_error, sol.stats["seconds"])
        row["spap_start"] = sol.stats.get("start")
        row["swaps"] = sol.stats.get("swaps", 0)
        for name, (method, options) in BASELINES.items():
            b = solvers.solve(p, method, **options)
            row[name] = (b.relative_error, b.stats["seconds"])
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _header() -> str:
    cols = "".join(f"{name:>24}" for name in ["spap", *BASELINES])
    return f"{'layer':>5}{cols}{'start':>20}{'swaps':>7}\n{'':>5}" + "".join(f"{'rel.err':>14}{'s':>10}" for _ in range(3))


def _format(row: dict) -> str:
    cells = "".join(f"{row[name][0]:>14.5f}{row[name][1]:>10.3f}" for name in ["spap", *BASELINES])
    return f"{row['layer']:>5}{cells}{row['spap_start']:>20}{row['swaps']:>7}"


def summary(rows: list[dict]) -> None:
    print("-" * 100)
    for name in ["spap", *BASELINES]:
        errs = [r[name][0] for r in rows]
        secs = [r[name][1] for r in rows]
        print(f"{name:<16} mean rel.err {statistics.mean(errs):.5f}   mean s {statistics.mean(secs):.3f}   max s {max(secs):.3f}")
    lowest = sum(r["spap"][0] <= min(r[b][0] for b in BASELINES) * (1 + 1e-9) for r in rows)
    print(f"SPAP lowest error on {lowest}/{len(rows)} layers; "
          f"mean error reduction vs magnitude+refit {statistics.mean(1 - r['spap'][0] / r['magnitude+refit'][0] for r in rows):.1%}, "
          f"vs wanda+refit {statistics.mean(1 - r['spap'][0] / r['wanda+refit'][0] for r in rows):.1%}")


def grid(layers, sparsity: float) -> None:
    data = load()
    print(f"{'setting':<36}{'mean rel.err':>14}{'vs default':>12}{'swaps':>7}{'mean s':>9}{'max s':>8}")
    base = None
    for name, options in GRID.items():
        # Fresh problems per setting: the cached H⁻¹ must not favour the settings that run later.
        problems = [problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=sparsity) for layer in layers]
        sols = [solvers.solve(p, "spap", **options) for p in problems]
        err = statistics.mean(s.relative_error for s in sols)
        secs = [s.stats["seconds"] for s in sols]
        base = base or err
        swaps = statistics.mean(s.stats.get("swaps", 0) for s in sols)
        print(f"{name:<36}{err:>14.5f}{err / base - 1:>+12.2%}{swaps:>7.1f}{statistics.mean(secs):>9.3f}{max(secs):>8.3f}", flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ["spap", *BASELINES]:
        ax.plot([r["layer"] for r in rows], [r[name][0] for r in rows], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative reconstruction error")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M down_proj, 30% channels pruned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", help="layer indices (default: all)")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--damp", type=float, default=0.01, help="relative damping of H (default 0.01)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--grid", action="store_true", help="compare SPAP settings instead (the defaults experiment)")
    parser.add_argument("--plot", help="write error per layer to this image file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = args.layers if args.layers is not None else list(range(n_layers(load())))
    if args.grid:
        grid(layers, args.sparsity)
        return
    print(f"SmolLM2-135M down_proj (576x1536), {args.sparsity:.0%} channels, damp {args.damp:g}, "
          f"torch threads {torch.get_num_threads()}")
    print(_header())
    rows = run(layers, args.sparsity, {}, args.damp)
    summary(rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
