"""How many units each layer gives up under one budget: the allocation problem, as mathematics.

A model-level budget fixes the total count of units removed, ``Σ_i p_i = P``, and each layer ``i`` has a
cost ``c_i(p)`` for removing ``p`` of its units.  Choosing one count per layer to minimise ``Σ_i c_i(p_i)``
is a multiple-choice knapsack (each layer picks one level from its menu; the weights must add up to the
budget exactly), solved exactly by dynamic programming over the running total (:func:`choose_counts`, as
SPDY does for per-layer sparsity, Frantar & Alistarh 2022).

The costs come from one greedy OBS path per layer problem (:func:`removal_costs`): removing units one at
a time with exact updates gives the exact (damped) error of that path's mask at *every* count, from one
factorization.  It is an upper bound of each count's optimum, tight where the greedy path is good.
For unstructured rows the menu comes from SparseGPT sweeps at each level, sharing one factorization
(:func:`row_removal_costs`).

OWL (Yin et al. 2024) gives less pruning to layers with more outliers (:func:`outlier_sparsities`);
:func:`round_to_budget` turns per-layer fractions into integer counts with an exact total.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from .problem import LayerProblem
from .registry import solve
from .sparsegpt import inverse_cholesky_upper, sweep
from .structure import ColumnGroups, Unstructured
from .validation import InvalidArgumentError


def removal_costs(problem: LayerProblem, max_prune: int) -> np.ndarray:
    """The damped error of removing ``p`` units for ``p = 0, 1, …, max_prune``, along the greedy OBS path.

    Parameters
    ----------
    problem : LayerProblem
        A column-group problem (MLP channels, heads); its own ``n_prune`` is ignored.  For a loss-aware
        cost pass the problem of ``R W`` (:class:`solvers.OutputMetric`): the error is then the metric's.
    max_prune : int
        The longest path, ``0 <= max_prune < n_units`` (a layer keeps at least one unit).

    Returns
    -------
    float64 array of length ``max_prune + 1``: ``costs[p]``, ``costs[0] = 0``, non-decreasing.
    """
    if not isinstance(problem.structure, ColumnGroups):
        raise InvalidArgumentError(f"removal_costs needs a column-group problem (MLP channels, heads); got "
                                   f"{problem.structure!r}.")
    if not 0 <= max_prune < problem.n_units:
        raise InvalidArgumentError(f"The 'max_prune' argument of removal_costs must be in [0, {problem.n_units}) "
                                   f"(a layer keeps at least one of its {problem.n_units} units); got {max_prune}.")
    costs = np.zeros(max_prune + 1)
    if max_prune == 0:
        return costs
    path = dataclasses.replace(problem, sparsity=None, n_prune=max_prune)
    steps = solve(path, "obs", per_step=1).stats["step_costs"]  # each exact: one group, current state
    costs[1:] = np.maximum.accumulate(np.cumsum(np.maximum(steps, 0.0)))
    return costs


def row_removal_costs(problem: LayerProblem, n_prunes: Sequence[int]) -> np.ndarray:
    """The damped error of SparseGPT's solution at each count of pruned weights (unstructured rows).

    Parameters
    ----------
    problem : LayerProblem
        An unstructured problem; its own target is ignored.  For a loss-aware cost pass the problem of
        ``R W`` with a diagonal metric ``R`` (rows stay rows): the error is then the metric's.
    n_prunes : sequence of int
        Counts of weights to prune, each in ``[0, d_out·d_in]``.

    Returns
    -------
    float64 array, ``costs[j]`` the damped objective ``½ tr(ΔW H_d ΔWᵀ)`` of the SparseGPT sweep that
    prunes ``n_prunes[j]`` weights (``0`` for a count of 0).

    The sweeps share one factorization of ``H_d``; each is ``O(d_out·d_in²)``.  A sweep is an upper
    bound of its count's optimum and far cheaper than an exact row solve, which is what a menu of levels
    per layer needs (SPAP then solves the chosen count).
    """
    if not isinstance(problem.structure, Unstructured):
        raise InvalidArgumentError(f"row_removal_costs needs an unstructured problem; got {problem.structure!r}.")
    total = problem.weight.numel()
    counts = [int(k) for k in n_prunes]
    if any(not 0 <= k <= total for k in counts):
        raise InvalidArgumentError(f"The 'n_prunes' argument of row_removal_costs must hold counts in [0, {total}]; "
                                   f"got {counts}.")
    costs = np.zeros(len(counts))
    if not any(counts):
        return costs
    U = inverse_cholesky_upper(problem.hessian)
    for j, k in enumerate(counts):
        if k:
            costs[j] = float(sweep(problem, U, k)[2].sum())
    return costs


def choose_counts(costs: Sequence[Sequence[float]], counts: Sequence[Sequence[int]], total: int) -> list[int]:
    """One count per layer, ``Σ_i counts[i][j_i] = total`` exactly, minimising ``Σ_i costs[i][j_i]``.

    Parameters
    ----------
    costs, counts : one sequence per layer, of equal lengths per layer
        Layer ``i`` may remove ``counts[i][j]`` units (integers >= 0) at cost ``costs[i][j]`` (finite).
    total : int
        The exact number of units removed over all layers.

    Returns
    -------
    list of int: the chosen count of every layer (an entry of ``counts[i]``).

    The dynamic program runs over the running total in units of the counts' greatest common divisor:
    ``O(L · T · J)`` for ``L`` layers, ``T`` reachable totals and ``J`` levels per layer, vectorised over
    ``T``.  Ties go to the first level listed.  Raises :class:`InvalidArgumentError` when no choice
    reaches ``total``.
    """
    if len(costs) != len(counts) or not costs:
        raise InvalidArgumentError("choose_counts needs one cost list and one count list per layer (and at least one layer).")
    levels = [np.asarray(c, dtype=np.int64) for c in counts]
    values = [np.asarray(c, dtype=np.float64) for c in costs]
    for i, (n, v) in enumerate(zip(levels, values)):
        if n.ndim != 1 or n.shape != v.shape or n.size == 0 or (n < 0).any() or not np.isfinite(v).all():
            raise InvalidArgumentError(f"Layer {i} of choose_counts needs as many finite costs as counts >= 0, at least one.")
    unit = math.gcd(int(total), *(int(x) for n in levels for x in n)) or 1
    if total % unit:
        raise InvalidArgumentError(f"No choice of counts reaches total={total}.")
    steps = [n // unit for n in levels]
    goal = total // unit
    best = np.zeros(1)  # best[t]: least cost of the layers so far removing t·unit units
    choice = []
    for n, v in zip(steps, values):
        width = min(best.size - 1 + int(n.max()), goal) + 1
        new = np.full(width, np.inf)
        arg = np.full(width, -1, dtype=np.int64)
        for j in range(n.size):
            lo = int(n[j])
            if lo >= width:
                continue
            m = min(best.size, width - lo)
            cand = best[:m] + v[j]
            better = cand < new[lo : lo + m]
            new[lo : lo + m][better] = cand[better]
            arg[lo : lo + m][better] = j
        best = new
        choice.append(arg)
    if goal >= best.size or not np.isfinite(best[goal]):
        raise InvalidArgumentError(f"No choice of counts reaches total={total}.")
    chosen, t = [], goal
    for n, arg in zip(reversed(steps), reversed(choice)):
        j = int(arg[t])
        chosen.append(j)
        t -= int(n[j])
    chosen.reverse()
    return [int(levels[i][j]) for i, j in enumerate(chosen)]


def outlier_sparsities(ratios: Sequence[float], sparsity: float, spread: float) -> list[float]:
    """OWL's per-layer sparsities from per-layer outlier ratios (Yin et al. 2024, their Eq. 3).

    The ratios are mapped linearly onto kept fractions in ``[1 − s − spread, 1 − s + spread]``, the most
    outliers keeping most, then shifted so that the mean sparsity is ``s``.  Equal ratios give ``s``
    everywhere.  Returns a list of floats (may leave ``[0, 1)`` for extreme ``s ± spread``; the caller
    checks).
    """
    r = np.asarray(ratios, dtype=np.float64)
    span = float(r.max() - r.min())
    kept = np.zeros_like(r) if span == 0 else (r - r.min()) / span * 2 * spread
    kept = kept - kept.mean() + (1 - sparsity)
    return [float(1 - k) for k in kept]


def round_to_budget(fractions: Sequence[float], sizes: Sequence[int], total: int) -> list[int]:
    """Integer counts ``p_i ≈ fractions[i]·sizes[i]`` with ``Σ p_i = total`` exactly (largest remainders).

    Each count stays in ``[0, sizes[i] − 1]``; raises :class:`InvalidArgumentError` when that is
    impossible.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    raw = np.clip(np.asarray(fractions, dtype=np.float64) * sizes, 0, sizes - 1)
    counts = np.floor(raw).astype(np.int64)
    if not 0 <= total <= int((sizes - 1).sum()):
        raise InvalidArgumentError(f"round_to_budget: total={total} is outside [0, {int((sizes - 1).sum())}].")
    remainder = raw - counts
    while counts.sum() != total:  # at most len(sizes) rounds of at most len(sizes) moves
        need = total - int(counts.sum())
        room = counts < sizes - 1 if need > 0 else counts > 0
        order = np.argsort(-remainder if need > 0 else remainder, kind="stable")
        order = order[room[order]][: abs(need)]
        counts[order] += 1 if need > 0 else -1
        remainder[order] = 0.0 if need > 0 else 1.0
    return [int(c) for c in counts]
