"""Baseline solvers (obs, sparsegpt, admm, wanda_sp, flap): structure, determinism and cross-checks.

Each cross-check compares against an independent computation that the method must reproduce, so a
wrong update, mask rule or schedule fails it.
"""

from __future__ import annotations

import itertools
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solvers
from solvers.exact import ProblemTooLargeError
from solvers.masks import keep_largest
from solvers.refit import refit, refit_columns, refit_rows
from solvers.synthetic import make_inputs, make_problem

from .helpers import DEVICES

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COLUMN_METHODS = ["obs", "admm", "wanda_sp", "flap"]
ROW_METHODS = ["sparsegpt", "admm"]


@st.composite
def column_problems(draw):
    kind = draw(st.sampled_from(["random", "correlated"]))
    seed = draw(st.integers(0, 10_000))
    d_out = draw(st.integers(1, 8))
    if draw(st.booleans()):
        d_in = draw(st.integers(2, 20))
        return make_problem(d_out, d_in, kind=kind, n_prune=draw(st.integers(0, d_in - 1)), seed=seed)
    n_heads, head_dim = draw(st.integers(2, 6)), draw(st.integers(1, 4))
    return make_problem(d_out, n_heads * head_dim, kind=kind, structure=solvers.heads(n_heads * head_dim, head_dim),
                        n_prune=draw(st.integers(0, n_heads - 1)), seed=seed)


@st.composite
def row_problems(draw):
    kind = draw(st.sampled_from(["random", "correlated"]))
    seed = draw(st.integers(0, 10_000))
    d_out = draw(st.integers(1, 8))
    if draw(st.booleans()):
        n, m = draw(st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]))
        return make_problem(d_out, m * draw(st.integers(1, 5)), kind=kind, structure=solvers.NM(n, m), seed=seed)
    d_in = draw(st.integers(2, 24))
    return make_problem(d_out, d_in, kind=kind, structure=solvers.Unstructured(),
                        n_prune=draw(st.integers(0, d_out * d_in - 1)), seed=seed)


def _check_structure(problem, sol):
    s = problem.structure
    assert sol.weight.shape == problem.shape and sol.weight.dtype == problem.weight.dtype
    assert int((~sol.keep).sum()) == problem.n_pruned_target
    if isinstance(s, solvers.ColumnGroups):
        assert sol.keep.shape == (s.n_groups,)
        kept_cols = s.column_keep_mask(sol.keep, problem.shape[1])
        assert bool((sol.weight[:, ~kept_cols] == 0).all())
    else:
        assert sol.keep.shape == problem.shape
        assert bool((sol.weight[~sol.keep] == 0).all())
    if isinstance(s, solvers.NM):
        assert bool((sol.keep.reshape(problem.shape[0], -1, s.m).sum(-1) == s.n).all())
    assert math.isclose(sol.error, problem.error(sol.weight), rel_tol=1e-9, abs_tol=1e-12)


# --- structure and determinism ----------------------------------------------------------------------


@pytest.mark.parametrize("method", COLUMN_METHODS)
@SETTINGS
@given(problem=column_problems())
def test_column_methods_honour_structure(method, problem):
    _check_structure(problem, solvers.solve(problem, method))


@pytest.mark.parametrize("method", ROW_METHODS)
@SETTINGS
@given(problem=row_problems())
def test_row_methods_honour_structure(method, problem):
    _check_structure(problem, solvers.solve(problem, method, **({"iterations": 8, "prune_iterations": 4} if method == "admm" else {})))


@pytest.mark.parametrize(
    "method, structure",
    [("obs", "channels"), ("obs", "heads"), ("admm", "heads"), ("wanda_sp", "heads"), ("flap", "channels"),
     ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("admm", "unstructured"), ("admm", "2:4")],
)
def test_deterministic(method, structure):
    def run():
        p = make_problem(12, 32, kind="correlated", structure=solvers.parse_structure(structure, 32, head_dim=4),
                         **({} if structure == "2:4" else {"sparsity": 0.5}), seed=7)
        return solvers.solve(p, method)

    a, b = run(), run()
    assert torch.equal(a.keep, b.keep) and torch.equal(a.weight, b.weight)


def test_unequal_groups_and_per_step():
    groups = solvers.column_groups([[0, 5], [1], [2, 3, 4], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]])
    p = make_problem(9, 16, kind="correlated", structure=groups, n_prune=3, seed=3)
    for per_step in (1, 2, 3):
        _check_structure(p, solvers.solve(p, "obs", per_step=per_step))
    _check_structure(p, solvers.solve(p, "admm"))


