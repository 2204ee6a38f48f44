"""Which channels each method prunes on the real SmolLM2 down_proj layers (30%), dense inputs.

Three questions from ``docs/results.md``: does magnitude (column norm, no activations) prune the
largest-activation channels, how far apart are SPAP's and ADMM's masks, and where does SPAP's swap
search take ADMM's mask (``admm`` with ``swap=True``)?  Needs the Gram cache of
``benchmarks/real_layers.py``.

    python benchmarks/masks.py
"""

from __future__ import annotations

import torch

import solvers
from real_layers import load, n_layers, problem


def main() -> None:
    torch.set_num_threads(2)
    data = load()
    print("magnitude (column norm) at 30%: largest diag(H) / mean, is one of the 3 largest-activation "
          "channels pruned, share of sum_j H_jj |W_j|^2 pruned")
    hit = 0
    for layer in range(n_layers(data)):
        p = problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=0.3)
        hd, norms = p.H64.diagonal(), (p.W64 * p.W64).sum(0)
        pruned = set(torch.argsort(norms)[: p.n_pruned_target].tolist())
        top = any(int(j) in pruned for j in torch.argsort(hd, descending=True)[:3])
        hit += top
        energy = hd * norms
        share = float(energy[list(pruned)].sum() / energy.sum())
        print(f"  layer {layer:2d}: {float(hd.max() / hd.mean()):7.0f}x  {str(top):5}  {share:.3f}")
    print(f"  a top-3 activation channel pruned in {hit}/{n_layers(data)} layers")
    print("spap vs admm (final='refit'), 30%: channels kept by one and not the other, relative errors; "
          "admm with swap=True (its mask finished by SPAP's swap search): swaps, channels it keeps that spap prunes")
    for layer in range(0, n_layers(data), 5):
        p = problem(data, layer, "mlp.down_proj", solvers.channels, sparsity=0.3)
        a, b = solvers.solve(p, "spap"), solvers.solve(p, "admm", final="refit")
        c = solvers.solve(p, "admm", swap=True)
        differ = int((a.keep & ~b.keep).sum())
        print(f"  layer {layer:2d}: differ in {differ:3d} of {p.n_pruned_target} pruned; spap {a.relative_error:.5f}, "
              f"admm+refit {b.relative_error:.5f} ({b.relative_error / a.relative_error - 1:+.1%}); "
              f"admm swap=True {c.relative_error:.5f} after {c.stats['swaps']} swaps, differs from spap in "
              f"{int((c.keep & ~a.keep).sum())}")


if __name__ == "__main__":
    main()
