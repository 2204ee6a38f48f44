"""How much to prune in each block: per-block targets and allocation rules (``prune_layerwise``).

``sparsity`` is a float (one target for every block), a sequence (one per block) or a mapping from a
block index or a glob pattern on the block's module name (``"model.layers.1?"``) to a target; the first
key that matches a block gives its target.  A float may instead be a *model budget* that an allocation
rule spreads over the blocks (``allocation=``), keeping the total count of removed units exactly that
of the uniform prune (``Σ_i ⌊s·n_i + ½⌋`` per unit kind):

- :class:`Uniform` (``"uniform"``, the default): every block prunes ``⌊s·n + ½⌋`` units;
- :class:`OWL` (``"owl"``, Yin et al. 2024): blocks with more outlier weights (Wanda scores above
  ``threshold`` times the block's mean) prune less, sparsities spread over ``[s − spread, s + spread]``;
- :class:`Knapsack` (``"knapsack"``): each block's cost of removing ``p`` units is measured as the
  loss-aware error ``½ tr(ΔW H ΔWᵀ G)`` of its greedy OBS path (``solvers.removal_costs``; ``G`` the
  output-gradient Gram matrix, scaled so blocks compare in loss units), and one count per block is chosen
  on a grid to minimise the summed cost under the exact budget (``solvers.choose_counts``).  For
  unstructured targets a level is one fraction for every linear of the block, and its cost the summed
  loss-aware error of SparseGPT sweeps at that fraction (``solvers.row_removal_costs``, ``G`` diagonal).

OWL and Knapsack read the dense model once, block by block over the first ``windows`` (16) calibration
sequences, before the prune (:func:`allocate`).  Derivation and measurements: docs/method.md, "How much to prune where".
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, ClassVar, Union

import numpy as np
import torch
from torch import nn

import solvers

from . import units as U
from .adapters import Adapter, LinearView
from .capture import GramHooks, capture_block_inputs, outside_blocks_on, run_block
from .checks import Interval, InvalidArgumentError, NoneOr, check_table, finite


@dataclass(frozen=True)
class Uniform:
    """Every block prunes the same fraction (``⌊s·n + ½⌋`` units)."""

    name: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class OWL:
    """Outlier-weighted layerwise sparsity (Yin et al. 2024).

    Parameters
    ----------
    threshold : float > 0, default 5.0
        A weight is an outlier when its Wanda score ``|W_ij|·‖x_j‖`` exceeds ``threshold`` times the mean
        score of its block (all linears of the block together); the paper's ``M``.
    spread : float >= 0, default 0.08
        Block sparsities lie in ``[s − spread, s + spread]`` (the paper's ``λ``), the most outliers pruned least.
    windows : int >= 1 or None, default 16
        Calibration sequences the input norms are read from (None: all).
    """

    threshold: float = 5.0
    spread: float = 0.08
    windows: int | None = 16
    name: ClassVar[str] = "owl"


@dataclass(frozen=True)
class Knapsack:
    """Counts per block from measured costs under the exact budget (a multiple-choice knapsack).

    Parameters
    ----------
    levels : int >= 1, default 64
        Grid steps per block: block ``i`` may remove ``u_i + j·⌈n_i / levels⌉`` units (``u_i`` its uniform
        count, ``j`` any integer), so the uniform choice is always on the grid.
    max_sparsity : float in (0, 1), default 0.9
        No block removes more than this fraction of its units (and every block keeps one).
    windows : int >= 1 or None, default 16
        Calibration sequences the dense Gram matrices behind the costs are read from (None: all).
    row_levels : int >= 1, default 32
        Unstructured targets: block ``i`` prunes the fraction ``s + j / row_levels`` of every linear
        (``j`` any integer), so the uniform choice is on the grid.
    row_spread : float >= 0, default 0.25
        Unstructured targets: block fractions stay within ``s ± row_spread`` (and in
        ``[0, max_sparsity]``); each level on the grid costs one SparseGPT sweep per linear.
    """

    levels: int = 64
    max_sparsity: float = 0.9
    windows: int | None = 16
    row_levels: int = 32
    row_spread: float = 0.25
    name: ClassVar[str] = "knapsack"


Allocation = Union[Uniform, OWL, Knapsack]
ALLOCATIONS: dict[str, type] = {c.name: c for c in (Uniform, OWL, Knapsack)}


# Each rule's fields, checked by parse_allocation with the package's constraint table.
_FIELDS: dict[type, dict] = {
    Uniform: {},
    OWL: {"threshold": Interval(float, 0, None, closed="neither"), "spread": Interval(float, 0, None),
          "windows": NoneOr(Interval(int, 1, None))},
    Knapsack: {"levels": Interval(int, 1, None), "max_sparsity": Interval(float, 0, 1, closed="neither"),
               "windows": NoneOr(Interval(int, 1, None)), "row_levels": Interval(int, 1, None),
               "row_spread": Interval(float, 0, None)},
}


def parse_allocation(allocation: object, caller: str = "prune_layerwise") -> Allocation:
    """A name from :data:`ALLOCATIONS` or an instance with valid fields; :class:`InvalidArgumentError`
    names 'allocation' (or the bad field) otherwise."""
    if isinstance(allocation, str) and allocation in ALLOCATIONS:
        return ALLOCATIONS[allocation]()
    if type(allocation) in _FIELDS:
        check_table(f"{caller} (in its 'allocation' argument)",
                    {f"{type(allocation).__name__}.{k}": c for k, c in _FIELDS[type(allocation)].items()},
                    {f"{type(allocation).__name__}.{k}": v for k, v in dataclasses.asdict(allocation).items()})
        return allocation
    raise InvalidArgumentError(f"The 'allocation' argument of {caller} must be one of "
                               f"{', '.join(map(repr, ALLOCATIONS))} or an instance of spap.allocation.Uniform, OWL or "
                               f"Knapsack. Got {allocation!r} instead.")


def describe(allocation: Allocation) -> dict:
    """What a report and a checkpoint record of the rule: its name and fields."""
    return {"name": allocation.name, **dataclasses.asdict(allocation)}


def block_sparsities(sparsity: object, names: Sequence[str], caller: str = "prune_layerwise") -> tuple[float, ...]:
    """One target per block from a float, a sequence or a mapping; ``names`` are the blocks' module
    names (for patterns).  Raises :class:`InvalidArgumentError` naming 'sparsity': a wrong length, a
    value outside ``[0, 1)``, a key that is neither an index in range nor a string, a block no key matches."""
    n = len(names)
    allowed = ("a float in [0, 1), a sequence of one per block, or a mapping from block index or module-name "
               "pattern to a float")

    def value(v: object, where: str) -> float:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v < 1:
            raise InvalidArgumentError(f"The 'sparsity' argument of {caller} must be {allowed}; {where} is {v!r}, "
                                       "not a number in [0, 1).")
        return float(v)

    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
        return (value(sparsity, "it"),) * n
    if isinstance(sparsity, Mapping):
        for key in sparsity:
            if isinstance(key, bool) or not isinstance(key, (numbers.Integral, str)) \
                    or (isinstance(key, numbers.Integral) and not 0 <= key < n):
                raise InvalidArgumentError(f"The 'sparsity' argument of {caller} has the key {key!r}; keys must be block "
                                           f"indices in [0, {n}) or module-name patterns (e.g. {names[0] + '*'!r}).")
        out = []
        for i, name in enumerate(names):
            match = next((k for k in sparsity if (k == i if not isinstance(k, str) else fnmatch.fnmatchcase(name, k))),
                         None)
            if match is None:
                raise InvalidArgumentError(f"The 'sparsity' argument of {caller} gives no target for block {i} "
                                           f"({name!r}); add its index or a pattern that matches it (e.g. '*').")
            out.append(value(sparsity[match], f"the target of block {i}"))
        return tuple(out)
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, (str, bytes)) or isinstance(sparsity, torch.Tensor):
        values = list(sparsity.tolist() if isinstance(sparsity, torch.Tensor) else sparsity)
        if len(values) != n:
            raise InvalidArgumentError(f"The 'sparsity' argument of {caller} has {len(values)} targets; the model has "
                                       f"{n} blocks (one target per block).")
        return tuple(value(v, f"the target of block {i}") for i, v in enumerate(values))
    raise InvalidArgumentError(f"The 'sparsity' argument of {caller} must be {allowed}. Got {sparsity!r} instead.")


def block_names(model: nn.Module, adapter: Adapter) -> list[str]:
    """The decoder blocks' module names in ``model`` (``"model.layers.0"``, ...)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in adapter.blocks()]


def uniform_counts(sparsities: Sequence[float], adapter: Adapter, kinds: Sequence[str]) -> list[dict[str, int]]:
    """Units each block prunes of every kind at its own target (the package's rounding rule)."""
    found = U.kinds(adapter, kinds)
    return [{name: kind.prune_count(s, kind.count(block)) for name, kind in found.items()}
            for s, block in zip(sparsities, adapter.blocks())]


# --- the dense statistics behind OWL and Knapsack ----------------------------------------------------

def allocate(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], allocation: Allocation,
             sparsity: float, kinds: Sequence[str], *, device: torch.device, offload: torch.device,
             output_grams: Mapping[int, Mapping[str, torch.Tensor]] | None = None, metric_kind: str = "full",
             metric_damp: float = 1.0, damp: float = 0.01, damp_mode: str = "mean",
             gram_dtype: torch.dtype = torch.float32, rows: solvers.Structure | None = None,
             progress: bool = False) -> tuple[tuple[float, ...], list[dict[str, int]]]:
    """Per-block targets for a model budget ``sparsity``: ``(sparsities, counts)``, one fraction per block
    (what row structures prune of every linear) and, per block, the units of every kind in ``kinds`` it
    prunes.  Unit counts add up exactly to the uniform prune's, per kind, and every block keeps at least
    one unit of each kind (OWL's rounding and the knapsack's grid stop at ``n − 1``).

    OWL and Knapsack run the dense model block by block over the rule's first ``windows`` calibration
    sequences first; Knapsack also needs ``output_grams[block][name]`` (``G``: full for a unit kind's
    output linear, the diagonal for every linear of an unstructured target ``rows``; ``prune_layerwise``
    refuses it for N:M before any work).
    """
    blocks = adapter.blocks()
    uniform = uniform_counts([sparsity] * len(blocks), adapter, kinds)
    if isinstance(allocation, Uniform):
        return (sparsity,) * len(blocks), uniform
    found = U.kinds(adapter, kinds)
    batches = _first_sequences(batches, allocation.windows)
    if isinstance(allocation, OWL):
        ratios = _block_statistics(model, adapter, batches, device, offload, progress,
                                   hooks=lambda block: _SquaredNorms(_group_heads(adapter, block), device),
                                   statistic=lambda i, block, norms: _outlier_ratio(adapter, block, norms,
                                                                                     allocation.threshold))
        fractions = solvers.outlier_sparsities(ratios, sparsity, allocation.spread)
        counts: list[dict[str, int]] = [{} for _ in blocks]
        for name, kind in found.items():
            sizes = [kind.count(b) for b in blocks]
            chosen = solvers.round_to_budget(fractions, sizes, sum(c[name] for c in uniform))
            for c, p in zip(counts, chosen):
                c[name] = p
        return tuple(min(max(f, 0.0), 1 - 1e-9) for f in fractions), counts
    if rows is not None:  # Knapsack over one fraction per block (unstructured)
        return _row_knapsack(model, adapter, batches, allocation, sparsity, uniform, device=device, offload=offload,
                             output_grams=output_grams, metric_damp=metric_damp, damp=damp, damp_mode=damp_mode,
                             gram_dtype=gram_dtype, progress=progress)
    def menus(i: int, block: nn.Module, grams: Mapping[str, solvers.GramAccumulator]):
        out = {}
        for name, kind in found.items():
            n, u = kind.count(block), uniform[i][name]
            top = max(min(n - 1, int(allocation.max_sparsity * n)), u)
            step = max(1, math.ceil(n / allocation.levels))
            levels = list(range(u % step, top + 1, step))
            curve = solvers.removal_costs(cost_problem(kind, block, grams[name], output_grams[i][name], metric_kind,
                                                        metric_damp, damp, damp_mode), top)
            out[name] = (levels, [float(curve[p]) for p in levels])
        return out

    menu = _block_statistics(model, adapter, batches, device, offload, progress,
                             hooks=lambda block: GramHooks({name: kind.output_linear(block)
                                                            for name, kind in found.items()}, device, gram_dtype),
                             statistic=menus)
    counts = [{} for _ in blocks]
    for name in found:
        chosen = solvers.choose_counts([m[name][1] for m in menu], [m[name][0] for m in menu],
                                       sum(c[name] for c in uniform))
        for c, p in zip(counts, chosen):
            c[name] = p
    mlp = "mlp" if "mlp" in found else next(iter(found))
    fractions = tuple(c[mlp] / found[mlp].count(b) for c, b in zip(counts, blocks))
    return fractions, counts


