"""Greedy OBS removal of column groups (channels, heads): ZipLM / SlimGPT-style structured pruning.

Removing a set ``P`` of columns from a weight ``W`` that was fitted with inverse Gram matrix ``H⁻¹``
costs exactly (Hassibi & Stork 1993, in the group form of Kurtic et al. 2023)::

    ε(P) = ½ tr(W_P (H⁻¹_PP)⁻¹ W_Pᵀ)                       (a sum over the rows of W)

and the optimal update of the remaining weights, together with the inverse Gram matrix of the
remaining columns, is::

    W   ← W − W_P (H⁻¹_PP)⁻¹ H⁻¹_{P,:}
    H⁻¹ ← H⁻¹ − H⁻¹_{:,P} (H⁻¹_PP)⁻¹ H⁻¹_{P,:}

The greedy method removes, one step at a time, the group with the smallest ``ε`` under the current
``W`` and ``H⁻¹``.  Because every update is exact, the weight after the last step is the exact refit of
the final mask (the same as :func:`solvers.refit.refit_columns`).

Implementation: a pivoted Cholesky recursion.  Instead of rewriting the ``d_in × d_in`` matrix ``H⁻¹``
and the ``d_out × d_in`` weight at every step, the removed directions are stored as the rows of three
thin matrices, ``H⁻¹' = H⁻¹ − CᵀC``, ``W' = W − AᵀC`` and ``B = A W``, and only the small per-group
blocks ``H⁻¹'_gg`` and ``(W'ᵀW')_gg`` that the criterion needs are kept up to date (``WᵀW`` is formed
once).  A step that removes ``m`` columns after ``r`` have gone costs ``O((d_in + d_out)·r·m)`` instead of
``O(d_in²·m + d_out·d_in·m)`` for the explicit downdates.  ``obs`` is timed by
``python benchmarks/scaling.py`` and ``python benchmarks/compare_solvers.py --suite speed`` (figures in
``docs/performance.md``).
"""

from __future__ import annotations

import torch

from ._linalg import cholesky
from .validation import Interval
from .problem import LayerProblem
from .registry import register
from .structure import ColumnGroups

_OPTIONS = {"per_step": Interval(int, 1, None)}


