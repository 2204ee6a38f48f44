"""Exact projections onto each structure: from scores to a mask with exactly the target count.

Masks are chosen by rank (``topk``), never by a ``<=`` threshold: dequantized weights share magnitudes,
and a threshold then prunes too many or too few.  Ties are broken by index (stable sort), so masks are
deterministic.
"""

from __future__ import annotations

import torch

from .problem import LayerProblem
from .structure import NM, ColumnGroups, Unstructured


def keep_largest(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` largest entries of a 1-D tensor (ties: lower index wins)."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def group_scores(problem: LayerProblem, column_scores: torch.Tensor) -> torch.Tensor:
    """Sum per-column scores, shape ``(d_in,)``, over each group: shape ``(n_groups,)``."""
    s: ColumnGroups = problem.structure  # type: ignore[assignment]
    if s.group_size is not None:
        return column_scores[s.index(column_scores.device)].sum(1)
    return torch.stack([column_scores[list(g)].sum() for g in s.groups])


def row_prune_counts(problem: LayerProblem) -> torch.Tensor:
    """Per-row prune counts that add up exactly to the layer target (for per-row selections)."""
    d_out, _ = problem.shape
    total = problem.n_pruned_target
    base, extra = divmod(total, d_out)
    counts = torch.full((d_out,), base, dtype=torch.long, device=problem.device)
    counts[:extra] += 1
    return counts


def project(problem: LayerProblem, scores: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """Keep mask with the highest scores that satisfies the problem's structure and target exactly.

    Parameters
    ----------
    scores : Tensor
        Shape ``(n_groups,)`` for column structures, ``(d_out, d_in)`` otherwise; larger = keep.
    per_row : bool, default False
        Unstructured only: prune the same count in every row (Wanda's comparison group) instead of
        choosing across the whole layer.
    """
    s = problem.structure
    if isinstance(s, ColumnGroups):
        return keep_largest(scores, problem.n_units - problem.n_pruned_target)
    if isinstance(s, NM):
        d_out, d_in = scores.shape
        blocks = scores.reshape(d_out, d_in // s.m, s.m)
        top = torch.argsort(blocks, dim=-1, descending=True, stable=True)[..., : s.n]
        keep = torch.zeros_like(blocks, dtype=torch.bool)
        keep.scatter_(-1, top, True)
        return keep.reshape(d_out, d_in)
    assert isinstance(s, Unstructured)
    if per_row:
        counts = row_prune_counts(problem)
        ranks = torch.argsort(torch.argsort(scores, dim=1, stable=True), dim=1, stable=True)
        return ranks >= counts[:, None]
    flat = keep_largest(scores.flatten(), problem.n_units - problem.n_pruned_target)
    return flat.reshape(scores.shape)
