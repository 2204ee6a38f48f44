"""Every registered pruning method on the same layer problems: relative error and seconds.

Suites (``--suite``, several allowed):

- ``synthetic``: random and strongly correlated Gram matrices, several shapes, channels / unstructured /
  2:4, for each sparsity in ``--sparsities``.
- ``exact``: problems small enough to enumerate; the gap of each method to the global optimum.
- ``columns``: real SmolLM2-135M layers, every ``down_proj`` (channels) and ``o_proj`` (heads of 64) of
  ``--layers`` at ``--column-sparsity`` (default 30%); per layer, whether SPAP has the lowest error.
- ``sweep``: real ``down_proj`` of ``--sweep-layers`` at every sparsity in ``--sparsities`` (the plot's
  error-vs-sparsity curves).
- ``rows``: every linear of ``--row-blocks`` at 50% unstructured and 2:4.
- ``speed``: seconds of obs and sparsegpt (and the rest of ``--methods``) on one down_proj, best of 3.

Errors are ``½‖(Ŵ−W)X‖²/½‖WX‖²`` with the undamped Gram matrix (``Solution.relative_error``); the exact
gap uses the damped objective that every solver minimises.  A method name may carry ``+refit`` (the
score methods' exact refit).  ``flap[bias]`` is FLAP's error once its compensated bias is used.
Timings are printed, never asserted; the CPU may be shared, so the header prints the load average.

    python benchmarks/compare_solvers.py --quick                            # a minute: small versions of every suite
    python benchmarks/compare_solvers.py --suite columns --plot docs/solvers_columns.png
    python benchmarks/compare_solvers.py --suite rows --row-blocks 0 15 29
    python benchmarks/compare_solvers.py --suite speed --threads 2
    python benchmarks/compare_solvers.py --suite columns --damp 0.001 --json columns-0.001.json   # lighter damping
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import solvers
from solvers.synthetic import make_problem

COLUMN_METHODS = ["spap", "obs", "admm", "wanda_sp", "wanda_sp+refit", "flap", "flap+refit", "magnitude", "magnitude+refit"]
ROW_METHODS = ["spap", "sparsegpt", "admm", "wanda", "magnitude"]
SPARSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def run_method(problem: solvers.LayerProblem, spec: str) -> dict[str, dict]:
    """Solve with ``spec`` (``name`` or ``name+refit``); ``{label: {"error", "objective", "seconds"}}``."""
    name, _, extra = spec.partition("+")
    options = {"refit": True} if extra == "refit" else {}
    sol = solvers.solve(problem, name, **options)
    seconds = sol.stats["seconds"]
    out = {spec: {"error": sol.relative_error, "objective": sol.objective, "seconds": seconds}}
    if "error_with_bias" in sol.stats:
        out[f"{spec}[bias]"] = {"error": sol.stats["error_with_bias"] / problem.dense_energy,
                                "objective": float("nan"), "seconds": seconds}
    return out


def supported(spec: str, structure) -> bool:
    return solvers.get_solver(spec.partition("+")[0]).supports(structure)


def solve_all(make, methods: list[str], key: dict) -> list[dict]:
    """Rows ``{**key, "method", "error", "objective", "seconds"}``; ``make()`` gives a fresh problem per method."""
    rows = []
    structure = make().structure
    for spec in methods:
        if not supported(spec, structure):
            continue
        for label, r in run_method(make(), spec).items():
            rows.append({**key, "method": label, **r})
    return rows


# --- suites --------------------------------------------------------------------------------------------


def suite_synthetic(args) -> list[dict]:
    shapes = [(64, 128)] if args.quick else [(64, 128), (128, 256)]
    rows = []
    for kind in ("random", "correlated"):
        for d_out, d_in in shapes:
            for sname in ("channels", "unstructured", "2:4"):
                sparsities = [None] if sname == "2:4" else args.sparsities
                for sp in sparsities:
                    structure = solvers.parse_structure(sname, d_in)
                    target = {} if sp is None else {"sparsity": sp}
                    methods = args.methods or (COLUMN_METHODS if sname == "channels" else ROW_METHODS)

                    def make():
                        return make_problem(d_out, d_in, kind=kind, structure=structure, seed=0, **target)

                    key = {"suite": "synthetic", "kind": kind, "shape": f"{d_out}x{d_in}", "structure": sname,
                           "sparsity": 0.5 if sp is None else sp}
                    rows += solve_all(make, methods, key)
    return rows


def suite_exact(args) -> list[dict]:
    seeds = 3 if args.quick else 10
    cases = [("channels", 12, 16), ("heads", 12, 16), ("unstructured", 3, 8), ("2:4", 4, 8)]
    rows = []
    for kind in ("random", "correlated"):
        for sname, d_out, d_in in cases:
            for sp in ([None] if sname == "2:4" else [0.25, 0.5, 0.75]):
                structure = solvers.parse_structure(sname, d_in, head_dim=2)
                target = {} if sp is None else {"sparsity": sp}
                methods = args.methods or (COLUMN_METHODS if sname in ("channels", "heads") else ROW_METHODS)
                for seed in range(seeds):
                    def make():
                        return make_problem(d_out, d_in, kind=kind, structure=structure, seed=seed, **target)

                    optimum = solvers.solve(make(), "exact").objective
                    key = {"suite": "exact", "kind": kind, "structure": sname, "sparsity": 0.5 if sp is None else sp,
                           "seed": seed}
                    for r in solve_all(make, methods, key):
                        if r["method"].endswith("[bias]"):
                            continue
                        r["gap"] = (r["objective"] - optimum) / max(optimum, 1e-300)
                        rows.append(r)
    return rows


def _real(args):
    import real_layers

    data = real_layers.load()
    layers = args.layers if args.layers is not None else list(range(real_layers.n_layers(data)))
    return real_layers, data, layers


def suite_columns(args) -> list[dict]:
    real_layers, data, layers = _real(args)
    if args.quick:
        layers = layers[:3]
    rows = []
    structures = {"mlp.down_proj": solvers.channels, "self_attn.o_proj": lambda d: solvers.heads(d, 64)}
    for layer in layers:
        for linear, structure in structures.items():
            methods = args.methods or (COLUMN_METHODS + (["exact"] if linear == "self_attn.o_proj" else []))

            def make():
                return real_layers.problem(data, layer, linear, structure, sparsity=args.column_sparsity, damp=args.damp)

            key = {"suite": "columns", "layer": layer, "linear": linear, "sparsity": args.column_sparsity, "damp": args.damp}
            rows += solve_all(make, methods, key)
            print(f"  layer {layer:2d} {linear}: " + ", ".join(
                f"{r['method']} {r['error']:.4f}" for r in rows if r.get("layer") == layer and r["linear"] == linear),
                flush=True)
    return rows


def suite_sweep(args) -> list[dict]:
    real_layers, data, _ = _real(args)
    layers = args.sweep_layers[:1] if args.quick else args.sweep_layers
    rows = []
    for layer in layers:
        for sp in args.sparsities:
            def make():
                return real_layers.problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=sp, damp=args.damp)

            rows += solve_all(make, args.methods or COLUMN_METHODS,
                              {"suite": "sweep", "layer": layer, "linear": "mlp.down_proj", "sparsity": sp})
        print(f"  sweep layer {layer} done", flush=True)
    return rows


def suite_rows(args) -> list[dict]:
    real_layers, data, _ = _real(args)
    blocks = args.row_blocks[:1] if args.quick else args.row_blocks
    linears = ["self_attn.o_proj", "mlp.down_proj"] if args.quick else real_layers.LINEARS
    rows = []
    for layer in blocks:
        for linear in linears:
            for sname, target in (("unstructured", {"sparsity": 0.5}), ("2:4", {})):
                structure = solvers.parse_structure(sname, 1)  # neither depends on d_in

                def make():
                    return real_layers.problem(data, layer, linear, structure, damp=args.damp, **target)

                key = {"suite": "rows", "layer": layer, "linear": linear, "structure": sname, "sparsity": 0.5}
                new = solve_all(make, args.methods or ROW_METHODS, key)
                rows += new
                print(f"  layer {layer:2d} {linear} {sname}: " + ", ".join(f"{r['method']} {r['error']:.4f}" for r in new),
                      flush=True)
    return rows


def suite_speed(args) -> list[dict]:
    real_layers, data, layers = _real(args)
    layer = layers[0] if args.layers else 3
    methods = args.methods or ["obs", "sparsegpt", "spap", "admm", "wanda_sp", "flap"]
    rows = []
    for spec in methods:
        sname = "unstructured" if supported(spec, solvers.Unstructured()) and not supported(spec, solvers.channels(2)) else "channels"
        structure = solvers.channels if sname == "channels" else solvers.Unstructured()
        times = []
        for _ in range(3):
            p = real_layers.problem(data, layer, "mlp.down_proj", structure,
                                    **({"n_prune": 461} if sname == "channels" else {"sparsity": 0.5}))
            times.append(run_method(p, spec)[spec]["seconds"])
        rows.append({"suite": "speed", "layer": layer, "linear": "mlp.down_proj", "structure": sname, "method": spec,
                     "seconds": min(times), "median_seconds": statistics.median(times)})
        print(f"  {spec:10s} {sname:12s} best {min(times):.3f} s  median {statistics.median(times):.3f} s", flush=True)
    return rows


SUITES = {"synthetic": suite_synthetic, "exact": suite_exact, "columns": suite_columns, "sweep": suite_sweep,
          "rows": suite_rows, "speed": suite_speed}


# --- reports ------------------------------------------------------------------------------------------


def table(rows: list[dict], group: list[str], value: str = "error", fmt: str = "{:.4f}") -> str:
    """Markdown table: one line per ``group`` key, one column per method, the mean of ``value``."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[tuple(r[g] for g in group)][r["method"]].append(r[value])
    lines = ["| " + " | ".join(group + methods) + " |", "|" + "---|" * (len(group) + len(methods))]
    for key, by_method in cells.items():
        vals = [fmt.format(statistics.fmean(by_method[m])) if by_method.get(m) else "" for m in methods]
        lines.append("| " + " | ".join([str(k) for k in key] + vals) + " |")
    return "\n".join(lines)


