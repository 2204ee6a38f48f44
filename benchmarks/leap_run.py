"""LEAP (``spap.leap_prune``) on SmolLM2-135M at 50% and 60% unstructured sparsity, quick protocol.

The Wanda start uses the quick protocol's calibration (64 windows of 1024 tokens from C4 docs[:500],
seed 0: the same batches as ``end_to_end.py``'s ``wanda`` row, so ``--steps 0`` reproduces that row);
the training then takes ``--steps`` Adam steps on ``--batch-size`` random crops of ``--train-seqlen``
tokens of those windows.  Evaluation: the first 40 windows of 1024 tokens of WikiText-2 test and of C4
docs[500:] (``end_to_end.py``'s quick protocol).  Each run is its own process (its peak RSS is its
own); rows are cached in ``--cache`` under a key that names the budget, so a run is done once.

Default budget, for a 2-core CPU: 200 steps of one 128-token crop (25,600 training tokens) after the
Wanda start; a run takes roughly half an hour on 2 CPU cores, evaluation included (measured figures in
docs/leap.md).  The paper's budget is many orders of magnitude larger (see docs/leap.md).

    python benchmarks/leap_run.py --cache leap.json                       # 50% and 60%, 200 steps
    python benchmarks/leap_run.py --cache leap.json --steps 0             # the Wanda start alone
    python benchmarks/leap_run.py --cache leap.json --report              # the table from the cache
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import harness

BUDGET_KEYS = ("steps", "lr", "batch_size", "train_seqlen", "blocks", "scope", "kl_weight", "seed")


def label(args: dict) -> str:
    """The method's name in the cache key and the table: ``leap`` and its budget."""
    return "leap@" + ",".join(f"{k}={args[k]}" for k in BUDGET_KEYS)


def run_one(payload: dict) -> dict:
    import torch

    import spap
    from spap.data import calibration_set
    from spap.report import count_parameters

    torch.set_num_threads(payload["threads"])
    p = harness.PROTOCOLS[payload["protocol"]]
    model, tok = spap.load_model(payload["model"])
    calib = calibration_set("c4", tok, n=p["n"], seqlen=p["seqlen"], seed=0)
    budget = payload["budget"]
    model, report = spap.leap_prune(model, calib, payload["sparsity"], steps=budget["steps"], lr=budget["lr"],
                                    batch_size=budget["batch_size"], train_seqlen=budget["train_seqlen"],
                                    blocks=budget["blocks"], scope=budget["scope"], kl_weight=budget["kl_weight"],
                                    seed=budget["seed"], progress=payload["progress"])
    scores = harness.evaluate(model, tok, payload["protocol"])
    history = report.history
    return {
        "structure": "unstructured", "method": label(budget), "sparsity": payload["sparsity"], **budget,
        **scores,
        "prune_s": report.seconds, "wanda_s": report.wanda_seconds,
        "train_s_per_step": (report.seconds - report.wanda_seconds) / max(1, len(history)),
        "peak_rss_gib": report.peak_memory["rss"] / 2**30, "peak_cuda_gib": report.peak_memory.get("cuda", 0) / 2**30,
        "achieved_sparsity": report.sparsity, "changed_vs_wanda": report.changed,
        "first_losses": [h["loss"] for h in history[:20]], "last_losses": [h["loss"] for h in history[-20:]],
        "density_range": [min((h["density"] for h in history), default=None),
                          max((h["density"] for h in history), default=None)],
        "params": count_parameters(model),
    }


def table(cache: dict, protocol: str) -> str:
    rows = sorted((r for k, r in cache.items() if k.startswith(f"{protocol}|unstructured|leap@")),
                  key=lambda r: (r["sparsity"], r["steps"], r["method"]))
    if not rows:
        return "no LEAP rows in the cache"
    lines = [harness.protocol_text(protocol), "",
             "| sparsity | steps | lr | batch x seqlen | blocks | scope | WikiText-2 ppl | C4 ppl | changed vs Wanda "
             "| Wanda s | s/step | total s | threads | peak RSS GiB |",
             "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['steps']} | {r['lr']:g} | {r['batch_size']} x {r['train_seqlen']} | "
                     f"{r['blocks']} | {r['scope']} | {r['wikitext_ppl']:.2f} | {r['c4_ppl']:.2f} | "
                     f"{r['changed_vs_wanda']:.2%} | {r['wanda_s']:.0f} | {r['train_s_per_step']:.1f} | "
                     f"{r['prune_s']:.0f} | {r.get('threads', '?')} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6])
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per group of blocks (default 200)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=1, help="crops per step (default 1)")
    parser.add_argument("--train-seqlen", type=int, default=128, help="tokens per training crop (default 128)")
    parser.add_argument("--blocks", type=int, default=None, help="train groups of this many blocks in turn "
                        "(default: all blocks at once)")
    parser.add_argument("--scope", default="global", choices=["global", "layer", "row"])
    parser.add_argument("--kl-weight", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", default="quick", choices=list(harness.PROTOCOLS))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="leap_run.json", help="JSON file of finished runs (resumable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it is abandoned")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar (stderr)")
    parser.add_argument("--report", action="store_true", help="print the table from the cache, run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    harness.check_args(parser, args, at_least={"steps": 0, "batch_size": 1, "train_seqlen": 2, "threads": 1})
    if not args.lr > 0:
        parser.error(f"--lr must be > 0; got {args.lr}")
    cache_path = Path(args.cache)
    cache = harness.load_cache(cache_path)
    if not args.report:
        budget = {k: getattr(args, k) for k in BUDGET_KEYS}
        print(harness.protocol_text(args.protocol), flush=True)
        for sparsity in args.sparsities:
            key = f"{args.protocol}|unstructured|{label(budget)}|{sparsity:g}"
            if key in cache:
                print(f"{key}: cached", flush=True)
                continue
            payload = {"protocol": args.protocol, "model": args.model, "threads": args.threads, "sparsity": sparsity,
                       "budget": budget, "progress": args.progress}
            done = harness.run_and_cache(cache_path, key, payload, script=__file__, timeout=args.timeout,
                                         threads=args.threads, stream_stderr=True)
            if done is None:
                continue
            cache, row = done
            print(f"{key}: wiki {row['wikitext_ppl']:.2f}, c4 {row['c4_ppl']:.2f}, {row['wall_s']:.0f} s, "
                  f"peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    print()
    print(table(cache, args.protocol))


if __name__ == "__main__":
    main()
