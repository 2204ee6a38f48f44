"""Does the knapsack's cost predict what pruning one block costs the model?

For some blocks and levels of SmolLM2's MLP channels: the cost ``prune_layerwise(allocation="knapsack")``
uses (``spap.allocation.cost_problem``: the greedy OBS path in the loss-aware metric, in loss units, on the
dense block's Gram matrix) against the measured rise of the validation loss (nats per token) when that
block alone loses that many channels (the path's mask, refitted; every other block dense).  The plain
relative layer error of the same mask is shown as the baseline predictor.  Prints a table and Spearman's
rank correlation of each predictor with the measured rise, over all rows and across blocks at one level.

    python benchmarks/allocation_costs.py --blocks 0 5 10 15 20 25 29 --fractions 0.25 0.5 0.75
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F

import solvers
import spap
from spap.adapters import get_adapter
from spap.allocation import cost_problem
from spap.data import calibration_set, validation_documents
from spap.gradients import output_gradient_grams
from spap.units import kinds


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def validation_loss(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None], use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            count += ids.numel() - 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[0, 5, 10, 15, 20, 25, 29])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 1024 tokens (default 32)")
    parser.add_argument("--metric-windows", type=int, default=16)
    parser.add_argument("--val", type=int, default=8, help="validation windows of 1024 tokens (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = spap.load_model("smollm2")
    adapter = get_adapter(model)
    mlp = kinds(adapter, ["mlp"])["mlp"]
    blocks = adapter.blocks()
    calib = calibration_set("c4", tok, n=args.calib, seqlen=1024, seed=0)
    ids = tok("\n\n".join(validation_documents(tok)), return_tensors="pt").input_ids[0]
    val = ids[: args.val * 1024].reshape(args.val, 1024)
    outputs = {i: mlp.output_linear(blocks[i]) for i in args.blocks}
    G = output_gradient_grams(model, [calib], outputs, n_sequences=args.metric_windows, device=torch.device("cpu"))
    accs = {i: solvers.GramAccumulator(mlp.output_linear(blocks[i]).in_features) for i in args.blocks}
    hooks = [outputs[i].register_forward_pre_hook(lambda m, a, i=i: accs[i].add_batch(a[0])) for i in args.blocks]
    with torch.no_grad():
        for batch in calib.split(8):
            model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    base = validation_loss(model, val)
    n = mlp.count(blocks[0])
    rows = []
    for i in args.blocks:
        problem = cost_problem(mlp, blocks[i], accs[i], G[i])
        levels = [int(f * n + 0.5) for f in args.fractions]
        curve = solvers.removal_costs(problem, max(levels))
        view = outputs[i]
        W = view.weight.detach().clone()
        metric = solvers.OutputMetric.from_gram(G[i], "full", 1.0)
        for p in levels:
            plain = solvers.LayerProblem(W, accs[i].H, mlp.column_groups(blocks[i]), n_prune=p)
            sol = solvers.solve_in_metric(plain, metric, "obs")
            with torch.no_grad():
                view.weight.copy_(sol.weight)
            rise = validation_loss(model, val) - base
            with torch.no_grad():
                view.weight.copy_(W)
            rows.append((i, p, float(curve[p]), sol.relative_error, rise))
            print(f"block {i:>2}  pruned {p:>4}  cost {curve[p]:>12.4g}  rel.err {sol.relative_error:.4f}  "
                  f"loss rise {rise:+.4f}", flush=True)
    cost, err, rise = (np.array([r[k] for r in rows]) for k in (2, 3, 4))
    print(f"\nvalidation loss of the dense model: {base:.4f} nats/token ({args.val} windows of 1024)")
    print(f"{'predictor':<28}{'Spearman, all rows':>20}" + "".join(f"{f'at {f:.0%}':>10}" for f in args.fractions))
    for name, x in (("knapsack cost (metric)", cost), ("plain relative error", err)):
        per_level = []
        for f in args.fractions:
            p = int(f * n + 0.5)
            sel = [k for k, r in enumerate(rows) if r[1] == p]
            per_level.append(spearman(x[sel], rise[sel]) if len(sel) > 2 else float("nan"))
        print(f"{name:<28}{spearman(x, rise):>20.3f}" + "".join(f"{v:>10.3f}" for v in per_level))
    print(f"\nseconds: {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
