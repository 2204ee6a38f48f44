"""SPAP: a penalty method with alternating minimization, then an exact 1-swap local search.

Column structures (channels, heads, index groups).  With ``s`` the indicator of pruned groups and
``D = diag(c)``, ``c_j = 1/[H_d⁻¹]_jj`` (the OBS cost of pruning column ``j`` alone is ``c_j‖W_{:,j}‖²``),
the bilinear constraint ``Ŵ·diag(s) = 0`` is replaced by the penalty::

    F_ρ(Ŵ, s) = ½ tr((Ŵ−W) H_d (Ŵ−W)ᵀ) + ρ/2 Σ_j s_j D_j ‖Ŵ_{:,j}‖²,     s ∈ {0,1}^g, Σ s = k

and minimized alternately:

- Ŵ-step (``s`` fixed) is a ridge problem solved in closed form through the Woodbury identity with the
  inverse Gram matrix factored once: ``Ŵ = W − W_P (Hinv_PP + (ρ D_P)⁻¹)⁻¹ Hinv_{P,:}``.  It costs one
  ``|P|×|P|`` Cholesky and one ``m×|P|×n`` product, and it splits across the rows of ``W``.
- s-step (``Ŵ`` fixed) is exact: prune the ``k`` groups with the smallest ``Σ_{j∈G} D_j ‖Ŵ_j‖²``.

Both steps minimize ``F_ρ`` exactly, so ``F_ρ`` never increases at fixed ``ρ``.  ``ρ`` grows
geometrically from ``rho0`` to ``rho_max`` (ρ→∞ enforces the constraint); then the mask is refit exactly
and improved by :func:`solvers.swap.swap_search` to a 1-swap local optimum.

Unstructured and N:M.  The same penalty idea with a split variable ``Z`` in the structure set and a
scaled multiplier ``U`` of the constraint ``Ŵ = Z`` (the augmented Lagrangian)::

    ½ tr((Ŵ−W) H_d (Ŵ−W)ᵀ) + ρ/2 ‖(Ŵ − Z + U) D^{1/2}‖²_F

Ŵ-step: ``Ŵ (H_d + ρD) = W H_d + ρ (Z − U) D`` (one Cholesky per ρ); Z-step: the exact projection of
``Ŵ + U`` onto the structure in the ``D``-weighted norm (keep the largest ``D_j (Ŵ+U)_ij²``); then
``U ← U + Ŵ − Z``.  Then the exact per-row refit of the final support, optionally improved row by row by
:func:`solvers.row_swap.row_swap_search` to a 1-swap local optimum (swaps inside a row; N:M: inside a
group of ``M``).

Cost for an ``m×n`` layer: ``O(n³)`` once (inverse), ``O(|P|³ + m|P|n)`` per column iteration,
``O(n²d + mnd)`` per swap.  Derivations and the experiments behind the defaults: ``docs/method.md``.
"""

from __future__ import annotations

import torch

from . import kernels
from ._linalg import cholesky
from .validation import Boolean, InvalidArgumentError, Interval, NoneOr, Options
from .masks import group_scores, keep_largest, project
from .problem import LayerProblem
from .refit import mask_objective, refit_rows, refit_rows_below, refit_through_inverse
from .registry import register
from .structure import ColumnGroups, Unstructured
from .row_swap import row_swap_search
from .swap import MAX_SWAPS, pruned_cost, swap_then_refit

_OPTIONS = {
    "rho0": NoneOr(Interval(float, 0.0, None, closed="neither")),
    "rho_max": NoneOr(Interval(float, 0.0, None, closed="neither")),
    "steps": NoneOr(Interval(int, 1, None)),
    "gradual": Boolean(),
    "max_inner": Interval(int, 1, None),
    "swap": Boolean(),
    "row_swap": Boolean(),
    "max_swaps": Interval(int, 0, None),
    "guard": Boolean(),
    "kernel": Options(kernels.KERNELS),
    "round_precision": Options(("float32", "float64")),
    "uncompensated": Interval(float, 0.0, None),
}


