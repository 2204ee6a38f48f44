"""The refit of a per-weight mask: conjugate gradients against the direct solve."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solvers
from solvers.synthetic import make_problem

from .helpers import DEVICES, kept_gradient

SETTINGS_CG = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])

@SETTINGS_CG
@given(seed=st.integers(0, 10_000), d_out=st.integers(1, 12), d_in=st.integers(2, 40),
       kind=st.sampled_from(["random", "correlated"]), warm=st.booleans(), cap=st.sampled_from([100, 2]))
def test_cg_row_refit_is_the_direct_refit(seed, d_out, d_in, kind, warm, cap, monkeypatch):
    """Conjugate gradients reach the direct solve's objective (to 1e-10) from any start; rows still short
    of the bound when the iterations run out (cap=2) are finished directly."""
    refit_module = importlib.import_module("solvers.refit")
    monkeypatch.setattr(refit_module, "_CG_MAX_ITERATIONS", cap)
    p = make_problem(d_out, d_in, kind=kind, structure=solvers.Unstructured(), sparsity=0.5, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(d_out, d_in, generator=gen) < torch.rand(d_out, 1, generator=gen)
    keep[0] = seed % 2 == 0  # a row that keeps nothing or everything
    start = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) if warm else None
    direct = refit_module.refit_rows(p, keep, method="cholesky")
    cg = refit_module.refit_rows(p, keep, start=start, method="cg")
    assert bool((cg[~keep] == 0).all())
    # The stop bounds the excess by _CG_RTOL of the objective (twice that: round-off).
    assert math.isclose(p.objective(cg), p.objective(direct), rel_tol=2 * refit_module._CG_RTOL, abs_tol=1e-14)
    # CG stops on the objective's excess (a fraction _CG_RTOL of it): the gradient is of its square root.
    assert kept_gradient(p, cg, keep) < 10 * math.sqrt(refit_module._CG_RTOL)


def test_row_refit_refuses_an_unknown_method():
    p = make_problem(3, 8, structure=solvers.Unstructured(), sparsity=0.5, seed=0)
    with pytest.raises(ValueError, match="'method'.*'auto', 'cg' or 'cholesky'"):
        solvers.refit_rows(p, torch.ones(3, 8, dtype=torch.bool), method="lu")


@pytest.mark.parametrize("device", DEVICES)  # the host selects by kthvalue, CUDA by a sort
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, float("inf"), float("-inf"), float("nan")]), min_size=1,
                       max_size=40), data=st.data())
def test_keep_largest_selects_as_a_stable_sort(device, values, data):
    """Selection by the k-th value gives the stable sort's mask, ties to the lower index, NaN first."""
    scores = torch.tensor(values, dtype=torch.float64)
    k = data.draw(st.integers(0, len(values)))
    expected = torch.zeros(len(values), dtype=torch.bool)
    expected[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    assert torch.equal(solvers.masks.keep_largest(scores.to(device), k).cpu(), expected)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, float("inf"), float("-inf")]), min_size=2,
                       max_size=400), layout=st.sampled_from(["as drawn", "sorted", "sawtooth"]), data=st.data())
def test_sampled_selection_is_kthvalue(values, layout, data, monkeypatch):
    """The host's selection on a sampled band gives kthvalue's threshold, also where the strided sample
    is unlike the whole (sorted or periodic inputs, ties, infinities) and the band misses."""
    masks = importlib.import_module("solvers.masks")
    monkeypatch.setattr(masks, "_SAMPLED_SELECTION_FROM", 2)
    monkeypatch.setattr(masks, "_SAMPLE_SIZE", data.draw(st.integers(1, 64)))
    x = torch.tensor(values, dtype=torch.float64)
    if layout == "sorted":
        x = x.sort().values
    elif layout == "sawtooth":
        x = torch.arange(x.numel(), dtype=torch.float64) % 7
    k = data.draw(st.integers(1, x.numel() - 1))
    assert masks._kth_largest_host(x, k) == torch.kthvalue(x, x.numel() - k + 1).values


@pytest.mark.parametrize("d_in", [24, 512])  # the direct solve, and conjugate gradients (from 512 inputs)
@pytest.mark.parametrize("kind", ["random", "correlated"])
def test_refit_below_a_bound_is_the_refit_or_none(d_in, kind):
    """refit_rows_below gives the refit when its objective is below the bound, and None otherwise."""
    p = make_problem(6, d_in, kind=kind, structure=solvers.Unstructured(), sparsity=0.5, seed=3)
    keep = solvers.solve(p, "magnitude").keep
    exact = p.objective(solvers.refit_rows(p, keep, method="cholesky"))
    assert solvers.refit_rows_below(p, keep, exact * (1 - 1e-6)) is None
    below = solvers.refit_rows_below(p, keep, exact * (1 + 1e-6))
    assert below is not None and math.isclose(p.objective(below[0]), exact, rel_tol=1e-10)
    assert below[1] == p.objective(below[0])
    assert solvers.refit_rows_below(p, keep, 0.0) is None


@pytest.mark.parametrize("device", DEVICES)
def test_cg_row_refit_runs_on_every_device(device):
    p = make_problem(8, 520, kind="correlated", structure=solvers.Unstructured(), sparsity=0.5, seed=1, device=device)
    keep = solvers.solve(p, "magnitude").keep
    cg = solvers.refit_rows(p, keep)  # "auto": conjugate gradients from 512 inputs
    assert cg.device.type == device
    direct = solvers.refit_rows(p, keep, method="cholesky")
    assert math.isclose(p.objective(cg), p.objective(direct), rel_tol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=200, deadline=None)
@given(m=st.sampled_from([2, 4, 8, 16]), data=st.data())
def test_keep_largest_in_groups_selects_as_a_stable_sort(device, m, data):
    """The top N of each group of M is the stable descending sort's (ties to the lower index, NaN
    first), both as chosen on the device and by the rank count that CUDA uses."""
    values = st.sampled_from([0.0, 1.0, 2.0, float("inf"), float("-inf"), float("nan"), -1.5])
    rows = data.draw(st.integers(1, 3))
    scores = torch.tensor(data.draw(st.lists(values, min_size=rows * 2 * m, max_size=rows * 2 * m)),
                          dtype=torch.float64).reshape(rows, 2, m)
    n = data.draw(st.integers(0, m))
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.scatter_(-1, torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :n], True)
    assert torch.equal(solvers.masks.keep_largest_in_groups(scores.to(device), n).cpu(), expected)
    if m <= 8:  # the rank count that CUDA uses, on this device too
        assert torch.equal(solvers.masks._keep_by_rank_count(scores.to(device), n).cpu(), expected)
