"""Exact 1-swap local search for per-weight masks (unstructured and N:M), row by row.

Given a mask, each row of ``W`` is improved on its own (the rows decouple for a fixed mask): a swap
restores one pruned weight ``i`` and prunes one kept weight ``j`` of the same row (N:M: of the same group
of ``m``), so every row keeps its count (and its N:M pattern).  Every swap's change of the row's exact
refit error is known in closed form, the best are applied while they lower it by more than ``rel_tol``
times the row's error, and a row stops at a table with no such swap: a 1-swap local optimum.
Derivation in ``docs/method.md`` §6.1.

State of one row, for its kept set ``K`` and pruned set ``P`` (``Q = (H_KK)⁻¹``, ``B = [(H⁻¹)_PP]⁻¹``,
the Schur complement ``H_PP − H_PK Q H_KP``)::

    T  = −H_PK Q = B (H⁻¹)_PK      (|P|, |K|)
    v  = B w_P = −g_P              (|P|,)   minus the refit's gradient g = (ŵ − w) H on P
    Bd = diag B                    (|P|,)
    c  = diag Q                    (|K|,)
    ŵ_K = w_K − Tᵀ w_P             (|K|,)   the exact refit;  error ½ w_Pᵀ v

These are the blocks of ``H`` swept on ``K`` (augmented with the target ``wᵀX``), so a swap is a sweep
in ``i`` and an unsweep in ``j``.  The error change of swapping ``(i, j)`` (slots ``a``, ``b``) is::

    Δ(a, b) = ½ (Bd_a ŵ_b² + 2 T_ab v_a ŵ_b − c_b v_a²) / (Bd_a c_b + T_ab²)

elementwise on ``T``: the table of every swap of a row costs ``O(|P||K|)``.  A swap updates ``T`` by a
rank-2 correction and the vectors, reading two vectors that are not stored: the column
``B_{P,i} = H_{P,i} + T H_{K,i}`` (``O(|P||K|)``) and the column ``Q_{K,j} = (H⁻¹)_{K,j} − (H⁻¹)_{K,P} T_{:,j}``
(``O(|P| n)`` in the kernel: whole rows of ``H⁻¹``), from the shared ``H`` and ``H⁻¹``.

Building the state costs ``O(min(|K|,|P|)² max(|K|,|P|))`` per row: the kept side
(Cholesky of ``H_KK``, ``T = −H_PK Q``) when ``|K| ≤ |P|``, the pruned side (Cholesky of ``(H⁻¹)_PP``,
``T = B (H⁻¹)_PK``) otherwise; rows are built in batches sorted by kept count, padded to the batch's
largest count (as :func:`solvers.refit.refit_rows`).  It is rebuilt every ``refresh`` swaps of a row to
bound the round-off of the rank updates, and the weights returned for a row that swapped are its exact
refit (:func:`solvers.refit.refit_rows`), not the updated state.

The search itself runs in a Numba kernel on CPU (one thread per row, each row's search to its end
without leaving the kernel: one fused pass per table, no table stored) or in torch on any device (every
row of a batch in lockstep: a ``(rows, |P|, |K|)`` table per step and batched rank-2 updates).  Both
choose the same swaps up to round-off; the kernel avoids the table's temporaries and the per-step
dispatch of many small operations (``python benchmarks/row_swaps.py --kernels`` times both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from ._linalg import cholesky
from .problem import LayerProblem
from .refit import refit_rows
from .swap import MAX_SWAPS
from .structure import NM, Unstructured
from .validation import InvalidArgumentError

# Swaps of one row between two rebuilds of its state from H and H⁻¹ (a rebuild costs as much as the
# first build; most rows of real layers end their search before it).
_REFRESH_EVERY = 128
# Upper bound on the entries of T (|P|×|K| per row) in one batch of rows; the build gathers about three
# more arrays of this size.
_CHUNK_ELEMENTS = 4_000_000
_CHUNK_ELEMENTS_CUDA = 64_000_000


@dataclass
class _RowState:
    """The swap state of a batch of rows (slots beyond a row's counts are padding: never read as real)."""

    rows: torch.Tensor  # (R,) row indices into W
    P: torch.Tensor  # (R, pmax) pruned column of each slot
    K: torch.Tensor  # (R, kmax) kept column of each slot
    pcount: torch.Tensor  # (R,)
    kcount: torch.Tensor  # (R,)
    T: torch.Tensor  # (R, pmax, kmax)
    v: torch.Tensor  # (R, pmax)
    Bd: torch.Tensor  # (R, pmax)
    c: torch.Tensor  # (R, kmax)
    wk: torch.Tensor  # (R, kmax) refit weights on K
    err: torch.Tensor  # (R,) the rows' refit errors, tracked through swaps
    side: str


def swap_delta(T, v, Bd, c, wk):
    """``Δ`` of the docstring above for broadcastable operands (the formula the Numba kernel uses too)."""
    return 0.5 * (Bd * wk * wk + 2.0 * T * v * wk - c * v * v) / (Bd * c + T * T)


class _Padded:
    """``H`` and ``H⁻¹`` extended by an identity block, so that padding slots index rows and columns
    that couple to nothing: kept padding slots take ``n, n+1, …``, pruned ones ``n + kpad, …``."""

    def __init__(self, H: torch.Tensor, Hinv: torch.Tensor, kpad: int, ppad: int) -> None:
        self.n, self.kpad, self.ppad = H.shape[0], kpad, ppad
        self.H0, self.Hinv0 = H.contiguous(), Hinv.contiguous()  # unpadded, for the Numba kernel
        extra = kpad + ppad
        eye = torch.eye(extra, dtype=H.dtype, device=H.device)
        self.H = torch.block_diag(H, eye) if extra else H
        self.Hinv = torch.block_diag(Hinv, eye) if extra else Hinv


def _build(pad: _Padded, W: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> tuple[_RowState, torch.Tensor]:
    """The state of ``rows`` for mask ``keep``, and their exact refit (R, n)."""
    n, dev = pad.n, W.device
    kr = keep[rows].sum(1)
    pr = n - kr
    kmax, pmax = int(kr.max()), int(pr.max())
    order = torch.argsort((~keep[rows]).to(torch.int8), dim=1, stable=True)  # kept columns first, ascending
    slot_k = torch.arange(kmax, device=dev)[None, :]
    slot_p = torch.arange(pmax, device=dev)[None, :]
    K = torch.where(slot_k < kr[:, None], order[:, :kmax], n + slot_k - kr[:, None])
    pos = (kr[:, None] + slot_p).clamp_max(n - 1)
    P = torch.where(slot_p < pr[:, None], order.gather(1, pos), n + pad.kpad + slot_p - pr[:, None])
    Hx, Hix = pad.H, pad.Hinv
    HPK = Hx[P[:, :, None], K[:, None, :]]  # (R, p, k)
    HinvPK = Hix[P[:, :, None], K[:, None, :]]
    if kmax <= pmax:  # kept side: factor H_KK, T = −H_PK Q
        side = "kept"
        L = cholesky(Hx[K[:, :, None], K[:, None, :]], what="the Gram matrix on a row's kept weights", hint="raise 'damp'")
        T = -torch.cholesky_solve(HPK.transpose(1, 2), L).transpose(1, 2).contiguous()
    else:  # pruned side: factor (H⁻¹)_PP, T = B (H⁻¹)_PK
        side = "pruned"
        L = cholesky(Hix[P[:, :, None], P[:, None, :]], what="the pruned block of the inverse Gram matrix")
        T = torch.cholesky_solve(HinvPK, L).contiguous()
    c = Hix[K, K] - (HinvPK * T).sum(1)
    Bd = Hx[P, P] + (T * HPK).sum(2)
    extra = pad.kpad + pad.ppad
    Wx = torch.cat([W[rows], W.new_zeros(rows.numel(), extra)], dim=1) if extra else W[rows]
    wP = Wx.gather(1, P)
    wk = Wx.gather(1, K) - torch.einsum("rpk,rp->rk", T, wP)
    W_hat = torch.zeros_like(Wx).scatter_(1, K, wk)
    v = ((Wx - W_hat) @ Hx).gather(1, P)
    err = 0.5 * (wP * v).sum(1)
    state = _RowState(rows, P, K, pr, kr, T, v, Bd, c, wk, err, side)
    return state, W_hat[:, :n]


def _chunks(rows: torch.Tensor, counts: torch.Tensor, n: int, budget: int):
    """``rows`` sorted by kept count, cut into batches whose padded ``T`` holds at most ``budget`` entries."""
    if rows.numel() == 0:
        return []
    rows = rows[torch.argsort(counts[rows], stable=True)]
    k = counts[rows].tolist()
    out, start = [], 0
    while start < len(k):
        stop = start + 1
        while stop < len(k) and (stop + 1 - start) * (n - k[start]) * k[stop] <= budget:
            stop += 1
        out.append(rows[start:stop])
        start = stop
    return out


# --- the search in torch (any device) ------------------------------------------------------------------


def _search_torch(s: _RowState, pad: _Padded, m: int, rel_tol: float, limit: torch.Tensor, batch: int):
    """Run every row of ``s`` to a 1-swap optimum or ``limit`` swaps; returns (swaps, done) per row.

    Rows advance in lockstep: one table of all rows per step, then up to ``batch`` swaps per row from its
    best entries (one per pruned slot, distinct kept slots), each re-evaluated on the updated state.
    """
    R, p, k = s.T.shape
    dev = s.T.device
    validP = torch.arange(p, device=dev)[None, :] < s.pcount[:, None]
    validK = torch.arange(k, device=dev)[None, :] < s.kcount[:, None]
    allowed0 = validP[:, :, None] & validK[:, None, :]
    swaps = torch.zeros(R, dtype=torch.long, device=dev)
    done = (s.pcount == 0) | (s.kcount == 0)
    r = torch.arange(R, device=dev)
    while True:
        act = ~done & (swaps < limit)
        if not bool(act.any()):
            break
        allowed = allowed0 if m == 0 else allowed0 & ((s.P // m)[:, :, None] == (s.K // m)[:, None, :])
        table = swap_delta(s.T, s.v[:, :, None], s.Bd[:, :, None], s.c[:, None, :], s.wk[:, None, :])
        best, bslot = table.masked_fill(~allowed, torch.inf).min(2)  # (R, p): the best kept slot per pruned slot
        vals, order = torch.sort(best, dim=1, stable=True)
        thr = -rel_tol * s.err.clamp_min(1e-300)
        improving = act & (vals[:, 0] < thr)
        done |= act & ~improving
        if not bool(improving.any()):
            continue
        used = torch.zeros(R, k, dtype=torch.bool, device=dev)
        for t in range(min(batch, p)):
            a = order[:, t]
            b = bslot[r, a]
            ok = improving & (vals[:, t] < thr) & ~used[r, b] & (swaps < limit)
            if not bool(ok.any()):
                continue
            d = swap_delta(s.T[r, a, b], s.v[r, a], s.Bd[r, a], s.c[r, b], s.wk[r, b])
            ok &= d < -rel_tol * s.err.clamp_min(1e-300)
            if not bool(ok.any()):
                continue
            _apply_torch(s, pad, a, b, ok, validP, validK)
            s.err += torch.where(ok, d, torch.zeros_like(d))
            swaps += ok.long()
            used[r, b] |= ok
    return swaps, done


def _apply_torch(s: _RowState, pad: _Padded, a: torch.Tensor, b: torch.Tensor, ok: torch.Tensor,
                 validP: torch.Tensor, validK: torch.Tensor) -> None:
    """Swap slot ``a`` (pruned ``i``, restored) with slot ``b`` (kept ``j``, pruned) in rows where ``ok``.

    A sweep in ``i`` then an unsweep in ``j``, fused into one rank-2 update of ``T``: with
    ``β = B_{P,i}``, ``τ = T_{a,:}`` (``τ_b := 1``), ``g = τ_b/Bd_a``, ``c' = c_b + τ_b g``,
    ``φ = T_{:,b} − β g`` and ``ψ = (Q_{K,j} + τ g)/c'`` (``Q_{jj} := 0``): ``T ← T − β τᵀ/Bd_a − φ ψᵀ`` off
    row ``a`` (column ``b`` zeroed first), and row ``a`` becomes ``ψ``.
    """
    R = a.numel()
    r = torch.arange(R, device=a.device)
    T, okf = s.T, ok.to(s.T.dtype)
    i, j = s.P[r, a], s.K[r, b]
    Ba, va, cb, wb = s.Bd[r, a], s.v[r, a], s.c[r, b], s.wk[r, b]
    tau = T[r, a, :].clone()
    taub = tau[r, b]
    col = T[r, :, b].clone()
    beta = pad.H[s.P, i[:, None]] + torch.bmm(T, pad.H[s.K, i[:, None]][:, :, None])[:, :, 0]
    spread = torch.zeros(R, pad.H.shape[0], dtype=T.dtype, device=T.device).scatter_(1, s.P, col * validP)
    qcol = pad.Hinv[s.K, j[:, None]] - (spread @ pad.Hinv).gather(1, s.K)  # Q_{K,j}
    g = taub / Ba
    c1 = cb + taub * g
    w1 = wb + g * va  # ŵ_j after restoring i
    tau[r, b] = 1.0
    qcol[r, b] = 0.0
    psi = (qcol + tau * g[:, None]) / c1[:, None] * validK
    phi = (col - beta * g[:, None]) * validP
    tau = tau * validK
    # T: zero column b, rank-2 update, then row a ← ψ (rows not ok: untouched).
    T[r, :, b] *= (1 - okf)[:, None]
    left = torch.stack([beta / Ba[:, None], phi], dim=2) * okf[:, None, None]  # (R, p, 2)
    T.baddbmm_(left, torch.stack([tau, psi], dim=1), alpha=-1.0)
    T[r, a, :] = torch.where(ok[:, None], psi, T[r, a, :])
    keepb = torch.ones_like(s.c)
    keepb[r, b] = 1 - okf
    c_new = s.c * keepb + okf[:, None] * (tau * tau / Ba[:, None] - psi * psi * c1[:, None])
    wk_new = s.wk * keepb + okf[:, None] * (tau * (va / Ba)[:, None] - psi * w1[:, None])
    v_new = s.v - okf[:, None] * (beta * (va / Ba)[:, None] + phi * (w1 / c1)[:, None])
    Bd_new = s.Bd + okf[:, None] * (phi * phi / c1[:, None] - beta * beta / Ba[:, None])
    v_new[r, a] = torch.where(ok, w1 / c1, v_new[r, a])
    Bd_new[r, a] = torch.where(ok, 1.0 / c1, Bd_new[r, a])
    s.c, s.wk, s.v, s.Bd = c_new, wk_new, v_new, Bd_new
    s.P[r, a] = torch.where(ok, j, i)
    s.K[r, b] = torch.where(ok, i, j)


def _search(s: _RowState, pad: _Padded, m: int, rel_tol: float, limit: torch.Tensor, batch: int, numba: bool):
    if not numba:
        return _search_torch(s, pad, m, rel_tol, limit, batch)
    swaps = torch.zeros(s.rows.numel(), dtype=torch.long)
    done = torch.zeros(s.rows.numel(), dtype=torch.bool)
    kernels.row_swap_search(s.T, s.v, s.Bd, s.c, s.wk, s.P, s.K, s.pcount, s.kcount, pad.H0, pad.Hinv0,
                            s.err, m, rel_tol, limit, batch, swaps, done)
    return swaps, done


def _write_mask(keep: torch.Tensor, s: _RowState) -> None:
    """Set ``keep`` on the rows of ``s`` from its slots."""
    n = keep.shape[1]
    R, k = s.K.shape
    mask = torch.zeros(R, n + 1, dtype=torch.bool, device=keep.device)
    validK = torch.arange(k, device=keep.device)[None, :] < s.kcount[:, None]
    mask.scatter_(1, torch.where(validK, s.K, n), True)
    keep[s.rows] = mask[:, :n]


def row_swap_search(
    problem: LayerProblem,
    keep: torch.Tensor,
    *,
    max_swaps: int = MAX_SWAPS,
    rel_tol: float = 1e-9,
    batch: int = 8,
    refresh: int = _REFRESH_EVERY,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Improve a per-weight mask row by row to a 1-swap local optimum of the exact refit error.

    Parameters
    ----------
    problem : LayerProblem
        Unstructured or N:M; the damped Gram matrix ``problem.hessian`` is the objective's.
    keep : BoolTensor of shape (d_out, d_in)
        The starting mask (any per-row counts; N:M: the pattern).  Each row keeps its count.
    max_swaps : int, default MAX_SWAPS (10000)
        Swaps per row at most.
    rel_tol : float, default 1e-9
        A swap must lower its row's error by more than ``rel_tol`` times that error.
    batch : int, default 8
        Swaps tried per table and row: the best entry of each pruned slot, best first, distinct kept slots,
        each re-evaluated exactly on the updated state (``O(1)`` per check) and applied if it still
        improves.  1 = best improvement.
    refresh : int, default 128
        Rebuild a row's state after this many swaps (round-off of the rank updates).
    kernel : {"auto", "numba", "torch"}
        The search: a Numba kernel for CPU tensors (``"auto"``) or batched torch (any device).

    Returns
    -------
    keep : BoolTensor of shape (d_out, d_in)
    W_hat : Tensor of shape (d_out, d_in), float64
        The exact refit of ``keep`` (:func:`solvers.refit.refit_rows`).
    stats : dict
        ``swaps`` (total), ``rows_swapped``, ``max_row_swaps``, ``local_optimum`` (every row ended at a table
        with no improving swap), ``rows_not_at_optimum``, ``error_before`` and ``error_after`` (damped
        objective of the refits of the start and the result), ``rebuilds`` (of one row's state), ``kernel`` and
        ``fallback_rows`` (rows put back to their start because round-off made them worse; never seen).
    """
    s = problem.structure
    if not isinstance(s, (Unstructured, NM)):
        raise InvalidArgumentError(f"row_swap_search takes unstructured and N:M problems; this one is {s!r}.")
    W, H = problem.W64, problem.hessian
    d_out, n = W.shape
    if keep.shape != W.shape or keep.dtype != torch.bool:
        raise InvalidArgumentError(f"The 'keep' argument of row_swap_search must be a boolean tensor of shape {tuple(W.shape)}.")
    if not (isinstance(batch, int) and batch >= 1 and isinstance(refresh, int) and refresh >= 1
            and isinstance(max_swaps, int) and max_swaps >= 0):
        raise InvalidArgumentError("row_swap_search needs ints batch >= 1, refresh >= 1 and max_swaps >= 0.")
    if isinstance(s, NM) and not bool((keep.reshape(d_out, -1, s.m).sum(-1) == s.n).all()):
        raise InvalidArgumentError(f"The 'keep' argument of row_swap_search must keep {s.n} of every {s.m} weights ({s!r}).")
    use_numba = kernels.use_numba(kernel, W)
    m = s.m if isinstance(s, NM) else 0
    start_keep = keep.to(W.device)
    keep = start_keep.clone()
    counts = keep.sum(1)
    rows = torch.nonzero((counts > 0) & (counts < n)).flatten()
    budget = _CHUNK_ELEMENTS_CUDA if W.is_cuda else _CHUNK_ELEMENTS
    chunks = _chunks(rows, counts, n, budget)
    kpad = max((int(counts[c].max() - counts[c].min()) for c in chunks), default=0)
    pad = _Padded(H, problem.hessian_inverse, kpad, kpad)  # the pruned counts of a batch spread as far
    W_start = torch.where(keep, W, torch.zeros_like(W))  # rows without a search: their refit is this
    row_swaps = torch.zeros(d_out, dtype=torch.long, device=W.device)
    optimal = torch.ones(d_out, dtype=torch.bool, device=W.device)
    rebuilds = 0
    for chunk in chunks:
        pending, first = chunk, True
        while pending.numel():
            state, W_fit = _build(pad, W, keep, pending)
            if first:
                W_start[pending] = W_fit
                first = False
            else:
                rebuilds += pending.numel()
            left = max_swaps - row_swaps[pending]
            made, done = _search(state, pad, m, rel_tol, left.clamp_max(refresh), batch, use_numba)
            made, done = made.to(W.device), done.to(W.device)
            _write_mask(keep, state)
            row_swaps[pending] += made
            optimal[pending] = done
            pending = pending[~done & (made < left)]
    swapped = row_swaps > 0
    W_hat = W_start.clone()
    if bool(swapped.any()):
        # Exact weights for the rows that moved: refit_rows skips rows that keep everything.
        refit_keep = keep.clone()
        refit_keep[~swapped] = True
        W_hat[swapped] = refit_rows(problem, refit_keep)[swapped]
    e_start, e_end = _row_errors(W_start, W, H), _row_errors(W_hat, W, H)
    worse = swapped & (e_end > e_start * (1 + 1e-9) + 1e-300)
    if bool(worse.any()):  # round-off in the rank updates; never return a row worse than its start
        keep[worse], W_hat[worse], e_end[worse] = start_keep[worse], W_start[worse], e_start[worse]
        row_swaps[worse] = 0
    stats = {
        "swaps": int(row_swaps.sum()),
        "rows_swapped": int((row_swaps > 0).sum()),
        "max_row_swaps": int(row_swaps.max()) if d_out else 0,
        "local_optimum": bool(optimal.all()),
        "rows_not_at_optimum": int((~optimal).sum()),
        "error_before": float(e_start.sum()),
        "error_after": float(e_end.sum()),
        "rebuilds": rebuilds,
        "kernel": "numba" if use_numba else "torch",
        "fallback_rows": int(worse.sum()),
    }
    return keep, W_hat, stats


def _row_errors(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``½ (ŵ_r − w_r) H (ŵ_r − w_r)ᵀ`` of every row, shape (d_out,)."""
    D = W_hat - W
    return 0.5 * ((D @ H) * D).sum(1)


__all__ = ["row_swap_search", "swap_delta"]
