"""Exact 1-swap local search over column groups.

Given a kept/pruned partition of equal-sized column groups, repeatedly apply the swap (restore one
pruned group ``p``, prune one kept group ``q``) that lowers the exact refit error the most, until no swap
lowers it: the result is a 1-swap local optimum.  Every swap is evaluated *exactly* in closed form and
the state is updated by rank-``d`` corrections (``d`` = group size), so one swap costs
``O(n²d + m n d)`` instead of the ``O(n³)`` of a refit.  Derivation in ``docs/method.md`` §4.

State, for kept columns ``K`` (always including the columns of no group) and pruned groups ``P``,
with ``Kinv = (H_KK)⁻¹`` embedded in zeros (never formed: see below):

- ``W_hat`` (m, n): the exact refit for ``K``; ``GP`` (m, |P|d): the pruned columns of its gradient
  ``G = (W_hat − W) H`` (which is zero on ``K``),
- ``U``  (|P|d, n): ``H[P, :] Kinv``,  ``A`` (|P|d, n): ``G[:, P]ᵀ W_hat``,
- ``HinvP`` (|P|d, n): ``H⁻¹[P, :]``, rows in the same slot order as ``U``.

By the block inverse, ``H_PK (H_KK)⁻¹ = −(H⁻¹_PP)⁻¹ H⁻¹_PK``, so ``U_K = −(H⁻¹_PP)⁻¹ H⁻¹_PK`` and
``Kinv_{:,K} = H⁻¹_{:,K} − H⁻¹_{:,P} (H⁻¹_PP)⁻¹ H⁻¹_PK = H⁻¹_{:,K} + HinvPᵀ U_{:,K}`` (zero on ``P``).  The
swap search reads ``Kinv`` only as a few columns per swap and the diagonal blocks of the kept groups per
table, so both are formed from ``HinvP`` and ``U`` in ``O(|P| d n)``, instead of keeping the ``n×n``
``Kinv`` up to date with a rank update per swap (it would be the largest matrix of the state; the
search is timed by ``python benchmarks/down_proj.py``, figures in ``docs/performance.md``).

With ``S_p = H_pp − U_p H[:, p]`` (Schur complement), ``X = S_p⁻¹ U_pq``::

    Δ(p, q) = −½ tr(S_p⁻¹ G_pᵀG_p) + ½ tr((Kinv_qq + U_pqᵀ X)⁻¹ (W_qᵀW_q + A_pqᵀX + XᵀA_pq + XᵀG_pᵀG_p X))

All of it is batched torch (CPU or CUDA) in float64.
"""

from __future__ import annotations

import torch

from . import kernels
from ._linalg import cholesky, inverse_from_cholesky, spd_inverse
from .problem import LayerProblem
from .refit import mask_objective, refit_through_inverse

# Swaps between two rebuilds of the state from H⁻¹.  The rank updates drift little: on SmolLM2 down_proj
# layers the tracked error after 29-74 swaps with no rebuild matched the exact refit error to 2.2e-16
# (relative; the command is in docs/performance.md), so a rebuild, which costs as much as many swaps,
# is only a bound for long searches.
_REFRESH_EVERY = 128

# Swaps allowed in one search from a solver (column groups: in all; rows: per row).  The column search
# makes tens of swaps on SmolLM2's down_proj layers (29-74 from SPAP's start, 43-109 from ADMM's; the
# commands are in docs/performance.md and docs/results.md), so the bound only stops a runaway search.
MAX_SWAPS = 10_000


def pruned_cost(group_cost: torch.Tensor | None, keep_groups: torch.Tensor) -> float:
    """``Σ_{p pruned} group_cost[p]``: the cost per pruned group added to a column objective (0 without one)."""
    return 0.0 if group_cost is None else float(group_cost[~keep_groups].sum())


