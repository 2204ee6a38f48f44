"""The exact 1-swap search for per-weight masks, row by row (solvers/row_swap.py, its Numba kernel)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solvers
from solvers import kernels
from solvers.masks import project
from solvers.row_swap import _build, _Padded, _search, row_swap_search
from solvers.synthetic import make_problem

from .helpers import DEVICES

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KERNELS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not importable"))]


def _random_mask(d_out: int, d_in: int, structure, seed: int) -> torch.Tensor:
    """A start mask: any count per row (unstructured, empty and full rows included) or a random N:M pattern."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(d_out, d_in, generator=gen)
    if isinstance(structure, solvers.NM):
        blocks = scores.reshape(d_out, -1, structure.m)
        top = blocks.argsort(-1, descending=True)[..., : structure.n]
        return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True).reshape(d_out, d_in)
    counts = torch.randint(0, d_in + 1, (d_out, 1), generator=gen)
    return scores.argsort(1).argsort(1) < counts


@st.composite
def row_problems(draw):
    """A small problem (≤ 10 columns, ≤ 4 rows) and a start mask for it."""
    kind = draw(st.sampled_from(["random", "correlated"]))
    seed = draw(st.integers(0, 10_000))
    d_out = draw(st.integers(1, 4))
    if draw(st.booleans()):
        structure, d_in = solvers.NM(2, 4), 4 * draw(st.integers(1, 2))
        keep = _random_mask(d_out, d_in, structure, seed)
        problem = make_problem(d_out, d_in, kind=kind, structure=structure, seed=seed)
    else:
        structure, d_in = solvers.Unstructured(), draw(st.integers(2, 10))
        keep = _random_mask(d_out, d_in, structure, seed)
        n_prune = min(max(int((~keep).sum()), 1), d_out * d_in - 1)
        problem = make_problem(d_out, d_in, kind=kind, structure=structure, n_prune=n_prune, seed=seed)
    return problem, keep


def _row_error(problem, keep_row: torch.Tensor, r: int) -> float:
    """Exact refit error of row ``r`` for its kept set, by a direct solve (damped objective)."""
    H, w = problem.hessian, problem.W64[r]
    K = torch.nonzero(keep_row).flatten()
    w_hat = torch.zeros_like(w)
    if K.numel():
        w_hat[K] = torch.linalg.solve(H[K][:, K], (H @ w)[K])
    d = w_hat - w
    return 0.5 * float(d @ H @ d)


def _assert_one_swap_optimum(problem, keep: torch.Tensor) -> int:
    """Every swap of a kept and a pruned weight of one row (N:M: of one group) leaves the row's error no lower."""
    m = problem.structure.m if isinstance(problem.structure, solvers.NM) else None
    checked = 0
    for r in range(problem.shape[0]):
        base = _row_error(problem, keep[r], r)
        scale = 0.5 * float(problem.W64[r] @ problem.hessian @ problem.W64[r])
        for i in torch.nonzero(~keep[r]).flatten().tolist():
            for j in torch.nonzero(keep[r]).flatten().tolist():
                if m is not None and i // m != j // m:
                    continue
                row = keep[r].clone()
                row[i], row[j] = True, False
                assert _row_error(problem, row, r) >= base * (1 - 1e-7) - 1e-12 * scale, (r, i, j)
                checked += 1
    return checked


def _assert_structure(problem, start: torch.Tensor, keep: torch.Tensor) -> None:
    assert keep.shape == start.shape and keep.dtype == torch.bool
    assert torch.equal(keep.sum(1), start.sum(1))
    s = problem.structure
    if isinstance(s, solvers.NM):
        assert bool((keep.reshape(keep.shape[0], -1, s.m).sum(-1) == s.n).all())


@pytest.mark.parametrize("kernel", KERNELS)
@SETTINGS
@given(case=row_problems())
def test_ends_at_a_one_swap_local_optimum(kernel, case):
    """Brute force over every swap of every row, each with its exact refit."""
    problem, start = case
    keep, W_hat, stats = row_swap_search(problem, start, kernel=kernel)
    assert stats["local_optimum"] and stats["kernel"] == kernel
    _assert_structure(problem, start, keep)
    _assert_one_swap_optimum(problem, keep)


