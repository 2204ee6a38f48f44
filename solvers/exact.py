"""Exact solvers for small problems: enumeration (ground truth for tests) and the MIQP.

Enumeration uses the closed-form error of a pruned column set ``P`` (OBS, Hassibi & Stork 1993)::

    min_{Ŵ: Ŵ_P = 0} ½ tr((Ŵ−W) H (Ŵ−W)ᵀ) = ½ tr(W_P (H⁻¹_PP)⁻¹ W_Pᵀ)

so each candidate costs one small solve, batched over candidates of equal size.

- Column groups: every set of ``k`` pruned groups.
- Unstructured: per row, the best error for every prune count (all column subsets of the row), then a
  knapsack over rows so that the counts add up to the layer target exactly.
- N:M: per row, every combination of per-block choices.
"""

from __future__ import annotations

import itertools
import math

import torch

from .validation import Interval, Options
from .problem import LayerProblem
from .refit import refit
from .registry import register
from .structure import NM, ColumnGroups

_OPTIONS = {
    "backend": Options(("enumerate", "miqp")),
    "max_candidates": Interval(int, 1, None),
    "solver": Options(("SCIP",)),  # the mixed-integer QP solvers offered (solvers.miqp.MIQP_SOLVERS)
    "time_limit": Interval(float, 0.0, None, closed="neither"),
}


class ProblemTooLargeError(ValueError):
    """The exact solver refuses: the problem has too many candidates for enumeration."""


