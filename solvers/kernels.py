"""Numba CPU kernels for loops that torch runs as many tiny operations.

Each kernel has a torch twin in the solver that uses it (the reference, and the CUDA path), a test
that the two agree on random inputs (``tests/test_kernels.py``), and a measured reason to exist
(``benchmarks/kernels.py``; figures in ``docs/performance.md``).  Solvers choose with their ``kernel``
option: ``"auto"`` (Numba for CPU tensors, torch otherwise), ``"numba"`` or ``"torch"``.

Kernels work in float64 on contiguous NumPy views of CPU tensors (no copies: ``Tensor.numpy()`` shares
memory) and are compiled on first use (``cache=True`` keeps the machine code between processes).
"""

from __future__ import annotations

import torch

try:  # numba is a dependency; the guard keeps ``import solvers`` working where it cannot load
    import numba
    import numpy as np

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    numba = None
    HAVE_NUMBA = False

KERNELS = ("auto", "numba", "torch")


def use_numba(kernel: str, tensor: torch.Tensor) -> bool:
    """Whether a solver's ``kernel`` option selects the Numba path for ``tensor``."""
    if kernel == "torch":
        return False
    if tensor.device.type != "cpu":
        if kernel == "numba":
            raise ValueError(f"kernel='numba' runs on CPU tensors only; this problem is on {tensor.device}. "
                             "Use kernel='auto' or 'torch'.")
        return False
    if not HAVE_NUMBA:
        if kernel == "numba":
            raise ValueError("kernel='numba' needs the numba package (pip install numba); use kernel='torch'.")
        return False
    return True


