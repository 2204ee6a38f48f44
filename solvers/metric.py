"""A loss-aware output metric: weight a layer's error by how much the loss cares about each output.

The plain layer problem treats every output direction alike.  With ``g`` the gradient of the model's
loss at the layer's output (one per calibration token) and ``G = Σ g gᵀ`` (d_out × d_out), a second-order
expansion of the loss around the dense model weights the error of each output direction by ``G``::

    ½ tr(ΔW H ΔWᵀ G) = ½‖R ΔW X‖²_F,   RᵀR = G,   ΔW = Ŵ − W

(the Kronecker-factored curvature of LLM Surgeon, van der Ouderaa et al. 2024).  For column structures
two facts make every solver usable unchanged (derivation: ``docs/method.md``, "A loss-aware output
metric"):

- a column mask of ``Ŵ`` is a column mask of ``RŴ``, so the problem is the ordinary one of ``W' = RW``
  on the same ``H``, and its solution maps back by ``Ŵ = R⁻¹ Ŵ'``;
- for a fixed mask the optimal kept weights do not depend on ``G`` (``Ŵ_K = W H_{:,K} H_KK⁻¹`` row by row
  of ``RW`` is ``R`` times the same rows of ``W``), so only the *choice of mask* changes.

Row structures (unstructured, N:M) mask each row on its own; a full ``G`` couples the rows (``R ΔW``
mixes them) and ``R⁻¹ Ŵ'`` would not keep the mask, so rows take the diagonal of ``G`` only: it scales
row ``r``'s error by ``G_rr``, which changes which rows give up weights when a layer's budget is shared
across rows, and nothing when every row prunes the same count.
"""

from __future__ import annotations

import dataclasses

import torch

from .problem import LayerProblem
from .registry import solution_of, solve
from .solution import Solution
from .structure import ColumnGroups
from .validation import Interval, InvalidArgumentError, Options, check

METRIC_KINDS = ("full", "diag")


@dataclasses.dataclass(frozen=True, eq=False)
class OutputMetric:
    """``R`` with ``RᵀR = G_d``, the damped, normalised output metric of one layer, and ``R⁻¹``.

    Build it with :meth:`from_gram`.  ``factor`` is ``(d_out, d_out)`` for ``kind="full"`` and
    ``(d_out,)`` (the diagonal) for ``kind="diag"``; both float64.
    """

    factor: torch.Tensor
    inverse: torch.Tensor
    kind: str

    @classmethod
    def from_gram(cls, G: torch.Tensor, kind: str = "full", damp: float = 1.0) -> "OutputMetric":
        """The metric of the output-gradient Gram matrix ``G`` (d_out × d_out, or its diagonal (d_out,)).

        ``G`` is scaled to a unit mean diagonal (its scale does not change which mask is best) and damped
        to ``G/mean(diag G) + damp·I`` so that every output keeps a weight and ``R`` is invertible; in
        float64 (an eigendecomposition for ``"full"``: ``R = V Λ^½ Vᵀ``, the symmetric square root).
        """
        check("kind", kind, Options(METRIC_KINDS), "OutputMetric.from_gram")
        check("damp", damp, Interval(float, 0, None, closed="neither"), "OutputMetric.from_gram")
        if not isinstance(G, torch.Tensor) or G.ndim not in (1, 2) or (G.ndim == 2 and G.shape[0] != G.shape[1]):
            raise InvalidArgumentError("The 'G' argument of OutputMetric.from_gram must be a square matrix "
                                       f"(d_out, d_out) or a diagonal (d_out,). Got {getattr(G, 'shape', type(G).__name__)}.")
        if not torch.isfinite(G).all():
            raise InvalidArgumentError("The 'G' argument of OutputMetric.from_gram contains NaN or Inf.")
        G = G.to(torch.float64)
        diag = G if G.ndim == 1 else G.diagonal()
        if (diag < 0).any() or float(diag.sum()) <= 0:
            raise InvalidArgumentError("The 'G' argument of OutputMetric.from_gram must be positive semi-definite "
                                       "and nonzero (a sum of g gᵀ over calibration tokens).")
        scale = float(diag.mean())
        if kind == "diag" or G.ndim == 1:
            if kind == "full":
                raise InvalidArgumentError("kind='full' needs the whole 'G' matrix; a diagonal was given.")
            d = (diag / scale + damp).sqrt()
            return cls(d, 1.0 / d, "diag")
        evals, evecs = torch.linalg.eigh(0.5 * (G + G.T) / scale)
        evals = evals.clamp_min(0) + damp
        root = evals.sqrt()
        return cls((evecs * root) @ evecs.T, (evecs / root) @ evecs.T, "full")

    @property
    def d_out(self) -> int:
        return self.factor.shape[0]

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """``R W`` (float64) for ``W`` of shape ``(d_out, ...)``."""
        return _times(self.factor, W)

    def undo(self, W: torch.Tensor) -> torch.Tensor:
        """``R⁻¹ W`` (float64) for ``W`` of shape ``(d_out, ...)``."""
        return _times(self.inverse, W)

    def error(self, problem: LayerProblem, weight: torch.Tensor) -> float:
        """``½ tr(ΔW H ΔWᵀ G_d)`` with the problem's undamped ``H``: the error this metric weights."""
        return problem.error(problem.W64 + self.apply(weight.to(problem.W64) - problem.W64))


