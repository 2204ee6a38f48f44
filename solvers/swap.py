"""Exact 1-swap local search over column groups.

Given a kept/pruned partition of equal-sized column groups, repeatedly apply the swap (restore one
pruned group ``p``, prune one kept group ``q``) that lowers the exact refit error the most, until no swap
lowers it: the result is a 1-swap local optimum.  Every swap is evaluated *exactly* in closed form and
the state is updated by rank-``d`` corrections (``d`` = group size), so one swap costs
``O(n²d + m n d)`` instead of the ``O(n³)`` of a refit.  Derivation in ``docs/method.md`` §4.

State, for kept columns ``K`` (always including the columns of no group) and pruned groups ``P``:

- ``Kinv``  (n, n): ``(H_KK)⁻¹`` embedded in zeros,
- ``W_hat`` (m, n): the exact refit for ``K``; ``G = (W_hat − W) H`` its gradient (zero on ``K``),
- ``U``  (|P|d, n): ``H[P, :] Kinv``,  ``A`` (|P|d, n): ``G[:, P]ᵀ W_hat``.

With ``S_p = H_pp − U_p H[:, p]`` (Schur complement), ``X = S_p⁻¹ U_pq``::

    Δ(p, q) = −½ tr(S_p⁻¹ G_pᵀG_p) + ½ tr((Kinv_qq + U_pqᵀ X)⁻¹ (W_qᵀW_q + A_pqᵀX + XᵀA_pq + XᵀG_pᵀG_p X))

All of it is batched torch (CPU or CUDA) in float64.
"""

from __future__ import annotations

import torch

from ._linalg import cholesky, spd_inverse

_REFRESH_EVERY = 32