class _ColumnState:
    def __init__(self, H: torch.Tensor, W: torch.Tensor, groups: torch.Tensor, keep_groups: torch.Tensor,
                 Hinv: torch.Tensor, kernel: str = "auto") -> None:
        self.H, self.W, self.groups, self.Hinv = H, W, groups, Hinv
        self.numba = kernels.use_numba(kernel, W)
        self.d = groups.shape[1]
        self.reset(keep_groups)

    def reset(self, keep_groups: torch.Tensor) -> None:
        """Build the state for a partition from ``H⁻¹`` alone (all products, no ``n×n`` factorization).

        With ``B = (H⁻¹_PP)⁻¹`` and ``T = B H⁻¹_{P,:}``: ``U = H_{P,:} Kinv = −T`` off ``P``,
        ``Ŵ = W − W_P T`` (OBS) and ``G_P = (Ŵ − W) H_{:,P} = −W_P B``.
        """
        W, Hinv = self.W, self.Hinv
        self.keep_groups = keep_groups.clone()
        self.pruned = torch.nonzero(~keep_groups).flatten()  # group ids; slot i holds pruned[i]
        Pc = self.pcols()
        self.HinvP = Hinv[Pc]  # (|P|d, n), a copy: rows are replaced as groups are swapped
        B = spd_inverse(self.HinvP[:, Pc], what="the pruned block of the inverse Gram matrix")
        T = B @ self.HinvP  # (|P|d, n)
        self.U = -T
        self.U[:, Pc] = 0
        self.W_hat = W - W[:, Pc] @ T
        self.W_hat[:, Pc] = 0
        self.GP = -W[:, Pc] @ B  # (m, |P|d), in slot order
        self.A = self.GP.T @ self.W_hat
        self.reset_error = -0.5 * float((W[:, Pc] * self.GP).sum())  # ½ tr(W_P B W_Pᵀ)

    def pcols(self) -> torch.Tensor:
        return self.groups[self.pruned].flatten()

    def kinv_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """``Kinv[:, cols]`` for kept columns ``cols``, shape ``(n, len(cols))``: ``H⁻¹_{:,c} + HinvPᵀ U_{:,c}``."""
        out = self.Hinv[:, cols] + self.HinvP.T @ self.U[:, cols]
        out[self.pcols()] = 0  # exact in theory; removes round-off
        return out

    def kinv_blocks(self, Kidx: torch.Tensor) -> torch.Tensor:
        """The diagonal blocks ``Kinv[Kidx[j], Kidx[j]]`` of kept groups ``Kidx`` (r, d), shape ``(r, d, d)``."""
        if Kidx.shape[1] == 1:
            c = Kidx[:, 0]
            return (self.Hinv[c, c] + (self.HinvP[:, c] * self.U[:, c]).sum(0))[:, None, None]
        return (self.Hinv[Kidx[:, :, None], Kidx[:, None, :]]
                + torch.einsum("pra,prb->rab", self.HinvP[:, Kidx], self.U[:, Kidx]))

    def error(self) -> float:
        """``½ tr((Ŵ−W) H (Ŵ−W)ᵀ)`` recomputed from scratch (tests; ``O(m n²)``)."""
        D = self.W_hat - self.W
        return 0.5 * float(((D @ self.H) * D).sum())

    # --- swap table --------------------------------------------------------------------------------

    def deltas(self, slots: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Exact error change ``Δ(p, q)`` of every swap, shape ``(len(slots), len(kept))``.

        ``slots`` index ``pruned`` (default: all); ``kept`` are kept group ids (default: all).
        """
        H, d = self.H, self.d
        every_slot = slots is None
        if every_slot:
            slots = torch.arange(self.pruned.numel(), device=self.pruned.device)
        if kept is None:
            kept = torch.nonzero(self.keep_groups).flatten()
        k = slots.numel()
        Pidx = self.groups[self.pruned[slots]]  # (k, d)
        Kidx = self.groups[kept]  # (r, d)
        rows = (slots[:, None] * d + torch.arange(d, device=slots.device)).flatten()  # rows of U, A; cols of GP
        # The whole table reads the state in place; gathering it would copy U and A (|P|d×n each).
        U, A, GP = (self.U, self.A, self.GP) if every_slot else (self.U[rows], self.A[rows], self.GP[:, rows])
        if d == 1:
            # Channels: every block is a scalar; plain reductions (einsum takes a slow path here).
            P, K = Pidx[:, 0], Kidx[:, 0]
            s = H[P, P] - (U * H[P]).sum(1)
            gg = GP.square().sum(0)
            ww = self.W_hat[:, K].square().sum(0)
            kdiag = self.kinv_blocks(Kidx)[:, 0, 0]
            if self.numba:  # one fused pass instead of ~10 table-sized temporaries
                return kernels.channel_swap_table(self.U, self.A, rows, K, s, gg, ww, kdiag)
            u, a = U[:, K], A[:, K]
            X = u / s[:, None]
            kq = kdiag[None, :] + u * X
            num = ww[None, :] + 2 * a * X + X * X * gg[:, None]
            return 0.5 * (num / kq) - 0.5 * (gg / s)[:, None]
        Ub = U.reshape(k, d, -1)
        Ab = A.reshape(k, d, -1)
        Hp = H[:, Pidx]  # (n, k, d)
        S = H[Pidx[:, :, None], Pidx[:, None, :]] - torch.einsum("kan,nkb->kab", Ub, Hp)
        Gp = GP.reshape(-1, k, d)  # (m, k, d)
        GG = torch.einsum("mka,mkb->kab", Gp, Gp)
        Wq = self.W_hat[:, Kidx]  # (m, r, d)
        WW = torch.einsum("mra,mrb->rab", Wq, Wq)
        Kqq = self.kinv_blocks(Kidx)  # (r, d, d)
        U4 = Ub[:, :, Kidx].permute(0, 2, 1, 3)  # (k, r, d, d)
        A4 = Ab[:, :, Kidx].permute(0, 2, 1, 3)
        Sinv = spd_inverse(S, what="a Schur complement in the swap search")
        X = Sinv[:, None] @ U4
        kq = Kqq[None] + U4.transpose(-1, -2) @ X
        quad = WW[None] + A4.transpose(-1, -2) @ X + X.transpose(-1, -2) @ A4
        quad = quad + X.transpose(-1, -2) @ GG[:, None] @ X
        kq = 0.5 * (kq + kq.transpose(-1, -2))
        gain = 0.5 * torch.einsum("kab,kba->k", Sinv, GG)
        trace = torch.cholesky_solve(quad, cholesky(kq, what="a kept block in the swap search"))
        return 0.5 * trace.diagonal(dim1=-2, dim2=-1).sum(-1) - gain[:, None]

    def improving_swaps(self, threshold: float, batch: int,
                        group_cost: torch.Tensor | None = None) -> list[tuple[float, int, int]]:
        """Up to ``batch`` disjoint swaps ``(Δ, slot, q)`` with ``Δ < threshold``, best first (``Δ`` with
        ``group_cost[q] − group_cost[p]`` added when a cost per pruned group is given)."""
        kept = torch.nonzero(self.keep_groups).flatten()
        table = self.deltas(None, kept)
        if group_cost is not None:
            table = table + (group_cost[kept][None, :] - group_cost[self.pruned][:, None])
        r = kept.numel()
        n_best = min(table.numel(), 8 * batch)
        values, flat = torch.topk(table.flatten(), n_best, largest=False)
        picked: list[tuple[float, int, int]] = []
        used_slots, used_q = set(), set()
        for value, f in zip(values.tolist(), flat.tolist()):
            if not value < threshold or len(picked) == batch:
                break
            pos, q = f // r, int(kept[f % r])
            if pos in used_slots or q in used_q:
                continue
            used_slots.add(pos)
            used_q.add(q)
            picked.append((value, pos, q))
        return picked

    # --- updates -----------------------------------------------------------------------------------

    def apply_swap(self, pos: int, q: int) -> None:
        """Restore the group in slot ``pos`` and prune kept group ``q`` into the same slot.

        Two exact steps, each a rank-``d`` update of the state: restoring ``p`` (a Newton step in the
        Schur complement ``S_p = H_pp − U_p H_{:,p}``) with ``Z₁ = [−U_pᵀ; I at p]``, ``M₁ = S_p⁻¹``, then
        pruning ``q`` (the OBS step) with ``Z₂ = Kinv'_{:,q}``, ``M₂ = −(Kinv'_qq)⁻¹``, where ``'`` marks the
        state after the first step.  Every update has the form ``Kinv += Z M Zᵀ`` (in theory: ``Kinv`` is
        not stored, and ``Kinv_{:,q}`` is formed from ``HinvP`` and ``U``), ``Ŵ += c Zᵀ``, ``G += c (H Z)ᵀ``
        (with ``(H Z)_P`` in closed form: ``H Z`` vanishes on the kept rows) and the matching rows of ``U``
        and ``A``; the slot's row of ``HinvP`` becomes ``H⁻¹_{q,:}``.  The few columns of the intermediate state that the second step
        reads are formed from the first step's factors, so each large matrix is updated once, by a
        rank-``2d`` product: the updates are memory-bound, and this halves their traffic (the search is
        timed by ``python benchmarks/down_proj.py``; figures in ``docs/performance.md``).
        """
        d = self.d
        p = int(self.pruned[pos])
        pc, qc = self.groups[p], self.groups[q]
        slot = slice(pos * d, (pos + 1) * d)
        # Step 1 factors: restore p.
        Hpc = self.H[:, pc]  # (n, d); gathering H[P] first would copy |P|×n
        HZ1 = Hpc[self.pcols()] - self.U @ Hpc  # (H Z₁)_P, (|P|d, d)
        M1 = spd_inverse(HZ1[slot], what="a Schur complement in the swap search")
        Z1 = -self.U[slot].T.clone()
        Z1[pc] = torch.eye(d, dtype=Z1.dtype, device=Z1.device)
        c1 = -self.GP[:, slot] @ M1  # (m, d)
        # Step 2 factors from the state after step 1, read through step 1's factors.
        Z1q = Z1[qc]  # (d, d)
        Kq = self.kinv_columns(qc)  # Kinv_{:,q} before the swap, (n, d)
        Zq = Kq + Z1 @ (M1 @ Z1q.T)  # Kinv'_{:,q}, (n, d)
        Kqq_inv = spd_inverse(Kq[qc] + Z1q @ M1 @ Z1q.T, what="a kept block in the swap search")
        Uq1 = self.U[:, qc] + HZ1 @ (M1 @ Z1q.T)  # U'_{:,q} = (H Z₂)_P, (|P|d, d)
        c2 = -(self.W_hat[:, qc] + c1 @ Z1q.T) @ Kqq_inv  # −Ŵ'_q (Kinv'_qq)⁻¹, (m, d)
        # Products with Ŵ and G before any change; step 2's are corrected for step 1.
        cW1, Gc1 = c1.T @ self.W_hat, self.GP.T @ c1
        cW2 = c2.T @ self.W_hat + (c2.T @ c1) @ Z1.T  # c₂ᵀŴ'
        Gc2 = self.GP.T @ c2 + HZ1 @ (c1.T @ c2)  # G'_Pᵀ c₂
        ZT = torch.cat([Z1, Zq], dim=1).T.contiguous()  # (2d, n)
        self.A.addmm_(torch.cat([Gc1 + HZ1 @ (c1.T @ c1), HZ1, Gc2 + Uq1 @ (c2.T @ c2), Uq1], dim=1),
                      torch.cat([ZT[:d], cW1, ZT[d:], cW2], dim=0))
        self.U.addmm_(torch.cat([HZ1 @ M1, -Uq1 @ Kqq_inv], dim=1), ZT)
        self.W_hat.addmm_(torch.cat([c1, c2], dim=1), ZT)
        self.GP.addmm_(torch.cat([c1, c2], dim=1), torch.cat([HZ1, Uq1], dim=1).T)
        self.W_hat[:, qc] = 0  # exact in theory; removes round-off
        self.keep_groups[p] = True
        self.keep_groups[q] = False
        self.pruned[pos] = q
        self.HinvP[slot] = self.Hinv[qc]
        self.GP[:, slot] = c2  # G_q = c₂ (H Kinv')_{q,q} = c₂
        # U_q = H_{q,:} Kinv'' without touching Kinv'': H_{q,:} Kinv' = E_q, so
        # U_q = E_q − (Kinv'_qq)⁻¹ Kinv'_{q,:}, which vanishes on q's columns.
        Uq = -(Kqq_inv @ Zq.T)
        Uq[:, qc] = 0
        self.U[slot] = Uq
        self.A[slot] = c2.T @ self.W_hat


def swap_search(
    H: torch.Tensor,
    W: torch.Tensor,
    groups: torch.Tensor,
    keep_groups: torch.Tensor,
    *,
    max_swaps: int = 1000,
    rel_tol: float = 1e-9,
    batch: int = 8,
    Hinv: torch.Tensor | None = None,
    kernel: str = "auto",
    group_cost: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Exact 1-swap local search: best swap first, then up to ``batch − 1`` more per table.

    Parameters
    ----------
    H : Tensor of shape (n, n), float64
        The (damped) Gram matrix.
    W : Tensor of shape (m, n), float64
        The dense weight.
    groups : LongTensor of shape (g, d)
        Column indices of each group (equal sizes).
    keep_groups : BoolTensor of shape (g,)
        The starting partition.
    max_swaps : int
        Stop after this many swaps even if an improving swap remains.
    rel_tol : float
        A swap must lower the error by more than ``rel_tol`` times the current error.
    batch : int
        Swaps tried per table of all ``Δ(p, q)``: the table costs about as much as a swap, and most of
        its best disjoint entries still improve after the first is applied.  1 = best improvement.
    Hinv : Tensor of shape (n, n), optional
        ``H⁻¹`` when the caller has it; computed here otherwise.
    kernel : {"auto", "numba", "torch"}
        The swap table for single-column groups: a fused Numba kernel on CPU (``"auto"``) or torch.
    group_cost : Tensor of shape (g,), float64, optional
        A cost added to the objective for each pruned group: the search minimizes the refit error plus
        ``Σ_{p pruned} group_cost[p]`` (a swap changes it by ``group_cost[q] − group_cost[p]``).

    Returns
    -------
    keep_groups : BoolTensor of shape (g,)
    stats : dict with ``swaps``, ``local_optimum`` (no improving swap remained) and ``errors`` (the
        objective after each swap, the cost included).
    """
    if bool(keep_groups.all()) or not bool(keep_groups.any()):
        return keep_groups.clone(), {"swaps": 0, "local_optimum": True, "errors": []}
    if Hinv is None:
        Hinv = inverse_from_cholesky(cholesky(H, what="the Gram matrix", hint="raise 'damp'"))
    state = _ColumnState(H, W, groups, keep_groups, Hinv, kernel)
    err = state.reset_error + pruned_cost(group_cost, state.keep_groups)
    errors = [err]
    swaps, local_optimum, tables = 0, False, 0
    while swaps < max_swaps:
        # One table, then up to `batch` disjoint swaps from its best entries: the first is the best
        # swap; each later one is re-evaluated exactly on the updated state and applied only if it
        # still improves.  The loop ends on a table with no improving swap: a 1-swap local optimum.
        candidates = state.improving_swaps(-rel_tol * max(err, 1e-300), batch, group_cost)
        tables += 1
        if not candidates:
            local_optimum = True
            break
        for i, (delta, pos, q) in enumerate(candidates):
            if swaps >= max_swaps:
                break
            if i > 0:
                delta = float(state.deltas(torch.tensor([pos], device=H.device), torch.tensor([q], device=H.device))[0, 0])
                if group_cost is not None:
                    delta += float(group_cost[q] - group_cost[state.pruned[pos]])
                if not delta < -rel_tol * max(err, 1e-300):
                    continue
            state.apply_swap(pos, q)
            swaps += 1
            if swaps % _REFRESH_EVERY == 0:
                state.reset(state.keep_groups)  # bound the round-off of the rank updates
                err = state.reset_error + pruned_cost(group_cost, state.keep_groups)
            else:
                err += delta
            errors.append(err)
    return state.keep_groups.clone(), {"swaps": swaps, "tables": tables, "local_optimum": local_optimum, "errors": errors}


