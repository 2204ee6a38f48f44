"""SPAP: a penalty method with alternating minimization, then an exact 1-swap local search.

Column structures (channels, heads, index groups).  With ``s`` the indicator of pruned groups and
``D = diag(H_d)``, the bilinear constraint ``Ŵ·diag(s) = 0`` is replaced by the penalty::

    F_ρ(Ŵ, s) = ½ tr((Ŵ−W) H_d (Ŵ−W)ᵀ) + ρ/2 Σ_j s_j D_j ‖Ŵ_{:,j}‖²,     s ∈ {0,1}^g, Σ s = k

and minimized alternately:

- Ŵ-step (``s`` fixed) is a ridge problem solved in closed form through the Woodbury identity with the
  inverse Gram matrix factored once: ``Ŵ = W − W_P (Hinv_PP + (ρ D_P)⁻¹)⁻¹ Hinv_{P,:}``.  It costs one
  ``|P|×|P|`` Cholesky and one ``m×|P|×n`` product, and it splits across the rows of ``W``.
- s-step (``Ŵ`` fixed) is exact: prune the ``k`` groups with the smallest ``Σ_{j∈G} D_j ‖Ŵ_j‖²``.

Both steps minimize ``F_ρ`` exactly, so ``F_ρ`` never increases at fixed ``ρ``.  ``ρ`` grows
geometrically from ``rho0`` to ``rho_max`` (ρ→∞ enforces the constraint); then the mask is refit exactly
and improved by :func:`solvers.swap.swap_search` to a 1-swap local optimum.

Unstructured and N:M.  The same penalty idea with a split variable ``Z`` in the structure set::

    ½ tr((Ŵ−W) H_d (Ŵ−W)ᵀ) + ρ/2 ‖(Ŵ − Z) D^{1/2}‖²_F

Ŵ-step: ``Ŵ (H_d + ρD) = W H_d + ρ Z D`` (one Cholesky per ρ); Z-step: the exact projection of ``Ŵ``
onto the structure in the ``D``-weighted norm (keep the largest ``D_j Ŵ_ij²``).  Then the exact per-row
refit of the final support.

Cost for an ``m×n`` layer: ``O(n³)`` once (inverse), ``O(|P|³ + m|P|n)`` per column iteration,
``O(n²d + mnd)`` per swap.  Derivations and the experiments behind the defaults: ``docs/method.md``.
"""

from __future__ import annotations

import torch

from ._linalg import cholesky
from ._validation import Boolean, Interval
from .masks import group_scores, project
from .problem import LayerProblem
from .refit import refit_columns, refit_rows
from .registry import register
from .structure import ColumnGroups
from .swap import swap_search

_OPTIONS = {
    "rho0": Interval(float, 0.0, None, closed="neither"),
    "rho_max": Interval(float, 0.0, None, closed="neither"),
    "rho_growth": Interval(float, 1.0, None, closed="neither"),
    "max_inner": Interval(int, 1, None),
    "swap": Boolean(),
    "max_swaps": Interval(int, 0, None),
    "guard": Boolean(),
}


def rho_schedule(rho0: float, rho_max: float, growth: float) -> list[float]:
    """Geometric penalty schedule ``rho0·growth^t`` up to and including the first value ≥ ``rho_max``."""
    rhos = [rho0]
    while rhos[-1] < rho_max:
        rhos.append(rhos[-1] * growth)
    return rhos


@register(
    "spap",
    reference="Hu & Yuan, Structured Pruning via Alternating Optimization and Penalty Methods, 2025; "
    "penalty schedule, Woodbury W-step and swap search: this package (docs/method.md).",
    options=_OPTIONS,
)
def spap(
    problem: LayerProblem,
    *,
    rho0: float = 1e-3,
    rho_max: float = 1e3,
    rho_growth: float = 2.0,
    max_inner: int = 3,
    swap: bool = True,
    max_swaps: int = 10_000,
    guard: bool = True,
):
    """Penalty method + alternating minimization (+ exact 1-swap search for column groups)."""
    schedule = rho_schedule(rho0, rho_max, rho_growth)
    if isinstance(problem.structure, ColumnGroups):
        return _spap_columns(problem, schedule, max_inner, swap, max_swaps, guard)
    return _spap_rows(problem, schedule, max_inner, guard)


# --- column groups ---------------------------------------------------------------------------------


