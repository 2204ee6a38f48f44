"""The blocked inverses of ``solvers._linalg`` against LAPACK on random matrices, across the block size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import _linalg

from .helpers import DEVICES


def _spd(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n + 3, generator=g, dtype=torch.float64)
    # Correlated columns, as in real Gram matrices: condition numbers of 1e3-1e5 here.
    X = X + 3.0 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return (X @ X.T / X.shape[1] + 1e-3 * torch.eye(n, dtype=torch.float64)).to(device)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3 * _linalg._BLOCK + 5), seed=st.integers(0, 1000))
def test_lower_inverse_equals_a_triangular_solve(n, seed):
    L = torch.linalg.cholesky(_spd(n, seed))
    inv = _linalg.lower_inverse(L)
    ref = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    assert torch.equal(inv, torch.tril(inv))
    torch.testing.assert_close(inv, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3 * _linalg._BLOCK + 5), seed=st.integers(0, 1000))
def test_inverse_from_cholesky_equals_lapack(n, seed):
    H = _spd(n, seed)
    inv = _linalg.inverse_from_cholesky(torch.linalg.cholesky(H))
    ref = torch.cholesky_inverse(torch.linalg.cholesky(H))
    assert torch.equal(inv, inv.T)
    torch.testing.assert_close(inv, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))
    torch.testing.assert_close(H @ inv, torch.eye(n, dtype=H.dtype), rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_from_cholesky_on_each_device(device):
    H = _spd(2 * _linalg._BLOCK + 17, 0, device)
    inv = _linalg.inverse_from_cholesky(_linalg.cholesky(H))
    assert inv.device.type == device
    torch.testing.assert_close(H @ inv, torch.eye(H.shape[0], dtype=H.dtype, device=device), rtol=0, atol=1e-7)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 17), seed=st.integers(0, 1000))
def test_symmetrize_in_place_equals_the_mean_with_the_transpose(n, block, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = 0.5 * (A + A.T)
    out = _linalg.symmetrize_(A, block=block)
    assert out.data_ptr() == A.data_ptr()
    assert torch.equal(A, A.T)
    torch.testing.assert_close(A, expected, rtol=0, atol=1e-15)
