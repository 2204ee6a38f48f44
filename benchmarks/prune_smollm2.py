"""Prune SmolLM2-135M end to end and print what it cost and what it changed.

Defaults are the acceptance setting of the pipeline: 30% of MLP channels with SPAP, calibration 64
windows of 1024 tokens from C4 docs[:500] (seed 0), evaluation on the first 40 windows of 1024 tokens
of WikiText-2 test.  Each method runs in a fresh process state (the model is reloaded).

    python benchmarks/prune_smollm2.py
    python benchmarks/prune_smollm2.py --methods spap magnitude wanda --n 32 --seqlen 512 --plot ppl.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spap  # noqa: E402
from spap.data import calibration_set, wikitext_rows  # noqa: E402
from spap.eval import perplexity  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["spap"])
    parser.add_argument("--structure", default="mlp")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--plot", help="write a bar plot of perplexity per method")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    model, tok = spap.load_model("smollm2")
    t = time.perf_counter()
    dense = perplexity(model, tok, wikitext_rows(), seqlen=1024, max_windows=args.eval_windows)
    rows.append({"method": "dense", "ppl": dense, "eval_s": time.perf_counter() - t})
    print(f"dense: WikiText-2 ppl {dense:.3f} ({args.eval_windows} windows of 1024)", flush=True)
    for method in args.methods:
        model, tok = spap.load_model("smollm2")
        calib = calibration_set("c4", tok, n=args.n, seqlen=args.seqlen, seed=0)
        options = {"refit": True} if method in ("magnitude", "wanda") else {}
        model, report = spap.prune_layerwise(model, calib, args.sparsity, method=method, structure=args.structure,
                                             method_options=options, progress=False)
        ppl = perplexity(model, tok, wikitext_rows(), seqlen=1024, max_windows=args.eval_windows)
        row = {"method": method + (" (+refit)" if options else ""), "ppl": ppl, "prune_s": report.seconds,
               "solver_s": report.solver_seconds, "peak_rss_gib": report.peak_memory["rss"] / 2**30,
               "params": report.params_after, "mean_rel_err": sum(r.relative_error for r in report.layers) / len(report.layers)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"SmolLM2-135M, {args.sparsity:.0%} {args.structure}, calibration {args.n}x{args.seqlen} C4, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'method':<20}{'wiki ppl':>10}{'prune s':>9}{'solver s':>10}{'peak RSS GiB':>14}{'params':>13}{'mean rel.err':>14}")
    for r in rows:
        if r["method"] == "dense":
            print(f"{'dense':<20}{r['ppl']:>10.3f}")
            continue
        print(f"{r['method']:<20}{r['ppl']:>10.3f}{r['prune_s']:>9.1f}{r['solver_s']:>10.1f}{r['peak_rss_gib']:>14.2f}"
              f"{r['params']:>13,}{r['mean_rel_err']:>14.5f}")
    print("(peak RSS is the process maximum: it includes the earlier runs and evaluations of this process)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["method"] for r in rows], [r["ppl"] for r in rows])
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title(f"SmolLM2-135M, {args.sparsity:.0%} {args.structure}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