# Defaults per structure (docs/method.md §7.3).  Rows: ρ 0.5 → 0.5·1.3⁴ over 5 values, 3 rounds each.
_COLUMN_SCHEDULE = {"rho0": 0.01, "rho_max": 100.0, "steps": 5}
_ROW_SCHEDULE = {"rho0": 0.5, "rho_max": 0.5 * 1.3**4, "steps": 5}


def rho_schedule(rho0: float, rho_max: float, steps: int) -> list[float]:
    """``steps`` penalty parameters growing geometrically from ``rho0`` to ``rho_max``."""
    if steps == 1:
        return [rho_max]
    return [rho0 * (rho_max / rho0) ** (t / (steps - 1)) for t in range(steps)]


def prune_schedule(k: int, steps: int, gradual: bool) -> list[int]:
    """Units pruned at each step: all ``k`` at once, or the cubic ramp ``k(1 − (1 − t/T)³)``."""
    if not gradual:
        return [k] * steps
    return [int(round(k * (1 - (1 - (t + 1) / steps) ** 3))) for t in range(steps)]


def _check_structure(options: dict, structure: object) -> None:
    if options.get("uncompensated") and not isinstance(structure, ColumnGroups):
        raise InvalidArgumentError(f"The 'uncompensated' option of spap applies to column groups (channels, heads); "
                                   f"the structure is {structure!r}. Leave it at 0.0.")