if HAVE_NUMBA:

    def _sparsegpt_block(W1, U1, keep1, nm_n, nm_m, E1, loss):  # pragma: no cover - compiled
        """One lazy block of the SparseGPT sweep, for every row of ``W`` at once (rows in parallel).

        ``W1`` (d_out, width): the block's columns of ``W``, updated in place; ``U1`` (width, width):
        the block's upper Cholesky factor of ``H⁻¹``; ``keep1`` (d_out, width): the mask, read
        (unstructured) or written (N:M, ``nm_m > 0``: the ``nm_n`` largest ``w²/U_jj²`` of each group of
        ``nm_m`` columns, chosen on the updated weights, ties to the lower index); ``E1`` (d_out, width):
        the errors ``(w − q)/U_jj``, written; ``loss`` (d_out,): ``½ Σ err²`` added.

        The rows are independent inside a block, so each thread sweeps whole rows: the updates
        ``W[r, j:] −= err·U[j, j:]`` run over contiguous memory with no per-column synchronisation.
        """
        d_out, width = W1.shape
        for r in numba.prange(d_out):
            w = W1[r]
            for j in range(width):
                if nm_m > 0 and j % nm_m == 0:
                    stop = min(j + nm_m, width)
                    for i in range(j, stop):
                        keep1[r, i] = False
                    for _ in range(nm_n):
                        best, best_i = -1.0, -1
                        for i in range(j, stop):
                            if not keep1[r, i]:
                                s = w[i] * w[i] / (U1[i, i] * U1[i, i])
                                if s > best:
                                    best, best_i = s, i
                        if best_i >= 0:
                            keep1[r, best_i] = True
                err = 0.0 if keep1[r, j] else w[j] / U1[j, j]
                E1[r, j] = err
                loss[r] += 0.5 * err * err
                if err != 0.0:
                    for i in range(j, width):
                        w[i] -= err * U1[j, i]


    def _channel_swap_table(U, A, rows, kept, s, gg, ww, kdiag, out):  # pragma: no cover - compiled
        """``out[i, j] = Δ(p_i, q_j)`` for single-column groups, fused into one pass.

        ``U``, ``A`` (|P|, n): the swap state's matrices; ``rows`` (k,): their rows for the pruned groups
        asked for; ``kept`` (r,): kept column indices; ``s``, ``gg`` (k,): Schur complements and
        ``‖G_p‖²``; ``ww``, ``kdiag`` (r,): ``‖Ŵ_q‖²`` and ``Kinv_qq``.  With ``x = u/s``::

            Δ = ½ (ww + 2·a·x + x²·gg) / (kdiag + u·x) − ½ gg/s

        torch evaluates this as about ten full-size temporaries (gathers, products, quotients); here each
        entry is computed once from the gathered ``u, a`` and written once.
        """
        k, r = out.shape
        for i in numba.prange(k):
            row = rows[i]
            si, gi = s[i], gg[i]
            base = 0.5 * gi / si
            for j in range(r):
                c = kept[j]
                u = U[row, c]
                x = u / si
                out[i, j] = 0.5 * (ww[j] + 2.0 * A[row, c] * x + x * x * gi) / (kdiag[j] + u * x) - base


    def _row_swap_delta(Ba, va, t, wb, cb):  # pragma: no cover - compiled
        """``Δ`` of one swap (``solvers.row_swap.swap_delta``, the same operations in the same order)."""
        return 0.5 * (Ba * wb * wb + 2.0 * t * va * wb - cb * va * va) / (Ba * cb + t * t)


    _row_swap_delta_c = numba.njit(inline="always", cache=True)(_row_swap_delta)


    def _row_swap_search(T, v, Bd, c, wk, P, K, pcount, kcount, H, Hinv, err, m, rel_tol, limit, batch,
                         swaps, done):  # pragma: no cover - compiled
        """The 1-swap search of ``solvers.row_swap`` for a batch of rows, each row to its end (rows in parallel).

        Per row ``r`` (slots ``a < pcount[r]`` of ``P``, ``b < kcount[r]`` of ``K``; the state's arrays are
        updated in place): scan the table ``Δ(a, b)`` keeping each pruned slot's best kept slot, take up to
        ``batch`` of those below ``−rel_tol·err[r]``, best first, apply each whose kept slot is still unused
        and whose ``Δ``, re-evaluated on the updated state, still improves; repeat until a table has no
        improving swap (``done[r]``) or ``limit[r]`` swaps.  N:M (``m > 0``): only pairs of one group of
        ``m``; a swap keeps each slot in its group, so each pruned slot's kept partners are listed once.

        torch stores each table (``|P|×|K|`` per row, about eight temporaries of that size) and advances
        every row of a batch in lockstep, a dozen small operations per swap; here a table is one pass that
        stores nothing (N:M: ``|P|·n`` entries, not ``|P||K|``), and each row stops when it is done.
        """
        R = T.shape[0]
        n = H.shape[0]
        for r in numba.prange(R):
            p, k = pcount[r], kcount[r]
            swaps[r] = 0
            done[r] = False
            if p == 0 or k == 0:
                done[r] = True
                continue
            Tr, vr, Br, cr, wr, Pr, Kr = T[r], v[r], Bd[r], c[r], wk[r], P[r], K[r]
            bestv = np.empty(p)
            bestb = np.empty(p, np.int64)
            cand = np.empty(batch, np.int64)
            used = np.zeros(k, np.bool_)
            beta = np.empty(p)
            phi = np.empty(p)
            tau = np.empty(k)
            psi = np.empty(k)
            hk = np.empty(k)
            y = np.empty(n)
            # N:M: the kept slots of each group (a swap stays inside its group, so this never changes).
            groups = n // m if m > 0 else 1
            per = k // groups if m > 0 else 0
            gk = np.empty((groups, per), np.int64)
            if m > 0:
                fill = np.zeros(groups, np.int64)
                for b in range(k):
                    g = Kr[b] // m
                    gk[g, fill[g]] = b
                    fill[g] += 1
            while swaps[r] < limit[r]:
                thr = -rel_tol * max(err[r], 1e-300)
                for a in range(p):
                    Ba, va = Br[a], vr[a]
                    best, bb = np.inf, -1
                    row = Tr[a]
                    if m > 0:
                        g = Pr[a] // m
                        for q in range(per):
                            b = gk[g, q]
                            d = _row_swap_delta_c(Ba, va, row[b], wr[b], cr[b])
                            if d < best:
                                best, bb = d, b
                    else:
                        for b in range(k):
                            d = _row_swap_delta_c(Ba, va, row[b], wr[b], cr[b])
                            if d < best:
                                best, bb = d, b
                    bestv[a], bestb[a] = best, bb
                ncand = 0
                for _ in range(batch):  # the smallest entries below thr, best first (ties: lower slot)
                    sel, sv = -1, thr
                    for a in range(p):
                        if bestv[a] < sv:
                            sel, sv = a, bestv[a]
                    if sel < 0:
                        break
                    cand[ncand] = sel
                    ncand += 1
                    bestv[sel] = np.inf
                if ncand == 0:
                    done[r] = True
                    break
                for t in range(ncand):
                    if swaps[r] >= limit[r]:
                        break
                    a = cand[t]
                    b = bestb[a]
                    if used[b]:
                        continue
                    Ba, va, taub = Br[a], vr[a], Tr[a, b]
                    d = _row_swap_delta_c(Ba, va, taub, wr[b], cr[b])
                    if not d < -rel_tol * max(err[r], 1e-300):
                        continue
                    i, j = Pr[a], Kr[b]
                    # β = B_{P,i} = H_{P,i} + T H_{K,i}  (four partial sums: the dot products pipeline)
                    hrow = H[i]
                    for z in range(k):
                        hk[z] = hrow[Kr[z]]
                    k4 = k - k % 4
                    for x in range(p):
                        row = Tr[x]
                        s0 = s1 = s2 = s3 = 0.0
                        for z in range(0, k4, 4):
                            s0 += row[z] * hk[z]
                            s1 += row[z + 1] * hk[z + 1]
                            s2 += row[z + 2] * hk[z + 2]
                            s3 += row[z + 3] * hk[z + 3]
                        for z in range(k4, k):
                            s0 += row[z] * hk[z]
                        beta[x] = hrow[Pr[x]] + ((s0 + s1) + (s2 + s3))
                    # ψ ← Q_{K,j} = (H⁻¹)_{K,j} − (H⁻¹)_{K,P} T_{:,b}: whole contiguous rows of H⁻¹ (n per
                    # pruned slot, vectorized), then the kept entries.
                    hrow = Hinv[j]
                    for l in range(n):
                        y[l] = hrow[l]
                    for x in range(p):
                        coef = Tr[x, b]
                        if coef != 0.0:
                            hrow = Hinv[Pr[x]]
                            for l in range(n):
                                y[l] -= hrow[l] * coef
                    for z in range(k):
                        psi[z] = y[Kr[z]]
                    g = taub / Ba
                    c1 = cr[b] + taub * g
                    w1 = wr[b] + g * va
                    for z in range(k):
                        tau[z] = Tr[a, z]
                    tau[b] = 1.0
                    psi[b] = 0.0
                    for z in range(k):
                        psi[z] = (psi[z] + tau[z] * g) / c1
                    for x in range(p):
                        phi[x] = Tr[x, b] - beta[x] * g
                    for x in range(p):
                        if x == a:
                            continue
                        bx, fx = beta[x] / Ba, phi[x]
                        row = Tr[x]
                        row[b] = 0.0
                        for z in range(k):
                            row[z] -= bx * tau[z] + fx * psi[z]
                    for z in range(k):
                        Tr[a, z] = psi[z]
                    cr[b] = 0.0
                    wr[b] = 0.0
                    for z in range(k):
                        cr[z] = cr[z] + (tau[z] * tau[z] / Ba - psi[z] * psi[z] * c1)
                        wr[z] = wr[z] + (tau[z] * (va / Ba) - psi[z] * w1)
                    for x in range(p):
                        vr[x] = vr[x] - (beta[x] * (va / Ba) + phi[x] * (w1 / c1))
                        Br[x] = Br[x] + (phi[x] * phi[x] / c1 - beta[x] * beta[x] / Ba)
                    vr[a] = w1 / c1
                    Br[a] = 1.0 / c1
                    Pr[a] = j
                    Kr[b] = i
                    err[r] += d
                    swaps[r] += 1
                    used[b] = True
                for t in range(ncand):
                    used[bestb[cand[t]]] = False


    # Each kernel is compiled twice: in parallel over its outer loop, and serial for small inputs, where
    # waking threads costs more than the work (and idle pool threads would compete with torch's).
    _COMPILED = {
        name: (numba.njit(cache=True)(fn), numba.njit(parallel=True, cache=True)(fn))
        for name, fn in (("sparsegpt_block", _sparsegpt_block), ("channel_swap_table", _channel_swap_table),
                         ("row_swap_search", _row_swap_search))
    }

