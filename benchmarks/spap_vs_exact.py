"""SPAP against the exact optimum on problems small enough to enumerate (≤ 16 groups).

For each kind of Gram matrix (random, strongly correlated), each structure (16 channels; 8 heads of
2 columns) and each sparsity, ``--seeds`` random problems are solved by enumeration (the global
optimum), by SPAP, and by magnitude and Wanda selection followed by the exact refit.  The table gives,
per setting, the share of problems where SPAP is within 1% of the optimum, the worst and mean gap, and
how often SPAP is worse than magnitude + refit (the acceptance asks for 0).

    python benchmarks/spap_vs_exact.py                     # 2 kinds x 2 structures x 3 sparsities x 50 seeds
    python benchmarks/spap_vs_exact.py --seeds 10 --plot gaps.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import solvers
from solvers.synthetic import make_problem

STRUCTURES = {
    "channels16": lambda: solvers.channels(16),
    "heads8x2": lambda: solvers.heads(16, 2),
}


@dataclass
class Trial:
    kind: str
    structure: str
    sparsity: float
    seed: int
    optimum: float
    spap: float
    magnitude: float
    wanda: float

    @property
    def gap(self) -> float:
        """SPAP's error above the optimum, relative to the optimum (0 = optimal)."""
        return (self.spap - self.optimum) / max(self.optimum, 1e-300)


def run_trials(
    kinds=("random", "correlated"),
    structures=tuple(STRUCTURES),
    sparsities=(0.25, 0.5, 0.75),
    seeds: int = 50,
    d_out: int = 12,
    spap_options: dict | None = None,
) -> list[Trial]:
    """Solve every (kind, structure, sparsity, seed) problem by enumeration, SPAP and the two scores."""
    trials = []
    for kind in kinds:
        for name in structures:
            for sparsity in sparsities:
                for seed in range(seeds):
                    p = make_problem(d_out, 16, kind=kind, structure=STRUCTURES[name](), sparsity=sparsity, seed=seed)
                    # All errors in the damped objective that every solver minimises.
                    trials.append(
                        Trial(
                            kind, name, sparsity, seed,
                            optimum=solvers.solve(p, "exact").objective,
                            spap=solvers.solve(p, "spap", **(spap_options or {})).objective,
                            magnitude=solvers.solve(p, "magnitude", refit=True).objective,
                            wanda=solvers.solve(p, "wanda", refit=True).objective,
                        )
                    )
    return trials


def summarize(trials: list[Trial]) -> list[dict]:
    """One row per (kind, structure, sparsity), plus an "all" row."""
    keys = sorted({(t.kind, t.structure, t.sparsity) for t in trials})
    rows = []
    for key in keys + [None]:
        group = [t for t in trials if key is None or (t.kind, t.structure, t.sparsity) == key]
        gaps = [t.gap for t in group]
        rows.append(
            {
                "kind": "all" if key is None else key[0],
                "structure": "" if key is None else key[1],
                "sparsity": "" if key is None else f"{key[2]:.2f}",
                "n": len(group),
                "within_1pct": sum(g <= 0.01 for g in gaps) / len(group),
                "optimal": sum(g <= 1e-9 for g in gaps) / len(group),
                "mean_gap": sum(gaps) / len(group),
                "max_gap": max(gaps),
                "worse_than_magnitude": sum(t.spap > t.magnitude * (1 + 1e-9) for t in group),
                "magnitude_gap": sum((t.magnitude - t.optimum) / t.optimum for t in group) / len(group),
                "wanda_gap": sum((t.wanda - t.optimum) / t.optimum for t in group) / len(group),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'kind':<11}{'structure':<11}{'sparsity':>8}{'n':>5}{'≤1% gap':>9}{'optimal':>9}{'mean gap':>10}{'max gap':>9}{'>magn.':>7}{'magn. gap':>11}{'wanda gap':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['kind']:<11}{r['structure']:<11}{r['sparsity']:>8}{r['n']:>5}{r['within_1pct']:>9.1%}{r['optimal']:>9.1%}"
            f"{r['mean_gap']:>10.2%}{r['max_gap']:>9.2%}{r['worse_than_magnitude']:>7}{r['magnitude_gap']:>11.1%}{r['wanda_gap']:>11.1%}"
        )


def plot(trials: list[Trial], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("spap", "wanda", "magnitude"):
        gaps = sorted(max((getattr(t, method) - t.optimum) / t.optimum, 1e-12) for t in trials)
        ax.plot(gaps, [i / len(gaps) for i in range(1, len(gaps) + 1)], label=method)
    ax.set_xscale("log")
    ax.set_xlabel("error above the exact optimum (relative)")
    ax.set_ylabel("share of problems")
    ax.set_title("SPAP vs exact optimum, ≤ 16 groups")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50, help="random problems per setting (default 50)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--kinds", nargs="+", default=["random", "correlated"], choices=["random", "correlated"])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=list(STRUCTURES))
    parser.add_argument("--plot", help="write a CDF of the gaps to this image file")
    args = parser.parse_args(argv)
    if args.seeds <= 0:
        parser.error("--seeds must be positive")
    trials = run_trials(args.kinds, args.structures, args.sparsities, args.seeds)
    print_table(summarize(trials))
    if args.plot:
        plot(trials, args.plot)


if __name__ == "__main__":
    main()