@register(
    "spap",
    reference="Hu & Yuan, Structured Pruning via Alternating Optimization and Penalty Methods, 2025; "
    "OBS-weighted penalty, gradual schedule, Woodbury W-step and swap search: this package (docs/method.md).",
    options=_OPTIONS,
    check=_check_structure,
)
def spap(
    problem: LayerProblem,
    *,
    rho0: float | None = None,
    rho_max: float | None = None,
    steps: int | None = None,
    gradual: bool = True,
    max_inner: int = 3,
    swap: bool = True,
    max_swaps: int = MAX_SWAPS,
    guard: bool = True,
    kernel: str = "auto",
    row_swap: bool = False,
    round_precision: str = "float32",
    uncompensated: float = 0.0,
):
    """Penalty method + alternating minimization, then an exact 1-swap local search.

    Parameters
    ----------
    rho0, rho_max : float, optional
        First and last penalty parameter.  The penalty weights are ``1/[H⁻¹]_jj``, so ``ρ`` is unitless:
        a lone penalized column shrinks by about ``1/(1+ρ)`` in the Ŵ-step.  Default 0.01 and 100 for
        column groups; 0.5 and ``0.5·1.3⁴`` (about 1.43) for unstructured and N:M, whose multiplier keeps
        the constraint's pull so that ρ need not grow large (``docs/method.md`` §6).
    steps : int, optional
        Number of penalty parameters, geometric between ``rho0`` and ``rho_max``.  Default 5.  For column
        groups the swap search finishes the job (on the 30 SmolLM2 down_proj layers 5 steps end at the
        same mean error as 10, in less time; ``python benchmarks/down_proj.py --grid``).  The row
        schedule was chosen on the layers of two SmolLM2 blocks and checked on three others
        (``python benchmarks/down_proj.py --row-grid``; ``docs/method.md`` §7.3).
    gradual : bool, default True
        Raise the number of pruned units along the cubic ramp ``k(1 − (1 − t/T)³)`` (all ``k`` by the last
        step; for unstructured and N:M, by the last round) instead of pruning ``k`` from the first step.
    max_inner : int, default 3
        Alternating (Ŵ, s) rounds per step.  Column groups: a step ends early when the mask stops
        changing.  Unstructured and N:M: every round runs (the multiplier moves even when the mask does
        not), so a solve is ``steps·max_inner`` rounds.
    swap : bool, default True
        Finish with an exact 1-swap local search: over column groups of equal size
        (:func:`solvers.swap.swap_search`), or, for unstructured and N:M when ``row_swap`` is on, row by
        row, a kept and a pruned weight of one row (N:M: of one group of ``M``)
        (:func:`solvers.row_swap.row_swap_search`).
    row_swap : bool, default False
        Run the row swap search for unstructured and N:M (with ``swap``).  Off by default: it lowers
        every layer's error at a large multiple of the solver time, and the whole model's validation
        perplexity only at some targets (docs/results.md, "The row swap search on the whole model").
    max_swaps : int, default MAX_SWAPS (10000)
        Upper bound on swaps: in all for column groups, per row for unstructured and N:M (the search
        normally stops at a local optimum long before).
    guard : bool, default True
        Also refit the ρ→0 limits of the method (the OBS-score and magnitude masks) and continue from the
        best of the three, so SPAP is never worse than those selections with the exact refit.
    kernel : {"auto", "numba", "torch"}, default "auto"
        The swap search's table for single-column groups, and the row swap search: a Numba kernel for
        CPU tensors (``"auto"``) or torch (any device).  Same swaps up to round-off
        (``tests/test_kernels.py``, ``tests/test_row_swap.py``).
    round_precision : {"float32", "float64"}, default "float32"
        Unstructured and N:M: the dtype of the penalty rounds (each ρ's Cholesky factor is computed in
        float64 and rounded).  The rounds only choose the mask, whose refit is float64 either way; on
        SmolLM2's layers both precisions end within 0.4% of each other's error, neither ahead, and the
        default was chosen on the validation split (``docs/performance.md``).  ``"float64"`` for layers
        so ill-conditioned that float32 rounds lose the mask.
    uncompensated : float, default 0.0
        Column groups: choose the mask by the refit error plus ``uncompensated`` times the error the
        pruned groups would cause with no refit, ``β·½ Σ_{j pruned} H_jj ‖W_{:,j}‖²`` (the diagonal of
        ``½ tr(W_P H_PP W_Pᵀ)``), in the penalty path's s-step, the choice of start and the swap search.
        It favours pruning groups that matter little on their own over groups that the kept ones can
        stand in for.  The refit of the chosen mask is the exact one either way (``docs/method.md`` §6f).
    """
    columns = isinstance(problem.structure, ColumnGroups)
    default = _COLUMN_SCHEDULE if columns else _ROW_SCHEDULE
    rho0 = default["rho0"] if rho0 is None else rho0
    rho_max = default["rho_max"] if rho_max is None else rho_max
    steps = default["steps"] if steps is None else steps
    schedule = rho_schedule(rho0, rho_max, steps)
    if columns:
        counts = prune_schedule(problem.n_pruned_target, steps, gradual)
        return _spap_columns(problem, schedule, counts, max_inner, swap, max_swaps, guard, kernel, uncompensated)
    dtype = torch.float32 if round_precision == "float32" else torch.float64
    return _spap_rows(problem, schedule, max_inner, gradual, guard, swap and row_swap, max_swaps, kernel, dtype)


# --- column groups ---------------------------------------------------------------------------------


