"""Property-based tests (hypothesis) of the invariants every solver result must satisfy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solvers
from solvers.synthetic import make_problem

from .helpers import DEVICES, kept_gradient

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METHODS = ["spap", "magnitude", "wanda", "exact"]


@st.composite
def small_problems(draw, structures=("channels", "heads", "unstructured", "2:4")):
    """Problems small enough for the exact solvers: ≤ 12 groups, ≤ 24 weights unstructured."""
    kind = draw(st.sampled_from(["random", "correlated"]))
    structure = draw(st.sampled_from(structures))
    seed = draw(st.integers(0, 10_000))
    if structure == "channels":
        d_in = draw(st.integers(3, 12))
        return make_problem(draw(st.integers(1, 6)), d_in, kind=kind, n_prune=draw(st.integers(0, d_in - 1)), seed=seed)
    if structure == "heads":
        n_heads, head_dim = draw(st.integers(2, 6)), draw(st.integers(1, 3))
        return make_problem(
            draw(st.integers(1, 6)), n_heads * head_dim, kind=kind, structure=solvers.heads(n_heads * head_dim, head_dim),
            n_prune=draw(st.integers(0, n_heads - 1)), seed=seed,
        )
    if structure == "unstructured":
        d_out, d_in = draw(st.integers(1, 3)), draw(st.integers(2, 8))
        return make_problem(d_out, d_in, kind=kind, structure=solvers.Unstructured(),
                            n_prune=draw(st.integers(0, d_out * d_in - 1)), seed=seed)
    return make_problem(draw(st.integers(1, 3)), 4 * draw(st.integers(1, 2)), kind=kind, structure=solvers.NM(2, 4), seed=seed)


def _entry_keep(problem, solution) -> torch.Tensor:
    """Kept mask over weights, shape (d_out, d_in)."""
    s = problem.structure
    if isinstance(s, solvers.ColumnGroups):
        cols = s.column_keep_mask(solution.keep, problem.shape[1])
        return cols.expand(problem.shape)
    return solution.keep


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(problem=small_problems())
def test_exact_sparsity_and_structure(method, problem):
    options = {"refit": True} if method in ("magnitude", "wanda") else {}
    sol = solvers.solve(problem, method, **options)
    s = problem.structure
    assert sol.weight.shape == problem.shape and sol.weight.dtype == problem.weight.dtype
    assert int((~sol.keep).sum()) == problem.n_pruned_target
    if isinstance(s, solvers.ColumnGroups):
        assert sol.keep.shape == (s.n_groups,)
    else:
        assert sol.keep.shape == problem.shape
    if isinstance(s, solvers.NM):
        per_block = sol.keep.reshape(problem.shape[0], -1, s.m).sum(-1)
        assert bool((per_block == s.n).all())
    # Pruned entries are exactly zero.
    assert bool((sol.weight[~_entry_keep(problem, sol)] == 0).all())
    assert math.isclose(sol.error, problem.error(sol.weight), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("method", ["spap", "exact", "magnitude"])
@SETTINGS
@given(problem=small_problems())
def test_refit_is_optimal_for_its_mask(method, problem):
    """The gradient of the damped objective vanishes on every kept weight."""
    sol = solvers.solve(problem, method, **({"refit": True} if method == "magnitude" else {}))
    assert kept_gradient(problem, sol.weight, _entry_keep(problem, sol)) < 1e-8


@SETTINGS
@given(problem=small_problems())
def test_spap_between_optimum_and_heuristics(problem):
    """optimum ≤ SPAP ≤ magnitude + refit (and ≤ Wanda + refit for column structures)."""
    spap = solvers.solve(problem, "spap").objective
    optimum = solvers.solve(problem, "exact").objective
    magnitude = solvers.solve(problem, "magnitude", refit=True).objective
    tol = 1e-9 * max(problem.dense_energy, 1e-12)
    assert optimum <= spap + tol
    if isinstance(problem.structure, solvers.ColumnGroups):
        # The guard starts the swap search from the best of the penalty, weighted-magnitude and
        # magnitude masks, so SPAP never loses to magnitude selection.
        assert spap <= magnitude + tol
        assert spap <= solvers.solve(problem, "wanda", refit=True).objective + tol


@SETTINGS
@given(problem=small_problems(structures=("channels", "heads")))
def test_spap_ends_at_a_one_swap_local_optimum(problem):
    """No exchange of one pruned and one kept group lowers the error (checked by brute force)."""
    sol = solvers.solve(problem, "spap")
    s = problem.structure
    best = sol.objective
    for p in torch.nonzero(~sol.keep).flatten().tolist():
        for q in torch.nonzero(sol.keep).flatten().tolist():
            keep = sol.keep.clone()
            keep[p], keep[q] = True, False
            W_hat = solvers.refit_columns(problem, s.column_keep_mask(keep, problem.shape[1]))
            assert problem.objective(W_hat) >= best * (1 - 1e-7) - 1e-12


@SETTINGS
@given(problem=small_problems(structures=("channels", "heads", "unstructured", "2:4")))
def test_penalized_objective_never_increases_at_fixed_rho(problem):
    """Each W-step and s-step minimises F_ρ exactly, so F_ρ is monotone within one ρ."""
    stats = solvers.solve(problem, "spap").stats
    for values in stats.get("penalized_objective", []):
        for before, after in zip(values, values[1:]):
            assert after <= before * (1 + 1e-9) + 1e-12


@SETTINGS
@given(problem=small_problems(structures=("channels",)), seed=st.integers(0, 1000))
def test_invariant_to_permuting_groups(problem, seed):
    """Permuting the columns of W and H (and the groups with them) permutes the answer."""
    perm = torch.randperm(problem.shape[1], generator=torch.Generator().manual_seed(seed))
    permuted = solvers.LayerProblem(
        problem.weight[:, perm], problem.gram[perm][:, perm], problem.structure, n_prune=problem.n_pruned_target
    )
    for method in ("spap", "exact"):
        a, b = solvers.solve(problem, method), solvers.solve(permuted, method)
        assert math.isclose(a.error, b.error, rel_tol=1e-6, abs_tol=1e-9 * problem.dense_energy)
        torch.testing.assert_close(b.weight, a.weight[:, perm])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("structure", ["channels", "heads", "unstructured"])
def test_sparsity_zero_returns_w_unchanged(method, structure):
    s = {"channels": solvers.channels(8), "heads": solvers.heads(8, 2), "unstructured": solvers.Unstructured()}[structure]
    p = make_problem(3, 8, kind="correlated", structure=s, sparsity=0.0)
    sol = solvers.solve(p, method)
    assert torch.equal(sol.weight, p.weight)
    assert sol.error == 0.0 and bool(sol.keep.all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["channels", "heads", "unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_same_code_on_every_device(device, structure, method):
    s = solvers.parse_structure(structure, 8, head_dim=2)
    target = {} if structure == "2:4" else {"sparsity": 0.5}
    p = make_problem(3, 8, kind="correlated", structure=s, device=device, dtype=torch.float32, **target)
    sol = solvers.solve(p, method)
    assert sol.weight.device.type == device and sol.keep.device.type == device
    assert sol.weight.dtype == torch.float32
    ref = solvers.solve(make_problem(3, 8, kind="correlated", structure=s, dtype=torch.float32, **target), method)
    assert torch.equal(sol.keep.cpu(), ref.keep)
    assert math.isclose(sol.error, ref.error, rel_tol=1e-6)


@pytest.mark.parametrize("method", ["spap", "magnitude", "wanda"])
def test_deterministic(method):
    p = make_problem(6, 24, kind="correlated", sparsity=0.5, seed=7)
    a, b = solvers.solve(p, method), solvers.solve(p, method)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.weight, b.weight)


def _check_swap_errors(problem) -> int:
    """Assert the closed-form Δ of every applied swap adds up to the error recomputed from scratch."""
    sol = solvers.solve(problem, "spap")
    errors = sol.stats.get("swap_errors") or []
    if len(errors) > 1:
        start = sol.stats["start_errors"][sol.stats["start"]]
        assert math.isclose(errors[0], start, rel_tol=1e-8, abs_tol=1e-10 * problem.dense_energy)
        assert math.isclose(errors[-1], sol.objective, rel_tol=1e-8, abs_tol=1e-10 * problem.dense_energy)
        assert all(b < a for a, b in zip(errors, errors[1:]))
    return len(errors) - 1


@SETTINGS
@given(problem=small_problems(structures=("channels", "heads")))
def test_swap_predictions_match_recomputed_errors(problem):
    _check_swap_errors(problem)


def test_swap_search_runs_on_hard_problems():
    """Correlated problems where the start is not a local optimum: the swaps happen and add up."""
    swaps = [_check_swap_errors(make_problem(4, 12, kind="correlated", n_prune=6, seed=seed)) for seed in range(20)]
    heads = [_check_swap_errors(make_problem(4, 12, kind="correlated", structure=solvers.heads(12, 2), n_prune=3, seed=seed))
             for seed in range(20)]
    assert sum(s > 0 for s in swaps) >= 2 and sum(h > 0 for h in heads) >= 1


@SETTINGS
@given(problem=small_problems(structures=("channels", "heads")), seed=st.integers(0, 1000))
def test_refit_through_inverse_is_the_exact_refit(problem, seed):
    """SPAP's final refit from H⁻¹ (Woodbury form) equals the refit on the kept block of H, and its
    objective is the damped objective of that refit."""
    from solvers.refit import refit_through_inverse

    s = problem.structure
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(s.n_groups, generator=g) >= problem.n_pruned_target
    cols = s.column_keep_mask(keep, problem.shape[1])
    value, W_hat = refit_through_inverse(problem.hessian_inverse, problem.W64, torch.nonzero(~cols).flatten())
    expected = solvers.refit_columns(problem, cols)
    scale = float(problem.W64.abs().max()) + 1e-12
    assert torch.allclose(W_hat, expected, atol=1e-7 * scale, rtol=1e-6)
    assert bool((W_hat[:, ~cols] == 0).all())
    assert math.isclose(value, problem.objective(expected), rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@SETTINGS
@given(problem=small_problems(structures=("unstructured", "2:4")))
def test_spap_rows_in_either_round_precision(precision, problem):
    """The rounds' precision changes only the path to the mask: the result has the exact count and is the
    exact refit of its mask, in the problem's dtype."""
    sol = solvers.solve(problem, "spap", round_precision=precision)
    assert int((~sol.keep).sum()) == problem.n_pruned_target
    assert sol.weight.dtype == problem.weight.dtype
    assert kept_gradient(problem, sol.weight, sol.keep) < 1e-8