def report(rows: list[dict]) -> None:
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    for suite in suites:
        part = [r for r in rows if r["suite"] == suite]
        print(f"\n## {suite}\n")
        if suite == "synthetic":
            print(table(part, ["kind", "shape", "structure", "sparsity"]))
            print("\nseconds (mean)\n")
            print(table(part, ["kind", "structure"], "seconds", "{:.3f}"))
        elif suite == "exact":
            print("mean relative gap to the optimum (damped objective)\n")
            print(table(part, ["kind", "structure", "sparsity"], "gap", "{:.4f}"))
            print("\nworst gap\n")
            worst = [dict(r, method=r["method"]) for r in part]
            methods = list(dict.fromkeys(r["method"] for r in worst))
            print(" | ".join(f"{m} {max(r['gap'] for r in worst if r['method'] == m):.4f}" for m in methods))
        elif suite in ("columns", "sweep"):
            print(table(part, ["linear", "layer", "sparsity"]))
            print("\nmean over layers\n")
            print(table(part, ["linear", "sparsity"]))
            print("\nseconds (mean)\n")
            print(table(part, ["linear"], "seconds", "{:.3f}"))
            if suite == "columns":
                print()
                spap_lowest(part)
        elif suite == "rows":
            print(table(part, ["linear", "layer", "structure"]))
            print("\nmean over layers and linears\n")
            print(table(part, ["structure"]))
            print("\nseconds (mean)\n")
            print(table(part, ["structure", "linear"], "seconds", "{:.3f}"))
        elif suite == "speed":
            for r in part:
                print(f"{r['method']:10s} {r['structure']:12s} down_proj layer {r['layer']}: best of 3 {r['seconds']:.3f} s, "
                      f"median {r['median_seconds']:.3f} s")


