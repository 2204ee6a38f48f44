"""Exact least-squares refit of the kept weights for a fixed mask.

Column masks (structured pruning).  With kept columns ``K`` and pruned ``P``, the optimum of
``½ tr((Ŵ−W) H (Ŵ−W)ᵀ)`` subject to ``Ŵ_P = 0`` solves ``Ŵ_K H_KK = W H_{:,K}``, i.e.::

    Ŵ_K = W_K + W_P H_PK H_KK⁻¹,        error = ½ tr(W_P S W_Pᵀ),  S = H_PP − H_PK H_KK⁻¹ H_KP

and the same ``H_KK`` serves every row: one Cholesky factor, ``O(|K|³ + d_out·|K|·|P|)``.

Row masks (unstructured, N:M).  Each row ``r`` has its own kept set ``K_r``; the rows are independent::

    ŵ_{K_r} = w_{K_r} + H_{K_r K_r}⁻¹ (H w_{P_r})_{K_r}

solved either directly, as batched Cholesky over chunks of rows (each system padded to the largest kept
count with identity rows so that one batched factorization serves unequal sizes), or by conjugate
gradients on all rows at once, preconditioned by ``(H⁻¹)_{K_r K_r}``: each iteration is two dense
``d_out × d_in × d_in`` products (float32 ones first, then float64 ones), and the float64 stopping rule
bounds the objective's excess over the direct solution (derivation: docs/method.md §3b).
"""

from __future__ import annotations

import torch

from ._linalg import cholesky, inverse_from_cholesky
from .problem import LayerProblem
from .validation import InvalidArgumentError

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


# Conjugate-gradient refit: stop when the bound on the objective's excess is below this fraction of the
# objective (1e-11: far below any difference between masks; on SmolLM2's block-5 layers it took about
# 13 iterations where stopping at round-off, 1e-14, took 17-20; ``python benchmarks/row_refit.py``
# compares the result with the direct solve).  Rows not there
# after _CG_MAX_ITERATIONS are solved directly, so a badly conditioned layer costs at most that many
# iterations more than the direct solve (measured by ``python benchmarks/row_refit.py``).
_CG_RTOL = 1e-11
_CG_MAX_ITERATIONS = 40
# The float32 iterations that precede the float64 ones stop once rᵀz has fallen by this factor: about
# where float32 round-off stops it falling on SmolLM2's layers (a few float64 iterations finish).
_CG32_DROP = 1e-10
# Whether that float32 phase runs (``python benchmarks/row_refit.py`` times the refit with and without).
_FLOAT32_PHASE = True
# method="auto" uses CG from this input width up.  On SmolLM2's layers (576 and 1536 inputs) CG took a
# third to a half of the direct solve's time; on narrow or synthetic problems it was not faster, and
# the direct solve is exact to round-off (``python benchmarks/row_refit.py``).
_CG_MIN_WIDTH = 512


