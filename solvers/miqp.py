"""The layer problem as an explicit mixed-integer quadratic program, built with cvxpy.

Variables: ``Ŵ`` (continuous, ``d_out×d_in``) and ``z`` (binary; 1 = kept) per group or per weight::

    minimize    ½ ‖(Ŵ − W) L‖²_F            (H_d = L Lᵀ, so this is ½ tr((Ŵ−W) H_d (Ŵ−W)ᵀ))
    subject to  |Ŵ_ri| ≤ M_ri z_{unit(r,i)}   (big-M link: a pruned unit has zero weights)
                Σ z = number kept            (or, for N:M, Σ over each block of m = n)

Big-M, derived (not guessed).  Ŵ = 0 is feasible for every mask, and for a fixed mask the rows
decouple, so each row of an optimal Ŵ satisfies ``‖ŵ_r − w_r‖_H ≤ ‖w_r‖_H`` (its error is at most that
of the zero row).  By Cauchy–Schwarz in the ``H`` inner product, ``|e_iᵀ v| ≤ √(H⁻¹_ii) ‖v‖_H``, hence::

    |ŵ_ri| ≤ M_ri = |w_ri| + ‖w_r‖_H √(H⁻¹_ii)

holds at every optimum, so the big-M constraints cut off no optimal solution.

The mixed-integer solver is SCIP (``pip install pyscipopt``, the ``exact`` extra); cvxpy is imported
lazily.  SCIP is the only solver offered: of cvxpy's other installable solvers HiGHS and SciPy solve
mixed-integer *linear* programs only (cvxpy 1.9 refuses this model with them: "The solver HIGHS cannot
solve this problem"), and the solvers that take integer variables with a quadratic or second-order-cone
objective (Gurobi, CPLEX, MOSEK, Xpress, COPT) are commercial and untested here.  A time limit that
stops SCIP before it proves optimality is reported (``status``, ``gap``), never passed off as optimal.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .validation import InvalidArgumentError
from .structure import NM, ColumnGroups

if TYPE_CHECKING:  # only for annotations: LayerProblem.to_cvxpy imports this module
    from .problem import LayerProblem


@dataclass
class MIQP:
    """A built model: the cvxpy problem, its variables and the derived big-M bounds."""

    problem: Any  # cvxpy.Problem
    W_hat: Any  # cvxpy.Variable (d_out, d_in)
    z: Any  # cvxpy.Variable, boolean: (n_groups,) or (d_out, d_in)
    big_m: np.ndarray  # (d_out, d_in)


def big_m(problem: LayerProblem) -> torch.Tensor:
    """The bounds ``M_ri = |w_ri| + ‖w_r‖_H √(H⁻¹_ii)`` (float64, shape ``(d_out, d_in)``)."""
    W, H, Hinv = problem.W64, problem.hessian, problem.hessian_inverse
    row_norm = ((W @ H) * W).sum(1).clamp_min(0).sqrt()  # ‖w_r‖_H
    return W.abs() + row_norm[:, None] * Hinv.diagonal().clamp_min(0).sqrt()[None, :]


def build_miqp(problem: LayerProblem) -> MIQP:
    """Build the MIQP of ``problem`` (column groups, unstructured or N:M)."""
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The MIQP needs cvxpy: pip install 'spap[exact]'.") from exc
    W = problem.W64.cpu().numpy()
    L = problem.hessian_cholesky.cpu().numpy()
    M = big_m(problem).cpu().numpy()
    d_out, d_in = W.shape
    W_hat = cp.Variable((d_out, d_in))
    s = problem.structure
    objective = cp.Minimize(0.5 * cp.sum_squares((W_hat - W) @ L))
    if isinstance(s, ColumnGroups):
        z = cp.Variable(s.n_groups, boolean=True)
        # Column c of group j: |Ŵ[:, c]| ≤ M[:, c] z_j.  Build the (d_in, n_groups) incidence matrix.
        incidence = np.zeros((d_in, s.n_groups))
        for j, group in enumerate(s.groups):
            incidence[list(group), j] = 1.0
        cols = np.nonzero(incidence.sum(1) > 0)[0]
        kept_col = cp.reshape(incidence[cols] @ z, (1, len(cols)), order="C")  # z of each column's group
        constraints = [
            cp.abs(W_hat[:, cols]) <= cp.multiply(M[:, cols], np.ones((d_out, 1)) @ kept_col),
            cp.sum(z) == s.n_groups - problem.n_pruned_target,
        ]
    else:
        z = cp.Variable((d_out, d_in), boolean=True)
        constraints = [cp.abs(W_hat) <= cp.multiply(M, z)]
        if isinstance(s, NM):
            for b in range(d_in // s.m):
                constraints.append(cp.sum(z[:, b * s.m : (b + 1) * s.m], axis=1) == s.n)
        else:
            constraints.append(cp.sum(z) == d_out * d_in - problem.n_pruned_target)
    return MIQP(cp.Problem(objective, constraints), W_hat, z, M)


MIQP_SOLVERS = ("SCIP",)


def solve_miqp(problem: LayerProblem, *, solver: str = "SCIP", time_limit: float = 600.0,
               scip_params: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Solve the MIQP within ``time_limit`` seconds; returns the kept mask (groups or weights) of the best
    solution found, and what the solver says of it.  ``scip_params``: further SCIP parameters (e.g.
    ``{"limits/nodes": 1}``), passed as they are.

    The information: ``status`` (``"optimal"`` only when SCIP proved it; otherwise SCIP's own status,
    e.g. ``"timelimit"``, and the mask is the best found, not a proven optimum), ``optimal`` (bool),
    ``gap`` (relative MIP gap ``(primal − dual bound) / |primal bound|`` of the MIQP's objective; 0 when
    proven optimal), ``miqp_objective`` (the best solution's objective), ``solver`` and ``backend``.
    Raises ``RuntimeError`` naming the status when no feasible mask was found in time.
    """
    import cvxpy as cp

    if solver not in MIQP_SOLVERS:
        raise InvalidArgumentError(f"The 'solver' argument of solve_miqp must be one of "
                                   f"{', '.join(map(repr, MIQP_SOLVERS))} (a mixed-integer QP solver). Got {solver!r}.")
    if solver not in cp.installed_solvers():
        raise InvalidArgumentError(
            f"The 'solver' argument names {solver!r}, which is not installed; installed: {cp.installed_solvers()}. "
            "Install SCIP with: pip install pyscipopt"
        )
    model = build_miqp(problem)
    with warnings.catch_warnings():  # cvxpy's "Solution may be inaccurate" on a limit: `status` says it
        warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
        model.problem.solve(solver=solver, scip_params={"limits/time": float(time_limit), **(scip_params or {})})
    stats = model.problem.solver_stats.extra_stats or {}
    scip = stats.get("model")
    scip_status = scip.getStatus() if scip is not None else str(stats.get("scip_status", model.problem.status))
    info = {"backend": "miqp", "solver": solver, "status": scip_status, "optimal": scip_status == "optimal"}
    if model.z.value is None:
        raise RuntimeError(f"The MIQP solver {solver} returned no solution (status {scip_status!r}, time limit "
                           f"{time_limit} s).")
    value = float(model.problem.value)
    info["miqp_objective"] = value
    if scip is not None:  # SCIP's bounds are on its model's objective, which differs from ours by a constant
        absolute = max(float(scip.getPrimalbound()) - float(scip.getDualbound()), 0.0)
        info["gap"] = 0.0 if info["optimal"] else absolute / max(abs(value), 1e-300)
    else:
        info["gap"] = 0.0 if info["optimal"] else float("inf")
    keep = torch.from_numpy(np.round(model.z.value).astype(bool)).to(problem.device)
    if isinstance(problem.structure, ColumnGroups):
        keep = keep.reshape(-1)
    return keep, info
