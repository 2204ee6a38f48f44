"""SparseGPT (Frantar & Alistarh 2023): one OBS sweep over the columns with lazy blocked updates.

The columns of ``W`` are visited left to right.  With ``U`` the upper Cholesky factor of the damped
``H⁻¹`` (``H⁻¹ = UᵀU``), pruning or keeping column ``j`` leaves an error ``e = (w_j − q_j)/U_jj`` per row
that is pushed onto the not yet visited columns as ``W_{:,j:} −= e U_{j,j:}``: the OBS update restricted
to the columns to the right, which never have to be re-inverted because the rows of ``U`` are those of
the successive inverses.

Lazy batching: inside a block of ``blocksize`` columns the updates are applied column by column; the
accumulated errors of the block reach the columns to its right through one matrix product.

Masks: unstructured, the weights with the smallest ``w²/U_jj²`` inside each block are pruned, chosen
when the block starts (adaptive mask selection), with the per-block counts set so that the layer
prunes exactly its target; N:M, every group of ``m`` columns keeps the ``n`` largest ``w²/U_jj²`` of
the *updated* weights when the sweep reaches the group.
"""

from __future__ import annotations

import torch

from . import kernels
from ._linalg import cholesky
from .validation import Boolean, Interval, Options
from .masks import keep_largest
from .problem import LayerProblem
from .refit import refit_rows
from .registry import register
from .structure import NM, Unstructured

