"""GISP: global iterative structured pruning of MLP channels and key-value groups.

Wang et al., *From Local to Global: Revisiting Structured Pruning Paradigms for Large Language Models*
(arXiv 2510.18030).  Where :func:`spap.prune_layerwise` solves one layer's reconstruction problem at a
time, GISP ranks every structure of the whole model by a first-order estimate of how much the *model's
loss* changes when the structure is removed, and removes the least important ones in small steps,
recomputing the gradients after each step:

1. **Score.**  With ``ḡ`` the gradient of the objective averaged over the calibration set, a
   structure ``S`` (the weights its removal deletes) scores ``|Σ_{w ∈ S} w · ḡ_w|``: the first-order
   Taylor estimate of the change in loss when every weight of ``S`` is set to zero.  An MLP channel is
   its rows of gate/up (fc1, c_fc, with their biases) and its column of down (fc2, c_proj); a
   key-value group is the q rows of its query heads, the k and v rows of its KV head (with biases)
   and the o columns of its query heads.
2. **Normalise per type.**  Each score is divided by the mean score of its type (MLP channel or KV
   group) over the structures of the whole model still present, so the two types are comparable.
3. **Rank globally** and remove the lowest-ranked structures until the step's parameter target is
   reached, keeping at least one channel and one KV group in every block.  Per-layer widths become
   non-uniform.
4. **Iterate.**  Between consecutive requested sparsities the target grows in ``steps_per_target``
   equal steps; removed structures are masked (their activations multiplied by zero), and the next
   step's gradients are those of the masked model.  Structures are only ever removed, so the kept
   sets are nested: one run gives a sub-network at every requested sparsity ("prune once, deploy
   many").  :meth:`GispResult.materialize` shrinks a copy of the dense model to any of them.

Memory: the whole model, the gradients of the linears being scored (their own size again) and the
activations of one calibration batch, on the model's device.  docs/gisp.md states the formulas and
the choices made where the paper leaves them open.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import units as U
from ..adapters import LinearView, get_adapter
from ..capture import calibration_batches, check_calibration
from ..checks import Boolean, DistinctFloats, Interval, InvalidArgumentError, NoneOr, Options, check_table
from ..report import peak_memory
from ..units import PruneStructure, check_model

OBJECTIVES = ("perplexity", "margin")
_UNIT_NAMES = {"mlp": "MLP channels", "heads": "key-value groups"}
NORMALIZATIONS = ("mean", "sum", "none")
_CONSTRAINTS = {
    "sparsities": DistinctFloats(Interval(float, 0, 1, closed="neither")),
    "objective": Options(OBJECTIVES),
    "normalize": Options(NORMALIZATIONS),
    "steps_per_target": Interval(int, 1, None),
    "batch_size": Interval(int, 1, None),
    "batches_per_step": NoneOr(Interval(int, 1, None)),
    "seed": Interval(int, None, None),
    "progress": Boolean(),
}


@dataclass
class GispStep:
    """One pruning step: its cumulative ``target`` and ``achieved`` sparsity, the ``objective`` of the
    model entering the step (mean next-token NLL, or mean margin), the structures ``removed`` in the
    step and ``alive`` after it (per type), and its wall ``seconds``."""

    index: int
    target: float
    achieved: float
    objective: float
    removed: dict[str, int]
    alive: dict[str, int]
    seconds: float


@dataclass
class GispResult:
    """What :func:`gisp` returns: the nested kept sets at every requested sparsity.

    Attributes
    ----------
    sparsities : list of float, ascending
    kept : dict float -> list (one per block) of dict str -> LongTensor
        ``kept[s][i]["mlp"]``: sorted indices of block ``i``'s kept MLP channels, shape ``(width_i,)``;
        ``kept[s][i]["heads"]``: sorted indices of its kept key-value groups, shape ``(n_kv_i,)``.  The
        format :func:`spap.units.keep` takes.
    achieved : dict float -> float
        Removed parameters of the chosen structures over their total (the definition of sparsity).
    unit_params : dict str -> int
        Parameters one MLP channel / one KV group holds (``"mlp"``, ``"heads"``).
    structure_params : int
        Parameters of all the chosen structures in the dense model (the denominator of sparsity).
    dense_widths : dict str -> int
        ``{"mlp": intermediate size, "heads": KV heads}`` of the dense model (the model to materialise).
    steps : list of GispStep
    settings : dict
        The arguments of the run.
    seconds : float
        Wall time of the run.
    peak_memory : dict str -> int
        Peak resident memory (and CUDA memory on CUDA), bytes.
    """

    sparsities: list[float]
    structure: str
    objective: str
    kept: dict[float, list[dict[str, torch.Tensor]]]
    achieved: dict[float, float]
    unit_params: dict[str, int]
    structure_params: int
    dense_widths: dict[str, int]
    steps: list[GispStep] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory: dict[str, int] = field(default_factory=dict)

    def _key(self, sparsity: float) -> float:
        for s in self.sparsities:
            if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and math.isclose(s, sparsity, abs_tol=1e-9):
                return s
        raise ValueError(f"The 'sparsity' argument must be one of the run's sparsities "
                         f"{', '.join(f'{s:g}' for s in self.sparsities)}. Got {sparsity!r} instead.")

    def widths(self, sparsity: float) -> dict[str, list[int]]:
        """Per-block widths at ``sparsity``: ``{"mlp": [channels kept in block i], "heads": [KV groups]}``."""
        kept = self.kept[self._key(sparsity)]
        return {t: [len(k[t]) for k in kept] for t in kept[0]}

    def materialize(self, model: nn.Module, sparsity: float, *, inplace: bool = False) -> nn.Module:
        """The sub-network at ``sparsity``: ``model`` (the dense model :func:`gisp` ran on) with the
        removed channels and KV groups cut out of its weights.

        A copy unless ``inplace``.  Widths differ from block to block, so the config keeps the dense
        sizes unless every block ended with the same width (then it is updated as
        :func:`spap.prune_layerwise` does).  Save with :func:`spap.save_pruned`; stock
        ``from_pretrained`` cannot load non-uniform widths.  OPT and GPT-2 derive head_dim from the
        hidden size, so their removed heads are zeroed instead of cut (as in ``prune_layerwise``).
        """
        key = self._key(sparsity)
        U.check_uniform(get_adapter(model), self.dense_widths, "model", "the dense model GISP ran on")
        if not inplace:
            model = copy.deepcopy(model)
        adapter = get_adapter(model)
        for block, k in zip(adapter.blocks(), self.kept[key]):
            U.keep(adapter, block, k)
        U.set_widths(adapter, self.widths(key))
        return model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: kept indices as lists of ints, sparsities as strings ``f"{s:g}"``."""
        return {
            "sparsities": self.sparsities, "structure": self.structure, "objective": self.objective,
            "kept": {f"{s:g}": [{t: v.tolist() for t, v in k.items()} for k in blocks] for s, blocks in self.kept.items()},
            "achieved": {f"{s:g}": a for s, a in self.achieved.items()},
            "unit_params": self.unit_params, "structure_params": self.structure_params,
            "dense_widths": self.dense_widths, "steps": [vars(s) for s in self.steps], "settings": self.settings,
            "seconds": self.seconds, "peak_memory": self.peak_memory,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GispResult":
        """Inverse of :meth:`to_dict` (e.g. to materialise sub-networks of a run saved as JSON)."""
        levels = [float(s) for s in d["sparsities"]]
        key = {f"{s:g}": s for s in levels}
        return cls(levels, d["structure"], d["objective"],
                   {key[s]: [{t: torch.tensor(v, dtype=torch.long) for t, v in k.items()} for k in blocks]
                    for s, blocks in d["kept"].items()},
                   {key[s]: a for s, a in d["achieved"].items()}, dict(d["unit_params"]), d["structure_params"],
                   dict(d["dense_widths"]), [GispStep(**step) for step in d["steps"]], dict(d["settings"]),
                   d["seconds"], dict(d["peak_memory"]))


def gisp(
    model: nn.Module,
    calib: Any,
    sparsities: Sequence[float] = (0.2, 0.3, 0.5),
    *,
    structure: str = "mlp",
    objective: str = "perplexity",
    steps_per_target: int = 4,
    normalize: str = "mean",
    tokenizer=None,
    batch_size: int = 4,
    batches_per_step: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> GispResult:
    """Prune ``model`` globally and iteratively; return the kept structures at every sparsity.

    ``model`` is left as it was (weights, ``requires_grad`` flags, no hooks); materialise a pruned copy
    with ``result.materialize(model, s)``.

    Parameters
    ----------
    model : transformers causal LM
        A supported family (:data:`spap.adapters.ADAPTERS`, or a found layout) with uniform widths.  It
        runs forward and backward on the device it is on.
    calib : see ``objective``
        ``objective="perplexity"``: calibration text or token ids as :func:`spap.prune_layerwise`
        takes them (a LongTensor ``(n, seq)``, a list of strings with ``tokenizer``, or an iterable of
        ``(batch, seq)`` LongTensors).  ``objective="margin"``: a list of ``(prompt, correct,
        incorrect)`` triples, each element a non-empty 1-D LongTensor or list of token ids; the answer
        tokens follow the prompt directly (tokenize the answer with its leading space, without special
        tokens).
    sparsities : sequence of float in (0, 1), default (0.2, 0.3, 0.5)
        Fractions of the chosen structures' parameters to remove; one sub-network each.  Distinct; sorted
        by the function.  For ``"mlp"`` (or ``"heads"``) alone this is the fraction of all MLP channels
        (KV groups) of the model, ``⌊s·N + ½⌋`` of the ``N`` removed exactly.  For ``"mlp+heads"`` the
        removed parameter count is within half an MLP channel's parameters of ``s`` times the total.
    structure : {"mlp", "heads", "mlp+heads"}, default "mlp"
        MLP channels, whole key-value groups (a KV head and its query heads), or both.
    objective : {"perplexity", "margin"}, default "perplexity"
        ``"perplexity"``: mean next-token cross-entropy over every predicted token of ``calib``.
        ``"margin"``: mean over triples of ``NLL(correct) − NLL(incorrect)``, each NLL averaged over the
        answer's tokens given the prompt.
    steps_per_target : int ≥ 1, default 4
        Pruning steps from one requested sparsity to the next (from 0 to the first); each step removes
        an equal share of that interval, with gradients recomputed before it.
    normalize : {"mean", "sum", "none"}, default "mean"
        Divide each structure's score by the mean (or sum) of the scores of its type over the model's
        remaining structures; ``"none"`` ranks raw scores.
    tokenizer : optional
        Needed when ``calib`` is a list of strings.
    batch_size : int ≥ 1, default 4
        Sequences (perplexity) or triples (margin) per forward/backward pass.
    batches_per_step : int ≥ 1 or None, default None
        Gradients from this many batches per step, drawn at random (``seed``); None uses all of them.
    seed : int, default 0
        Seeds the choice of batches per step; runs with equal arguments give equal results.
    progress : bool, default True
        A progress bar over the forward/backward passes.

    Returns
    -------
    GispResult
        ``kept[s]`` per block, ``achieved[s]``, one :class:`GispStep` per step, time and peak memory.
    """
    # --- validate everything before any model work ----------------------------------------------
    adapter = check_model(model, "gisp")
    types = PruneStructure.parse(structure, caller="gisp", units_only=True).units
    check_table("gisp", _CONSTRAINTS, locals())
    levels = sorted(float(s) for s in sparsities)
    if "heads" in types and adapter.n_heads % adapter.n_kv_heads:
        raise InvalidArgumentError(f"The model has {adapter.n_heads} query heads, not a multiple of its "
                                   f"{adapter.n_kv_heads} key-value heads; KV groups are undefined.")
    kinds = U.kinds(adapter, types)
    dense = {name: kind.dense_count() for name, kind in U.kinds(adapter).items()}
    U.check_uniform(adapter, dense, "model", "its config")
    vocab = model.get_input_embeddings().weight.shape[0]
    if objective == "perplexity":
        batches: list[Any] = calibration_batches(calib, tokenizer, batch_size=batch_size)
        check_calibration(batches, model, "gisp", min_length=2)
    else:
        triples = _check_triples(calib, vocab, getattr(model.config, "max_position_embeddings", None))
        batches = [triples[i : i + batch_size] for i in range(0, len(triples), batch_size)]
    blocks = adapter.blocks()
    n_blocks = len(blocks)
    sizes = {t: kinds[t].params_per_unit(blocks[0]) for t in types}
    counts = {t: dense[t] for t in types}
    total = sum(counts[t] * n_blocks * sizes[t] for t in types)
    slack = min(sizes.values()) / 2
    removable = sum((counts[t] - 1) * n_blocks * sizes[t] for t in types)
    if levels[-1] * total > removable + slack:
        raise InvalidArgumentError(f"The 'sparsities' argument asks for {levels[-1]:g} of the {structure} parameters, "
                                   f"but keeping one of each structure in every block allows at most "
                                   f"{removable / total:.4f}.")
    if levels[0] * total + slack < min(sizes.values()):  # the budget of the first level rounds to no unit
        warnings.warn(f"The 'sparsities' argument of gisp starts at {levels[0]:g}, which rounds to 0 of the "
                      f"{sum(counts[t] * n_blocks for t in types)} {' and '.join(_UNIT_NAMES[t] for t in types)} "
                      f"of the model: nothing is pruned at that level; "
                      f"{min(sizes.values()) / 2 / total:.6g} or more prunes one.", UserWarning, stacklevel=2)
    settings = {"sparsities": levels, "structure": structure, "objective": objective,
                "steps_per_target": steps_per_target, "normalize": normalize, "batch_size": batch_size,
                "batches_per_step": batches_per_step, "seed": seed, "n_batches": len(batches),
                "model_type": model.config.model_type}

    # --- run --------------------------------------------------------------------------------------
    start = time.perf_counter()
    device = next(model.parameters()).device
    schedule = _schedule(levels, steps_per_target)
    alive = {t: torch.ones(n_blocks, counts[t], dtype=torch.bool) for t in types}
    result = GispResult(levels, structure, objective, {}, {}, sizes, total, dense, settings=settings)
    generator = torch.Generator().manual_seed(seed)
    per_step = len(batches) if batches_per_step is None else min(batches_per_step, len(batches))
    removed_params = 0
    with _scoring(model, blocks, kinds) as scored:
        bar = _progress(progress, len(schedule) * per_step)
        try:
            for index, (target, level) in enumerate(schedule):
                t0 = time.perf_counter()
                chosen = batches if per_step == len(batches) else \
                    [batches[i] for i in sorted(torch.randperm(len(batches), generator=generator)[:per_step].tolist())]
                with _masked(kinds, blocks, alive):
                    value = _objective_pass(model, chosen, objective, device, bar)
                scores = {t: torch.stack([_block_scores(kinds[t], block) for block in blocks]) for t in types}
                for module in scored:
                    module.weight.grad = None
                    if module.bias is not None:
                        module.bias.grad = None
                if not all(torch.isfinite(s).all() for s in scores.values()):
                    raise FloatingPointError(f"NaN or Inf in the importance scores of step {index}.")
                before = {t: int(a.sum()) for t, a in alive.items()}
                removed_params = _remove(scores, alive, sizes, normalize, target * total + slack, removed_params)
                result.steps.append(GispStep(index, target, removed_params / total, value,
                                             {t: before[t] - int(alive[t].sum()) for t in types},
                                             {t: int(alive[t].sum()) for t in types}, time.perf_counter() - t0))
                if level is not None:
                    result.kept[level] = [{t: torch.nonzero(alive[t][i]).flatten() for t in types} for i in range(n_blocks)]
                    result.achieved[level] = removed_params / total
                if progress:
                    bar.set_postfix(sparsity=f"{removed_params / total:.3f}", objective=f"{value:.4f}")
        finally:
            bar.close()
    result.seconds = time.perf_counter() - start
    result.peak_memory = peak_memory(device)
    return result


# ---------------------------------------------------------------------------------------------------
# Validation and bookkeeping


def _check_triples(calib: Any, vocab: int,
                   positions: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``calib`` as a list of ``(prompt, correct, incorrect)`` 1-D LongTensors; a prompt and its longer
    answer must fit in ``positions`` tokens (the model's positions, when it has a limit)."""
    message = ("With objective='margin', the 'calib' argument must be a non-empty list of (prompt, correct, "
               "incorrect) triples, each a non-empty 1-D LongTensor or list of token ids in [0, {vocab}).")
    if isinstance(calib, (str, torch.Tensor)) or not isinstance(calib, Sequence) or not calib:
        raise InvalidArgumentError(message.format(vocab=vocab) + f" Got {type(calib).__name__}.")
    out = []
    for i, triple in enumerate(calib):
        if not isinstance(triple, (tuple, list)) or len(triple) != 3:
            raise InvalidArgumentError(message.format(vocab=vocab) + f" Item {i} is not a triple.")
        parts = []
        for part in triple:
            try:
                t = torch.as_tensor(part)
            except (TypeError, ValueError, RuntimeError):
                raise InvalidArgumentError(message.format(vocab=vocab) + f" Item {i} holds {type(part).__name__}.") from None
            if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool \
                    or int(t.min()) < 0 or int(t.max()) >= vocab:
                raise InvalidArgumentError(message.format(vocab=vocab) + f" Item {i} does not qualify.")
            parts.append(t.long())
        if positions is not None and len(parts[0]) + max(len(parts[1]), len(parts[2])) > positions:
            raise InvalidArgumentError(message.format(vocab=vocab) + f" Item {i} is longer than the model's {positions} positions.")
        out.append(tuple(parts))
    return out


def _schedule(levels: list[float], steps: int) -> list[tuple[float, float | None]]:
    """``(cumulative target, requested level or None)`` per step: ``steps`` equal steps per interval."""
    out, previous = [], 0.0
    for level in levels:
        out += [(previous + (level - previous) * j / steps, None) for j in range(1, steps)] + [(level, level)]
        previous = level
    return out


# ---------------------------------------------------------------------------------------------------
# Gradients, scores, removal


@contextmanager
def _scoring(model: nn.Module, blocks: nn.ModuleList, kinds: dict[str, U.UnitKind]) -> Iterator[list[nn.Module]]:
    """Gradients on for the linears whose weights make up the units, off everywhere else; eval mode.
    Restores every ``requires_grad`` flag and the training mode on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    modules: dict[int, nn.Module] = {}
    for block in blocks:
        for kind in kinds.values():
            for m in kind.linears(block):
                modules[id(m)] = m
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(True)
                m.bias.grad = None
        model.eval()
        with torch.enable_grad():
            yield list(modules.values())
    finally:
        for m in modules.values():
            m.weight.grad = None
            if getattr(m, "bias", None) is not None:
                m.bias.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def _masked(kinds: dict[str, U.UnitKind], blocks: nn.ModuleList, alive: dict[str, torch.Tensor]) -> Iterator[None]:
    """Gate every removed unit to zero (:meth:`spap.units.UnitKind.gate`): the block then computes
    exactly what the shrunk block computes, and gradients of removed weights are zero."""
    handles = []
    try:
        for i, block in enumerate(blocks):
            for t, kind in kinds.items():
                if not alive[t][i].all():
                    handles.append(kind.gate(block, lambda mask=alive[t][i]: mask))
        yield
    finally:
        for h in handles:
            h.remove()


def _objective_pass(model: nn.Module, batches: list[Any], objective: str, device: torch.device, bar) -> float:
    """Run ``batches`` forward and backward, accumulating in ``.grad`` the gradient of the objective
    averaged over the whole set (each batch's sum divided by the set's token or triple count).
    Returns the objective's value."""
    if objective == "perplexity":
        count = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    else:
        count = sum(len(b) for b in batches)
    value = 0.0
    for batch in batches:
        total = _nll_sum(model, batch, device) if objective == "perplexity" else _margin_sum(model, batch, device)
        loss = total / count
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The {objective} objective is NaN or Inf on a calibration batch.")
        loss.backward()
        value += float(loss.detach())
        bar.update(1)
    return value


def _nll_sum(model: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Summed next-token NLL of a ``(batch, seq)`` batch: ``batch × (seq − 1)`` predictions."""
    ids = ids.to(device)
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def _margin_sum(model: nn.Module, triples: list[tuple[torch.Tensor, ...]], device: torch.device) -> torch.Tensor:
    """Σ over triples of NLL(correct) − NLL(incorrect), each the mean NLL of the answer's tokens given
    the prompt.  The ``2 × len(triples)`` sequences are right-padded into one batch: with causal
    attention, padding after a sequence does not change its logits, and padded positions are ignored."""
    rows = [torch.cat([p, a]) for p, good, bad in triples for a in (good, bad)]
    starts = [len(p) for p, _, _ in triples for _ in (0, 1)]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (row, start) in enumerate(zip(rows, starts)):
        ids[r, : len(row)] = row
        targets[r, start : len(row)] = row[start:]
    ids, targets = ids.to(device), targets[:, 1:].to(device)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    per_row = nll.sum(1) / (targets != -100).sum(1)
    per_row = per_row.view(-1, 2)
    return (per_row[:, 0] - per_row[:, 1]).sum()


def _products(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w · g, b · g_b)`` elementwise, float64, the weight part as ``(d_out, d_in)``; zeros where no
    gradient reached the module."""
    w = module.weight
    g = w.grad if w.grad is not None else torch.zeros_like(w)
    wg = LinearView(module).as_weight(w.detach().double() * g.double())
    b = getattr(module, "bias", None)
    bg = None
    if b is not None:
        bg = b.detach().double() * (b.grad.double() if b.grad is not None else torch.zeros_like(b, dtype=torch.float64))
    return wg, bg


def _block_scores(kind: U.UnitKind, block: nn.Module) -> torch.Tensor:
    """``|Σ_{w ∈ S} w · ḡ_w|`` for every unit ``S`` of ``block``, shape ``(n_units,)``: the unit's rows of
    the input linears (with biases) and its columns of the output linear."""
    n = kind.count(block)
    total = torch.zeros(n, dtype=torch.float64)
    for module, offset, rows_per_unit in kind.input_rows(block):
        wg, bg = _products(module)
        width = n * rows_per_unit
        rows = wg[offset : offset + width].sum(1)
        if bg is not None:
            rows = rows + bg[offset : offset + width]
        total += rows.reshape(n, -1).sum(1).cpu()
    total += _products(kind.output_linear(block))[0].sum(0).reshape(n, -1).sum(1).cpu()
    return total.abs()


def _remove(scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], sizes: dict[str, int], normalize: str,
            budget: float, removed: int) -> int:
    """Mark structures removed in ``alive`` (in place), lowest normalised score first, while the removed
    parameter count stays within ``budget``; never the last structure of a type in a block.  Ties keep
    the enumeration order (type, block, index), so the result is deterministic.  Returns the removed
    parameter count."""
    values, where = [], []
    for t in scores:
        s, a = scores[t], alive[t]
        norm = 1.0
        if normalize != "none" and a.any():
            norm = float(s[a].mean() if normalize == "mean" else s[a].sum())
            norm = norm if norm > 0 and math.isfinite(norm) else 1.0
        v = (s / norm).masked_fill(~a, math.inf)
        values.append(v.flatten())
        where += [(t, i) for i in range(v.numel())]
    order = torch.argsort(torch.cat(values), stable=True).tolist()
    flat = torch.cat(values).tolist()
    left = {t: alive[t].sum(1).tolist() for t in scores}
    width = {t: alive[t].shape[1] for t in scores}
    smallest = min(sizes.values())
    for j in order:
        if removed + smallest > budget or flat[j] == math.inf:
            break
        t, i = where[j]
        block, unit = divmod(i, width[t])
        if left[t][block] <= 1 or removed + sizes[t] > budget:
            continue
        alive[t][block, unit] = False
        left[t][block] -= 1
        removed += sizes[t]
    return removed


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GISP forward/backward", unit="batch", disable=not enabled)