def cost_problem(kind: U.UnitKind, block: nn.Module, acc: solvers.GramAccumulator, G: torch.Tensor,
                 metric_kind: str = "full", metric_damp: float = 1.0, damp: float = 0.01,
                 damp_mode: str = "mean") -> solvers.LayerProblem:
    """The knapsack's cost problem of one block's unit kind (``acc``: its output linear's input Gram
    matrix, ``G`` its output-gradient Gram matrix): the layer problem of ``√scale · R W``: its error is ``½ tr(ΔW H ΔWᵀ G_d)·scale`` with ``G_d`` the
    damped, normalised metric of the masks and ``scale = mean(diag G)``, so that blocks compare in units
    of the loss."""
    W = LinearView(kind.output_linear(block)).weight.to(acc.H.device, torch.float64)
    return solvers.LayerProblem(_in_loss_units(W, G, metric_kind, metric_damp), acc.H, kind.column_groups(block),
                                n_prune=0, damp=damp, damp_mode=damp_mode)


def _in_loss_units(W: torch.Tensor, G: torch.Tensor, metric_kind: str, metric_damp: float) -> torch.Tensor:
    """``√scale · R W``: its plain layer error is ``½ tr(ΔW H ΔWᵀ G_d)·scale``, ``G_d`` the damped,
    normalised metric of ``G`` and ``scale = mean(diag G)``."""
    G = G.to(W.device)
    metric = solvers.OutputMetric.from_gram(G, metric_kind, metric_damp)
    scale = float((G if G.ndim == 1 else G.diagonal()).mean())
    return math.sqrt(scale) * metric.apply(W)