_OPTIONS = {"blocksize": Interval(int, 1, None), "refit": Boolean(), "kernel": Options(kernels.KERNELS)}


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper triangular ``U`` with ``UᵀU = H⁻¹`` (the Cholesky factor of ``H⁻¹``), without forming ``H⁻¹``.

    With ``J`` the index reversal, ``JHJ = L̃L̃ᵀ`` gives ``H = RRᵀ`` for the upper triangular ``R = JL̃J``,
    so ``H⁻¹ = R⁻ᵀR⁻¹`` and ``U = R⁻¹ = J L̃⁻¹ J``: one Cholesky and one triangular inverse,
    ``⅔ d³`` flops, against ``≈ 2 d³`` for inverting ``H`` and factoring the inverse.
    """
    L = cholesky(H.flip(0, 1), what="the damped Gram matrix", hint="raise 'damp'")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


def block_prune_counts(k: int, d_in: int, edges: list[int]) -> list[int]:
    """Weights to prune in each column block ``[edges[i], edges[i+1])``: proportional, summing to ``k``."""
    cum = [(k * e) // d_in for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:])]


@register(
    "sparsegpt",
    structures=(Unstructured, NM),
    reference="Frantar & Alistarh, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot, ICML 2023.",
    options=_OPTIONS,
)
def sparsegpt(problem: LayerProblem, *, blocksize: int = 128, refit: bool = False, kernel: str = "auto"):
    """SparseGPT: column sweep with OBS updates, lazy blocks and adaptive masks (unstructured, N:M).

    Parameters
    ----------
    problem : LayerProblem
        Unstructured or N:M.  The damped ``H`` of the problem (relative damping ``damp``, 1% by
        default, as in the paper) is the one inverted.
    blocksize : int, default 128
        Columns per lazy block (rounded up to a multiple of ``m`` for N:M).  Unstructured masks are
        chosen per block, so the block size also sets the mask's granularity.
    refit : bool, default False
        Replace the swept weights by the exact refit of the final mask (off in the paper).
    kernel : {"auto", "numba", "torch"}, default "auto"
        The in-block column loop: a Numba kernel that sweeps whole rows in parallel (CPU; the default
        there) or torch rank-1 updates (any device).  Same result up to round-off
        (``tests/test_kernels.py``); speeds in ``docs/performance.md``.

    Cost
    ----
    ``O(d_in³)`` for ``U`` and ``O(d_out·d_in²)`` for the sweep (half of it in the block products); the
    per-column loop is ``d_in`` small vector updates.
    """
    k = problem.n_pruned_target
    if k == 0:
        W = problem.W64.clone()
        return W, torch.ones_like(W, dtype=torch.bool), {"iterations": 0, "obs_loss": 0.0}
    W_hat, keep, loss, stats = sweep(problem, inverse_cholesky_upper(problem.hessian), k, blocksize, kernel)
    if refit:
        W_hat = refit_rows(problem, keep)
        stats["refit"] = True
    return W_hat, keep, stats


def sweep(problem: LayerProblem, U: torch.Tensor, k: int, blocksize: int = 128, kernel: str = "auto"
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """One SparseGPT sweep of ``problem`` pruning ``k`` weights (unstructured; N:M ignores ``k``), given
    ``U`` (:func:`inverse_cholesky_upper` of ``problem.hessian``), so that several counts share one
    factorization: ``(W_hat, keep, per-row loss, stats)``.  The per-row losses sum to the damped objective
    of ``W_hat`` (``problem.objective``) up to round-off."""
    s = problem.structure
    W = problem.W64.clone()
    d_in = W.shape[1]
    if isinstance(s, NM):
        blocksize = -(-blocksize // s.m) * s.m
    edges = list(range(0, d_in, blocksize)) + [d_in]
    counts = block_prune_counts(k, d_in, edges) if isinstance(s, Unstructured) else None
    nm = (s.n, s.m) if isinstance(s, NM) else None
    run = _sweep_numba if kernels.use_numba(kernel, W) else _sweep_torch
    W_hat, keep, loss = run(W, U, edges, counts, nm)
    return W_hat, keep, loss, {"iterations": d_in, "obs_loss": float(loss.sum()), "blocksize": blocksize,
                               "kernel": "numba" if run is _sweep_numba else "torch"}


def _sweep_torch(W: torch.Tensor, U: torch.Tensor, edges: list[int], counts: list[int] | None,
                 nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column sweep with torch operations (any device): ``(W_hat, keep, per-row loss)``."""
    d_out, d_in = W.shape
    Wt = W.T.contiguous()  # (d_in, d_out): the sweep works on contiguous rows, one per column of W
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    loss = torch.zeros(d_out, dtype=W.dtype, device=W.device)
    for b, (i1, i2) in enumerate(zip(edges[:-1], edges[1:])):
        W1 = Wt[i1:i2].clone()  # (width, d_out)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        E1 = torch.zeros_like(W1)  # errors (w − q)/U_jj, pushed to the right of the block at its end
        if counts is not None:
            scores = W1 * W1 / (d * d)[:, None]
            keep_t[i1:i2] = keep_largest(scores.flatten(), scores.numel() - counts[b]).reshape(scores.shape)
        for j in range(i2 - i1):
            if counts is None and j % nm[1] == 0:  # N:M: choose the group's mask on the updated weights
                group = W1[j : j + nm[1]]
                scores = group * group / (d[j : j + nm[1]] ** 2)[:, None]
                top = torch.argsort(scores, dim=0, descending=True, stable=True)[: nm[0]]  # (n, d_out)
                block_keep = torch.zeros_like(group, dtype=torch.bool).scatter_(0, top, True)
                keep_t[i1 + j : i1 + j + nm[1]] = block_keep
            w = W1[j]
            err = torch.where(keep_t[i1 + j], torch.zeros_like(w), w) / d[j]
            loss += 0.5 * err * err
            W1[j:].addr_(U1[j, j:], err, alpha=-1.0)  # BLAS rank-1: no threaded temporaries
            E1[j] = err
        Wt[i1:i2] = W1.masked_fill_(~keep_t[i1:i2], 0.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # the block's errors, pushed right at once
    return Wt.T.contiguous(), keep_t.T.contiguous(), loss


def _sweep_numba(W: torch.Tensor, U: torch.Tensor, edges: list[int], counts: list[int] | None,
                 nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column sweep with :func:`solvers.kernels.sparsegpt_block` (CPU): rows swept in parallel."""
    d_out, d_in = W.shape
    W = W.contiguous()
    keep = torch.ones_like(W, dtype=torch.bool)
    loss = torch.zeros(d_out, dtype=W.dtype)
    for b, (i1, i2) in enumerate(zip(edges[:-1], edges[1:])):
        W1 = W[:, i1:i2].contiguous()
        U1 = U[i1:i2, i1:i2].contiguous()
        if counts is not None:  # same scores and flat order (column-major) as the torch sweep's ties
            d = U1.diagonal()
            scores = (W1 * W1 / (d * d)[None, :]).T
            keep1 = keep_largest(scores.flatten(), scores.numel() - counts[b]).reshape(scores.shape).T.contiguous()
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        E1 = torch.zeros_like(W1)
        kernels.sparsegpt_block(W1, U1, keep1, nm, E1, loss)
        W[:, i1:i2] = W1.masked_fill_(~keep1, 0.0)
        keep[:, i1:i2] = keep1
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)  # the block's errors, pushed right at once
    return W, keep, loss