def spap_lowest(rows: list[dict]) -> None:
    """Per linear: on how many layers SPAP is the lowest of the compared methods (exact excluded).

    Three counts: by relative error against the bias-free methods; by the same error counting FLAP with
    its compensated bias (``flap[bias]``) as a rival; by the damped objective that the solvers minimise
    (the undamped error can rank two near-equal masks the other way round).
    """
    by = defaultdict(dict)
    for r in rows:
        by[(r["linear"], r["layer"])][r["method"]] = r
    for linear in dict.fromkeys(k[0] for k in by):
        keys = [k for k in by if k[0] == linear and "spap" in by[k]]
        for label, value, with_bias in (("error", "error", False), ("error, flap[bias] included", "error", True),
                                        ("damped objective", "objective", False)):
            wins, losses = 0, []
            for k in keys:
                rivals = {m: r[value] for m, r in by[k].items()
                          if m not in ("spap", "exact") and (with_bias or not m.endswith("[bias]"))}
                best = min(rivals, key=rivals.get)
                mine = by[k]["spap"][value]
                if mine <= rivals[best] * (1 + 1e-9):
                    wins += 1
                else:
                    losses.append(f"layer {k[1]}: spap {mine:.6g} > {best} {rivals[best]:.6g}")
            print(f"- {linear}, by {label}: SPAP lowest (ties count) on {wins}/{len(keys)} layers"
                  + ("; " + "; ".join(losses) if losses else ""))
        exact = [k for k in keys if "exact" in by[k]]
        if exact:
            at_opt = sum(1 for k in exact if by[k]["spap"]["objective"] <= by[k]["exact"]["objective"] * (1 + 1e-9))
            print(f"- {linear}: SPAP at the exact optimum (damped objective) on {at_opt}/{len(exact)} layers")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r["suite"] in ("sweep", "synthetic") and r.get("structure", "channels") == "channels"
              and r.get("kind", "real") in ("correlated", "real")]
    source = "sweep" if any(r["suite"] == "sweep" for r in curves) else "synthetic"
    curves = [r for r in curves if r["suite"] == source]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in dict.fromkeys(r["method"] for r in curves):
        pts = defaultdict(list)
        for r in curves:
            if r["method"] == m:
                pts[r["sparsity"]].append(r["error"])
        xs = sorted(pts)
        ax1.plot(xs, [statistics.fmean(pts[x]) for x in xs], marker="o", label=m)
    ax1.set_xlabel("column sparsity")
    ax1.set_ylabel("relative error (mean)")
    ax1.set_yscale("log")
    ax1.set_title("real down_proj" if source == "sweep" else "synthetic correlated, channels")
    ax1.legend(fontsize=7)
    timed = [r for r in rows if r["suite"] in ("columns", "rows", "sweep", "synthetic") and "seconds" in r and "error" in r]
    for m in dict.fromkeys(r["method"] for r in timed):
        sel = [r for r in timed if r["method"] == m]
        ax2.scatter([r["seconds"] for r in sel], [r["error"] for r in sel], s=8, label=m, alpha=0.6)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("relative error")
    ax2.set_title("error vs time (every problem)")
    ax2.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=list(SUITES), default=None,
                        help="default: every suite (with --quick) or synthetic, exact, columns, rows, speed")
    parser.add_argument("--methods", nargs="+", default=None, help="method specs, e.g. spap obs magnitude+refit")
    parser.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    parser.add_argument("--layers", nargs="+", type=int, default=None, help="real layers (default: all)")
    parser.add_argument("--sweep-layers", nargs="+", type=int, default=[3, 15, 27])
    parser.add_argument("--row-blocks", nargs="+", type=int, default=[3, 15])
    parser.add_argument("--column-sparsity", type=float, default=0.3)
    parser.add_argument("--damp", type=float, default=0.01,
                        help="relative damping of every real layer's Gram matrix (default 0.01, as in SparseGPT)")
    parser.add_argument("--quick", action="store_true", help="small versions of the suites")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--plot", default=None, help="write error-vs-sparsity and error-vs-time plots here")
    parser.add_argument("--json", default=None, help="write every result row here")
    parser.add_argument("--from-json", nargs="+", default=None, help="report (and plot) saved rows; solve nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [r for path in args.from_json for r in json.loads(Path(path).read_text())]
        report(rows)
        if args.plot:
            plot(rows, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sparsities = [s for s in args.sparsities if s in (0.3, 0.5, 0.7)] or args.sparsities[:2]
    suites = args.suite or (list(SUITES) if args.quick else ["synthetic", "exact", "columns", "rows", "speed"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# benchmarks/compare_solvers.py {' '.join(sys.argv[1:])}\n"
          f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load:.2f}, real layers damped by {args.damp:g}·mean(diag H)")
    rows = []
    for suite in suites:
        start = time.perf_counter()
        print(f"\n# suite {suite}", flush=True)
        rows += SUITES[suite](args)
        print(f"# suite {suite}: {time.perf_counter() - start:.0f} s", flush=True)
    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
