"""Score-based selections: magnitude, Wanda, Wanda-sp and FLAP, with an optional exact refit.

Cost: one pass over ``W`` (plus a sort), and one refit when ``refit=True``.
"""

from __future__ import annotations

import torch

from .validation import Boolean, InvalidArgumentError
from .masks import group_scores, project
from .problem import LayerProblem
from .refit import refit
from .structure import ColumnGroups, Unstructured

_OPTIONS = {"refit": Boolean()}


def _finish(problem: LayerProblem, keep: torch.Tensor, do_refit: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if do_refit:
        return refit(problem, keep), keep, {"refit": True}
    W = problem.W64
    if isinstance(problem.structure, ColumnGroups):
        cols = problem.structure.column_keep_mask(keep, problem.shape[1])
        return W * cols[None, :], keep, {"refit": False}
    return W * keep, keep, {"refit": False}


def weight_scores(problem: LayerProblem, column_norm: torch.Tensor | None) -> torch.Tensor:
    """``|W_ij|·c_j`` where ``c_j`` is an input-norm weight (1 for magnitude), shape ``(d_out, d_in)``."""
    W = problem.W64.abs()
    return W if column_norm is None else W * column_norm[None, :]


def select(problem: LayerProblem, column_norm: torch.Tensor | None, *, per_row: bool) -> torch.Tensor:
    """Keep mask from the scores ``|W_ij|·c_j``; a group scores the squared sum over its columns."""
    scores = weight_scores(problem, column_norm)
    if isinstance(problem.structure, ColumnGroups):
        return project(problem, group_scores(problem, (scores**2).sum(0)))
    return project(problem, scores, per_row=per_row and isinstance(problem.structure, Unstructured))


from .registry import register  # noqa: E402  (registry imports problem/solution only)


@register(
    "magnitude",
    reference="Han et al., Learning both Weights and Connections for Efficient Neural Networks, NeurIPS 2015.",
    options=_OPTIONS,
)
def magnitude(problem: LayerProblem, *, refit: bool = False):
    """Keep the largest |W| (a group by its Frobenius norm); optionally refit exactly."""
    return _finish(problem, select(problem, None, per_row=False), refit)


@register(
    "wanda",
    reference="Sun et al., A Simple and Effective Pruning Approach for Large Language Models (Wanda), ICLR 2024.",
    options=_OPTIONS,
)
def wanda(problem: LayerProblem, *, refit: bool = False):
    """Keep the largest |W_ij|·‖x_j‖₂, compared per output row (unstructured); optionally refit."""
    norms = problem.H64.diagonal().clamp_min(0).sqrt()
    return _finish(problem, select(problem, norms, per_row=True), refit)


def _column_structured_finish(problem: LayerProblem, column_scores: torch.Tensor, do_refit: bool):
    """Keep the groups with the largest summed column scores; optional exact refit."""
    keep = project(problem, group_scores(problem, column_scores))
    return _finish(problem, keep, do_refit)


@register(
    "wanda_sp",
    structures=(ColumnGroups,),
    reference="An et al., Fluctuation-based Adaptive Structured Pruning for Large Language Models (FLAP), AAAI 2024: "
    "the structured Wanda baseline (Wanda-sp) of its experiments; Sun et al., Wanda, ICLR 2024.",
    options=_OPTIONS,
)
def wanda_sp(problem: LayerProblem, *, refit: bool = False):
    """Structured Wanda: a group scores ``Σ_{j∈g} Σ_i |W_ij|·‖x_j‖₂``; keep the largest; optionally refit.

    Cost: one pass over ``W``, a sort over groups, and one refit when ``refit=True``.
    """
    norms = problem.H64.diagonal().clamp_min(0).sqrt()
    return _column_structured_finish(problem, (problem.W64.abs() * norms[None, :]).sum(0), refit)


def input_variance(problem: LayerProblem, caller: str) -> torch.Tensor:
    """Per-feature sample variance of the calibration inputs, ``H_jj/N − μ_j²``, shape ``(d_in,)``."""
    if problem.input_mean is None or problem.n_samples is None:
        missing = "input_mean" if problem.input_mean is None else "n_samples"
        raise InvalidArgumentError(
            f"Method {caller!r} needs the calibration input statistics: build the LayerProblem with "
            f"'input_mean' and 'n_samples' (GramAccumulator.mean and .n_samples); {missing!r} is missing."
        )
    mean = problem.input_mean.to(problem.H64)
    return (problem.H64.diagonal() / problem.n_samples - mean * mean).clamp_min(0)


@register(
    "flap",
    structures=(ColumnGroups,),
    reference="An et al., Fluctuation-based Adaptive Structured Pruning for Large Language Models (FLAP), AAAI 2024.",
    options=_OPTIONS,
    compensates_bias=True,
)
def flap(problem: LayerProblem, *, refit: bool = False):
    """FLAP: fluctuation metric ``Var(x_j)·‖W_{:,j}‖²`` summed over a group, and bias compensation.

    The pruned inputs' mean contribution moves into the bias, ``b ← b + (W − Ŵ) μ``
    (``W_{:,P} μ_P`` without refit): :attr:`Solution.bias` carries the new bias (for a
    layer without one, the shift alone: the layer must gain a bias to use it), and
    ``stats["error_with_bias"]`` the layer error once that bias is used,
    ``½ tr((Ŵ−W)(H − N μμᵀ)(Ŵ−W)ᵀ)``.  FLAP's cross-layer standardisation of the scores and its adaptive
    per-layer widths concern a whole model, not one layer, and are not part of this solver.

    Needs ``problem.input_mean`` and ``problem.n_samples``.  Cost: one pass over ``W``, a sort over
    groups, and one refit when ``refit=True``.
    """
    variance = input_variance(problem, "flap")
    W_hat, keep, stats = _column_structured_finish(problem, variance * (problem.W64**2).sum(0), refit)
    mean = problem.input_mean.to(problem.H64)
    shift = (problem.W64 - W_hat) @ mean
    bias = shift if problem.bias is None else problem.bias.to(shift) + shift
    D = W_hat - problem.W64
    centered = 0.5 * float(((D @ problem.H64) * D).sum()) - 0.5 * problem.n_samples * float(((D @ mean) ** 2).sum())
    stats.update({"bias": bias.to(problem.weight.dtype), "error_with_bias": centered})
    return W_hat, keep, stats