def _spap_columns(problem: LayerProblem, schedule, counts, max_inner: int, swap: bool, max_swaps: int, guard: bool,
                  kernel: str = "auto", uncompensated: float = 0.0):
    s: ColumnGroups = problem.structure  # type: ignore[assignment]
    W, H = problem.W64, problem.hessian
    k = problem.n_pruned_target
    g = s.n_groups
    if k == 0:
        return W.clone(), torch.ones(g, dtype=torch.bool, device=W.device), {"iterations": 0}
    Hinv = problem.hessian_inverse
    c = 1.0 / Hinv.diagonal()  # OBS weights: c_j‖w_j‖² is the cost of pruning column j alone
    obs_score = group_scores(problem, c * (W * W).sum(0))
    # ½ H_jj‖w_j‖² summed per group: the error of pruning a group with no refit (diagonal part)
    unrefit = 0.5 * group_scores(problem, H.diagonal() * (W * W).sum(0))
    group_cost = uncompensated * unrefit if uncompensated > 0 else None

    def s_step_scores(rho: float) -> torch.Tensor:
        """What the s-step keeps the largest of: F_ρ's penalty per group, plus the cost when there is one."""
        return score if group_cost is None else 0.5 * rho * score + group_cost

    keep = torch.ones(g, dtype=torch.bool, device=W.device)
    score = obs_score
    penalized, fits, changes = [], [], []
    iterations = 0
    for rho, k_t in zip(schedule, counts):
        changed = 0
        values: list[float] = []  # F_rho after each s-step and W-step at this (rho, k_t): non-increasing
        for inner in range(max_inner):
            new_keep = keep_largest(s_step_scores(rho), g - k_t)  # s-step: exact for the current W_hat
            moved = int((new_keep != keep).sum())
            keep = new_keep
            if inner > 0 and moved == 0:
                break
            changed += moved
            Pc = s.columns(~keep)
            if inner > 0:
                values.append(fits[-1] + 0.5 * rho * float(score[~keep].sum()) + pruned_cost(group_cost, keep))
            # W-step (Woodbury): W_hat = W − E Hinv[P,:],  E = W_P (Hinv_PP + (ρ c_P)⁻¹)⁻¹.
            HinvP = Hinv[Pc]  # (|P|, n), gathered once per W-step
            HinvPP = HinvP[:, Pc]
            M = HinvPP + torch.diag(1.0 / (rho * c[Pc]))
            E = torch.cholesky_solve(W[:, Pc].T, cholesky(M, what="the penalty system")).T  # (m, |P|)
            W_hat = W - E @ HinvP
            iterations += 1
            # ½ tr((Ŵ−W) H (Ŵ−W)ᵀ) = ½ tr(E H⁻¹_PP Eᵀ), and E H⁻¹_PP = W_P − E diag(1/(ρ c_P)) by the
            # definition of E: O(m|P|) instead of a third m×|P|×|P| product.
            fits.append(0.5 * float((W[:, Pc] * E).sum() - (E * E / (rho * c[Pc])).sum()))
            score = group_scores(problem, c * (W_hat * W_hat).sum(0))
            values.append(fits[-1] + 0.5 * rho * float(score[~keep].sum()) + pruned_cost(group_cost, keep))
        penalized.append(values)
        changes.append(changed)
    keep = keep_largest(s_step_scores(schedule[-1]), g - k)
    stats = {
        "iterations": iterations,
        "rho": list(schedule),
        "pruned_per_step": list(counts),
        "mask_changes": changes,
        "penalized_objective": penalized,  # one list per step
        "penalty_fit": fits,
    }
    candidates = {"penalty": keep}
    if guard:
        # The rho -> 0 limit of the method (OBS scores of the dense weight) and the score selections
        # (Wanda's weighting, magnitude): continue from whichever refits best.
        candidates["obs_score"] = keep_largest(obs_score, g - k)
        candidates["weighted_magnitude"] = keep_largest(unrefit, g - k)
        candidates["magnitude"] = keep_largest(group_scores(problem, (W * W).sum(0)), g - k)
    # Exact refit error of each mask from the pruned block of H⁻¹ (|P|×|P|), without refitting.
    errors = {name: mask_objective(Hinv, W, s.columns(~mask)) + pruned_cost(group_cost, mask)
              for name, mask in candidates.items()}
    start = min(errors, key=errors.get)
    stats["start_errors"] = errors
    stats["start"] = start
    keep = candidates[start]
    if swap:
        W_hat, keep, swap_stats = swap_then_refit(problem, keep, max_swaps=max_swaps, kernel=kernel,
                                                  start_error=errors[start], group_cost=group_cost)
        stats.update(swap_stats)
    else:
        _, W_hat = refit_through_inverse(Hinv, W, s.columns(~keep))
    return W_hat, keep, stats


