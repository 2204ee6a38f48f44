"""LayerProblem, GramAccumulator and solve(): the data, the objective and the argument checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import solvers
from solvers.synthetic import make_inputs, make_problem


def _WH(d_out=4, d_in=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, 50, generator=g, dtype=torch.float64)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), X @ X.T, X


# --- bad input raises ValueError naming the argument -------------------------------------------------


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda W, H: (W, H[:-1, :-1]), "gram"),  # shape mismatch
        (lambda W, H: (W[0], H), "weight"),  # not 2-D
        (lambda W, H: (W.masked_fill(torch.zeros_like(W, dtype=torch.bool).index_fill(1, torch.tensor([2]), True), float("nan")), H), "weight"),
        (lambda W, H: (W, H.clone().fill_diagonal_(float("inf"))), "gram"),
        (lambda W, H: (W, H + torch.triu(torch.ones_like(H), 1)), "gram"),  # not symmetric
        (lambda W, H: (W, torch.zeros_like(H)), "gram"),  # no calibration input reached it
    ],
    ids=["shape", "ndim", "nan-weight", "inf-gram", "asymmetric", "zero-gram"],
)
def test_bad_matrices_name_the_argument(change, name):
    W, H, _ = _WH()
    W, H = change(W, H)
    with pytest.raises(ValueError, match=f"'{name}'"):
        solvers.LayerProblem(W, H, solvers.channels(8), sparsity=0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "0.3", True])
def test_sparsity_outside_unit_interval(sparsity):
    W, H, _ = _WH()
    with pytest.raises(ValueError, match=r"'sparsity'.*\[0, 1\)"):
        solvers.LayerProblem(W, H, solvers.channels(8), sparsity=sparsity)


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="'head_dim'.*divide"):
        solvers.heads(10, 3)
    W, H, _ = _WH(d_in=10)
    with pytest.raises(ValueError, match="m=4 must divide"):
        solvers.LayerProblem(W, H, solvers.NM(2, 4))


def test_target_arguments():
    W, H, _ = _WH()
    with pytest.raises(ValueError, match="exactly one of 'sparsity' and 'n_prune'"):
        solvers.LayerProblem(W, H, solvers.channels(8))
    with pytest.raises(ValueError, match="exactly one"):
        solvers.LayerProblem(W, H, solvers.channels(8), sparsity=0.5, n_prune=2)
    with pytest.raises(ValueError, match="'n_prune'"):
        solvers.LayerProblem(W, H, solvers.channels(8), n_prune=8)
    with pytest.raises(ValueError, match="N:M structure fixes the sparsity"):
        solvers.LayerProblem(W, H, solvers.NM(2, 4), sparsity=0.5)
    with pytest.raises(ValueError, match="'damp'"):
        solvers.LayerProblem(W, H, solvers.channels(8), sparsity=0.5, damp=-1.0)
    with pytest.raises(ValueError, match="outside"):
        solvers.LayerProblem(W, H, solvers.column_groups([[0, 9]]), n_prune=0)
    with pytest.raises(ValueError, match="'n' and 'm'"):
        solvers.NM(4, 4)
    with pytest.raises(ValueError, match="'structure'.*'2:4'"):
        solvers.parse_structure("rows", 8)


def test_solve_rejects_unknown_method_and_options():
    p = make_problem()
    with pytest.raises(ValueError, match="'method'.*'spap'"):
        solvers.solve(p, "nope")
    with pytest.raises(ValueError, match="unknown option.*'rho'"):
        solvers.solve(p, "spap", rho=1.0)
    with pytest.raises(ValueError, match="'steps'.*range"):
        solvers.solve(p, "spap", steps=0)
    with pytest.raises(ValueError, match="'problem'"):
        solvers.solve("not a problem")


# --- the data ------------------------------------------------------------------------------------------


def test_gram_accumulator_streams_batches_in_float64():
    X = make_inputs(6, 300, "correlated", seed=3)
    acc = solvers.GramAccumulator(6)
    # Mixed batch shapes (tokens, batch x seq x d) and a float32 input: the sum is still float64.
    acc.add_batch(X[:, :100].T.float())
    acc.add_batch(X[:, 100:].T.reshape(4, 50, 6))
    assert acc.H.dtype == torch.float64 and acc.n_samples == 300
    Xq = torch.cat([X[:, :100].float().double(), X[:, 100:]], dim=1)
    torch.testing.assert_close(acc.H, Xq @ Xq.T, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(acc.mean, Xq.mean(1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="'x'"):
        acc.add_batch(torch.ones(3, 5))


def test_error_is_the_output_reconstruction_error():
    W, H, X = _WH()
    p = solvers.LayerProblem(W, H, solvers.channels(8), sparsity=0.25, damp=0.0)
    W_hat = W.clone()
    W_hat[:, :2] = 0
    expected = 0.5 * float(((W_hat - W) @ X).pow(2).sum())
    assert math.isclose(p.error(W_hat), expected, rel_tol=1e-10)
    assert math.isclose(p.relative_error(torch.zeros_like(W)), 1.0, rel_tol=1e-12)
    assert p.error(W) == 0.0


def test_damping_is_relative_to_mean_diagonal():
    W, H, _ = _WH()
    p = solvers.LayerProblem(W, H, solvers.channels(8), sparsity=0.25, damp=0.1)
    torch.testing.assert_close(p.hessian, H + 0.1 * H.diagonal().mean() * torch.eye(8, dtype=torch.float64))
    # A rank-deficient H (fewer samples than features) still factors once damped.
    X = torch.randn(8, 3, dtype=torch.float64)
    q = solvers.LayerProblem(W, X @ X.T, solvers.channels(8), sparsity=0.25)
    assert torch.isfinite(q.hessian_inverse).all()


def test_targets_are_exact_counts():
    p = make_problem(3, 10, sparsity=0.3)
    assert p.n_pruned_target == 3
    assert make_problem(3, 10, n_prune=7).n_pruned_target == 7
    assert make_problem(3, 8, structure=solvers.NM(2, 4)).n_pruned_target == 12
    assert make_problem(3, 8, structure=solvers.Unstructured(), sparsity=0.5).n_pruned_target == 12


def test_float32_products_keep_a_float64_sum():
    X = make_inputs(6, 4000, "correlated", seed=4).float()
    exact = solvers.GramAccumulator(6)
    mixed = solvers.GramAccumulator(6, product_dtype=torch.float32)
    for batch in X.T.split(1000):
        exact.add_batch(batch)
        mixed.add_batch(batch)
    assert mixed.H.dtype == torch.float64
    assert float((mixed.H - exact.H).norm() / exact.H.norm()) < 1e-5
    with pytest.raises(ValueError, match="'product_dtype'"):
        solvers.GramAccumulator(6, product_dtype=torch.float16)


@pytest.mark.parametrize("d", [5, 300, 517])
def test_gram_panels_equal_the_full_product(d):
    X = torch.randn(700, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    acc = solvers.GramAccumulator(d)
    acc.add_batch(X)
    torch.testing.assert_close(acc.H, X.T @ X, rtol=1e-12, atol=1e-9)
    assert torch.equal(acc.H, acc.H.T)


def test_float32_batches_are_never_copied_whole_to_float64():
    # The mean's float64 sum by row panels: no allocation of the whole batch in float64 (the prune's
    # resident memory peaks while a batch is added), and the sum of every row all the same.
    from torch.profiler import ProfilerActivity, profile

    X = torch.randn(4096, 512, generator=torch.Generator().manual_seed(0))
    acc = solvers.GramAccumulator(512, product_dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        acc.add_batch(X)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < X.numel() * 8 // 2
    torch.testing.assert_close(acc.mean, X.double().mean(0), rtol=1e-12, atol=1e-14)


def test_factor_problem_is_a_valid_seeded_problem():
    from solvers.synthetic import make_factor_problem

    a = make_factor_problem(6, 40, rank=8, seed=1)
    b = make_factor_problem(6, 40, rank=8, seed=1)
    assert a.shape == (6, 40) and a.n_pruned_target == 12
    assert torch.equal(a.H64, b.H64) and torch.equal(a.W64, b.W64)
    assert torch.equal(a.H64, a.H64.T)
    assert float(torch.linalg.eigvalsh(a.H64).min()) > 0  # the noise term makes H positive definite
    with pytest.raises(ValueError, match="rank"):
        make_factor_problem(6, 40, rank=0)


# --- damp_mode="diag": a ridge per input ---------------------------------------------------------

def _ridge_problem(mode: str, dead: bool = False):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(8, 40, generator=g, dtype=torch.float64) * torch.rand(8, 1, generator=g, dtype=torch.float64)
    if dead:
        X[3] = 0.0
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    return solvers.LayerProblem(W, X @ X.T, solvers.channels(8), n_prune=3, damp=0.2, damp_mode=mode)


@pytest.mark.parametrize("mode", ["mean", "diag"])
def test_objective_is_the_quadratic_form_of_the_damped_gram(mode):
    p = _ridge_problem(mode)
    D = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert p.objective(p.W64 + D) == pytest.approx(0.5 * float(torch.trace(D @ p.hessian @ D.T)), rel=1e-12)
    diag = p.H64.diagonal()
    expected = 0.2 * diag if mode == "diag" else torch.full_like(diag, 0.2 * float(diag.mean()))
    torch.testing.assert_close(p.ridge, expected)


def test_diag_damping_keeps_a_dead_input_invertible_and_the_exact_solve_optimal():
    p = _ridge_problem("diag", dead=True)
    assert float(p.ridge[3]) == pytest.approx(0.2 * 1e-6 * float(p.H64.diagonal().mean()))
    exact = solvers.solve(p, "exact")
    spap_sol = solvers.solve(p, "spap")
    assert spap_sol.objective >= exact.objective - 1e-9
    best = min(p.objective(solvers.refit_columns(p, torch.ones(8, dtype=torch.bool).index_fill(0, torch.tensor(c), False)))
               for c in itertools.combinations(range(8), 3))
    assert exact.objective == pytest.approx(best, rel=1e-9)


def test_bad_damp_mode_is_refused_naming_it():
    with pytest.raises(solvers.InvalidArgumentError, match="'damp_mode'"):
        _ridge_problem("per-channel")


def test_the_corrected_weight_with_a_ridge_per_input_minimises_the_dense_fit():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(6, 30, generator=g, dtype=torch.float64)
    X_hat = X + 0.3 * torch.randn(6, 30, generator=g, dtype=torch.float64)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    H_hat = X_hat @ X_hat.T
    W_star = solvers.corrected_weight(W, H_hat, X @ X_hat.T, 0.1, "diag")
    D = 0.1 * H_hat.diagonal()
    # gradient of ½‖Ŵ X̂ − W X‖² + ½ Σ_j D_j ‖Ŵ_:,j − W_:,j‖² at Ŵ = W* (unconstrained): zero
    grad = (W_star @ X_hat - W @ X) @ X_hat.T + (W_star - W) * D
    assert float(grad.abs().max()) < 1e-8 * float((W @ X @ X_hat.T).abs().max())
