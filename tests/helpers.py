"""Shared test helpers: devices, small-problem strategies, and the benchmark scripts as modules."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` imported the way its siblings see it when run as ``python benchmarks/NAME.py``:
    with ``benchmarks/`` first on ``sys.path`` (only while it is imported)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module(name)
