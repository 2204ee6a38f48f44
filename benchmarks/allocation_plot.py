"""What every allocation in an end-to-end cache keeps per block: a table and a plot.

Reads the rows that ``benchmarks/end_to_end.py --set allocation=...`` cached (their ``allocation``
field: units pruned, and the fraction, per block) and DDP's rows (``widths``), at the sparsities asked
for, and prints one line per run: what every block keeps (MLP channels; with ``--structure
unstructured`` the percentage of each linear's weights), their range, the allocation's seconds and the
perplexities.  ``--plot FILE`` draws it against block index, one panel per sparsity.

    python benchmarks/allocation_plot.py --cache docs/data/end_to_end_quick.json --sparsities 0.3 0.5 \
        --plot docs/allocation.png
    python benchmarks/allocation_plot.py --cache docs/data/end_to_end_quick.json --structure unstructured \
        --sparsities 0.5 0.6 --plot docs/allocation_unstructured.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def runs(cache: dict, protocol: str, sparsity: float, width: int, structure: str = "mlp"
         ) -> list[tuple[str, list[float] | None, dict]]:
    """``(label, kept per block, row)`` for every row of ``structure`` at ``sparsity`` with per-block
    targets (None for the uniform SPAP row, shown for reference): kept channels for ``"mlp"``, the kept
    percentage of every linear's weights for ``"unstructured"``."""
    out = []
    for key, row in cache.items():
        parts = key.split("|")
        if len(parts) != 4 or parts[0] != protocol or parts[1] != structure or parts[3] != f"{sparsity:g}":
            continue
        if isinstance(row.get("allocation"), dict):
            kept = ([width - p for p in row["allocation"]["mlp"]] if structure == "mlp"
                    else [round(100 * (1 - f), 2) for f in row["allocation"]["sparsity"]])
            out.append((parts[2], kept, row))
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
    parser.add_argument("--structure", choices=["mlp", "unstructured"], default="mlp")
    parser.add_argument("--width", type=int, default=1536, help="the dense MLP width (default SmolLM2's 1536)")
    parser.add_argument("--plot", help="write a PNG of kept channels per block")
    args = parser.parse_args()
    cache: dict = {}
    for path in args.cache:
        cache.update(json.loads(Path(path).read_text()))
    panels = []
    for s in args.sparsities:
        rows = runs(cache, args.protocol, s, args.width, args.structure)
        if args.structure == "mlp":
            uniform, what = args.width - int(s * args.width + 0.5), "MLP channels"
        else:
            uniform, what = round(100 * (1 - s), 2), "unstructured (% of weights)"
        print(f"\n{s:.0%} {what} (uniform: {uniform} kept in every block)")
        print(f"{'method':<34}{'min':>6}{'max':>6}{'alloc s':>9}{'prune s':>9}{'val':>8}{'wiki':>8}{'c4':>8}")
        shown = []
        blocks = next((len(k) for _, k, _ in rows if k is not None), None)  # "layers" counts problems, not blocks
        for label, kept, row in rows:
            kept = kept if kept is not None else [uniform] * (blocks or row["layers"])
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
            ax.set_title(f"{s:.0%} of {'MLP channels' if args.structure == 'mlp' else 'weights'} pruned (same total)")
            ax.set_xlabel("block")
            ax.set_ylabel("kept channels" if args.structure == "mlp" else "kept weights per linear, %")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
