"""SPAP on the real SmolLM2-135M ``down_proj`` layers at 30% channel sparsity.

For each of the 30 ``down_proj`` layers (W 576×1536, H from 64 C4 windows of 1024 tokens, dense inputs;
see ``benchmarks/real_layers.py``), prune 30% of the 1536 intermediate channels with SPAP and with
magnitude and Wanda-score selection followed by the exact refit.  Prints relative reconstruction error
and seconds per layer and a summary.  ``--grid`` runs the experiment behind SPAP's defaults instead.

    python benchmarks/down_proj.py                         # all 30 layers
    python benchmarks/down_proj.py --layers 0 14 29 --plot down_proj.png
    python benchmarks/down_proj.py --grid --layers 0 5 10 15 20 25 29
    python benchmarks/down_proj.py --row-grid --layers 5 20        # SPAP's row schedule against ADMM
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import torch

import solvers
from real_layers import LINEARS, load, n_layers, problem

BASELINES = {"magnitude+refit": ("magnitude", {"refit": True}), "wanda+refit": ("wanda", {"refit": True})}

# The settings compared by --grid (the first is the default).
GRID = {
    "default (5 steps, gradual, swap)": {},
    "default, again (timing noise)": {},
    "10 steps": {"steps": 10},
    "10 steps, 1 inner round": {"steps": 10, "max_inner": 1},
    "20 steps": {"steps": 20},
    "not gradual": {"gradual": False},
    "1 inner round": {"max_inner": 1},
    "rho 1e-3 .. 1e3": {"rho0": 1e-3, "rho_max": 1e3},
    "no swap": {"swap": False},
    "no swap, no guard": {"swap": False, "guard": False},
}

def warm_up(data, layer: int, sparsity: float, damp: float) -> float:
    """One untimed SPAP solve before the table: the process's first solve also loads the compiled Numba
    kernels (serial and parallel builds) and starts the thread pools, a one-time cost
    that is not the layer's.  Returns its seconds, which the table's header prints."""
    p = problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=sparsity, damp=damp)
    return solvers.solve(p, "spap").stats["seconds"]


def run(layers, sparsity: float, spap_options: dict, damp: float = 0.01, data: dict | None = None) -> list[dict]:
    data = data if data is not None else load()
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
        print(f"{name:<16} mean rel.err {statistics.mean(errs):.5f}   mean s {statistics.mean(secs):.3f}   "
              f"max s {max(secs):.3f}   under 1 s on {sum(s < 1 for s in secs)}/{len(secs)} layers")
    lowest = sum(r["spap"][0] <= min(r[b][0] for b in BASELINES) * (1 + 1e-9) for r in rows)
    print(f"SPAP lowest error on {lowest}/{len(rows)} layers; "
          f"mean error reduction vs magnitude+refit {statistics.mean(1 - r['spap'][0] / r['magnitude+refit'][0] for r in rows):.1%}, "
          f"vs wanda+refit {statistics.mean(1 - r['spap'][0] / r['wanda+refit'][0] for r in rows):.1%}")


def grid(layers, sparsity: float, names: list[str] | None = None, data: dict | None = None) -> None:
    """Each setting of ``GRID`` (or those named) on every layer: mean error and objective against the
    first setting, solver seconds (``H⁻¹`` is computed before each solve, so only the solver is timed)."""
    data = data if data is not None else load()
    names = names or list(GRID)
    print(f"{'setting':<36}{'mean rel.err':>14}{'objective vs first':>20}{'layers worse':>14}{'swaps':>7}"
          f"{'W-steps':>9}{'mean s':>9}{'max s':>8}")
    base = None
    for name in names:
        # Fresh problems per setting: the cached H⁻¹ must not favour the settings that run later.
        sols = []
        for layer in layers:
            p = problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=sparsity)
            p.hessian_inverse  # noqa: B018 - shared by every setting; not part of the solver's time
            sols.append(solvers.solve(p, "spap", **GRID[name]))
        objs = [s.objective for s in sols]
        base = base or objs
        secs = [s.stats["seconds"] for s in sols]
        print(f"{name:<36}{statistics.mean(s.relative_error for s in sols):>14.6f}"
              f"{statistics.mean(o / b - 1 for o, b in zip(objs, base)):>+20.2e}"
              f"{sum(o > b * (1 + 1e-12) for o, b in zip(objs, base)):>14}"
              f"{statistics.mean(s.stats.get('swaps', 0) for s in sols):>7.1f}"
              f"{statistics.mean(s.stats['iterations'] for s in sols):>9.1f}"
              f"{statistics.mean(secs):>9.3f}{max(secs):>8.3f}", flush=True)


def row_grid(blocks: list[int], linears: list[str], rho0s: list[float], data: dict | None = None) -> None:
    """SPAP's first penalty parameter on unstructured 50% and 2:4 problems, against ADMM.

    Each ``rho0`` runs SPAP's row schedule with its ρ range kept (5 values of ρ growing 1.3× each, 3
    rounds each: ``rho_max = rho0·1.3⁴``); the table sums the relative errors and the seconds over the
    linears of every block (``H⁻¹`` is computed before the clock starts).
    """
    data = data if data is not None else load()
    default = importlib.import_module("solvers.penalty")._ROW_SCHEDULE
    growth = default["rho_max"] / default["rho0"]
    settings = {f"spap rho0={r:g}": ("spap", {"rho0": r, "rho_max": r * growth}) for r in rho0s}
    settings["admm"] = ("admm", {})
    totals: dict = {}
    for block in blocks:
        for linear in linears:
            for name, structure, target in (("50%", solvers.Unstructured(), {"sparsity": 0.5}),
                                            ("2:4", solvers.NM(2, 4), {})):
                p = problem(data, block, linear, structure, **target)
                p.hessian_inverse  # noqa: B018 (cached: not part of any solver's time)
                for setting, (method, options) in settings.items():
                    sol = solvers.solve(p, method, **options)
                    total = totals.setdefault((name, setting), [0.0, 0.0])
                    total[0] += sol.relative_error
                    total[1] += sol.stats["seconds"]
    print(f"blocks {blocks}, {len(linears)} linears each, torch threads {torch.get_num_threads()}")
    print(f"{'structure':<10}{'setting':<22}{'summed rel.err':>15}{'seconds':>9}")
    for (name, setting), (error, seconds) in totals.items():
        print(f"{name:<10}{setting:<22}{error:>15.4f}{seconds:>9.1f}")


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
    parser.add_argument("--settings", nargs="+", choices=list(GRID), help="with --grid: only these settings")
    parser.add_argument("--row-grid", nargs="*", metavar="LINEAR",
                        help="instead: SPAP's rho0 against ADMM on unstructured 50%% and 2:4, for these linears "
                             "of --layers (default all seven)")
    parser.add_argument("--rho0", type=float, nargs="+", default=[0.3, 0.5, 1.0], help="with --row-grid")
    parser.add_argument("--plot", help="write error per layer to this image file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load()  # the captured Gram matrices, loaded once for whichever experiment runs
    layers = args.layers if args.layers is not None else list(range(n_layers(data)))
    if args.row_grid is not None:
        row_grid(layers, args.row_grid or LINEARS, args.rho0, data)
        return
    if args.grid:
        print(f"SPAP settings on SmolLM2-135M down_proj, {args.sparsity:.0%} channels, torch threads {torch.get_num_threads()}")
        grid(layers, args.sparsity, args.settings, data)
        return
    print(f"SmolLM2-135M down_proj (576x1536), {args.sparsity:.0%} channels, damp {args.damp:g}, "
          f"torch threads {torch.get_num_threads()}")
    first = warm_up(data, layers[0], args.sparsity, args.damp)
    print(f"warm-up: one untimed SPAP solve of layer {layers[0]} first ({first:.3f} s, compilation cache and thread pools)")
    print(_header())
    rows = run(layers, args.sparsity, {}, args.damp, data)
    summary(rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
