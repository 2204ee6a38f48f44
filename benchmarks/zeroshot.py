"""Zero-shot accuracy of SmolLM2-135M, dense and pruned by SPAP with the package defaults.

Each sparsity runs on a freshly loaded model: 0 is the dense model; any other value prunes it first with
``spap.prune_layerwise(model, calib, sparsity, structure=..., allocation=..., target=...)`` (SPAP; MLP
channels, a uniform allocation and the default target unless ``--structure`` / ``--allocation`` /
``--target`` say otherwise) on the quick protocol's
calibration (64 windows of 1024 tokens of C4 documents ``[:500]``, seed 0), then scores the tasks with
``spap.eval.zeroshot`` on the first ``--limit`` items of each.  Prints one table per sparsity and a
summary of mean accuracy; ``--json`` writes every result after each sparsity (with date, threads and
wall times), and a sparsity already in that file is not run again.

    SPAP_DATA_DIR=../shared/data python benchmarks/zeroshot.py --limit 20                    # a quick look
    SPAP_DATA_DIR=../shared/data python benchmarks/zeroshot.py --limit 500 --sparsities 0 0.3 0.5 --json zs.json
    SPAP_DATA_DIR=../shared/data python benchmarks/zeroshot.py --limit 60 --sparsities 0.5 --allocation knapsack --json zs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import spap
from spap.zeroshot import TASKS, TaskResult, table, task_names, zeroshot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="all", help=f"'all' or a comma list from {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0], help="0 = dense (default 0)")
    parser.add_argument("--structure", default="mlp", help="structure of the prune (default mlp)")
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "owl", "knapsack"],
                        help="how the sparsity is spread over the blocks (default uniform)")
    parser.add_argument("--target", default="pruned", choices=["pruned", "dense", "block"],
                        help="what each layer fits (prune_layerwise's target; default pruned)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="default $SPAP_DATA_DIR or ../shared/data")
    parser.add_argument("--json", type=Path, default=None, help="write (and resume from) this JSON file")
    args = parser.parse_args(argv)
    names = task_names(args.tasks)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1; got {args.limit}")
    if not all(0 <= s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must be in [0, 1); got {args.sparsities}")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for sparsity in args.sparsities:
        setting = {"structure": args.structure, "allocation": args.allocation, "target": args.target} \
            if sparsity > 0 else {}
        done = [r for r in runs if r["sparsity"] == sparsity and r["limit"] == args.limit and r["tasks"] == list(names)
                and _setting(r) == setting]
        if done:
            print(f"{_label(sparsity, setting)}: cached in {args.json}")
            continue
        start = time.perf_counter()
        model, tokenizer = spap.load_model("smollm2")
        prune_s = 0.0
        if sparsity > 0:
            calib = spap.data.calibration_set("c4", tokenizer, n=64, seqlen=1024, seed=0, path=args.data_dir)
            model, report = spap.prune_layerwise(model, calib, sparsity=sparsity, **setting)
            prune_s = report.seconds
        t0 = time.perf_counter()
        results = zeroshot(model, tokenizer, names, limit=args.limit, batch_size=args.batch_size,
                           data_dir=args.data_dir, progress=True)
        eval_s = time.perf_counter() - t0
        print(f"\nSmolLM2-135M, {_label(sparsity, setting)}, first {args.limit or 'all'} items per task")
        print(table(results))
        runs.append({"sparsity": sparsity, **setting, "limit": args.limit, "tasks": list(names),
                     "results": {k: dataclasses.asdict(v) for k, v in results.items()},
                     "prune_s": prune_s, "eval_s": eval_s, "wall_s": time.perf_counter() - start,
                     "threads": torch.get_num_threads(), "machine": platform.machine(),
                     "date": datetime.date.today().isoformat(), "torch": torch.__version__})
        if args.json:
            args.json.write_text(json.dumps(runs, indent=1) + "\n")
    _summary(runs, names, args.limit)


def _setting(run: dict) -> dict:
    """A cached run's structure, allocation and target (runs without them were MLP channels, uniform,
    the pruned model's outputs)."""
    if run["sparsity"] == 0:
        return {}
    return {"structure": run.get("structure", "mlp"), "allocation": run.get("allocation", "uniform"),
            "target": run.get("target", "pruned")}


def _label(sparsity: float, setting: dict) -> str:
    if sparsity == 0:
        return "dense"
    what = "MLP channels" if setting["structure"] == "mlp" else setting["structure"]
    target = "" if setting["target"] == "pruned" else f", target={setting['target']}"
    return f"{sparsity:.0%} {what} (spap, {setting['allocation']}{target})"


def _summary(runs: list[dict], names: tuple[str, ...], limit: int | None) -> None:
    """acc (acc_norm) per task and the mean acc, one column per run."""
    runs = sorted((r for r in runs if r["limit"] == limit and r["tasks"] == list(names)),
                  key=lambda r: (r["sparsity"], sorted(_setting(r).items())))
    if len(runs) < 2:
        return
    print("\nacc (acc_norm), %")
    for i, r in enumerate(runs):
        print(f"  column {i}: {_label(r['sparsity'], _setting(r))}")
    print(f"{'task':<16}" + "".join(f"{'column ' + str(i):>18}" for i in range(len(runs))))
    for name in names:
        cells = []
        for r in runs:
            res = TaskResult(**r["results"][name])
            cells.append(f"{100 * res.acc:.2f}" + (f" ({100 * res.acc_norm:.2f})" if res.acc_norm is not None else ""))
        print(f"{name:<16}" + "".join(f"{c:>18}" for c in cells))
    print(f"{'mean acc':<16}" + "".join(
        f"{100 * sum(r['results'][n]['acc'] for n in names) / len(names):>18.2f}" for r in runs))


if __name__ == "__main__":
    main()
