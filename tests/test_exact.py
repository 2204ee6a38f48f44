"""The exact solvers: the cvxpy MIQP against enumeration, the refit against least squares, big-M."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

import solvers
from solvers.exact import ProblemTooLargeError
from solvers.miqp import big_m
from solvers.synthetic import make_problem

cp = pytest.importorskip("cvxpy")
needs_scip = pytest.mark.skipif("SCIP" not in cp.installed_solvers(), reason="SCIP (pyscipopt) not installed")

TINY = [
    ("channels", lambda: solvers.channels(6), {"n_prune": 3}),
    ("heads", lambda: solvers.heads(6, 2), {"n_prune": 1}),
    ("unstructured", lambda: solvers.Unstructured(), {"n_prune": 7}),
    ("2:4", lambda: solvers.NM(2, 4), {}),
]


@needs_scip
@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("name, structure, target", TINY, ids=[t[0] for t in TINY])
def test_miqp_agrees_with_enumeration(kind, name, structure, target):
    for seed in range(2):
        d_in = 8 if name == "2:4" else 6
        p = make_problem(3, d_in, kind=kind, structure=structure(), seed=seed, **target)
        enum = solvers.solve(p, "exact")
        miqp = solvers.solve(p, "exact", backend="miqp")
        assert miqp.stats["status"] == "optimal"
        assert math.isclose(miqp.objective, enum.objective, rel_tol=1e-5, abs_tol=1e-9 * p.dense_energy)
        # The MIQP's own optimal value is the same quantity, computed by SCIP.
        assert math.isclose(miqp.stats["miqp_objective"], enum.objective, rel_tol=1e-4, abs_tol=1e-7 * p.dense_energy)


def test_enumeration_is_the_brute_force_optimum():
    """Enumeration = min over every kept set of the closed-form refit, computed here independently."""
    p = make_problem(4, 7, kind="correlated", n_prune=3, seed=5)
    H, W = p.hessian, p.W64
    best = math.inf
    for pruned in itertools.combinations(range(7), 3):
        K = [j for j in range(7) if j not in pruned]
        # Least squares on the kept columns: min ‖(Ŵ_K X_K − W X)‖ ⇔ Ŵ_K H_KK = W H_{:,K}.
        W_K = torch.linalg.solve(H[K][:, K], (W @ H[:, K]).T).T
        W_hat = torch.zeros_like(W)
        W_hat[:, K] = W_K
        best = min(best, p.objective(W_hat))
    assert math.isclose(solvers.solve(p, "exact").objective, best, rel_tol=1e-10)


def test_big_m_bounds_every_optimal_weight():
    """|ŵ_ri| ≤ M_ri for the refit of every kept set, so the big-M model cuts off no solution."""
    p = make_problem(3, 6, kind="correlated", n_prune=2, seed=1)
    M = big_m(p)
    for pruned in itertools.combinations(range(6), 2):
        keep = torch.ones(6, dtype=torch.bool)
        keep[list(pruned)] = False
        W_hat = solvers.refit_columns(p, keep)
        assert bool((W_hat.abs() <= M + 1e-9).all())


def test_exact_refuses_large_problems():
    p = make_problem(4, 64, sparsity=0.5)
    with pytest.raises(ProblemTooLargeError, match="max_candidates"):
        solvers.solve(p, "exact")
    with pytest.raises(ValueError, match="'backend'"):
        solvers.solve(p, "exact", backend="guess")


@pytest.mark.parametrize("structure", ["channels", "unstructured", "2:4"])
def test_refit_matches_least_squares(structure):
    p = make_problem(5, 8, kind="correlated", structure=solvers.parse_structure(structure, 8),
                     **({} if structure == "2:4" else {"sparsity": 0.5}), seed=2)
    keep = solvers.solve(p, "magnitude").keep
    # the direct solves; the conjugate-gradient refit is checked against them in test_refit.py
    W_hat = solvers.refit_columns(p, keep) if keep.ndim == 1 else solvers.refit_rows(p, keep, method="cholesky")
    entries = keep if keep.ndim == 2 else p.structure.column_keep_mask(keep, 8).expand(5, 8)
    for r in range(5):
        K = torch.nonzero(entries[r]).flatten()
        expected = torch.linalg.solve(p.hessian[K][:, K], (p.W64[r] @ p.hessian[:, K]))
        torch.testing.assert_close(W_hat[r, K], expected, rtol=1e-9, atol=1e-10)
        assert bool((W_hat[r, ~entries[r]] == 0).all())


@pytest.mark.parametrize("budget", [10**9, 200, 1])
@pytest.mark.parametrize("seed", range(3))
def test_row_refit_with_unequal_counts_matches_least_squares(budget, seed, monkeypatch):
    """Rows keep 0..all of their weights; small element budgets force many batches, each padded to its
    own largest count through the identity block appended to H."""
    refit_module = importlib.import_module("solvers.refit")
    monkeypatch.setattr(refit_module, "_ROW_CHUNK_ELEMENTS", budget)
    p = make_problem(9, 10, kind="correlated", structure=solvers.Unstructured(), sparsity=0.5, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(9, 10, generator=gen) < torch.linspace(0.0, 1.0, 9)[:, None]
    keep[0] = False
    keep[-1] = True
    W_hat = refit_module.refit_rows(p, keep, method="cholesky")
    for r in range(9):
        K = torch.nonzero(keep[r]).flatten()
        if K.numel():
            expected = torch.linalg.solve(p.hessian[K][:, K], p.W64[r] @ p.hessian[:, K])
            torch.testing.assert_close(W_hat[r, K], expected, rtol=1e-9, atol=1e-10)
        assert bool((W_hat[r, ~keep[r]] == 0).all())


def test_spap_near_the_optimum_on_small_problems():
    """A looser version of benchmarks/spap_vs_exact.py: ≥ 90% within 1% of the optimum over random and
    strongly correlated H, channels and heads; never worse than magnitude selection + exact refit."""
    gaps, worse = [], 0
    for kind in ("random", "correlated"):
        for structure in (solvers.channels(16), solvers.heads(16, 2)):
            for seed in range(10):
                p = make_problem(12, 16, kind=kind, structure=structure, sparsity=0.5, seed=seed)
                optimum = solvers.solve(p, "exact").objective
                spap = solvers.solve(p, "spap").objective
                worse += spap > solvers.solve(p, "magnitude", refit=True).objective * (1 + 1e-9)
                gaps.append((spap - optimum) / optimum)
    assert min(gaps) > -1e-9  # nothing beats the optimum
    assert sum(g <= 0.01 for g in gaps) >= 0.9 * len(gaps)
    assert worse == 0



def test_miqp_solver_must_solve_mixed_integer_qps():
    """HiGHS (MILP and QP, not MIQP) is no longer offered; the check names the allowed value."""
    p = make_problem(3, 6, n_prune=3, seed=0)
    with pytest.raises(ValueError, match="'solver'.*'SCIP'"):
        solvers.solve(p, "exact", backend="miqp", solver="HIGHS")
    from solvers.miqp import solve_miqp

    with pytest.raises(ValueError, match="'solver'.*'SCIP'.*mixed-integer"):
        solve_miqp(p, solver="HIGHS")


@pytest.mark.skipif("HIGHS" not in cp.installed_solvers(), reason="HiGHS not installed")
def test_highs_cannot_solve_the_miqp():
    """Why HiGHS was dropped: cvxpy refuses the model with it (HiGHS has no mixed-integer QP)."""
    model = make_problem(3, 6, n_prune=3, seed=0).to_cvxpy()
    with pytest.raises(cp.error.SolverError, match="HIGHS cannot solve"):
        model.problem.solve(solver="HIGHS")


@needs_scip
def test_a_stopped_miqp_reports_its_status_and_gap():
    """A limit that stops SCIP before it proves optimality (here one branch-and-bound node, which does
    not depend on the machine's speed) gives a mask with SCIP's status and a positive gap, never
    "optimal"; a proven optimum has gap 0."""
    from solvers.miqp import solve_miqp

    p = make_problem(4, 16, kind="correlated", structure=solvers.channels(16), n_prune=8, seed=0)
    keep, info = solve_miqp(p, scip_params={"limits/nodes": 1})
    assert info["status"] == "nodelimit" and info["optimal"] is False
    assert 0 < info["gap"] <= 1 and int(keep.sum()) == 8
    small = make_problem(3, 6, n_prune=3, seed=0)
    sol = solvers.solve(small, "exact", backend="miqp")
    assert sol.stats["status"] == "optimal" and sol.stats["optimal"] and sol.stats["gap"] == 0.0