def pruned_set_errors(Hinv: torch.Tensor, W: torch.Tensor, sets: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Exact refit errors ``½ tr(W_P (Hinv_PP)⁻¹ W_Pᵀ)`` for a batch of equal-sized column sets.

    Parameters
    ----------
    Hinv : Tensor (n, n) float64, the inverse (damped) Gram matrix.
    W : Tensor (m, n) float64.
    sets : LongTensor (c, s): ``c`` candidate pruned column sets of size ``s``.
    """
    out = []
    for i in range(0, sets.shape[0], batch):
        P = sets[i : i + batch]
        M = Hinv[P[:, :, None], P[:, None, :]]  # (b, s, s)
        WP = W[:, P].permute(1, 2, 0)  # (b, s, m)
        X = torch.linalg.solve(M, WP)  # (b, s, m)
        out.append(0.5 * (WP * X).sum((1, 2)))
    return torch.cat(out) if out else torch.zeros(0, dtype=W.dtype, device=W.device)


def _enumerate_columns(problem: LayerProblem, max_candidates: int) -> torch.Tensor:
    s: ColumnGroups = problem.structure  # type: ignore[assignment]
    g, k = s.n_groups, problem.n_pruned_target
    count = math.comb(g, k)
    if count > max_candidates:
        raise ProblemTooLargeError(
            f"Exact enumeration would try C({g}, {k}) = {count} masks, above max_candidates={max_candidates}."
        )
    keep = torch.ones(g, dtype=torch.bool, device=problem.device)
    if k == 0:
        return keep
    combos = torch.tensor(list(itertools.combinations(range(g), k)), dtype=torch.long, device=problem.device)
    Hinv, W = problem.hessian_inverse, problem.W64
    if s.group_size is not None:
        cols = s.index(problem.device)[combos].reshape(combos.shape[0], -1)
        errors = pruned_set_errors(Hinv, W, cols)
    else:
        errors = torch.stack(
            [pruned_set_errors(Hinv, W, s.columns(_mask(g, c, problem.device))[None])[0] for c in combos]
        )
    keep[combos[int(torch.argmin(errors))]] = False
    return keep


def _mask(g: int, pruned: torch.Tensor, device) -> torch.Tensor:
    m = torch.zeros(g, dtype=torch.bool, device=device)
    m[pruned] = True
    return m


def _row_best_by_count(Hinv: torch.Tensor, w: torch.Tensor, n: int) -> tuple[list[float], list[tuple]]:
    """For one row: the least error and its pruned set for every prune count 0..n."""
    best, arg = [0.0], [()]
    for c in range(1, n + 1):
        combos = torch.tensor(list(itertools.combinations(range(n), c)), dtype=torch.long, device=w.device)
        errs = pruned_set_errors(Hinv, w[None, :], combos)
        i = int(torch.argmin(errs))
        best.append(float(errs[i]))
        arg.append(tuple(combos[i].tolist()))
    return best, arg


def _enumerate_unstructured(problem: LayerProblem, max_candidates: int) -> torch.Tensor:
    m, n = problem.shape
    if m * 2**n > max_candidates:
        raise ProblemTooLargeError(
            f"Exact unstructured enumeration tries {m}·2^{n} = {m * 2**n} masks, above max_candidates={max_candidates}."
        )
    Hinv, W, k = problem.hessian_inverse, problem.W64, problem.n_pruned_target
    rows = [_row_best_by_count(Hinv, W[r], n) for r in range(m)]
    # Knapsack over rows: cost[r][c] for pruning c weights in row r, total exactly k.
    inf = float("inf")
    table = [0.0] + [inf] * k
    choice = []
    for best, _ in rows:
        new = [inf] * (k + 1)
        pick = [0] * (k + 1)
        for total in range(k + 1):
            for c in range(min(n, total) + 1):
                v = table[total - c] + best[c]
                if v < new[total]:
                    new[total], pick[total] = v, c
        table = new
        choice.append(pick)
    keep = torch.ones(m, n, dtype=torch.bool, device=problem.device)
    total = k
    for r in range(m - 1, -1, -1):
        c = choice[r][total]
        for j in rows[r][1][c]:
            keep[r, j] = False
        total -= c
    return keep


def _enumerate_nm(problem: LayerProblem, max_candidates: int) -> torch.Tensor:
    s: NM = problem.structure  # type: ignore[assignment]
    m, n = problem.shape
    per_block = list(itertools.combinations(range(s.m), s.m - s.n))
    count = len(per_block) ** (n // s.m)
    if m * count > max_candidates:
        raise ProblemTooLargeError(
            f"Exact N:M enumeration tries {m}·{count} masks, above max_candidates={max_candidates}."
        )
    combos = []
    for choice in itertools.product(per_block, repeat=n // s.m):
        combos.append([b * s.m + j for b, block in enumerate(choice) for j in block])
    sets = torch.tensor(combos, dtype=torch.long, device=problem.device)
    Hinv, W = problem.hessian_inverse, problem.W64
    keep = torch.ones(m, n, dtype=torch.bool, device=problem.device)
    for r in range(m):
        errs = pruned_set_errors(Hinv, W[r][None, :], sets)
        keep[r, sets[int(torch.argmin(errs))]] = False
    return keep


@register(
    "exact",
    reference="Exhaustive enumeration with the closed-form OBS error (Hassibi & Stork 1993); "
    "or the mixed-integer QP solved by SCIP (Bestuzheva et al. 2021) through cvxpy.",
    options=_OPTIONS,
)
def exact(
    problem: LayerProblem,
    *,
    backend: str = "enumerate",
    max_candidates: int = 500_000,
    solver: str = "SCIP",
    time_limit: float = 600.0,
):
    """The global optimum of a small problem, by enumeration or by the MIQP; refuses large problems.

    With ``backend="miqp"`` the optimum is proven only when ``stats["status"] == "optimal"``: a run
    stopped by ``time_limit`` returns the refit of the best mask found, with SCIP's status
    (``"timelimit"``), ``stats["optimal"]`` False and the relative MIP gap ``stats["gap"]``."""
    if backend == "miqp":
        from .miqp import solve_miqp

        keep, info = solve_miqp(problem, solver=solver, time_limit=time_limit)
        return refit(problem, keep), keep, {"iterations": 1, **info}
    s = problem.structure
    if isinstance(s, ColumnGroups):
        keep = _enumerate_columns(problem, max_candidates)
    elif isinstance(s, NM):
        keep = _enumerate_nm(problem, max_candidates)
    else:
        keep = _enumerate_unstructured(problem, max_candidates)
    return refit(problem, keep), keep, {"iterations": 1, "backend": "enumerate"}
