"""Global pruning methods on the real SmolLM2-135M: one run, every sparsity, quick-protocol evaluation.

``--method gisp`` runs :func:`spap.gisp` once with a small stated budget, then materialises each
requested sparsity (by default 20%, 30% and 50% of MLP channels) from that single run. Each
sub-network is evaluated the way ``benchmarks/end_to_end.py`` evaluates its quick protocol: the
first 40 windows of 1024 tokens of WikiText-2 test and of C4 docs[500:].

The default budget: 16 calibration windows of 512 tokens from C4 docs[:500] (seed 0), batch 2, and
2 steps per requested sparsity (6 forward/backward passes over the calibration set for 20/30/50%).
This is smaller than the 64 x 1024 windows the layer-wise methods get in end_to_end.py: gradients of
the whole model cost more than a block's Gram matrices, so the budget is written into every row.

For each sparsity the script prints WikiText-2 and C4 perplexity, the GISP time needed to reach that
sparsity (steps are shared, so the time is cumulative), the whole run's time, the peak RSS of the
GISP run, and the peak RSS of the process after the evaluation. The run (kept sets included) and
every evaluated row go to the JSON file ``--cache``, so an interrupted run resumes without pruning
again, and ``--report`` prints the table from the cache alone.

    python benchmarks/global_methods.py --method gisp --cache gisp.json
    python benchmarks/global_methods.py --method gisp --cache gisp.json --report
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import check_args, evaluate, evaluation_text, load_cache, machine_text, save_result

METHODS = ["gisp"]


def run_key(args) -> str:
    return (f"quick|{args.structure}|gisp|{args.objective}|calib={args.n}x{args.seqlen}|steps={args.steps_per_target}"
            f"|batch={args.batch_size}")


def budget_text(args) -> str:
    return (f"GISP ({args.objective}, {args.structure}), calibration {args.n}x{args.seqlen} tokens from C4 docs[:500] "
            f"(seed 0), batch {args.batch_size}, {args.steps_per_target} steps per requested sparsity, "
            f"{args.threads} threads")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--structure", default="mlp", choices=["mlp", "heads", "mlp+heads"])
    parser.add_argument("--objective", default="perplexity", choices=["perplexity"],
                        help="the margin objective needs multiple-choice data, which this benchmark does not have")
    parser.add_argument("--n", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--steps-per-target", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a Hugging Face directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", required=True, help="JSON file of the run and its rows (resumable)")
    parser.add_argument("--report", action="store_true", help="print the table from the cache, run nothing")
    args = parser.parse_args(argv)
    check_args(parser, args, at_least={"n": 1, "seqlen": 1, "steps_per_target": 1, "batch_size": 1, "threads": 1})
    cache_path = Path(args.cache)
    if not args.report:
        run(args, cache_path)
    print(table(load_cache(cache_path), args))


def run(args, cache_path: Path) -> None:
    import torch

    import spap
    from spap.data import calibration_set
    from spap.report import count_parameters, peak_memory

    torch.set_num_threads(args.threads)
    key = run_key(args)
    print(budget_text(args), flush=True)
    model, tok = spap.load_model(args.model)
    cache = load_cache(cache_path)
    stored = cache.get(key)
    if stored is not None and all(f"{s:g}" in stored["result"]["kept"] for s in args.sparsities):
        result = spap.GispResult.from_dict(stored["result"])
        print(f"GISP run cached ({stored['result']['seconds']:.0f} s); evaluating what is missing", flush=True)
    else:
        calib = calibration_set("c4", tok, n=args.n, seqlen=args.seqlen, seed=0)
        result = spap.gisp(model, calib, args.sparsities, structure=args.structure, objective=args.objective,
                           steps_per_target=args.steps_per_target, batch_size=args.batch_size)
        cache = save_result(cache_path, key, {"budget": budget_text(args), "result": result.to_dict(),
                                              "machine": machine_text(None), "date": time.strftime("%Y-%m-%d")})
    dense_params = count_parameters(model)
    for s in args.sparsities:
        row_key = f"{key}|{s:g}"
        if row_key in cache:
            continue
        pruned = result.materialize(model, s)
        scores = evaluate(pruned, tok, "quick")
        level = next(x for x in result.sparsities if abs(x - s) < 1e-9)
        reach = sum(step.seconds for step in result.steps if step.target <= level + 1e-12)
        widths = result.widths(level)[args.structure.split("+")[0]]
        row = {"sparsity": s, "achieved": result.achieved[level], **scores,
               "prune_s_to_reach": reach, "prune_s_run": result.seconds,
               "peak_rss_gib_gisp": result.peak_memory["rss"] / 2**30,
               "peak_rss_gib_process": peak_memory()["rss"] / 2**30,
               "params": count_parameters(pruned), "params_dense": dense_params,
               "width_min": min(widths), "width_max": max(widths), "threads": args.threads}
        cache = save_result(cache_path, row_key, row)
        print(f"{s:.0%}: wiki {scores['wikitext_ppl']:.2f}, c4 {scores['c4_ppl']:.2f}, "
              f"widths {min(widths)}..{max(widths)}", flush=True)
        del pruned


def table(cache: dict, args) -> str:
    key = run_key(args)
    run = cache.get(key)
    rows = sorted((r for k, r in cache.items() if k.startswith(key + "|")), key=lambda r: r["sparsity"])
    if run is None or not rows:
        return f"nothing cached under {key}"
    lines = [run["budget"], f"evaluation: {evaluation_text('quick')}; {run['machine']}, {run['date']}", "",
             "| sparsity | achieved | WikiText-2 ppl | C4 ppl | GISP s to reach | GISP s (run) | peak RSS GiB (GISP) "
             "| peak RSS GiB (after eval) | params | layer widths |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['achieved']:.4f} | {r['wikitext_ppl']:.2f} | {r['c4_ppl']:.2f} | "
                     f"{r['prune_s_to_reach']:.0f} | {r['prune_s_run']:.0f} | {r['peak_rss_gib_gisp']:.2f} | "
                     f"{r['peak_rss_gib_process']:.2f} | {r['params']:,} | {r['width_min']}..{r['width_max']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
