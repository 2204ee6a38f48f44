"""Score-based selections: magnitude and Wanda, with an optional exact refit.

Cost: one pass over ``W`` (plus a sort), and one refit when ``refit=True``.
"""

from __future__ import annotations

import torch

from ._validation import Boolean
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