def refit_rows(problem: LayerProblem, keep: torch.Tensor, H: torch.Tensor | None = None, *,
               start: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """Optimal weight for a per-weight mask (unstructured or N:M).

    Parameters
    ----------
    problem : LayerProblem
    keep : BoolTensor of shape (d_out, d_in)
        ``True`` for a kept weight.
    H : Tensor of shape (d_in, d_in), optional
        The matrix to refit with; default the problem's damped Gram matrix.
    start : Tensor of shape (d_out, d_in), optional
        A guess the conjugate gradients start from (its pruned entries are ignored); default ``W ⊙ keep``.
    method : {"auto", "cg", "cholesky"}, default "auto"
        ``"cholesky"``: one direct solve per row.  ``"cg"``: conjugate gradients on every row at once,
        preconditioned by ``(H⁻¹)_{KK}``, until the excess of the objective over the exact refit is
        provably below ``1e-11`` of the objective (rows not there after 40 iterations are solved
        directly); its objective equals the direct solve's to that bound, its weights to about 1e-6
        relative.  ``"auto"``: ``"cg"`` for layers of 512 inputs or more, where it is faster, else
        ``"cholesky"``.

    Returns
    -------
    Tensor of shape (d_out, d_in), float64, zero where ``keep`` is ``False``.
    """
    if method == "auto":
        method = "cg" if problem.shape[1] >= _CG_MIN_WIDTH else "cholesky"
    if method == "cg":
        Hinv = problem.hessian_inverse if H is None else None
        return _refit_rows_cg(problem, keep, problem.hessian if H is None else H, Hinv, start)
    if method != "cholesky":
        raise InvalidArgumentError(f"The 'method' argument of refit_rows must be 'auto', 'cg' or 'cholesky'. Got {method!r}.")
    return _refit_rows_direct(problem.W64, keep, problem.hessian if H is None else H)


def refit_rows_below(problem: LayerProblem, keep: torch.Tensor, bound: float) -> tuple[torch.Tensor, float] | None:
    """``(W_hat, objective)``, the refit of ``keep`` (as :func:`refit_rows`) and its objective, if that
    objective is below ``bound``; else None.

    With conjugate gradients the objective of the iterate, minus the bound on its excess, is a lower
    bound of the refit's objective: once it passes ``bound`` the iterations stop and None is returned.
    A mask that loses to ``bound`` thus costs a few iterations instead of a full refit.
    """
    if problem.shape[1] < _CG_MIN_WIDTH:
        W_hat = refit_rows(problem, keep, method="cholesky")
    else:
        W_hat = _refit_rows_cg(problem, keep, problem.hessian, problem.hessian_inverse, None, stop_above=bound)
        if W_hat is None:
            return None
    objective = problem.objective(W_hat)
    return (W_hat, objective) if objective < bound else None


def _refit_rows_cg(problem: LayerProblem, keep: torch.Tensor, H: torch.Tensor, Hinv: torch.Tensor | None,
                   start: torch.Tensor | None, stop_above: float | None = None) -> torch.Tensor | None:
    """Preconditioned conjugate gradients on ``H_KK x_r = (H w_r)_K`` for every row at once.

    With ``M⁻¹ = (H⁻¹)_KK ⪰ (H_KK)⁻¹`` and residual ``r`` (the negative gradient on ``K``), the excess of
    the objective over the exact refit is ``½ rᵀ H_KK⁻¹ r ≤ ½ rᵀ M⁻¹ r = ½ rᵀz``, which CG computes
    anyway; each step lowers the objective by ``½ α rᵀz``, so it is tracked without another product.
    With ``stop_above``, return None as soon as ``Σ f − ½ Σ rᵀz`` (a lower bound of the refit's total
    objective) exceeds it.
    """
    W = problem.W64
    if Hinv is None:
        Hinv = inverse_from_cholesky(cholesky(H, what="the Gram matrix", hint="raise 'damp'"))
    kept = keep.to(H.dtype)
    X = W * kept if start is None else start.to(H.dtype) * kept
    if stop_above is None and _FLOAT32_PHASE and H.dtype == torch.float64:
        X += _correction_in_float32(W, X, kept, H, Hinv)
    D = X - W
    DH = D @ H
    f = 0.5 * (DH * D).sum(1)  # each row's objective
    R = -DH * kept  # (W − X) H on K: the right-hand side minus H_KK x
    rz = None
    for rz in _pcg_steps(X, R, f, kept, H, Hinv):
        if stop_above is not None and float(f.sum() - 0.5 * rz.sum()) > stop_above:
            return None
        if bool((0.5 * rz <= _CG_RTOL * f).all()):
            break
    late = torch.nonzero(0.5 * rz > _CG_RTOL * f).flatten()
    if late.numel():  # not provably there: solve those rows directly
        X[late] = _refit_rows_direct(W[late], keep[late], H)
    return X


def _correction_in_float32(W: torch.Tensor, X: torch.Tensor, kept: torch.Tensor, H: torch.Tensor,
                           Hinv: torch.Tensor) -> torch.Tensor:
    """A float32 conjugate-gradient solve of the refit's correction from ``X``: ``δ_K`` with
    ``H_KK δ_K = ((W − X) H)_K`` for every row, preconditioned by ``(H⁻¹)_KK``.

    A float32 product costs about half of a float64 one on the host (and far less on most GPUs), and
    float32 conjugate gradients cut the preconditioned residual by ``1e-10`` in about as many iterations
    as float64 ones (SmolLM2's layers; docs/performance.md).  The residual it starts from is computed in
    float64, and :func:`_refit_rows_cg` certifies the result in float64 and iterates on where needed, so
    the refit's accuracy is unchanged.  Stops where ``rᵀz`` has fallen by ``_CG32_DROP`` (near float32's
    floor) or the float64 stopping rule already holds, or after ``_CG_MAX_ITERATIONS``.
    """
    D = X - W
    DH = D @ H
    f = (0.5 * (DH * D).sum(1)).float()  # each row's objective, lowered by every step as in _refit_rows_cg
    k32 = kept.float()
    R = (-DH * kept).float()
    delta = torch.zeros_like(R)
    floor = None
    for rz in _pcg_steps(delta, R, f, k32, H.float(), Hinv.float()):
        floor = _CG32_DROP * rz if floor is None else floor
        if bool(((rz <= floor) | (0.5 * rz <= _CG_RTOL * f)).all()):
            break
    return delta.to(H.dtype) * kept


def _pcg_steps(X: torch.Tensor, R: torch.Tensor, f: torch.Tensor, kept: torch.Tensor, H: torch.Tensor,
               Minv: torch.Tensor):
    """Preconditioned conjugate gradients on every row at once, in the dtype of its arguments.

    ``X`` (d_out, d_in) is the iterate, ``R`` its residual on the kept entries ``kept`` (0/1 of ``X``'s
    shape), ``f`` (d_out,) each row's objective; all three are updated in place by every step
    (``f`` falls by ``½ α rᵀz``).  ``H`` is the system's matrix, ``Minv`` the preconditioner, both
    (d_in, d_in).  Yields ``rᵀz`` (d_out,) before each step and once after the last of
    ``_CG_MAX_ITERATIONS``; the caller stops the iterations by leaving the loop.
    """
    tiny = torch.finfo(H.dtype).tiny
    Z = (R @ Minv) * kept
    rz = (R * Z).sum(1)
    P = Z.clone()
    for _ in range(_CG_MAX_ITERATIONS):
        yield rz
        Q = (P @ H) * kept
        pq = (P * Q).sum(1)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(tiny), torch.zeros_like(pq))
        X += alpha[:, None] * P
        R -= alpha[:, None] * Q
        f -= 0.5 * alpha * rz
        Z = (R @ Minv) * kept
        rz_next = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), torch.zeros_like(rz))
        P = Z + beta[:, None] * P
        rz = rz_next
    yield rz


