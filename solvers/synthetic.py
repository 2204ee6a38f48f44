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

from .validation import InvalidArgumentError, Options, check
from .problem import LayerProblem
from .structure import Structure, channels

KINDS = ("random", "correlated")


def make_inputs(d_in: int, n_samples: int, kind: str = "random", *, seed: int = 0, decades: float = 3.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Calibration inputs ``X`` of shape ``(d_in, n_samples)``, float64, for ``kind`` in :data:`KINDS`.

    ``decades``: the orders of magnitude the ``"correlated"`` singular values span.  ``generator``: draw
    from it, on its device, instead of a new host generator seeded with ``seed`` (large inputs are
    faster to draw and multiply on a GPU).
    """
    check("kind", kind, Options(KINDS), "make_inputs")
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    f64 = {"dtype": torch.float64, "device": gen.device}
    Z = torch.randn(d_in, n_samples, generator=gen, **f64)
    if kind == "random":
        return Z
    U, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, **f64))
    sigma = torch.logspace(0, -decades, d_in, **f64)
    scale = torch.exp(torch.empty(d_in, **f64).uniform_(0, 4.6, generator=gen))
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


def make_factor_problem(
    d_out: int,
    d_in: int,
    *,
    structure: Structure | None = None,
    sparsity: float | None = 0.3,
    rank: int = 256,
    noise: float = 0.1,
    seed: int = 0,
    damp: float = 0.01,
    device: torch.device | str = "cpu",
) -> LayerProblem:
    """A large random-but-realistic problem whose Gram matrix is built without any samples.

    ``H = D (F C Fᵀ + noise·I) D``: a rank-``rank`` factor model (``F`` of shape ``(d_in, rank)`` with
    standard normal entries, ``C`` an ``rank×rank`` Wishart matrix from ``4·rank`` samples) plus
    isotropic noise, with per-channel scales ``D`` log-uniform over ``[1, e^1.5]`` (uneven channels).  That is the shape of LLM activations' second
    moments (a few dominant directions, heavy-tailed channels), at ``O(d_in²·rank)`` cost where
    :func:`make_problem`'s sampled inputs cost ``O(d_in³)``: it is what scaling benchmarks need for
    Llama-3-8B/70B widths.  Built directly on ``device`` in float64.  Its pruning errors are smaller
    than real layers' (at 576×1536 and 30% channels: relative error 0.009 against 0.07 for SmolLM2's
    down_proj), so it is a problem for timing, not for ranking methods.
    """
    if d_out <= 0 or d_in <= 0 or rank <= 0:
        raise InvalidArgumentError(
            f"The 'd_out', 'd_in' and 'rank' arguments of make_factor_problem must be positive. Got {d_out}, {d_in}, {rank}."
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    F = torch.randn(d_in, rank, generator=gen, dtype=torch.float64).to(device)
    Z = torch.randn(rank, 4 * rank, generator=gen, dtype=torch.float64).to(device)
    C = Z @ Z.T / (4 * rank)
    scale = torch.exp(torch.empty(d_in, dtype=torch.float64).uniform_(0, 1.5, generator=gen)).to(device)
    H = F @ C @ F.T / rank
    H.diagonal().add_(noise)
    H.mul_(scale[:, None]).mul_(scale[None, :])
    H = 0.5 * (H + H.T)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).to(device)
    return LayerProblem(W, H, channels(d_in) if structure is None else structure, sparsity=sparsity, damp=damp)
