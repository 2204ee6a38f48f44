"""Synthetic layer problems for tests and benchmarks (in the spirit of ``sklearn.datasets.make_*``).

Two kinds of calibration inputs ``X`` of shape ``(d_in, n_samples)``:

- ``"random"``: i.i.d. standard normal, so ``H = XXᵀ`` is close to a multiple of the identity and
  the problem is nearly separable (magnitude-like scores are already good).
- ``"correlated"``: ``X = A Z`` with ``A = U diag(σ)`` for a random orthogonal ``U`` and singular
  values decaying geometrically over three orders of magnitude, plus a per-feature scale drawn
  log-uniformly over two orders (LLM activations have a few very large channels).  ``H`` is then
  strongly correlated and ill-conditioned: selection by score alone fails, which is where an
  optimization method must show its worth.
"""

from __future__ import annotations

import torch

from ._validation import InvalidArgumentError, Options, check
from .problem import LayerProblem
from .structure import Structure, channels

KINDS = ("random", "correlated")


def make_inputs(d_in: int, n_samples: int, kind: str = "random", *, seed: int = 0) -> torch.Tensor:
    """Calibration inputs ``X`` of shape ``(d_in, n_samples)``, float64, for ``kind`` in :data:`KINDS`."""
    check("kind", kind, Options(KINDS), "make_inputs")
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(d_in, n_samples, generator=gen, dtype=torch.float64)
    if kind == "random":
        return Z
    U, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -3, d_in, dtype=torch.float64)
    scale = torch.exp(torch.empty(d_in, dtype=torch.float64).uniform_(0, 4.6, generator=gen))
    return scale[:, None] * (U * sigma) @ Z


def make_problem(
    d_out: int = 8,
    d_in: int = 12,
    *,
    kind: str = "random",
    structure: Structure | None = None,
    sparsity: float | None = None,
    n_prune: int | None = None,
    n_samples: int | None = None,
    damp: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> LayerProblem:
    """A random :class:`LayerProblem` with weight ``W ~ N(0, 1)`` of shape ``(d_out, d_in)``.

    ``structure`` defaults to one group per column; give ``sparsity`` or ``n_prune`` as for
    :class:`LayerProblem` (default ``sparsity=0.5`` unless the structure is N:M).  ``n_samples``
    defaults to ``4·d_in``.
    """
    from .structure import NM

    if d_out <= 0 or d_in <= 0:
        raise InvalidArgumentError(f"The 'd_out' and 'd_in' arguments of make_problem must be positive. Got {d_out}, {d_in}.")
    structure = channels(d_in) if structure is None else structure
    if sparsity is None and n_prune is None and not isinstance(structure, NM):
        sparsity = 0.5
    X = make_inputs(d_in, n_samples or 4 * d_in, kind, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    H = X @ X.T
    return LayerProblem(
        W.to(device=device, dtype=dtype),
        H.to(device=device),
        structure,
        sparsity=sparsity,
        n_prune=n_prune,
        damp=damp,
        input_mean=X.mean(1).to(device=device, dtype=dtype),
        n_samples=X.shape[1],
    )