def row_levels(allocation: Knapsack, sparsity: float) -> list[float]:
    """The block fractions an unstructured knapsack chooses from: ``s + j / row_levels`` within
    ``s ± row_spread`` and ``[0, max_sparsity]`` (``s`` itself always among them)."""
    step = 1.0 / allocation.row_levels
    reach = int(math.floor(allocation.row_spread / step + 1e-9))
    out = [sparsity + j * step for j in range(-reach, reach + 1)]
    return [f for f in out if -1e-12 <= f <= max(allocation.max_sparsity, sparsity) + 1e-12]


def _row_knapsack(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], allocation: Knapsack,
                  sparsity: float, uniform: list[dict[str, int]], *, device: torch.device, offload: torch.device,
                  output_grams: Mapping[int, Mapping[str, torch.Tensor]], metric_damp: float, damp: float,
                  damp_mode: str, gram_dtype: torch.dtype, progress: bool) -> tuple[tuple[float, ...], list[dict[str, int]]]:
    """One fraction per block for an unstructured target: each block's cost at every level of
    :func:`row_levels` is the summed loss-aware error (diagonal ``G``) of SparseGPT sweeps of its linears
    at that fraction; the levels are chosen under the exact budget in weights (the uniform prune's)."""
    fractions = row_levels(allocation, sparsity)
    at_uniform = fractions.index(sparsity)  # steps from the lowest level to the uniform one

    def costs(i: int, block: nn.Module, grams: Mapping[str, solvers.GramAccumulator]) -> tuple[np.ndarray, int]:
        total, size = np.zeros(len(fractions)), 0
        for g in adapter.linear_groups(block):
            acc = grams[next(iter(g))]
            for name, module in g.items():
                W = LinearView(module).weight.to(acc.H.device, torch.float64)
                problem = solvers.LayerProblem(_in_loss_units(W, output_grams[i][name], "diag", metric_damp), acc.H,
                                               solvers.Unstructured(), n_prune=0, damp=damp, damp_mode=damp_mode)
                total += solvers.row_removal_costs(problem, [U.prune_count(f, W.numel()) for f in fractions])
                size += W.numel()
        return total, size

    menu = _block_statistics(model, adapter, batches, device, offload, progress,
                             hooks=lambda block: GramHooks(_group_heads(adapter, block), device, gram_dtype),
                             statistic=costs)
    # Block i at level j removes about (f_0 + j/row_levels)·size_i weights; counted from the lowest level
    # in units of size_i/row_levels, that is j·size_i, and the uniform total Σ_i at_uniform·size_i keeps the
    # parameter budget.
    chosen = solvers.choose_counts([c for c, _ in menu], [[j * size for j in range(len(fractions))] for _, size in menu],
                                   sum(at_uniform * size for _, size in menu))
    picks = [fractions[p // size] for p, (_, size) in zip(chosen, menu)]
    return tuple(picks), [dict(u) for u in uniform]


def _group_heads(adapter: Adapter, block: nn.Module) -> dict[str, nn.Module]:
    """The first linear of every group that shares an input (its Gram matrix serves the group)."""
    return {next(iter(g)): next(iter(g.values())) for g in adapter.linear_groups(block)}


def _outlier_ratio(adapter: Adapter, block: nn.Module, squared_norms: Mapping[str, torch.Tensor],
                   threshold: float) -> float:
    """OWL's layerwise outlier distribution: the fraction of the block's Wanda scores ``|W_ij|·‖x_j‖``
    above ``threshold`` times their mean (all linears of the block together)."""
    scores = []
    for g in adapter.linear_groups(block):
        norms = squared_norms[next(iter(g))].sqrt()
        for module in g.values():
            W = LinearView(module).weight.detach().to(norms.device, torch.float64)
            scores.append((W.abs() * norms).flatten())
    s = torch.cat(scores)
    return float((s > threshold * s.mean()).double().mean())


class _SquaredNorms:
    """Forward pre-hooks summing each input feature's square over every token: ``accumulators[name]``,
    float64 ``(d_in,)`` (the squared norms ``‖x_j‖²`` of Wanda's score)."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device) -> None:
        self.accumulators = {name: torch.zeros(LinearView(m).d_in, dtype=torch.float64, device=device)
                             for name, m in modules.items()}
        self._handles = [m.register_forward_pre_hook(lambda m, args, name=name: self._add(name, args[0]))
                         for name, m in modules.items()]

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.accumulators[name] += x.double().pow(2).sum(0).to(self.accumulators[name].device)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _first_sequences(batches: list[torch.Tensor], n: int | None) -> list[torch.Tensor]:
    """The first ``n`` calibration sequences (all when None), in batches of the original size."""
    if n is None:
        return batches
    rows = [row for b in batches for row in b][:n]
    size = len(batches[0])
    return [torch.stack(rows[k : k + size]) for k in range(0, len(rows), size)]


def _block_statistics(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], device: torch.device,
                      offload: torch.device, progress: bool, hooks: Callable[[nn.Module], object],
                      statistic: Callable[[int, nn.Module, dict], object]) -> list:
    """``statistic(i, block, accumulators)`` of every block of the *dense* model, ``accumulators`` those of
    ``hooks(block)`` (``GramHooks`` or ``_SquaredNorms``) after every batch ran through the block; the
    batches run block by block (one block on ``device`` at a time, activations on ``offload``), as the
    prune does."""
    blocks = adapter.blocks()
    with outside_blocks_on(model, blocks, device):
        hidden, kwargs = capture_block_inputs(model, blocks, batches, device, offload)
    out = []
    bar = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="allocation: reading blocks", unit="block")
    for i in bar:
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        recorder = hooks(block)
        try:
            with torch.no_grad():
                for b, h in enumerate(hidden):
                    hidden[b] = finite(run_block(block, h, kwargs[i][b], device),
                                       f"output of block {i} (allocation pass)").to(h.device)
        finally:
            recorder.remove()
        for key, acc in recorder.accumulators.items():
            if not torch.isfinite(acc.H if isinstance(acc, solvers.GramAccumulator) else acc).all():
                raise FloatingPointError(f"NaN or Inf in the calibration inputs of block {i} ({key}).")
        out.append(statistic(i, block, recorder.accumulators))
        block.to(home)
    return out