_PARALLEL_MIN_WORK = 1 << 16  # entries of the outer x inner loop below which a kernel runs serially


def _kernel(name: str, work: int):
    """The serial or parallel build of kernel ``name`` for ``work`` inner iterations.

    The parallel build uses as many threads as torch (``torch.get_num_threads()``), so that a caller who
    limits torch's threads limits these too.
    """
    serial, parallel = _COMPILED[name]
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if work < _PARALLEL_MIN_WORK or threads < 2:
        return serial
    numba.set_num_threads(threads)
    return parallel


def channel_swap_table(U: torch.Tensor, A: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor, s: torch.Tensor,
                       gg: torch.Tensor, ww: torch.Tensor, kdiag: torch.Tensor) -> torch.Tensor:
    """The ``(len(rows), len(kept))`` table of :func:`_channel_swap_table` on CPU float64 tensors."""
    out = torch.empty(rows.numel(), kept.numel(), dtype=U.dtype)
    args = [t.contiguous() for t in (U, A, rows, kept, s, gg, ww, kdiag)]
    _kernel("channel_swap_table", out.numel())(*(t.numpy() for t in args), out.numpy())
    return out


def row_swap_search(T, v, Bd, c, wk, P, K, pcount, kcount, H, Hinv, err, m: int, rel_tol: float, limit, batch: int,
                    swaps, done) -> None:
    """Run :func:`_row_swap_search` on CPU tensors in place (float64 state, int64 indices and counts;
    ``swaps`` int64 and ``done`` bool are written).  See ``solvers.row_swap`` for the state."""
    arrays = [t.numpy() for t in (T, v, Bd, c, wk, P, K, pcount, kcount, H, Hinv, err, limit, swaps, done)]
    if any(not a.flags.c_contiguous for a in arrays):
        raise ValueError("row_swap_search needs contiguous tensors")
    work = T.shape[0] * T.shape[1] * T.shape[2]
    fn = _kernel("row_swap_search", work)
    fn(*arrays[:12], int(m), float(rel_tol), arrays[12], int(batch), arrays[13], arrays[14])


