"""Numba kernels against their torch twins on random inputs (solvers/kernels.py)."""

from __future__ import annotations

import pytest
import torch

import solvers
from solvers import kernels
from solvers.synthetic import make_problem

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not importable")


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("structure,sparsity", [(solvers.Unstructured(), 0.5), (solvers.Unstructured(), 0.73),
                                                (solvers.NM(2, 4), None), (solvers.NM(1, 3), None)])
@pytest.mark.parametrize("blocksize", [5, 16, 128])
def test_sparsegpt_numba_sweep_equals_torch_sweep(kind, structure, sparsity, blocksize):
    d_in = 48 if isinstance(structure, solvers.Unstructured) or 48 % structure.m == 0 else 45
    p = make_problem(7, d_in, kind=kind, structure=structure, sparsity=sparsity, n_samples=200, seed=3)
    a = solvers.solve(p, "sparsegpt", blocksize=blocksize, kernel="numba")
    b = solvers.solve(p, "sparsegpt", blocksize=blocksize, kernel="torch")
    assert a.stats["kernel"] == "numba" and b.stats["kernel"] == "torch"
    assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-12)
    assert a.stats["obs_loss"] == pytest.approx(b.stats["obs_loss"], rel=1e-9)


def test_sparsegpt_numba_breaks_nm_ties_like_torch():
    """Equal scores inside a group of M: both kernels keep the lower column index."""
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, -2.0, 2.0, 0.5]])
    p = solvers.LayerProblem(W, torch.eye(8), solvers.NM(2, 4), damp=0.0)
    a = solvers.solve(p, "sparsegpt", kernel="numba")
    b = solvers.solve(p, "sparsegpt", kernel="torch")
    assert torch.equal(a.keep, b.keep)
    assert a.keep[0].tolist() == [True, True, False, False, True, True, False, False]


def test_kernel_option_is_checked():
    p = make_problem(4, 8, structure=solvers.Unstructured(), sparsity=0.5)
    with pytest.raises(ValueError, match="kernel"):
        solvers.solve(p, "sparsegpt", kernel="fortran")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU tensors only"):
            solvers.solve(make_problem(4, 8, structure=solvers.Unstructured(), sparsity=0.5, device="cuda"),
                          "sparsegpt", kernel="numba")


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channel_swap_table_equals_torch(kind, seed):
    from solvers.swap import _ColumnState

    p = make_problem(9, 30, kind=kind, sparsity=0.4, seed=seed)
    keep = torch.ones(30, dtype=torch.bool)
    keep[torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:12]] = False
    groups = p.structure.index(p.W64.device)
    fused = _ColumnState(p.hessian, p.W64, groups, keep, p.hessian_inverse, kernel="numba")
    plain = _ColumnState(p.hessian, p.W64, groups, keep, p.hessian_inverse, kernel="torch")
    slots = torch.tensor([0, 3, 5, 11])
    kept = torch.nonzero(keep).flatten()[::2]
    torch.testing.assert_close(fused.deltas(), plain.deltas(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.deltas(slots, kept), plain.deltas(slots, kept), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_spap_gives_the_same_mask_with_either_kernel(seed):
    p = make_problem(10, 40, kind="correlated", sparsity=0.5, seed=seed)
    a = solvers.solve(p, "spap", kernel="numba")
    b = solvers.solve(p, "spap", kernel="torch")
    assert torch.equal(a.keep, b.keep)
    assert a.stats["swaps"] == b.stats["swaps"]
    torch.testing.assert_close(a.weight, b.weight)