def test_spap_refuses_an_unknown_round_precision():
    p = make_problem(3, 8, structure=solvers.Unstructured(), sparsity=0.5, seed=0)
    with pytest.raises(ValueError, match="round_precision.*'float32', 'float64'"):
        solvers.solve(p, "spap", round_precision="float16")


def _uncompensated_cost(problem, keep: torch.Tensor, beta: float) -> float:
    """β·½ Σ_{j pruned} H_jj ‖W_j‖² over the pruned groups' columns (damped H), computed directly."""
    s = problem.structure
    pruned = ~s.column_keep_mask(keep, problem.shape[1])
    W, H = problem.W64, problem.hessian
    return beta * 0.5 * float((H.diagonal()[pruned] * (W[:, pruned] ** 2).sum(0)).sum())


@SETTINGS
@given(problem=small_problems(structures=("channels", "heads")), beta=st.sampled_from([0.1, 1.0, 10.0]))
def test_spap_with_the_uncompensated_cost_ends_at_a_one_swap_local_optimum_of_its_objective(problem, beta):
    """With ``uncompensated=β`` no exchange of one pruned and one kept group lowers the refit error plus
    β·½ Σ_{pruned} H_jj‖W_j‖² (brute force), and the weight is still the exact refit of the mask."""
    sol = solvers.solve(problem, "spap", uncompensated=beta)
    s = problem.structure
    assert kept_gradient(problem, sol.weight, _entry_keep(problem, sol)) < 1e-8
    best = sol.objective + _uncompensated_cost(problem, sol.keep, beta)
    for p in torch.nonzero(~sol.keep).flatten().tolist():
        for q in torch.nonzero(sol.keep).flatten().tolist():
            keep = sol.keep.clone()
            keep[p], keep[q] = True, False
            W_hat = solvers.refit_columns(problem, s.column_keep_mask(keep, problem.shape[1]))
            assert problem.objective(W_hat) + _uncompensated_cost(problem, keep, beta) >= best * (1 - 1e-7) - 1e-12
    for values in sol.stats.get("penalized_objective", []):  # the cost's s-step is exact too: F_ρ stays monotone
        for before, after in zip(values, values[1:]):
            assert after <= before * (1 + 1e-9) + 1e-12


