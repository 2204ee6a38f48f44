"""Shared test helpers: devices and small-problem strategies."""

from __future__ import annotations

import pytest
import torch

# Every solver must run unchanged on CUDA tensors; the CUDA case is skipped where torch sees no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


def kept_gradient(problem, W_hat: torch.Tensor, keep_entries: torch.Tensor) -> float:
    """Largest |∂/∂Ŵ| of the damped objective on kept entries, relative to the scale of ``W H_d``."""
    G = (W_hat.to(torch.float64) - problem.W64) @ problem.hessian
    scale = float((problem.W64 @ problem.hessian).abs().max())
    return float(G[keep_entries].abs().max()) / scale if keep_entries.any() else 0.0