def padded_groups(structure: ColumnGroups, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Group column indices padded to the largest group: LongTensor ``(g, s_max)`` and its valid mask."""
    smax = max(len(grp) for grp in structure.groups)
    idx = torch.zeros(structure.n_groups, smax, dtype=torch.long)
    valid = torch.zeros(structure.n_groups, smax, dtype=torch.bool)
    for i, grp in enumerate(structure.groups):
        idx[i, : len(grp)] = torch.tensor(grp, dtype=torch.long)
        valid[i, : len(grp)] = True
    return idx.to(device), valid.to(device)


def diagonal_blocks(M: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, pad: float) -> torch.Tensor:
    """The blocks ``M[g, g]`` of every group, shape ``(g, s_max, s_max)``; padding is ``pad·I``."""
    blocks = M[idx[:, :, None], idx[:, None, :]]
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(idx.shape[1], dtype=M.dtype, device=M.device).expand_as(blocks)
    return torch.where(both, blocks, pad * eye)


def group_costs(Hb: torch.Tensor, Gb: torch.Tensor) -> torch.Tensor:
    """``½ tr(Hb⁻¹ Gb)`` per group: the OBS cost ``½ Σ_rows w_g (H⁻¹_gg)⁻¹ w_gᵀ``, shape ``(g,)``."""
    if Hb.shape[-1] == 1:
        return 0.5 * Gb[:, 0, 0] / Hb[:, 0, 0]
    L = cholesky(Hb, what="a group block of the inverse Gram matrix", hint="raise 'damp'")
    return 0.5 * torch.cholesky_solve(Gb, L).diagonal(dim1=-2, dim2=-1).sum(-1)


def thin_product(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``A @ V`` for a ``V`` of few columns, as one matrix-vector product per column.

    On CPU (MKL, float64) a GEMM with 2 to 8 columns was far slower than the same number of
    ``torch.mv`` calls (``obs`` as a whole is timed by ``python benchmarks/scaling.py``).
    """
    if V.shape[1] > 8:
        return A @ V
    return torch.stack([torch.mv(A, V[:, j]) for j in range(V.shape[1])], dim=1)


def _inverse_cholesky(M: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` for the Cholesky factor ``L`` of a small SPD block.

    Explicit, because ``solve_triangular`` on a transposed (strided) right-hand side was orders of
    magnitude slower than the product with ``L⁻¹`` (``obs`` as a whole is timed by
    ``python benchmarks/scaling.py``).
    """
    if M.shape[0] == 1:
        if not bool(M[0, 0] > 0):
            cholesky(M, what="the removed block of the inverse Gram matrix", hint="raise 'damp'")  # raises
        return M.rsqrt()
    L = cholesky(M, what="the removed block of the inverse Gram matrix", hint="raise 'damp'")
    return torch.linalg.solve_triangular(L, torch.eye(M.shape[0], dtype=M.dtype, device=M.device), upper=False)


@register(
    "obs",
    structures=(ColumnGroups,),
    reference="Hassibi & Stork, Second order derivatives for network pruning: Optimal Brain Surgeon, NeurIPS 1993; "
    "Kurtic et al., ZipLM: Inference-Aware Structured Pruning of Language Models, NeurIPS 2023; "
    "Ling et al., SlimGPT: Layer-wise Structured Pruning for Large Language Models, NeurIPS 2024.",
    options=_OPTIONS,
)
def obs(problem: LayerProblem, *, per_step: int = 1):
    """Greedy OBS removal of column groups with exact inverse-Hessian updates of the remaining weights.

    Parameters
    ----------
    problem : LayerProblem
        With a :class:`~solvers.structure.ColumnGroups` structure (groups may differ in size).
    per_step : int, default 1
        Groups removed per step.  ``1`` is the exact greedy method.  Larger values remove the
        ``per_step`` cheapest groups (by their individual costs) jointly, with one exact block update;
        fewer steps, a slightly worse mask.

    ``stats["step_costs"]`` holds each step's exact cost (the rise of the damped objective when its
    groups go jointly, given the earlier steps); their running sum is the objective of the mask after
    each step, for any ``per_step``.

    Cost
    ----
    ``O(d_in³ + d_out·d_in²)`` once (``H⁻¹`` and ``WᵀW``), then per step ``O(g·s³)`` for the criterion
    and ``O((d_in + d_out)·r·m + d_in·s·m)`` for the update (``r`` columns removed so far, ``m`` in this
    step, ``s`` the group size).
    """
    s: ColumnGroups = problem.structure  # type: ignore[assignment]
    W, Hinv = problem.W64, problem.hessian_inverse
    d_out, d_in = W.shape
    k, g = problem.n_pruned_target, s.n_groups
    keep = torch.ones(g, dtype=torch.bool, device=W.device)
    if k == 0:
        return W.clone(), keep, {"iterations": 0, "step_costs": []}
    idx, valid = padded_groups(s, W.device)
    sizes = valid.sum(1)
    G = W.T @ W
    Hb = diagonal_blocks(Hinv, idx, valid, 1.0)  # blocks of the current H⁻¹'
    Gb = diagonal_blocks(G, idx, valid, 0.0)  # blocks of the current W'ᵀW'
    capacity = int(sizes.sort(descending=True).values[:k].sum())
    Ct = torch.zeros(capacity, d_in, dtype=W.dtype, device=W.device)  # rows c: H⁻¹' = H⁻¹ − CᵀC
    At = torch.zeros(capacity, d_out, dtype=W.dtype, device=W.device)  # rows a: W' = W − AᵀC
    Bt = torch.zeros(capacity, d_in, dtype=W.dtype, device=W.device)  # B = A W
    M = torch.zeros(capacity, capacity, dtype=W.dtype, device=W.device)  # A Aᵀ
    eye = torch.eye(idx.shape[1], dtype=W.dtype, device=W.device)
    r, removed = 0, 0
    step_costs: list[float] = []
    while removed < k:
        cost = group_costs(Hb, Gb)
        cost = torch.where(keep, cost, torch.full_like(cost, float("inf")))
        take = min(per_step, k - removed)
        chosen = torch.argsort(cost, stable=True)[:take]
        P = idx[chosen][valid[chosen]]  # the columns removed in this step
        m = P.numel()
        C, A, B = Ct[:r], At[:r], Bt[:r]
        CP = C[:, P]  # (r, m)
        Li = _inverse_cholesky(Hinv[P][:, P] - CP.T @ CP)  # L⁻¹ of H⁻¹'_PP = L Lᵀ, (m, m)
        An = Li @ (W[:, P] - thin_product(A.T, CP)).T  # (m, d_out) = L⁻¹ W'_Pᵀ: new rows of A
        step_costs.append(0.5 * float((An * An).sum()))  # ½ tr(W'_P (H⁻¹'_PP)⁻¹ W'_Pᵀ): the step's exact joint cost
        # One pass over C and one over B give H⁻¹'_{:,P} and (W'ᵀW')_{:,P}, from
        # W'ᵀW' = WᵀW − CᵀB − BᵀC + Cᵀ(AAᵀ)C.
        T = thin_product(C.T, torch.cat([CP, M[:r, :r] @ CP - B[:, P]], dim=1))  # (d_in, 2m)
        S = thin_product(B.T, CP)  # (d_in, m)
        Cn = Li @ (Hinv[:, P] - T[:, :m]).T  # (m, d_in): new rows of C
        Bn = Li @ (G[P] - S.T)  # (m, d_in) = A_new W
        X = Li @ (G[:, P] - S + T[:, m:]).T  # (m, d_in) = A_new W'
        # Block updates: H⁻¹'' = H⁻¹' − CnᵀCn; W''ᵀW'' = W'ᵀW' − XᵀCn − CnᵀX + Cnᵀ(An Anᵀ)Cn.
        AA = An @ An.T
        if idx.shape[1] == 1:  # single columns: the blocks are scalars
            c, x = Cn[:, idx[:, 0]], X[:, idx[:, 0]]  # (m, g)
            Hb = Hb - (c * c).sum(0)[:, None, None]
            Gb = Gb - (2 * (x * c).sum(0) - (c * (AA @ c)).sum(0))[:, None, None]
        else:
            Cg = Cn[:, idx].permute(1, 2, 0) * valid[:, :, None]  # (g, s_max, m)
            Xg = X[:, idx].permute(1, 2, 0) * valid[:, :, None]
            CgT = Cg.transpose(1, 2)
            Hb = Hb - Cg @ CgT
            Gb = Gb - Xg @ CgT - Cg @ Xg.transpose(1, 2) + (Cg @ AA) @ CgT
        cross = An @ A.T  # (m, r)
        M[r : r + m, :r], M[:r, r : r + m], M[r : r + m, r : r + m] = cross, cross.T, AA
        Ct[r : r + m], At[r : r + m], Bt[r : r + m] = Cn, An, Bn
        r += m
        removed += take
        keep[chosen] = False
        # Removed groups: neutral blocks, so the batched criterion stays well defined.
        Hb[chosen] = eye
        Gb[chosen] = 0.0
    W_hat = W - At[:r].T @ Ct[:r]
    W_hat[:, s.columns(~keep)] = 0.0
    return W_hat, keep, {"iterations": len(step_costs), "step_costs": step_costs}