def test_a_large_uncompensated_weight_prunes_by_the_uncompensated_error_alone():
    """β → ∞: the objective is the no-refit error, minimised by pruning the channels of smallest
    H_jj‖W_j‖²; β = 0 is SPAP unchanged."""
    problem = make_problem(16, 24, kind="correlated", n_prune=9, seed=5)
    W, H = problem.W64, problem.hessian
    alone = H.diagonal() * (W * W).sum(0)
    expected = torch.ones(24, dtype=torch.bool)
    expected[torch.argsort(alone)[:9]] = False
    assert torch.equal(solvers.solve(problem, "spap", uncompensated=1e9).keep, expected)
    plain, zero = solvers.solve(problem, "spap"), solvers.solve(problem, "spap", uncompensated=0.0)
    assert torch.equal(plain.keep, zero.keep) and torch.equal(plain.weight, zero.weight)
    assert not torch.equal(plain.keep, expected)  # the refit matters on this problem: the test can tell


def test_spap_refuses_a_negative_uncompensated_weight_and_one_for_rows():
    problem = make_problem(4, 8, n_prune=2, seed=0)
    with pytest.raises(ValueError, match="uncompensated"):
        solvers.solve(problem, "spap", uncompensated=-1.0)
    rows = make_problem(4, 8, structure=solvers.Unstructured(), n_prune=8, seed=0)
    with pytest.raises(ValueError, match="'uncompensated' option of spap applies to column groups"):
        solvers.solve(rows, "spap", uncompensated=0.5)
    assert solvers.solve(rows, "spap", uncompensated=0.0).keep.sum() == 24