def _refit_rows_direct(W: torch.Tensor, keep: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """One Cholesky solve per row, in batches of rows with similar kept counts."""
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


# --- column refits through H⁻¹ ------------------------------------------------------------------


def _pruned_correction(Hinv: torch.Tensor, W: torch.Tensor, pruned_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_P`` and ``E = W_P (H⁻¹_PP)⁻¹`` (both ``m×|P|``), through one ``|P|×|P|`` Cholesky."""
    WP = W[:, pruned_cols]
    L = cholesky(Hinv[pruned_cols][:, pruned_cols], what="the pruned block of the inverse Gram matrix")
    return WP, torch.cholesky_solve(WP.T, L).T


def refit_through_inverse(Hinv: torch.Tensor, W: torch.Tensor, pruned_cols: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The exact refit for pruned columns ``P`` and its damped objective, from ``H⁻¹``.

    ``Ŵ = W − W_P (H⁻¹_PP)⁻¹ H⁻¹_{P,:}`` (zero on ``P``) is the same optimum as
    :func:`refit_columns` (which factors ``H_KK``), by the block inverse; with ``H⁻¹``
    at hand it costs one ``|P|×|P|`` Cholesky, shared with the objective ``½ tr(W_P (H⁻¹_PP)⁻¹ W_Pᵀ)``
    (:func:`mask_objective`), and one ``m×|P|×n`` product, against a ``|K|×|K|`` Cholesky and solve,
    which was a large share of SPAP's time (SPAP's solve is measured by ``python benchmarks/down_proj.py``;
    figures in ``docs/performance.md``).
    """
    if pruned_cols.numel() == 0:
        return 0.0, W.clone()
    WP, E = _pruned_correction(Hinv, W, pruned_cols)
    W_hat = W - E @ Hinv[pruned_cols]
    W_hat[:, pruned_cols] = 0.0  # exactly zero, not round-off
    return 0.5 * float((WP * E).sum()), W_hat


def mask_objective(Hinv: torch.Tensor, W: torch.Tensor, pruned_cols: torch.Tensor) -> float:
    """Damped objective of the exact refit for pruned columns ``P``: ``½ tr(W_P (H⁻¹_PP)⁻¹ W_Pᵀ)``.

    ``O(|P|³ + m|P|²)``, against ``O(|K|³ + m n²)`` for a refit followed by the quadratic form.
    """
    if pruned_cols.numel() == 0:
        return 0.0
    WP, E = _pruned_correction(Hinv, W, pruned_cols)
    return 0.5 * float((WP * E).sum())


def refit(problem: LayerProblem, keep: torch.Tensor) -> torch.Tensor:
    """Refit for the problem's structure: ``keep`` over groups (column structures) or over weights."""
    from .structure import ColumnGroups

    if isinstance(problem.structure, ColumnGroups):
        cols = problem.structure.column_keep_mask(keep, problem.shape[1])
        return refit_columns(problem, cols)
    return refit_rows(problem, keep)