# --- OBS ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("structure", ["channels", "heads"])
@pytest.mark.parametrize("seed", range(4))
def test_obs_single_group_is_the_optimum(device, kind, structure, seed):
    p = make_problem(7, 18, kind=kind, structure=solvers.parse_structure(structure, 18, head_dim=3), n_prune=1,
                     seed=seed, device=device)
    best = solvers.solve(p, "exact")
    sol = solvers.solve(p, "obs")
    assert torch.equal(sol.keep, best.keep)
    assert math.isclose(sol.objective, best.objective, rel_tol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(problem=column_problems())
def test_obs_weight_is_the_refit_of_its_mask(device, problem):
    """The recursion's weight equals the exact refit, and each greedy step took the cheapest group."""
    if device != "cpu":
        problem = solvers.LayerProblem(problem.weight.to(device), problem.gram.to(device), problem.structure,
                                       n_prune=problem.n_prune)
    sol = solvers.solve(problem, "obs")
    s = problem.structure
    ref = refit_columns(problem, s.column_keep_mask(sol.keep, problem.shape[1]))
    scale = float(problem.W64.abs().max())
    assert float((sol.weight.double() - ref).abs().max()) <= 1e-8 * scale


def test_obs_greedy_order_by_brute_force():
    """Each step removes the group whose removal (with refit) adds the least error given the previous ones."""
    p = make_problem(6, 12, kind="correlated", structure=solvers.heads(12, 2), n_prune=4, seed=11)
    sol = solvers.solve(p, "obs")
    s = p.structure
    removed: list[int] = []
    for _ in range(4):
        def cost(g):
            keep = torch.ones(s.n_groups, dtype=torch.bool)
            keep[removed + [g]] = False
            return p.objective(refit_columns(p, s.column_keep_mask(keep, 12)))
        removed.append(min((g for g in range(s.n_groups) if g not in removed), key=cost))
    assert sorted(removed) == torch.nonzero(~sol.keep).flatten().tolist()
    steps = sol.stats["step_costs"]
    assert len(steps) == 4 and math.isclose(sum(steps), sol.objective, rel_tol=1e-8)


@pytest.mark.parametrize("per_step", [2, 3])
def test_obs_step_costs_are_exact_for_joint_steps(per_step):
    """With several groups per step, each step's cost is their joint removal cost: the running sum is the
    objective of every intermediate mask."""
    p = make_problem(6, 12, kind="correlated", structure=solvers.heads(12, 2), n_prune=4, seed=11)
    sol = solvers.solve(p, "obs", per_step=per_step)
    assert math.isclose(sum(sol.stats["step_costs"]), sol.objective, rel_tol=1e-8)
    first = solvers.solve(dataclasses.replace(p, n_prune=per_step), "obs", per_step=per_step)
    assert math.isclose(sol.stats["step_costs"][0], first.objective, rel_tol=1e-8)


# --- SparseGPT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure, target", [(solvers.Unstructured(), {"sparsity": 0.5}), (solvers.NM(2, 4), {})])
def test_sparsegpt_on_isotropic_diagonal_h_is_magnitude(device, structure, target):
    """No correlations: no OBS update, and the mask is magnitude's (one block holds every column)."""
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    H = 3.0 * torch.eye(32, dtype=torch.float64, device=device)
    p = solvers.LayerProblem(W, H, structure, **target)
    a = solvers.solve(p, "sparsegpt", blocksize=32)
    b = solvers.solve(p, "magnitude", refit=True)
    assert torch.equal(a.keep, b.keep)
    assert torch.allclose(a.weight, b.weight, atol=1e-12)


@pytest.mark.parametrize("blocksize", [4, 128])
def test_sparsegpt_on_diagonal_h_prunes_the_smallest_obs_scores(blocksize):
    """Diagonal ``H``: weights are never updated; N:M keeps the n largest ``w²·h_j`` of every group."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    h = torch.rand(16, generator=gen, dtype=torch.float64) + 0.1
    p = solvers.LayerProblem(W, torch.diag(h), solvers.NM(2, 4), damp=0.0)
    sol = solvers.solve(p, "sparsegpt", blocksize=blocksize)
    expected = solvers.masks.project(p, W * W * h)
    assert torch.equal(sol.keep, expected)
    assert torch.allclose(sol.weight, W * expected, atol=1e-12)


def test_sparsegpt_block_counts_add_up():
    p = make_problem(3, 40, structure=solvers.Unstructured(), n_prune=77, kind="correlated", seed=2)
    sol = solvers.solve(p, "sparsegpt", blocksize=16)  # blocks of 16, 16, 8 columns
    assert int((~sol.keep).sum()) == 77
    assert [int((~sol.keep[:, a:b]).sum()) for a, b in ((0, 16), (16, 32), (32, 40))] == [30, 31, 16]


def test_sparsegpt_improves_on_its_mask_without_update_and_refit_is_optimal():
    p = make_problem(16, 64, structure=solvers.Unstructured(), sparsity=0.6, kind="correlated", seed=4)
    sol = solvers.solve(p, "sparsegpt", blocksize=16)
    masked = p.objective(p.W64 * sol.keep)
    refit = solvers.solve(p, "sparsegpt", blocksize=16, refit=True)
    assert sol.objective < masked
    assert refit.objective <= sol.objective * (1 + 1e-12)
    assert math.isclose(refit.objective, p.objective(refit_rows(p, sol.keep)), rel_tol=1e-9)


# --- ADMM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "channels", "heads"])
def test_admm_with_a_fixed_mask_converges_to_the_refit(device, structure):
    p = make_problem(10, 24, kind="correlated", structure=solvers.parse_structure(structure, 24, head_dim=3),
                     **({} if structure == "2:4" else {"sparsity": 0.5}), seed=5, device=device)
    mask = solvers.solve(p, "wanda_sp" if structure in ("channels", "heads") else "wanda").keep
    sol = solvers.solve(p, "admm", mask=mask, iterations=300, rho=0.1)
    assert torch.equal(sol.keep, mask)
    best = solvers.refit(p, mask)
    assert math.isclose(sol.objective, p.objective(best), rel_tol=1e-6)
    assert float((sol.weight.double() - best).abs().max()) < 1e-8 * float(p.W64.abs().max())
    # Few iterations are not converged yet: the check above can fail.
    early = solvers.solve(p, "admm", mask=mask, iterations=2, rho=0.1)
    assert early.objective > p.objective(best) * (1 + 1e-6)


def test_admm_mask_method_and_final_refit():
    p = make_problem(8, 16, kind="correlated", structure=solvers.Unstructured(), sparsity=0.5, seed=6)
    wanda = solvers.solve(p, "wanda")
    a = solvers.solve(p, "admm", mask_method="wanda", final="refit")
    assert torch.equal(a.keep, wanda.keep)
    assert math.isclose(a.objective, p.objective(refit_rows(p, wanda.keep)), rel_tol=1e-9)
    assert a.stats["fixed_mask"]


def test_admm_gradual_beats_its_fixed_start():
    """The gradual schedule re-chooses the mask: on a correlated problem it beats Wanda's mask + refit."""
    p = make_problem(16, 48, kind="correlated", structure=solvers.Unstructured(), sparsity=0.6, seed=8)
    gradual = solvers.solve(p, "admm", final="refit")
    fixed = solvers.solve(p, "wanda", refit=True)
    assert not gradual.stats["fixed_mask"]
    assert gradual.objective < fixed.objective


def test_admm_rejects_bad_masks():
    p = make_problem(4, 8, structure=solvers.NM(2, 4), seed=0)
    bad_count = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(solvers.InvalidArgumentError, match="prunes 0 units"):
        solvers.solve(p, "admm", mask=bad_count)
    bad_pattern = torch.tensor([[True, True, True, True, False, False, False, False]] * 4)
    with pytest.raises(solvers.InvalidArgumentError, match="2:4 pattern"):
        solvers.solve(p, "admm", mask=bad_pattern)
    with pytest.raises(solvers.InvalidArgumentError, match="shape"):
        solvers.solve(p, "admm", mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(solvers.InvalidArgumentError, match="at most one"):
        solvers.solve(p, "admm", mask=bad_count, mask_method="wanda")
    with pytest.raises(solvers.InvalidArgumentError, match="does not support"):
        solvers.solve(p, "admm", mask_method="flap")
    with pytest.raises(solvers.InvalidArgumentError, match="boolean tensor"):
        solvers.solve(p, "admm", mask=torch.ones(4, 8))


# --- scores -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "channels", "heads"])
def test_wanda_with_identity_h_is_magnitude(structure):
    """``H = I``: every ``‖x_j‖ = 1``, so Wanda's scores are magnitudes.  Unstructured, Wanda compares
    within each row, so it equals magnitude on a single row and per-row magnitude otherwise."""
    W = torch.randn(6, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = solvers.parse_structure(structure, 20, head_dim=4)
    target = {} if structure == "2:4" else {"sparsity": 0.5}
    p = solvers.LayerProblem(W, torch.eye(20, dtype=torch.float64), s, **target)
    wanda = solvers.solve(p, "wanda", refit=True)
    if structure == "unstructured":
        assert torch.equal(wanda.keep, solvers.masks.project(p, W.abs(), per_row=True))
        row = solvers.LayerProblem(W[:1], torch.eye(20, dtype=torch.float64), s, sparsity=0.5)
        assert torch.equal(solvers.solve(row, "wanda").keep, solvers.solve(row, "magnitude").keep)
        return
    magnitude = solvers.solve(p, "magnitude", refit=True)
    assert torch.equal(wanda.keep, magnitude.keep)
    assert torch.equal(wanda.weight, magnitude.weight)


def test_wanda_sp_and_flap_scores_by_hand():
    gen = torch.Generator().manual_seed(3)
    X = make_inputs(12, 200, "correlated", seed=3) + torch.randn(12, 1, generator=gen, dtype=torch.float64)
    W = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    p = solvers.LayerProblem(W, X @ X.T, solvers.heads(12, 3), n_prune=2, bias=bias,
                             input_mean=X.mean(1), n_samples=200)
    norms = X.norm(dim=1)
    wsp = (W.abs() * norms).sum(0).reshape(4, 3).sum(1)
    assert torch.equal(solvers.solve(p, "wanda_sp").keep, solvers.masks.keep_largest(wsp, 2))
    var = X.var(dim=1, unbiased=False)
    fl = (var * (W * W).sum(0)).reshape(4, 3).sum(1)
    sol = solvers.solve(p, "flap")
    assert torch.equal(sol.keep, solvers.masks.keep_largest(fl, 2))
    pruned = ~p.structure.column_keep_mask(sol.keep, 12)
    assert torch.allclose(sol.bias, bias + W[:, pruned] @ X.mean(1)[pruned])
    # The error with the compensated bias, computed on the samples themselves.
    out = (sol.weight @ X + sol.bias[:, None]) - (W @ X + bias[:, None])
    assert math.isclose(sol.stats["error_with_bias"], 0.5 * float((out**2).sum()), rel_tol=1e-8)
    assert sol.stats["error_with_bias"] <= sol.error


def test_flap_needs_input_statistics():
    p = make_problem(4, 8, seed=0)
    bare = solvers.LayerProblem(p.weight, p.gram, p.structure, sparsity=0.5)
    with pytest.raises(solvers.InvalidArgumentError, match="input_mean"):
        solvers.solve(bare, "flap")
    assert solvers.solve(bare, "wanda_sp").keep.sum() == 4


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_score_refit_is_exact(method):
    p = make_problem(6, 16, kind="correlated", seed=9, sparsity=0.5)
    plain, fitted = solvers.solve(p, method), solvers.solve(p, method, refit=True)
    assert torch.equal(plain.keep, fitted.keep)
    assert fitted.objective < plain.objective
    assert math.isclose(fitted.objective, p.objective(solvers.refit(p, plain.keep)), rel_tol=1e-12)


# --- options and the exact solver's refusal -----------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("obs", {"per_step": 0}), ("sparsegpt", {"blocksize": 0}), ("sparsegpt", {"refit": 1}),
     ("admm", {"rho": 0.0}), ("admm", {"rho_growth": 0.5}), ("admm", {"final": "best"}),
     ("admm", {"mask_method": "exact"}), ("wanda_sp", {"refit": "yes"}), ("flap", {"damp": 0.1})],
)
def test_options_are_validated(method, options):
    s = solvers.heads(16, 4) if method in ("obs", "wanda_sp", "flap") else solvers.Unstructured()
    p = make_problem(4, 16, structure=s, sparsity=0.5)
    with pytest.raises(solvers.InvalidArgumentError):
        solvers.solve(p, method, **options)


@pytest.mark.parametrize("method, structure", [("obs", solvers.Unstructured()), ("sparsegpt", solvers.channels(8)),
                                               ("wanda_sp", solvers.NM(2, 4)), ("flap", solvers.Unstructured())])
def test_unsupported_structures_are_refused(method, structure):
    target = {} if isinstance(structure, solvers.NM) else {"sparsity": 0.5}
    p = make_problem(4, 8, structure=structure, **target)
    with pytest.raises(solvers.InvalidArgumentError, match="does not support"):
        solvers.solve(p, method)


@pytest.mark.parametrize(
    "structure, target",
    [(solvers.channels(64), {"sparsity": 0.5}), (solvers.Unstructured(), {"sparsity": 0.5}), (solvers.NM(2, 4), {})],
)
def test_exact_refuses_large_problems(structure, target):
    p = make_problem(32, 64, structure=structure, **target)
    with pytest.raises(ProblemTooLargeError, match="max_candidates"):
        solvers.solve(p, "exact")
    with pytest.raises(ProblemTooLargeError):
        solvers.solve(make_problem(2, 12, sparsity=0.5), "exact", max_candidates=100)  # C(12, 6) = 924


def test_every_new_method_is_registered_with_a_reference():
    for name in ("obs", "sparsegpt", "admm", "wanda_sp", "flap"):
        spec = solvers.get_solver(name)
        assert spec.reference and "Cost" in spec.fn.__doc__


@SETTINGS
@given(problem=column_problems())
def test_admm_swap_ends_at_a_one_swap_optimum_below_its_start(problem):
    """``swap=True``: ADMM's final mask improved to a 1-swap local optimum (brute force over every swap of a
    kept and a pruned group), and never worse than the refit of ADMM's own mask."""
    options = {"iterations": 8, "prune_iterations": 4}
    start = solvers.solve(problem, "admm", final="refit", **options)
    sol = solvers.solve(problem, "admm", swap=True, **options)
    _check_structure(problem, sol)
    assert sol.objective <= start.objective * (1 + 1e-9) + 1e-12
    assert math.isclose(sol.objective, problem.objective(refit(problem, sol.keep)), rel_tol=1e-9, abs_tol=1e-12)
    for p, q in itertools.product(torch.nonzero(~sol.keep).flatten(), torch.nonzero(sol.keep).flatten()):
        other = sol.keep.clone()
        other[p], other[q] = True, False
        assert problem.objective(refit(problem, other)) >= sol.objective * (1 - 1e-7) - 1e-12


@SETTINGS
@given(problem=row_problems())
def test_admm_swap_on_rows_never_loses_to_its_start(problem):
    options = {"iterations": 8, "prune_iterations": 4}
    start = solvers.solve(problem, "admm", final="refit", **options)
    sol = solvers.solve(problem, "admm", swap=True, **options)
    _check_structure(problem, sol)
    assert sol.objective <= start.objective * (1 + 1e-9) + 1e-12
    assert sol.stats["local_optimum"]


def test_admm_swap_needs_groups_of_equal_size():
    structure = solvers.column_groups([[0, 1], [2], [3, 4, 5]])
    p = make_problem(3, 6, structure=structure, n_prune=1, seed=0)
    with pytest.raises(solvers.InvalidArgumentError, match="equal size"):
        solvers.solve(p, "admm", swap=True)


@pytest.mark.parametrize("method", ["spap", "admm"])
def test_column_swap_finish_keeps_its_start_when_the_search_comes_back_worse(method, monkeypatch):
    """Both solvers finish column masks through ``solvers.swap.swap_then_refit``: if the search (here
    replaced by one that returns the worst mask, as round-off could in principle) ends above its start,
    the start's mask and its exact refit are returned and the fallback is recorded."""
    import solvers.swap as swap_module

    p = make_problem(5, 12, kind="correlated", n_prune=4, seed=3)
    reference = solvers.solve(p, method, **({"swap": False} if method == "spap" else {"final": "refit"}))

    def worst_search(H, W, groups, keep_groups, **_):
        energy = (p.W64 * p.W64).sum(0) * H.diagonal()
        return keep_largest(-energy, int(keep_groups.sum())), {"swaps": 1, "local_optimum": False, "errors": []}

    monkeypatch.setattr(swap_module, "swap_search", worst_search)
    sol = solvers.solve(p, method, swap=True)
    assert "fallback" in sol.stats
    assert math.isclose(sol.objective, p.objective(refit(p, sol.keep)), rel_tol=1e-9, abs_tol=1e-12)
    assert torch.equal(sol.keep, reference.keep)  # the start: the mask each solver has without the search
    assert math.isclose(sol.objective, reference.objective, rel_tol=1e-9, abs_tol=1e-12)