@pytest.mark.parametrize("kernel", KERNELS)
@SETTINGS
@given(case=row_problems())
def test_weight_is_the_exact_refit_and_no_row_gets_worse(kernel, case):
    problem, start = case
    keep, W_hat, stats = row_swap_search(problem, start, kernel=kernel)
    refit = solvers.refit_rows(problem, keep)
    scale = float(problem.W64.abs().max()) + 1e-300
    assert float((W_hat - refit).abs().max()) <= 1e-9 * scale
    assert bool((W_hat[~keep] == 0).all())
    before = solvers.refit_rows(problem, start)
    for r in range(problem.shape[0]):
        e0, e1 = _row_error(problem, start[r], r), _row_error(problem, keep[r], r)
        assert e1 <= e0 * (1 + 1e-9) + 1e-12
    tol = 1e-9 * max(problem.dense_energy, 1e-12)
    assert abs(stats["error_before"] - problem.objective(before)) <= tol
    assert abs(stats["error_after"] - problem.objective(W_hat)) <= tol
    assert stats["error_after"] <= stats["error_before"] + tol


def _dense_state(state, n: int) -> dict[str, torch.Tensor]:
    """The state indexed by column instead of slot: T as (R, n, n), the vectors as (R, n)."""
    R = state.T.shape[0]
    out = {"T": torch.zeros(R, n, n, dtype=torch.float64)}
    for name in ("v", "Bd", "c", "wk"):
        out[name] = torch.zeros(R, n, dtype=torch.float64)
    for r in range(R):
        p, k = int(state.pcount[r]), int(state.kcount[r])
        P, K = state.P[r, :p], state.K[r, :k]
        out["T"][r][P[:, None], K[None, :]] = state.T[r, :p, :k]
        out["v"][r, P], out["Bd"][r, P] = state.v[r, :p], state.Bd[r, :p]
        out["c"][r, K], out["wk"][r, K] = state.c[r, :k], state.wk[r, :k]
    out["err"] = state.err.clone()
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("structure,sparsity", [(solvers.Unstructured(), 0.6), (solvers.Unstructured(), 0.3),
                                                (solvers.NM(2, 4), None)])
@pytest.mark.parametrize("limit", [1, 3])
def test_updated_state_equals_a_fresh_build(kernel, structure, sparsity, limit):
    """After swaps, the rank-updated state (T, v, diag B, diag Q, ŵ_K, error) is the state built from scratch
    for the new mask: the update formulas of docs/method.md §6.1."""
    p = make_problem(5, 16, kind="correlated", structure=structure, seed=2,
                     **({} if sparsity is None else {"sparsity": sparsity}))
    start = project(p, p.W64.abs())
    rows = torch.arange(5)
    counts = start.sum(1)
    spread = int(counts.max() - counts.min())
    pad = _Padded(p.hessian, p.hessian_inverse, spread, spread)
    state, _ = _build(pad, p.W64, start, rows)
    m = structure.m if isinstance(structure, solvers.NM) else 0
    made, done = _search(state, pad, m, 1e-9, torch.full((5,), limit), 8, kernel == "numba")
    assert int(made.sum()) > 0
    keep = torch.zeros_like(start)
    for r in range(5):
        keep[r, state.K[r, : int(state.kcount[r])]] = True
    fresh, _ = _build(pad, p.W64, keep, rows)
    a, b = _dense_state(state, 16), _dense_state(fresh, 16)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-8, atol=1e-10 * float(b[name].abs().max()), msg=name)


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not importable")
@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("structure,sparsity", [(solvers.Unstructured(), 0.6), (solvers.Unstructured(), 0.45),
                                                (solvers.NM(2, 4), None), (solvers.NM(1, 3), None)])