def _times(M: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    W = W.to(device=M.device, dtype=torch.float64)
    return M[:, None] * W if M.ndim == 1 else M @ W


def solve_in_metric(problem: LayerProblem, metric: OutputMetric, method: str = "spap", **options) -> Solution:
    """Solve ``problem`` choosing the mask that minimises ``½ tr(ΔW H ΔWᵀ G)`` instead of ``½ tr(ΔW H ΔWᵀ)``.

    The method solves the problem of ``RW`` (same Gram matrix, structure, count and damping; bias ``Rb``)
    and its weight maps back by ``R⁻¹``; for a method that refits exactly this equals the refit of ``W`` on
    the chosen mask.  The returned :class:`~solvers.Solution` is for ``problem``: its ``error`` and
    ``objective`` are the unweighted ones, ``stats["metric_error"]`` the weighted error (``G`` normalised
    to a unit mean diagonal) and ``stats["metric"]`` the metric's kind.

    Parameters
    ----------
    problem : LayerProblem
    metric : OutputMetric
        Of width ``problem.weight.shape[0]``; ``kind="diag"`` for row structures (unstructured, N:M).
    method, **options
        As for :func:`solvers.solve`.
    """
    if not isinstance(metric, OutputMetric):
        raise InvalidArgumentError(f"The 'metric' argument of solve_in_metric must be an OutputMetric. "
                                   f"Got {type(metric).__name__}.")
    d_out = problem.weight.shape[0]
    if metric.d_out != d_out:
        raise InvalidArgumentError(f"The 'metric' argument of solve_in_metric has width {metric.d_out}; the problem's "
                                   f"weight has {d_out} outputs.")
    if metric.kind == "full" and not isinstance(problem.structure, ColumnGroups):
        raise InvalidArgumentError("The 'metric' argument of solve_in_metric is a full metric, which couples the rows of "
                                   f"a {type(problem.structure).__name__} mask; use kind='diag' for row structures.")
    device = problem.weight.device
    metric = OutputMetric(metric.factor.to(device), metric.inverse.to(device), metric.kind)
    bias = None if problem.bias is None else metric.apply(problem.bias[:, None])[:, 0]
    weighted = problem.with_weight(metric.apply(problem.weight), bias)
    sol = solve(weighted, method, **options)
    # Zero columns (or, with a diagonal R, zero weights of a row) stay exactly zero under R⁻¹.
    weight64 = metric.undo(sol.weight)
    out_bias = None if sol.bias is None else metric.undo(sol.bias[:, None])[:, 0].to(sol.bias.dtype)
    return solution_of(problem, weight64, sol.keep, sol.method, out_bias,
                       {**sol.stats, "metric": metric.kind, "metric_error": sol.error})