def _spap_columns(problem: LayerProblem, schedule, max_inner: int, swap: bool, max_swaps: int, guard: bool):
    s: ColumnGroups = problem.structure  # type: ignore[assignment]
    W, H = problem.W64, problem.hessian
    k = problem.n_pruned_target
    g = s.n_groups
    if k == 0:
        return W.clone(), torch.ones(g, dtype=torch.bool, device=W.device), {"iterations": 0}
    D = H.diagonal()
    Hinv = problem.hessian_inverse
    n_keep = g - k
    keep = project(problem, group_scores(problem, D * (W * W).sum(0)))
    penalized, objective_after_w, rhos, changes = [], [], [], []
    iterations = 0
    for rho in schedule:
        changed = 0
        values: list[float] = []  # F_rho after each W-step and each s-step: non-increasing
        for _ in range(max_inner):
            Pc = s.columns(~keep)
            M = Hinv[Pc][:, Pc] + torch.diag(1.0 / (rho * D[Pc]))
            E = torch.cholesky_solve(W[:, Pc].T, cholesky(M, what="the penalty system")).T  # (m, |P|)
            W_hat = W - E @ Hinv[Pc]
            iterations += 1
            fit = 0.5 * float(((E @ Hinv[Pc][:, Pc]) * E).sum())
            score = group_scores(problem, D * (W_hat * W_hat).sum(0))
            values.append(fit + 0.5 * rho * float(score[~keep].sum()))
            new_keep = project(problem, score)
            objective_after_w.append(fit)
            moved = int((new_keep != keep).sum()) // 2
            keep = new_keep
            values.append(fit + 0.5 * rho * float(score[~keep].sum()))
            changed += moved
            if moved == 0:
                break
        penalized.append(values)
        rhos.append(rho)
        changes.append(changed)
    stats = {
        "iterations": iterations,
        "rho": rhos,
        "mask_changes": changes,
        "penalized_objective": penalized,  # one list per rho
        "penalty_fit": objective_after_w,
    }
    candidates = {"penalty": keep}
    if guard:
        # The rho -> 0 limits of the method (weighted magnitude) and plain magnitude: start the swap
        # search from the best exact error of the three, so SPAP is never worse than either.
        candidates["weighted_magnitude"] = project(problem, group_scores(problem, D * (W * W).sum(0)))
        candidates["magnitude"] = project(problem, group_scores(problem, (W * W).sum(0)))
    errors = {}
    for name, mask in candidates.items():
        errors[name] = problem.objective(refit_columns(problem, s.column_keep_mask(mask, W.shape[1])))
    start = min(errors, key=errors.get)
    stats["start_errors"] = errors
    stats["start"] = start
    keep = candidates[start]
    if swap and s.group_size is not None and 0 < n_keep < g:
        keep, swap_stats = swap_search(H, W, s.index(W.device), keep, max_swaps=max_swaps)
        stats.update({"swaps": swap_stats["swaps"], "local_optimum": swap_stats["local_optimum"], "swap_errors": swap_stats["errors"]})
    elif swap:
        stats["swaps"] = 0
        stats["swap_skipped"] = "groups of unequal size" if s.group_size is None else "nothing to swap"
    W_hat = refit_columns(problem, s.column_keep_mask(keep, W.shape[1]))
    final = problem.objective(W_hat)
    if final > errors[start] * (1 + 1e-9):  # round-off in the rank updates; never return worse
        stats["fallback"] = f"swap result {final:.6g} above its start {errors[start]:.6g}; start kept"
        keep = candidates[start]
        W_hat = refit_columns(problem, s.column_keep_mask(keep, W.shape[1]))
    return W_hat, keep, stats


# --- unstructured and N:M --------------------------------------------------------------------------


def _spap_rows(problem: LayerProblem, schedule, max_inner: int, guard: bool):
    W, H = problem.W64, problem.hessian
    D = H.diagonal()
    if problem.n_pruned_target == 0:
        return W.clone(), torch.ones_like(W, dtype=torch.bool), {"iterations": 0}
    WH = W @ H
    keep = project(problem, W * W * D)
    Z = W * keep
    penalized, rhos = [], []
    iterations = 0
    for rho in schedule:
        L = cholesky(H + rho * torch.diag(D), what="the penalty system")
        values: list[float] = []
        for _ in range(max_inner):
            W_hat = torch.cholesky_solve((WH + rho * Z * D).T, L).T
            iterations += 1
            new_keep = project(problem, W_hat * W_hat * D)
            Z = W_hat * new_keep
            R = W_hat - W
            values.append(0.5 * float(((R @ H) * R).sum()) + 0.5 * rho * float((((W_hat - Z) ** 2) * D).sum()))
            moved = int((new_keep != keep).sum())
            keep = new_keep
            if moved == 0:
                break
        penalized.append(values)
        rhos.append(rho)
    stats = {"iterations": iterations, "rho": rhos, "penalized_objective": penalized}
    W_hat = refit_rows(problem, keep)
    if guard:
        start = project(problem, W * W * D)
        W_start = refit_rows(problem, start)
        e_pen, e_start = problem.objective(W_hat), problem.objective(W_start)
        stats["start_errors"] = {"penalty": e_pen, "weighted_magnitude": e_start}
        if e_start < e_pen:
            stats["fallback"] = "weighted-magnitude mask refit beat the penalty mask"
            keep, W_hat = start, W_start
    return W_hat, keep, stats