class _ColumnState:
    def __init__(self, H: torch.Tensor, W: torch.Tensor, groups: torch.Tensor, keep_groups: torch.Tensor) -> None:
        self.H, self.W, self.groups = H, W, groups
        self.d = groups.shape[1]
        self.reset(keep_groups)

    def reset(self, keep_groups: torch.Tensor) -> None:
        H, W = self.H, self.W
        n = H.shape[0]
        self.keep_groups = keep_groups.clone()
        self.pruned = torch.nonzero(~keep_groups).flatten()  # group ids, in a fixed order
        keep_cols = torch.ones(n, dtype=torch.bool, device=H.device)
        keep_cols[self.groups[self.pruned].flatten()] = False
        K = torch.nonzero(keep_cols).flatten()
        L = cholesky(H[K][:, K], what="the Gram matrix on the kept columns", hint="raise 'damp'")
        self.Kinv = torch.zeros_like(H)
        self.Kinv[K[:, None], K[None, :]] = torch.cholesky_inverse(L)
        Pc = self.pcols()
        self.W_hat = W.clone()
        self.W_hat[:, Pc] = 0
        self.W_hat[:, K] += torch.cholesky_solve(H[K][:, Pc] @ W[:, Pc].T, L).T
        self.G = (self.W_hat - W) @ H
        self.U = H[Pc] @ self.Kinv
        self.A = self.G[:, Pc].T @ self.W_hat

    def pcols(self) -> torch.Tensor:
        return self.groups[self.pruned].flatten()

    def error(self) -> float:
        D = self.W_hat - self.W
        return 0.5 * float(((D @ self.H) * D).sum())

    # --- swap table --------------------------------------------------------------------------------

    def best_swap(self) -> tuple[float, int, int]:
        """(Δ, index into ``pruned``, kept group id) of the best swap."""
        H, d = self.H, self.d
        kept = torch.nonzero(self.keep_groups).flatten()
        k, r = self.pruned.numel(), kept.numel()
        Pidx = self.groups[self.pruned]  # (k, d)
        Kidx = self.groups[kept]  # (r, d)
        if d == 1:
            # Channels: every block is a scalar; plain reductions (einsum takes a slow path here).
            P, K = Pidx[:, 0], Kidx[:, 0]
            s = H[P, P] - (self.U * H[P]).sum(1)
            gg = self.G[:, P].square().sum(0)
            ww = self.W_hat[:, K].square().sum(0)
            u, a = self.U[:, K], self.A[:, K]
            X = u / s[:, None]
            kq = self.Kinv[K, K][None, :] + u * X
            num = ww[None, :] + 2 * a * X + X * X * gg[:, None]
            delta = 0.5 * (num / kq) - 0.5 * (gg / s)[:, None]
        else:
            Ub = self.U.reshape(k, d, -1)
            Ab = self.A.reshape(k, d, -1)
            Hp = H[:, Pidx]  # (n, k, d)
            S = H[Pidx[:, :, None], Pidx[:, None, :]] - torch.einsum("kan,nkb->kab", Ub, Hp)
            Gp = self.G[:, Pidx]  # (m, k, d)
            GG = torch.einsum("mka,mkb->kab", Gp, Gp)
            Wq = self.W_hat[:, Kidx]  # (m, r, d)
            WW = torch.einsum("mra,mrb->rab", Wq, Wq)
            Kqq = self.Kinv[Kidx[:, :, None], Kidx[:, None, :]]  # (r, d, d)
            Upq = Ub[:, :, Kidx]  # (k, d, r, d)
            Apq = Ab[:, :, Kidx]
            Sinv = spd_inverse(S, what="a Schur complement in the swap search")
            U4 = Upq.permute(0, 2, 1, 3)  # (k, r, d, d)
            A4 = Apq.permute(0, 2, 1, 3)
            X = Sinv[:, None] @ U4
            kq = Kqq[None] + U4.transpose(-1, -2) @ X
            quad = WW[None] + A4.transpose(-1, -2) @ X + X.transpose(-1, -2) @ A4
            quad = quad + X.transpose(-1, -2) @ GG[:, None] @ X
            kq = 0.5 * (kq + kq.transpose(-1, -2))
            gain = 0.5 * torch.einsum("kab,kba->k", Sinv, GG)
            delta = 0.5 * torch.cholesky_solve(quad, cholesky(kq, what="a kept block in the swap search")).diagonal(
                dim1=-2, dim2=-1
            ).sum(-1) - gain[:, None]
        flat = int(torch.argmin(delta))
        return float(delta.flatten()[flat]), flat // r, int(kept[flat % r])

    # --- updates -----------------------------------------------------------------------------------

    def _rank_update(self, Z: torch.Tensor, M: torch.Tensor, c: torch.Tensor) -> None:
        """``Kinv += Z M Zᵀ``, ``W_hat += c Zᵀ``, ``G += c (H Z)ᵀ`` and the rows of ``U`` and ``A``.

        In place (``addmm_``): the update is memory-bound, and temporaries of the size of ``Kinv`` would
        double its traffic.
        """
        HZ = self.H @ Z  # (n, d)
        HZr = HZ[self.pcols()]  # (|P|d, d)
        cW = c.T @ self.W_hat  # (d, n), before W_hat changes
        ZT = Z.T.contiguous()
        Gc = self.G[:, self.pcols()].T @ c  # (|P|d, d), before G changes
        self.A.addmm_(Gc + HZr @ (c.T @ c), ZT).addmm_(HZr, cW)
        self.U.addmm_(HZr @ M, ZT)
        self.Kinv.addmm_(Z @ M, ZT)
        self.W_hat.addmm_(c, ZT)
        self.G.addmm_(c, HZ.T)

    def apply_swap(self, pos: int, q: int) -> None:
        d = self.d
        p = int(self.pruned[pos])
        pc = self.groups[p]
        # 1. Restore p: Newton step in the Schur complement.
        Up = self.U[pos * d : (pos + 1) * d]  # (d, n)
        S = self.H[pc][:, pc] - Up @ self.H[:, pc]
        M = spd_inverse(S, what="a Schur complement in the swap search")
        Z = -Up.T.clone()
        Z[pc] = torch.eye(d, dtype=Z.dtype, device=Z.device)
        c = -self.G[:, pc] @ M
        self._rank_update(Z, M, c)
        keep_rows = torch.ones(self.U.shape[0], dtype=torch.bool, device=self.U.device)
        keep_rows[pos * d : (pos + 1) * d] = False
        self.U, self.A = self.U[keep_rows], self.A[keep_rows]
        self.pruned = torch.cat([self.pruned[:pos], self.pruned[pos + 1 :]])
        self.keep_groups[p] = True
        # 2. Prune q: the OBS step.
        qc = self.groups[q]
        Zq = self.Kinv[:, qc].clone()
        Kqq_inv = spd_inverse(self.Kinv[qc][:, qc], what="a kept block in the swap search")
        self._rank_update(Zq, -Kqq_inv, -self.W_hat[:, qc] @ Kqq_inv)
        self.W_hat[:, qc] = 0  # exact in theory; removes round-off
        self.keep_groups[q] = False
        self.pruned = torch.cat([self.pruned, torch.tensor([q], device=self.pruned.device)])
        self.U = torch.cat([self.U, self.H[qc] @ self.Kinv])
        self.A = torch.cat([self.A, self.G[:, qc].T @ self.W_hat])


def swap_search(
    H: torch.Tensor,
    W: torch.Tensor,
    groups: torch.Tensor,
    keep_groups: torch.Tensor,
    *,
    max_swaps: int = 1000,
    rel_tol: float = 1e-9,
) -> tuple[torch.Tensor, dict]:
    """Best-improvement 1-swap local search.

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

    Returns
    -------
    keep_groups : BoolTensor of shape (g,)
    stats : dict with ``swaps``, ``local_optimum`` (no improving swap remained) and ``errors``.
    """
    if bool(keep_groups.all()) or not bool(keep_groups.any()):
        return keep_groups.clone(), {"swaps": 0, "local_optimum": True, "errors": []}
    state = _ColumnState(H, W, groups, keep_groups)
    err = state.error()
    errors = [err]
    swaps, local_optimum = 0, False
    while swaps < max_swaps:
        delta, pos, q = state.best_swap()
        if not delta < -rel_tol * max(err, 1e-300):
            local_optimum = True
            break
        state.apply_swap(pos, q)
        swaps += 1
        if swaps % _REFRESH_EVERY == 0:
            state.reset(state.keep_groups)  # bound the round-off of the rank updates
            err = state.error()
        else:
            err += delta
        errors.append(err)
    return state.keep_groups.clone(), {"swaps": swaps, "local_optimum": local_optimum, "errors": errors}