# --- unstructured and N:M --------------------------------------------------------------------------


def _project_count(problem: LayerProblem, scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Projection onto the structure with ``n_pruned`` weights pruned (N:M: its fixed pattern)."""
    if isinstance(problem.structure, Unstructured):
        return keep_largest(scores.flatten(), scores.numel() - n_pruned).reshape(scores.shape)
    return project(problem, scores)


def _spap_rows(problem: LayerProblem, schedule, max_inner: int, gradual: bool, guard: bool, swap: bool = True,
               max_swaps: int = MAX_SWAPS, kernel: str = "auto", dtype: torch.dtype = torch.float32):
    W64, H = problem.W64, problem.hessian
    k = problem.n_pruned_target
    if k == 0:
        return W64.clone(), torch.ones_like(W64, dtype=torch.bool), {"iterations": 0}
    c64 = 1.0 / problem.hessian_inverse.diagonal()
    # The rounds only steer the mask (the final support is refit exactly, in float64): in float32 their
    # triangular solves and elementwise passes take about half the time.  Each ρ's factor is computed in
    # float64 and rounded.
    W, c, WH = W64.to(dtype), c64.to(dtype), (W64 @ H).to(dtype)
    rounds = len(schedule) * max_inner
    counts = prune_schedule(k, rounds, gradual)
    # Scaled multiplier U of the constraint Ŵ = Z: it keeps the pull of the weights already pruned, so a
    # weight the fit wants back can return while ρ is still moderate (a pure penalty freezes the mask
    # once ρ is large; docs/method.md §6).
    keep = _project_count(problem, W * W * c, counts[0])
    Z = W * keep
    U = torch.zeros_like(W)
    residual: list[float] = []
    t = 0
    for i, rho in enumerate(schedule):
        if i:
            U *= schedule[i - 1] / rho  # the multiplier ρU is unchanged by a new ρ
        L = cholesky(H + rho * torch.diag(c64), what="the penalty system").to(dtype)
        for _ in range(max_inner):
            # Ŵ-step: Ŵ (H + ρC) = W H + ρ (Z − U) C, one Cholesky per ρ shared by every row.
            # Two triangular solves on the right: faster than cholesky_solve on the transposed rows.
            V = torch.linalg.solve_triangular(L.T, WH + rho * (Z - U) * c, upper=True, left=False)
            W_hat = torch.linalg.solve_triangular(L, V, upper=False, left=False)
            S = W_hat + U
            keep = _project_count(problem, S * S * c, counts[t])  # Z-step: exact projection
            Z = S * keep
            U = S - Z
            residual.append(float((((W_hat - Z) ** 2) * c).sum().sqrt()))
            t += 1
    stats = {"iterations": t, "rho": list(schedule), "pruned_per_step": counts, "constraint_residual": residual}
    W_hat = refit_rows(problem, keep, start=Z.to(H.dtype))  # the last iterate is close: CG starts there
    if guard:
        # The OBS-score mask's refit only matters if it beats the penalty mask's: its refit stops as soon
        # as its objective provably cannot (refit_rows_below), which is usually after a few iterations.
        start = project(problem, W64 * W64 * c64)
        e_pen = problem.objective(W_hat)
        below = refit_rows_below(problem, start, e_pen)
        W_start, e_start = below if below is not None else (None, None)
        stats["start_errors"] = {"penalty": e_pen, "obs_score": e_start}
        if below is not None:
            stats["fallback"] = "OBS-score mask refit beat the penalty mask"
            keep, W_hat = start, W_start
    if swap:
        # Row by row to a 1-swap local optimum; it returns the exact refit of its mask.
        keep, W_hat, swap_stats = row_swap_search(problem, keep, max_swaps=max_swaps, kernel=kernel)
        stats.update({"swaps": swap_stats["swaps"], "local_optimum": swap_stats["local_optimum"],
                      "row_swap": swap_stats})
    return W_hat, keep, stats
