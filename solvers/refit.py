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

# Upper bound on the float64 elements of one batch of row systems.  On CPU small batches stay in cache
# and are faster than 64M-element (0.5 GB) ones (measured by `python benchmarks/row_refit.py`; figures in
# docs/performance.md).  On CUDA large batches fill the device.
_ROW_CHUNK_ELEMENTS = 2_000_000
_ROW_CHUNK_ELEMENTS_CUDA = 64_000_000


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
    budget = _ROW_CHUNK_ELEMENTS_CUDA if H.is_cuda else _ROW_CHUNK_ELEMENTS
    chunks = list(_chunks_by_count(rows, counts, budget))
    # Padding slots index an identity block appended to H, so one gather builds each padded system
    # (a masked torch.where over the batch cost as much as the gather itself).
    pad = max((kmax - int(counts[r].min()) for r, kmax in chunks), default=0)
    H_ext = torch.block_diag(H, torch.eye(pad, dtype=H.dtype, device=H.device)) if pad else H
    for r, kmax in chunks:
        # Kept column indices of each row, left-aligned, then the row's padding slots d_in, d_in+1, ...
        order = torch.argsort((~keep[r]).to(torch.int8), dim=1, stable=True)[:, :kmax]
        slot = torch.arange(kmax, device=H.device)[None, :]
        valid = slot < counts[r][:, None]
        idx = torch.where(valid, order, d_in + slot - counts[r][:, None])
        A = H_ext[idx[:, :, None], idx[:, None, :]]
        pull_ext = torch.cat([pull[r], pull.new_zeros(r.numel(), pad)], dim=1) if pad else pull[r]
        b = torch.gather(pull_ext, 1, idx)
        L = cholesky(A, what="the Gram matrix on a row's kept weights", hint="raise 'damp'")
        x = torch.cholesky_solve(b[:, :, None], L)[:, :, 0]
        delta = torch.zeros(r.numel(), d_in + pad, dtype=H.dtype, device=H.device)
        delta.scatter_add_(1, idx, x)
        W_hat[r] += delta[:, :d_in]
    return W_hat


def _chunks_by_count(rows: torch.Tensor, counts: torch.Tensor, budget: int):
    """Yield ``(row indices, padded size)`` batches of rows with similar kept counts.

    Rows are sorted by kept count so that each batch pads only to its own largest count.  Unstructured
    masks chosen over a whole layer keep between 93 and 1137 of 1536 weights per row on a SmolLM2
    ``down_proj`` at 50%, and padding every row to the layer's largest count makes most systems far
    larger than they are (measured by ``python benchmarks/row_refit.py``; figures in ``docs/performance.md``).
    """
    if rows.numel() == 0:
        return
    rows = rows[torch.argsort(counts[rows], stable=True)]
    sizes = counts[rows].tolist()
    start = 0
    while start < len(sizes):
        stop = start + 1
        # Grow the batch while its padded systems stay within the element budget (at least one row).
        while stop < len(sizes) and (stop + 1 - start) * sizes[stop] ** 2 <= budget:
            stop += 1
        yield rows[start:stop], int(sizes[stop - 1])
        start = stop


def refit(problem: LayerProblem, keep: torch.Tensor) -> torch.Tensor:
    """Refit for the problem's structure: ``keep`` over groups (column structures) or over weights."""
    from .structure import ColumnGroups

    if isinstance(problem.structure, ColumnGroups):
        cols = problem.structure.column_keep_mask(keep, problem.shape[1])
        return refit_columns(problem, cols)
    return refit_rows(problem, keep)
