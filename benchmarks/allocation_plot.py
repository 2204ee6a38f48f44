"""Kept MLP channels per block for every allocation in an end-to-end cache: a table and a plot.

Reads the rows that ``benchmarks/end_to_end.py --set allocation=...`` cached (their ``allocation``
field: units pruned per block) and DDP's rows (``widths``), at the sparsities asked for, and prints one
line per run: the kept channels of every block, their range, the allocation's seconds and the
perplexities.  ``--plot FILE`` draws kept channels against block index, one panel per sparsity.

    python benchmarks/allocation_plot.py --cache docs/data/end_to_end_quick.json --sparsities 0.3 0.5 \
        --plot docs/allocation.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def runs(cache: dict, protocol: str, sparsity: float, width: int) -> list[tuple[str, list[int] | None, dict]]:
    """``(label, kept channels per block, row)`` for every MLP row at ``sparsity`` with per-block widths
    (None for the uniform SPAP row, shown for reference)."""
    out = []
    for key, row in cache.items():
        parts = key.split("|")
        if len(parts) != 4 or parts[0] != protocol or parts[1] != "mlp" or parts[3] != f"{sparsity:g}":
            continue
        if isinstance(row.get("allocation"), dict):
            out.append((parts[2], [width - p for p in row["allocation"]["mlp"]], row))
        elif isinstance(row.get("widths"), list):
            out.append((parts[2], list(row["widths"]), row))
        elif parts[2] == "spap":
            out.append(("spap (uniform)", None, row))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", nargs="+", required=True, help="end_to_end.py cache files (JSON)")
    parser.add_argument("--protocol", default="quick")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--width", type=int, default=1536, help="the dense MLP width (default SmolLM2's 1536)")
    parser.add_argument("--plot", help="write a PNG of kept channels per block")
    args = parser.parse_args()
    cache: dict = {}
    for path in args.cache:
        cache.update(json.loads(Path(path).read_text()))
    panels = []
    for s in args.sparsities:
        rows = runs(cache, args.protocol, s, args.width)
        uniform = args.width - int(s * args.width + 0.5)
        print(f"\n{s:.0%} MLP channels (uniform: {uniform} kept in every block)")
        print(f"{'method':<34}{'min':>6}{'max':>6}{'alloc s':>9}{'prune s':>9}{'val':>8}{'wiki':>8}{'c4':>8}")
        shown = []
        for label, kept, row in rows:
            kept = kept if kept is not None else [uniform] * row["layers"]
            val = row.get("val_ppl")
            print(f"{label:<34}{min(kept):>6}{max(kept):>6}{row.get('allocation_s', 0):>9.0f}{row['prune_s']:>9.0f}"
                  f"{val if val is not None else float('nan'):>8.2f}{row['wikitext_ppl']:>8.2f}{row['c4_ppl']:>8.2f}")
            print("    kept per block: " + " ".join(map(str, kept)))
            shown.append((label, kept))
        panels.append((s, shown))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (s, shown) in zip(axes[0], panels):
            for label, kept in shown:
                ax.plot(range(len(kept)), kept, marker=".", label=label)
            ax.set_title(f"{s:.0%} of MLP channels pruned (same total)")
            ax.set_xlabel("block")
            ax.set_ylabel("kept channels")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
