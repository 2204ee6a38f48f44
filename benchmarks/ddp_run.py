"""DDP (``spap.ddp_prune``) on SmolLM2-135M at a small CPU budget, evaluated on the quick protocol.

For each sparsity of MLP channels the model is loaded afresh in its own Python process (so its peak RSS
is its own), its gates are trained with ``spap.ddp_prune`` and the pruned model is evaluated as in
``benchmarks/end_to_end.py``'s quick protocol: the first 40 windows of 1024 tokens of WikiText-2 test
and of C4 documents ``[500:]``.

The budget (defaults; docs/ddp.md explains it): calibration 32 windows of 128 tokens
from C4 docs[:500] (seed 0), the dense model's log-probabilities cached (0.8 GB), 200 steps of 4
windows (each window seen 25 times), global allocation (blocks may keep different widths; the pruned
model is evaluated in memory).  Each run takes roughly 15-30 minutes on 2 CPU cores, evaluation included.

Results are cached in a JSON file (``--cache``) under ``quick|mlp|LABEL|SPARSITY``, where LABEL is ``ddp``
for the default budget and names every other setting (``ddp@steps=50``): an interrupted sweep goes on
where it stopped, and ``--report`` prints the table from the cache alone.  The dense row is computed
once, under ``quick|dense``, as in ``end_to_end.py``.

    python benchmarks/ddp_run.py --sparsities 0.2 0.3 0.5 --cache ddp.json
    python benchmarks/ddp_run.py --sparsities 0.3 --steps 20 --cache /tmp/ddp-try.json   # a short try
    python benchmarks/ddp_run.py --sparsities 0.3 --n 512 --teacher online --cache ddp.json
                        # 512 x 128 = 65,536 distinct tokens, the layer-wise methods' count; the cached
                        # teacher would need 12 GiB, so each step recomputes it with the gates off
    python benchmarks/ddp_run.py --report --cache ddp.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import harness

DEFAULTS = {"steps": 200, "batch_size": 4, "n": 32, "seqlen": 128, "allocation": "global", "seed": 0, "teacher": "cache"}
PROTOCOL = "quick"


def label(settings: dict) -> str:
    """``ddp``, with every setting that differs from :data:`DEFAULTS` appended."""
    extra = [f"{k}={settings[k]}" for k in DEFAULTS if settings[k] != DEFAULTS[k]]
    return "ddp" + (f"@{','.join(extra)}" if extra else "")


def run_one(sparsity: float, settings: dict, model_source: str, threads: int) -> dict:
    """Prune with DDP and evaluate; one row of the cache."""
    import torch

    import spap
    from spap.data import calibration_set

    torch.set_num_threads(threads)
    model, tok = spap.load_model(model_source)
    calib = calibration_set("c4", tok, n=settings["n"], seqlen=settings["seqlen"], seed=0)
    model, report = spap.ddp_prune(model, calib, sparsity, structure="mlp", steps=settings["steps"],
                                   batch_size=settings["batch_size"], allocation=settings["allocation"],
                                   seed=settings["seed"], teacher=settings["teacher"], progress=False)
    scores = harness.evaluate(model, tok, PROTOCOL)
    widths = [w["mlp"] for w in report.widths]
    last = report.history[-1]
    return {
        "structure": "mlp", "method": label(settings), "sparsity": sparsity, **settings,
        **scores,
        "prune_s": report.seconds, "seconds_per_step": report.seconds / settings["steps"],
        "solver_s": report.seconds,  # end_to_end.py's column: here the whole gate training
        "sum_rel_err": float("nan"),  # no layer problems are solved
        "peak_rss_gib": report.peak_memory["rss"] / 2**30,
        "params": report.params_after, "params_dense": report.params_before,
        "widths": widths, "width_min": min(widths), "width_max": max(widths),
        "final_loss": last["loss"], "final_kept_soft": last["kept_mlp"], "final_lambda": last["lambda_mlp"],
    }


def table(cache: dict) -> str:
    dense = cache.get(f"{PROTOCOL}|dense")
    rows = sorted((r for k, r in cache.items() if k.startswith(f"{PROTOCOL}|mlp|ddp")),
                  key=lambda r: (r["sparsity"], r["method"]))
    lines = [f"protocol {PROTOCOL}: evaluation {harness.evaluation_text(PROTOCOL)}; DDP calibration windows from "
             "C4 docs[:500], seed 0 (sizes and steps in the method label, defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()) + ")", "",
             "| sparsity | method | WikiText-2 ppl | C4 ppl | prune s | s/step | peak RSS GiB | params | widths min-max |",
             "|---|---|---|---|---|---|---|---|---|"]
    if dense:
        lines.append(f"| 0 | dense | {dense['wikitext_ppl']:.2f} | {dense['c4_ppl']:.2f} | | | | {dense['params']:,} | |")
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['method']} | {r['wikitext_ppl']:.2f} | {r['c4_ppl']:.2f} | "
                     f"{r['prune_s']:.0f} | {r['seconds_per_step']:.1f} | {r['peak_rss_gib']:.2f} | {r['params']:,} | "
                     f"{r['width_min']}-{r['width_max']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="windows per step")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=DEFAULTS["seqlen"], help="tokens per calibration window")
    parser.add_argument("--allocation", default=DEFAULTS["allocation"], choices=["global", "uniform"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="order of the windows")
    parser.add_argument("--teacher", default=DEFAULTS["teacher"], choices=["cache", "online"],
                        help="dense log-probabilities cached once (default) or recomputed every step (no memory "
                             "limit on the number of windows; one more forward pass per step)")
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a Hugging Face directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="ddp_run.json", help="JSON file of finished runs (resumable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it is abandoned")
    parser.add_argument("--report", action="store_true", help="print the table from the cache, run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        payload = json.loads(args.worker)
        if payload["sparsity"] is None:
            row = harness.dense_row(PROTOCOL, payload["model"], None, payload["threads"])
        else:
            row = run_one(payload["sparsity"], payload["settings"], payload["model"], payload["threads"])
        print(json.dumps(row))
        return
    harness.check_args(parser, args, at_least={"steps": 1, "batch_size": 1, "n": 1, "seqlen": 1, "threads": 1, "seed": 0})
    cache_path = Path(args.cache)
    cache = harness.load_cache(cache_path)
    if not args.report:
        settings = {k: getattr(args, k) for k in DEFAULTS}
        todo = [] if f"{PROTOCOL}|dense" in cache else [(f"{PROTOCOL}|dense", None)]
        todo += [(f"{PROTOCOL}|mlp|{label(settings)}|{s:g}", s) for s in args.sparsities]
        todo = [(k, s) for k, s in todo if k not in cache]
        print(f"{len(todo)} runs to do, {len(cache)} cached in {cache_path}", flush=True)
        for i, (key, sparsity) in enumerate(todo, 1):
            payload = {"sparsity": sparsity, "settings": settings, "model": args.model, "threads": args.threads}
            done = harness.run_and_cache(cache_path, key, payload, script=__file__, timeout=args.timeout,
                                         threads=args.threads, label=f"[{i}/{len(todo)}] {key}")
            if done is None:
                continue
            cache, row = done
            print(f"[{i}/{len(todo)}] {key}: wiki {row['wikitext_ppl']:.3f}, c4 {row['c4_ppl']:.3f}, "
                  f"{row['wall_s']:.0f} s", flush=True)
    print(table(cache))


if __name__ == "__main__":
    main()
