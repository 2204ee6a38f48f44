"""The result of solving a :class:`~solvers.problem.LayerProblem`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class Solution:
    """A pruned and updated weight with its mask and diagnostics.

    Attributes
    ----------
    weight : Tensor of shape (d_out, d_in)
        The pruned weight ``Ŵ``, in the problem weight's dtype and device.
    keep : BoolTensor
        For column structures, shape ``(n_groups,)``: ``True`` for a kept group.  Otherwise shape
        ``(d_out, d_in)``: ``True`` for a kept weight.
    error : float
        ``½ tr((Ŵ−W) H (Ŵ−W)ᵀ)`` with the undamped Gram matrix.
    relative_error : float
        ``error / (½ tr(W H Wᵀ))``.
    objective : float
        The damped objective the solver minimised (equals ``error`` when ``damp=0``).
    method : str
        Registered name of the solver.
    bias : Tensor of shape (d_out,), optional
        An updated bias, for methods that compensate into it (FLAP); ``None`` otherwise.
    stats : dict
        Diagnostics: ``seconds``, ``iterations`` and method-specific entries (objective per iteration,
        penalty schedule, swaps, any fallback taken).
    """

    weight: torch.Tensor
    keep: torch.Tensor
    error: float
    relative_error: float
    objective: float
    method: str
    bias: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned units (groups, or weights)."""
        return 1.0 - float(self.keep.float().mean())

    def __repr__(self) -> str:
        return (
            f"Solution(method={self.method!r}, sparsity={self.sparsity:.4f}, error={self.error:.6g}, "
            f"relative_error={self.relative_error:.6g}, seconds={self.stats.get('seconds', float('nan')):.3f})"
        )