@SETTINGS
@given(problem=small_problems(structures=("channels", "heads")), beta=st.sampled_from([0.1, 1.0, 10.0]),
       seed=st.integers(0, 1000))
def test_swap_search_with_a_group_cost_ends_at_a_one_swap_optimum_from_any_start(problem, beta, seed):
    """``swap_search(group_cost=…)`` from a random mask: the objectives it reports are the refit error plus
    the pruned groups' cost, each swap lowers them, and no single swap lowers the last (brute force)."""
    from solvers.masks import group_scores
    from solvers.swap import swap_search

    s = problem.structure
    W, H = problem.W64, problem.hessian
    k = problem.n_pruned_target
    start = torch.ones(s.n_groups, dtype=torch.bool)
    start[torch.randperm(s.n_groups, generator=torch.Generator().manual_seed(seed))[:k]] = False
    cost = beta * 0.5 * group_scores(problem, H.diagonal() * (W * W).sum(0))

    def objective(keep):
        W_hat = solvers.refit_columns(problem, s.column_keep_mask(keep, problem.shape[1]))
        return problem.objective(W_hat) + _uncompensated_cost(problem, keep, beta)

    keep, stats = swap_search(H, W, s.index(W.device), start, group_cost=cost)
    tol = 1e-8 * max(problem.dense_energy, 1e-12)
    if stats["errors"]:
        assert math.isclose(stats["errors"][0], objective(start), rel_tol=1e-8, abs_tol=tol)
        assert math.isclose(stats["errors"][-1], objective(keep), rel_tol=1e-8, abs_tol=tol)
        assert all(b < a for a, b in zip(stats["errors"], stats["errors"][1:]))
    best = objective(keep)
    for p in torch.nonzero(~keep).flatten().tolist():
        for q in torch.nonzero(keep).flatten().tolist():
            swapped = keep.clone()
            swapped[p], swapped[q] = True, False
            assert objective(swapped) >= best * (1 - 1e-7) - 1e-12
