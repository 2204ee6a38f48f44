"""Exact least-squares refit of the kept weights for a fixed mask.

Column masks (structured pruning).  With kept columns ``K`` and pruned ``P``, the optimum of
``½ tr((Ŵ−W) H (Ŵ−W)ᵀ)`` subject to ``Ŵ_P = 0`` solves ``Ŵ_K H_KK = W H_{:,K}``, i.e.::

    Ŵ_K = W_K + W_P H_PK H_KK⁻¹,        error = ½ tr(W_P S W_Pᵀ),  S = H_PP − H_PK H_KK⁻¹ H_KP

and the same ``H_KK`` serves every row: one Cholesky factor, ``O(|K|³ + d_out·|K|·|P|)``.

Row masks (unstructured, N:M).  Each row ``r`` has its own kept set ``K_r``; the rows are independent::

    ŵ_{K_r} = w_{K_r} + H_{K_r K_r}⁻¹ (H w_{P_r})_{K_r}

solved as batched Cholesky over chunks of rows, each system padded to the largest kept count with
identity rows so that one batched factorization serves unequal sizes.
"""

from __future__ import annotations

import torch

from ._linalg import cholesky
from .problem import LayerProblem

# Upper bound on the float64 elements of one batch of row systems (~0.5 GB).
_ROW_CHUNK_ELEMENTS = 64_000_000


def refit_columns(problem: LayerProblem, keep_cols: torch.Tensor, H: torch.Tensor | None = None) -> torch.Tensor:
    """Optimal weight for a column mask.

    Parameters
    ----------
    problem : LayerProblem
    keep_cols : BoolTensor of shape (d_in,)
        ``True`` for a kept column.
    H : Tensor of shape (d_in, d_in), optional
        The matrix to refit with; default the problem's damped Gram matrix.

    Returns
    -------
    Tensor of shape (d_out, d_in), float64, zero on pruned columns.
    """
    H = problem.hessian if H is None else H
    W = problem.W64
    K = torch.nonzero(keep_cols).flatten()
    P = torch.nonzero(~keep_cols).flatten()
    W_hat = torch.zeros_like(W)
    if K.numel() == 0:
        return W_hat
    W_hat[:, K] = W[:, K]
    if P.numel() == 0:
        return W_hat
    L = cholesky(H[K][:, K], what="the Gram matrix on the kept columns", hint="raise 'damp'")
    rhs = H[K][:, P] @ W[:, P].T  # (|K|, d_out)
    W_hat[:, K] += torch.cholesky_solve(rhs, L).T
    return W_hat


def refit_rows(problem: LayerProblem, keep: torch.Tensor, H: torch.Tensor | None = None) -> torch.Tensor:
    """Optimal weight for a per-weight mask (unstructured or N:M).

    Parameters
    ----------
    problem : LayerProblem
    keep : BoolTensor of shape (d_out, d_in)
        ``True`` for a kept weight.

    Returns
    -------
    Tensor of shape (d_out, d_in), float64, zero where ``keep`` is ``False``.
    """
    H = problem.hessian if H is None else H
    W = problem.W64
    d_out, d_in = W.shape
    W_hat = torch.where(keep, W, torch.zeros_like(W))
    counts = keep.sum(1)
    # rhs_r = (H (w_r ⊙ pruned_r))_{K_r}: the pull of the pruned weights on the kept ones.
    pull = (torch.where(keep, torch.zeros_like(W), W)) @ H  # (d_out, d_in), row r = H w_{P_r}
    rows = torch.nonzero((counts > 0) & (counts < d_in)).flatten()
    if rows.numel() == 0:
        return W_hat
    kmax = int(counts[rows].max())
    chunk = max(1, _ROW_CHUNK_ELEMENTS // (kmax * kmax))
    eye = torch.eye(kmax, dtype=H.dtype, device=H.device)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        # Kept column indices of each row, left-aligned, padded with column 0 (masked out below).
        order = torch.argsort((~keep[r]).to(torch.int8), dim=1, stable=True)[:, :kmax]
        valid = torch.arange(kmax, device=H.device)[None, :] < counts[r][:, None]
        idx = torch.where(valid, order, torch.zeros_like(order))
        A = H[idx[:, :, None], idx[:, None, :]]
        both = valid[:, :, None] & valid[:, None, :]
        A = torch.where(both, A, eye.expand_as(A))
        b = torch.where(valid, torch.gather(pull[r], 1, idx), torch.zeros_like(idx, dtype=H.dtype))
        L = cholesky(A, what="the Gram matrix on a row's kept weights", hint="raise 'damp'")
        x = torch.cholesky_solve(b[:, :, None], L)[:, :, 0]
        delta = torch.zeros(r.numel(), d_in, dtype=H.dtype, device=H.device)
        delta.scatter_add_(1, idx, torch.where(valid, x, torch.zeros_like(x)))
        W_hat[r] += delta
    return W_hat


def refit(problem: LayerProblem, keep: torch.Tensor) -> torch.Tensor:
    """Refit for the problem's structure: ``keep`` over groups (column structures) or over weights."""
    from .structure import ColumnGroups

    if isinstance(problem.structure, ColumnGroups):
        cols = problem.structure.column_keep_mask(keep, problem.shape[1])
        return refit_columns(problem, cols)
    return refit_rows(problem, keep)