def swap_then_refit(
    problem: LayerProblem,
    keep_groups: torch.Tensor,
    *,
    max_swaps: int = MAX_SWAPS,
    kernel: str = "auto",
    start_error: float | None = None,
    group_cost: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Finish a column-group mask: :func:`swap_search` from ``keep_groups``, then the exact refit.

    The result is never worse than the start: if round-off in the search's rank updates makes the
    refit of its mask worse than the start's, the start is kept (``stats["fallback"]`` says so).
    Groups of unequal size are not searched (``stats["swap_skipped"]``); the start is refit.

    Parameters
    ----------
    problem : LayerProblem
        A column-group problem.
    keep_groups : BoolTensor of shape (n_groups,)
        The starting mask (True = kept).
    max_swaps : int, default MAX_SWAPS
        Bound on the swaps of the search.
    kernel : {"auto", "numba", "torch"}
        Passed to :func:`swap_search`.
    start_error : float, optional
        The start's objective (its damped refit error, plus its pruned groups' ``group_cost``) when the
        caller has it; computed here otherwise.
    group_cost : Tensor of shape (n_groups,), optional
        A cost per pruned group added to the objective (see :func:`swap_search`).

    Returns
    -------
    W_hat : Tensor of shape (m, n), float64
        The exact refit for the returned mask (zero on its pruned columns).
    keep_groups : BoolTensor of shape (n_groups,)
    stats : dict with ``swaps``, ``local_optimum`` (not for groups of unequal size) and, when searched,
        ``swap_errors``.
    """
    s = problem.structure
    W, Hinv = problem.W64, problem.hessian_inverse
    n_pruned = int((~keep_groups).sum())
    stats: dict = {}
    keep = keep_groups
    if s.group_size is not None and 0 < n_pruned < s.n_groups:
        keep, found = swap_search(problem.hessian, W, s.index(W.device), keep_groups, max_swaps=max_swaps,
                                  Hinv=Hinv, kernel=kernel, group_cost=group_cost)
        stats.update(swaps=found["swaps"], local_optimum=found["local_optimum"], swap_errors=found["errors"])
    elif s.group_size is None:
        stats.update(swaps=0, swap_skipped="groups of unequal size")
    else:  # every group kept or every group pruned: no swap exists
        stats.update(swaps=0, local_optimum=True, swap_skipped="nothing to swap")
    final, W_hat = refit_through_inverse(Hinv, W, s.columns(~keep))
    if "swap_skipped" in stats:  # the start itself was refit: nothing to compare
        return W_hat, keep, stats
    if start_error is None:
        start_error = mask_objective(Hinv, W, s.columns(~keep_groups)) + pruned_cost(group_cost, keep_groups)
    final += pruned_cost(group_cost, keep)
    if final > start_error * (1 + 1e-9):  # round-off in the rank updates; never return worse
        stats["fallback"] = f"swap result {final:.6g} above its start {start_error:.6g}; start kept"
        keep = keep_groups.clone()
        _, W_hat = refit_through_inverse(Hinv, W, s.columns(~keep))
    return W_hat, keep, stats