def sparsegpt_block(W1: torch.Tensor, U1: torch.Tensor, keep1: torch.Tensor, nm: tuple[int, int] | None,
                    E1: torch.Tensor, loss: torch.Tensor) -> None:
    """Run :func:`_sparsegpt_block` on CPU float64 tensors in place (see its docstring for shapes)."""
    n, m = nm if nm is not None else (0, 0)
    arrays = [t.numpy() for t in (W1, U1, keep1, E1, loss)]
    if any(not a.flags.c_contiguous for a in arrays):
        raise ValueError("sparsegpt_block needs contiguous tensors")
    work = W1.shape[0] * W1.shape[1] * W1.shape[1] // 2
    _kernel("sparsegpt_block", work)(arrays[0], arrays[1], arrays[2], n, m, arrays[3], arrays[4])


def warm_up() -> None:
    """Compile every kernel once (benchmarks call this so that timings exclude compilation)."""
    if not HAVE_NUMBA:
        return
    W = torch.zeros(2, 4, dtype=torch.float64)
    U = torch.eye(4, dtype=torch.float64)
    keep = torch.ones(2, 4, dtype=torch.bool)
    sparsegpt_block(W, U, keep, None, torch.zeros_like(W), torch.zeros(2, dtype=torch.float64))
    sparsegpt_block(W, U, keep, (2, 4), torch.zeros_like(W), torch.zeros(2, dtype=torch.float64))
    idx = torch.arange(2)
    channel_swap_table(W, W, idx, idx, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                       torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))


__all__ = ["KERNELS", "HAVE_NUMBA", "use_numba", "sparsegpt_block", "channel_swap_table", "row_swap_search", "warm_up"]