@pytest.mark.parametrize("batch", [1, 8])
def test_numba_and_torch_choose_the_same_swaps(kind, structure, sparsity, batch):
    d_in = 48
    p = make_problem(10, d_in, kind=kind, structure=structure, seed=5, **({} if sparsity is None else {"sparsity": sparsity}))
    start = project(p, p.W64.abs())
    a = row_swap_search(p, start, kernel="numba", batch=batch)
    b = row_swap_search(p, start, kernel="torch", batch=batch)
    assert torch.equal(a[0], b[0])
    assert a[2]["swaps"] == b[2]["swaps"] > 0
    torch.testing.assert_close(a[1], b[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_refresh_and_max_swaps(kernel):
    p = make_problem(6, 24, kind="correlated", structure=solvers.Unstructured(), sparsity=0.6, seed=3)
    start = project(p, p.W64.abs())
    keep, W_hat, stats = row_swap_search(p, start, kernel=kernel, batch=1)
    assert stats["max_row_swaps"] >= 2 and stats["rebuilds"] == 0
    # Best improvement with a rebuild after every swap takes the same path (the rank updates lose nothing
    # that matters); each swap is followed by one rebuild of its row.
    again = row_swap_search(p, start, kernel=kernel, batch=1, refresh=1)
    assert torch.equal(again[0], keep) and again[2]["swaps"] == again[2]["rebuilds"] == stats["swaps"]
    # One swap per row at most: a row differs from its start in at most two weights.
    one = row_swap_search(p, start, kernel=kernel, max_swaps=1)
    assert int((one[0] != start).sum(1).max()) <= 2 and one[2]["max_row_swaps"] == 1
    assert not one[2]["local_optimum"] and one[2]["error_after"] <= stats["error_before"]
    none = row_swap_search(p, start, kernel=kernel, max_swaps=0)
    assert torch.equal(none[0], start) and none[2]["swaps"] == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_of_unequal_counts_in_one_batch(kernel):
    """Unstructured masks keep different counts per row; the batches pad to their largest count."""
    p = make_problem(9, 20, kind="correlated", structure=solvers.Unstructured(), sparsity=0.5, seed=4)
    start = _random_mask(9, 20, p.structure, seed=1)
    keep, W_hat, stats = row_swap_search(p, start, kernel=kernel)
    _assert_structure(p, start, keep)
    _assert_one_swap_optimum(p, keep)
    torch.testing.assert_close(W_hat, solvers.refit_rows(p, keep))


@SETTINGS
@given(case=row_problems())
def test_spap_ends_rows_at_a_one_swap_local_optimum(case):
    problem, _ = case
    sol = solvers.solve(problem, "spap", row_swap=True)
    plain = solvers.solve(problem, "spap")  # the row search is opt-in
    assert "row_swap" not in plain.stats
    assert sol.stats["local_optimum"] and "row_swap" in sol.stats
    assert sol.objective <= plain.objective * (1 + 1e-9) + 1e-12
    assert torch.equal(sol.keep.sum(1), plain.keep.sum(1))
    _assert_one_swap_optimum(problem, sol.keep)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure,sparsity", [(solvers.Unstructured(), 0.6), (solvers.NM(2, 4), None)])
def test_torch_path_on_every_device(device, structure, sparsity):
    p = make_problem(8, 32, kind="correlated", structure=structure, seed=1, device=device,
                     **({} if sparsity is None else {"sparsity": sparsity}))
    start = project(p, p.W64.abs())
    keep, W_hat, stats = row_swap_search(p, start, kernel="torch")
    assert keep.device.type == device and W_hat.device.type == device
    cpu = make_problem(8, 32, kind="correlated", structure=structure, seed=1,
                       **({} if sparsity is None else {"sparsity": sparsity}))
    ref = row_swap_search(cpu, start.cpu(), kernel="torch")
    assert torch.equal(keep.cpu(), ref[0])
    torch.testing.assert_close(W_hat.cpu(), ref[1])


def test_refuses_column_structures_and_bad_masks():
    p = make_problem(4, 8, sparsity=0.5)
    with pytest.raises(solvers.InvalidArgumentError, match="unstructured and N:M"):
        row_swap_search(p, torch.ones(4, 8, dtype=torch.bool))
    q = make_problem(4, 8, structure=solvers.Unstructured(), sparsity=0.5)
    with pytest.raises(solvers.InvalidArgumentError, match="boolean tensor of shape"):
        row_swap_search(q, torch.ones(4, 7, dtype=torch.bool))
    nm = make_problem(4, 8, structure=solvers.NM(2, 4))
    with pytest.raises(solvers.InvalidArgumentError, match="keep 2 of every 4"):
        row_swap_search(nm, torch.ones(4, 8, dtype=torch.bool))
