"""``prune_layerwise``: prune a Hugging Face causal LM block by block.

The sequential recipe (as in SparseGPT and llm-compressor's sequential pipeline):

1. capture the first block's inputs and call arguments for every calibration batch;
2. for each block: move it alone to the compute device, run the batches through it with hooks that
   accumulate each linear's Gram matrix (float64), build one :class:`solvers.LayerProblem` per target,
   solve it, write the result into the block (removing channels/heads physically for structured
   targets), then run the batches through the *pruned* block to get the next block's inputs
   (``propagate="dense"`` keeps the dense outputs instead);
3. update the config so the smaller model saves and reloads with stock transformers.

Peak memory is one block, its Gram matrices and the calibration activations (kept on ``offload``),
plus, unless ``restore_on_failure=False``, a CPU copy of the blocks' weights to undo a failed run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import numbers
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import solvers

from . import allocation as A
from . import bias as B
from . import checkpoint as ckpt
from . import distributed as D
from . import selection
from . import units as U
from .adapters import EXPERT_WIDTH_MULTIPLE, Adapter, LinearView, get_adapter
from .capture import (ExpertGrams, GramHooks, calibration_batches, capture_block_inputs, check_calibration, forward_pass,
                      outside_blocks_on, run_block)
from .checks import (Boolean, DistinctNames, Interval, InvalidArgumentError, NoneOr, Options, PathLike, check_table,
                     device as _device_arg, finite)
from .gradients import output_gradient_grams
from .hostmemory import release_free_memory
from .report import LayerRecord, PruneReport, count_parameters, peak_memory
from .units import PruneStructure, check_model

_CONSTRAINTS = {
    "damp": Interval(float, 0, None, closed="left"),
    "gram_dtype": Options((torch.float32, torch.float64)),
    "propagate": Options(("pruned", "dense")),
    "target": Options(("pruned", "dense", "block")),
    "output_metric": Options(("auto", None, "full", "diag")),
    "metric_windows": Interval(int, 1, None),
    "metric_damp": Interval(float, 0, None, closed="neither"),
    "damp_mode": Options(("mean", "diag")),
    "batch_size": Interval(int, 1, None),
    "checkpoint_dir": NoneOr(PathLike()),
    "resume": Boolean(),
    "progress": Boolean(),
    "restore_on_failure": Boolean(),
    "candidates": NoneOr(DistinctNames()),
    "select_windows": Interval(int, 1, None),
}


@dataclass(frozen=True)
class BlockSettings:
    """What pruning one block needs, fixed for the whole run (built once by :func:`prune_layerwise`).

    ``sparsity`` is the argument as given (a float or one target per block) and ``allocation`` the rule
    that spreads a float budget; ``block_sparsity`` is each block's fraction (what row structures prune of
    every linear) and ``counts`` each block's pruned units per kind (``{"mlp": p, "heads": q}``), both
    filled in before the first block (:mod:`spap.allocation`);
    ``mlp_tail`` lets the pipeline skip the second pass of an MLP-only prune (see :func:`_prune_block`);
    ``candidates`` the methods a mask is chosen from by the model's loss, ``method`` first (empty: no
    choice, ``method`` alone), on ``select_windows`` calibration sequences (:mod:`spap.selection`);
    ``bias_switches`` the config switches turned on before the first block so that a method compensating
    into a bias (FLAP) has one to write (:mod:`spap.bias`).
    """

    structure: PruneStructure
    sparsity: float | tuple[float, ...]
    method: str
    method_options: dict
    damp: float
    gram_dtype: torch.dtype
    propagate: str
    device: torch.device
    offload: torch.device
    mlp_tail: bool = True
    target: str = "pruned"
    output_metric: str | None = None  # resolved: never "auto"
    metric_windows: int = 16
    metric_damp: float = 1.0
    damp_mode: str = "mean"
    candidates: tuple[str, ...] = ()
    select_windows: int = 4
    allocation: A.Allocation = A.Uniform()
    block_sparsity: tuple[float, ...] = ()
    counts: tuple[dict[str, int], ...] = ()
    bias_switches: tuple[B.BiasSwitch, ...] = ()
    ranks: D.Ranks | None = None  # under a process group of several ranks (spap.distributed)


@dataclass
class _TestHooks:
    """Switches for the tests only (monkeypatch ``spap.pipeline._HOOKS``): stop after that many blocks
    with :class:`spap.checkpoint.Interrupted` (to test resume); turn the MLP shortcut off (to test it
    against full second passes)."""

    stop_after_blocks: int | None = None
    mlp_tail: bool = True


_HOOKS = _TestHooks()


def prune_layerwise(
    model: nn.Module,
    calib: Any,
    sparsity: float | Sequence[float] | Mapping[int | str, float] = 0.3,
    *,
    method: str = "spap",
    structure: str = "mlp",
    allocation: str | A.Allocation = "uniform",
    tokenizer=None,
    method_options: dict | None = None,
    damp: float = 0.01,
    damp_mode: str = "mean",
    gram_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: str | torch.device = "cpu",
    propagate: str = "pruned",
    target: str = "pruned",
    output_metric: str | None = "auto",
    metric_windows: int = 16,
    metric_damp: float = 1.0,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    restore_on_failure: bool = True,
    candidates: tuple[str, ...] | None = None,
    select_windows: int = 4,
) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place, block by block, and return ``(model, report)``.

    Before any work (no forward pass, no change to ``model``) every argument is checked and a bad one
    raises :class:`solvers.InvalidArgumentError` (a ``ValueError``) naming it: the model (a supported
    causal LM with its head, at least one block, no weight on the meta device), every keyword, the
    calibration ids (in the vocabulary, non-empty sequences, no longer than the model's positions) and
    the counts: a ``sparsity`` that rounds (``⌊s·n + ½⌋``, :func:`solvers.prune_count`) to every MLP
    channel, every key-value group or every weight of a linear is refused, and one that rounds to none
    is warned about (``UserWarning`` naming 'sparsity'), as are fewer calibration tokens than the
    widest solved layer's inputs (its problem is then underdetermined and reports error 0).

    What only shows during the run (NaN or Inf activations, a solver's error, running out of memory, an
    interrupt) raises after blocks have changed; with ``restore_on_failure`` (the default) the model is
    then put back as it was (every block's parameters, buffers and shapes, the config, the training
    mode) before the exception propagates.

    Parameters
    ----------
    model : transformers causal LM
        A family of :data:`spap.adapters.ADAPTERS`, or a decoder-only model whose layout spap finds and
        verifies (:func:`spap.adapters.discover`, :func:`spap.units.verify`); modified in place.
    calib : list of str, LongTensor (n, seq), or iterable of LongTensor batches
        Calibration text or token ids (see :func:`spap.capture.calibration_batches`).
    sparsity : float in [0, 1), sequence of floats, or mapping; default 0.3
        Fraction of MLP channels / attention KV groups / weights pruned (ignored for N:M, whose pattern
        fixes it).  A float prunes every block alike (with ``allocation="uniform"``) or is the model budget
        an allocation rule spreads; a sequence gives one target per block; a mapping maps a block index or
        a glob pattern on the block's module name (e.g. ``{"model.layers.2?": 0.5, "*": 0.2}``) to a target,
        the first matching key winning, every block matched.  A block may not lose all its units.
    allocation : {"uniform", "owl", "knapsack"} or a :mod:`spap.allocation` rule, default "uniform"
        How a float ``sparsity`` is spread over the blocks, removing exactly as many units (per kind) as the
        uniform prune: ``"uniform"`` every block alike; ``"owl"`` (Yin et al. 2024) less where the dense
        block has more outlier weights; ``"knapsack"`` one count per block (MLP channels, heads; for
        ``"unstructured"`` one fraction per block) minimising the summed loss-aware cost of each block's
        removal, measured on the dense model (``spap.allocation.Knapsack``).  Pass ``spap.allocation.OWL(threshold=..., spread=...)`` or
        ``Knapsack(levels=..., max_sparsity=...)`` for other settings.  Non-uniform widths save with
        :func:`spap.save_pruned`.
    method : str, default "spap"
        A registered solver (``solvers.available_methods()``).
    structure : {"mlp", "heads", "mlp+heads", "unstructured", "N:M"}, default "mlp"
        ``"mlp"`` prunes intermediate channels (rows of gate/up or fc1, columns of down or fc2; in a
        mixture of experts every expert's channels, each expert solved on the tokens routed to it, as many
        kept in every expert, the routers unchanged: docs/extending.md);
        ``"heads"`` prunes whole key-value groups (all query heads of a KV head, and the KV head), which
        keeps grouped-query attention valid (OPT and GPT-2, whose head_dim is derived from the hidden
        size, keep their shapes and store the pruned heads as zeros); ``"mlp+heads"`` prunes the heads
        first and then the MLP, whose problem is posed on the inputs of the block with its attention
        already pruned (one more pass through the block); unstructured and N:M keep shapes and store zeros.
    tokenizer : optional
        Needed when ``calib`` is a list of strings.
    method_options : dict, optional
        Passed to the solver; checked against ``solvers.get_solver(method).options`` before any work.
    damp : float, default 0.01
        Relative damping of every Gram matrix (see ``solvers.LayerProblem``).
    damp_mode : {"mean", "diag"}, default "mean"
        ``H + damp·mean(diag H)·I``, or a ridge per input ``H + damp·diag(H)`` (``LayerProblem.damp_mode``).
    gram_dtype : torch.float32 (default) or torch.float64
        Precision of each batch's ``XᵀX``; the sum over batches is float64 either way.  float32 products
        halve the capture time on CPU; docs/pipeline.md measures the effect on the solutions.
    batch_size : int, default 8
        Sequences per forward pass when ``calib`` is a tensor.
    device : str or torch.device, optional
        Where blocks run and problems are solved; default CUDA when available, else CPU.
    offload : str or torch.device, default "cpu"
        Where calibration activations live between blocks.
    target : {"pruned", "dense", "block"}, default "pruned"
        What each layer fits on the inputs the pruned model gives it: its own outputs on them
        (``"pruned"``), or the dense model's outputs (``"dense"``: errors of earlier blocks are corrected;
        a second activation stream, the dense model's, is kept on ``offload`` and run through each block
        once more; see ``solvers.corrected_weight``).  ``"block"`` fits the dense *block's* output: the
        MLP's output linear also absorbs the residual stream's error where the MLP's output is added,
        ``Ŵ x̂ ≈ W x + r − r̂`` (MLP channels only, families whose block ends with ``r + mlp(x)``).
        Needs ``propagate="pruned"``.
    propagate : {"pruned", "dense"}, default "pruned"
        Next block's inputs from the pruned block (default) or from the dense block.
    output_metric : {"auto", None, "full", "diag"}, default "auto"
        Weight each layer's output error by the loss's output-gradient Gram matrix ``G = Σ g gᵀ``
        (``½ tr(ΔW H ΔWᵀ G)``; see ``solvers.OutputMetric``) when choosing masks: ``"full"`` the whole
        ``G`` (column structures only: MLP channels, heads), ``"diag"`` its diagonal, None the plain
        reconstruction error; ``"auto"`` is ``"full"`` for ``method="spap"`` on MLP channels and heads,
        and None otherwise (unstructured and N:M, and the other methods, which keep their published
        objective unless asked).  ``G`` comes from one forward and backward pass of the dense model per
        sequence on the first ``metric_windows`` calibration sequences, before any block changes, with
        the whole model on ``device`` (the head by chunks of positions and each block's activations
        recomputed in the backward pass, so the pass holds one block's activations at a time).
    metric_windows : int >= 1, default 16
        Calibration sequences behind ``G`` (all of them when there are fewer).
    metric_damp : float > 0, default 1.0
        ``G`` is normalised to a unit mean diagonal and ``metric_damp·I`` is added (larger: closer to
        the plain error).
    checkpoint_dir : str, optional
        Save progress after every block (block weights and next inputs) for ``resume``.
    resume : bool, default False
        Continue from the last finished block in ``checkpoint_dir``; the result is identical to an
        uninterrupted run with the same arguments.  A checkpoint of another run (other model weights or
        config, calibration tokens or setting) is refused, naming what differs (see :mod:`spap.checkpoint`).
    progress : bool, default True
        Show a progress bar over blocks.
    restore_on_failure : bool, default True
        Copy every decoder block's parameters and buffers to CPU memory before the first change and put
        them back if the run raises.  The copy costs CPU memory equal to the blocks' weights (0.5 GB for
        SmolLM2-135M in float32, 16 GB for an 8B model in bfloat16) for the whole run, and the time of
        one copy.  False skips it, for models whose copy would not fit (or when the model is thrown away
        on failure, as the command line does); a failed run then leaves the finished blocks pruned and
        the config unchanged, a model that may not run.  A checkpoint (``checkpoint_dir``) keeps the
        finished blocks on disk either way.
    candidates : tuple of str, optional
        Choose each block's mask by the model's own loss (:mod:`spap.selection`): ``method`` and every
        method named here (registered solvers of column groups, distinct; ``method_options`` go to
        ``method`` only) solve the same layer problem, and the solution kept is the one whose block,
        followed by the rest of the network (later blocks still dense, final norm, head), gives the
        lowest next-token cross-entropy on the first ``select_windows`` calibration sequences.  With
        ``"mlp+heads"`` the heads are chosen first, then the MLP with them in place.  Only for MLP
        channels and key-value groups (unstructured and N:M are refused).  None (the default) solves with ``method`` alone.
    select_windows : int, default 4
        Calibration sequences the choice is scored on (all of them when there are fewer); each block
        costs ``K·(L − i)`` block passes on them for ``K`` candidates, block ``i`` of ``L``.

    Returns
    -------
    model : the same object, pruned in place
    report : PruneReport
        Per solved problem: block, target, structure, kept/total, relative error, seconds (and, with
        ``candidates``, the choice: every candidate's loss and error); totals: parameters before/after,
        wall time, solver time, peak memory.
    """
    settings = check_arguments(model, sparsity, method=method, structure=structure, allocation=allocation,
                               method_options=method_options,
                               damp=damp, damp_mode=damp_mode, gram_dtype=gram_dtype, batch_size=batch_size,
                               device=device, offload=offload, propagate=propagate, target=target,
                               output_metric=output_metric, metric_windows=metric_windows, metric_damp=metric_damp,
                               checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                               restore_on_failure=restore_on_failure, candidates=candidates,
                               select_windows=select_windows)
    batches = calibration_batches(calib, tokenizer, batch_size=batch_size)
    check_calibration(batches, model, "prune_layerwise")
    # None without a process group of several ranks
    ranks = D.ranks(sum(len(b) for b in batches), sum(b.numel() for b in batches))
    _warn_few_tokens(get_adapter(model), settings.structure, batches, ranks)
    settings = dataclasses.replace(settings, ranks=ranks)
    snapshot = _Snapshot(model, get_adapter(model)) if restore_on_failure else None
    try:
        return _run(model, batches, settings, checkpoint_dir, resume, progress)
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise


def forward_seconds(model: nn.Module, calib: Any, *, tokenizer=None, batch_size: int = 8,
                    device: str | torch.device | None = None, offload: str | torch.device = "cpu") -> float:
    """Wall seconds of one forward pass of ``calib`` through ``model``'s decoder blocks, run as
    :func:`prune_layerwise` runs its blocks (embeddings once, then each block on ``device`` over every
    batch, activations kept on ``offload``).

    This is the floor of a layer-wise prune: every block must see the calibration set at least once.
    Divide :attr:`PruneReport.seconds` by it for the prune's cost in forward passes.  Arguments as in
    :func:`prune_layerwise`; ``model`` is not changed (it is put back in its training mode).
    """
    adapter = check_model(model, "forward_seconds", experts=True)
    check_table("forward_seconds", {"batch_size": _CONSTRAINTS["batch_size"]}, {"batch_size": batch_size})
    device, offload = _devices(device, offload, "forward_seconds")
    batches = calibration_batches(calib, tokenizer, batch_size=batch_size)
    check_calibration(batches, model, "forward_seconds")
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        forward_pass(model, adapter.blocks(), batches, device, offload)
        return time.perf_counter() - start
    finally:
        model.train(was_training)


def _devices(device: str | torch.device | None, offload: str | torch.device, caller: str) -> tuple[torch.device, torch.device]:
    """The checked ``(device, offload)`` pair; ``device`` defaults to CUDA when there is one."""
    device = _device_arg("device", device or ("cuda" if torch.cuda.is_available() else "cpu"), caller)
    return device, _device_arg("offload", offload, caller)


def check_arguments(
    model: nn.Module,
    sparsity: float | Sequence[float] | Mapping[int | str, float] = 0.3,
    *,
    method: str = "spap",
    structure: str = "mlp",
    allocation: str | A.Allocation = "uniform",
    method_options: dict | None = None,
    damp: float = 0.01,
    damp_mode: str = "mean",
    gram_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: str | torch.device = "cpu",
    propagate: str = "pruned",
    target: str = "pruned",
    output_metric: str | None = "auto",
    metric_windows: int = 16,
    metric_damp: float = 1.0,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    restore_on_failure: bool = True,
    candidates: tuple[str, ...] | None = None,
    select_windows: int = 4,
) -> BlockSettings:
    """Check :func:`prune_layerwise`'s arguments against ``model`` without any work (the command line
    calls it before calibrating); raise :class:`solvers.InvalidArgumentError` naming the first bad one,
    and warn (``UserWarning`` naming 'sparsity') when the sparsity rounds to no unit.  The calibration
    ids are checked by :func:`spap.capture.check_calibration`.  Returns the run's :class:`BlockSettings`."""
    adapter = check_model(model, "prune_layerwise", experts=True)
    parsed = PruneStructure.parse(structure)
    check_table("prune_layerwise", _CONSTRAINTS, locals())
    method_options = dict(method_options or {})
    solvers.check_method(method, method_options, parsed.rows if parsed.rows is not None else solvers.channels(1))
    candidates = selection.check_candidates(candidates, method, parsed)
    switches = B.check_compensation(adapter, parsed.units, [method], "prune_layerwise")
    switches += [w for w in B.check_compensation(adapter, parsed.units, candidates, "prune_layerwise", "candidates")
                 if w not in switches]
    if isinstance(parsed.rows, solvers.NM):
        widths = {LinearView(m).d_in for g in adapter.linear_groups(adapter.blocks()[0]) for m in g.values()}
        if adapter.has_experts:  # the experts' [gate; up] and down projections read hidden and width inputs
            experts = adapter.experts(adapter.blocks()[0])
            widths |= {experts.hidden, experts.width}
        if any(w % parsed.rows.m for w in widths):
            raise InvalidArgumentError(f"The 'structure' argument {structure!r} needs every linear's input width to be "
                                       f"a multiple of {parsed.rows.m}; this model's widths are {sorted(widths)}.")
    if resume and checkpoint_dir is None:
        raise InvalidArgumentError("resume=True needs the 'checkpoint_dir' argument.")
    device, offload = _devices(device, offload, "prune_layerwise")
    sparsities = A.block_sparsities(sparsity, A.block_names(model, adapter))
    allocation = A.parse_allocation(allocation)
    if D.active():
        _check_distributed(adapter, checkpoint_dir, candidates, allocation)
    if not isinstance(allocation, A.Uniform):
        if not isinstance(sparsity, numbers.Real):
            raise InvalidArgumentError(f"The 'allocation' argument of prune_layerwise is {allocation.name!r}, which "
                                       "spreads one model budget: 'sparsity' must then be a float, not per-block targets.")
        if isinstance(parsed.rows, solvers.NM):
            raise InvalidArgumentError(f"The 'allocation' argument of prune_layerwise is {allocation.name!r}; structure "
                                       f"{structure!r} fixes every block's pattern, so only 'uniform' applies.")
        if isinstance(allocation, A.Knapsack) and parsed.rows is not None and adapter.has_experts:
            raise InvalidArgumentError(f"The 'allocation' argument of prune_layerwise is 'knapsack', whose unstructured "
                                       f"costs cover a block's linears but not its experts ({type(model).__name__} is a "
                                       "mixture of experts); use 'uniform', 'owl' or per-block sparsities.")
    if adapter.has_experts and "mlp" in parsed.units:
        _check_experts(model, sparsities, allocation, target, candidates)
    _check_counts(adapter, parsed, sparsities)
    counts = A.uniform_counts(sparsities, adapter, parsed.units)
    if target != "pruned" and propagate != "pruned":
        raise InvalidArgumentError(f"The 'target' argument of prune_layerwise is {target!r}, which needs propagate='pruned' "
                                   "(with dense propagation the inputs are the dense model's already).")
    if target == "block":
        _check_block_target(adapter, parsed, structure)
    if output_metric == "auto":  # docs/results.md: chosen on the validation split at 30% MLP channels
        output_metric = "full" if parsed.rows is None and method == "spap" else None
    if output_metric == "full" and parsed.rows is not None:
        raise InvalidArgumentError(f"The 'output_metric' argument of prune_layerwise is 'full', which couples the rows "
                                   f"of a {structure!r} mask; use output_metric='diag' (or None) with row structures.")
    recorded = float(sparsity) if isinstance(sparsity, numbers.Real) else sparsities
    settings = BlockSettings(parsed, recorded, method, method_options, damp, gram_dtype, propagate,
                             device, offload, mlp_tail=_HOOKS.mlp_tail, target=target, output_metric=output_metric,
                             metric_windows=int(metric_windows), metric_damp=float(metric_damp), damp_mode=damp_mode,
                             candidates=candidates, select_windows=select_windows, allocation=allocation,
                             block_sparsity=sparsities, counts=tuple(counts), bias_switches=tuple(switches))
    if resume:  # the arguments, before calibrating; the model and the tokens are checked when loading
        arguments = {k: v for k, v in _settings(settings, model).items() if k != "model_type"}
        ckpt.check_settings(checkpoint_dir, dict(arguments, device=device.type))
    return settings


def _check_distributed(adapter: Adapter, checkpoint_dir: str | None, candidates: tuple[str, ...],
                       allocation: A.Allocation) -> None:
    """Refuse, under a process group of several ranks, the options its data-parallel run does not have."""
    where = "under a torch.distributed process group of several ranks"
    if checkpoint_dir is not None:
        raise InvalidArgumentError(f"The 'checkpoint_dir' argument of prune_layerwise must be None {where} "
                                   "(checkpoints and resume are single-process only).")
    if candidates:
        raise InvalidArgumentError(f"The 'candidates' argument of prune_layerwise must be None {where}.")
    if not isinstance(allocation, A.Uniform):
        raise InvalidArgumentError(f"The 'allocation' argument of prune_layerwise must be 'uniform' {where} "
                                   "(per-block sparsities are accepted).")
    if adapter.has_experts:
        raise InvalidArgumentError(f"prune_layerwise does not prune mixture-of-experts models {where}.")


def _settings(s: BlockSettings, model: nn.Module) -> dict:
    """The run's settings as the report and the checkpoint record them (before calibration)."""
    out = {"sparsity": s.sparsity if isinstance(s.sparsity, float) else list(s.sparsity), "method": s.method, "structure": s.structure.text,
           "method_options": s.method_options, "damp": s.damp, "gram_dtype": str(s.gram_dtype),
           "propagate": s.propagate, "target": s.target, "model_type": model.config.model_type}
    # Later options only when used: a run without them records (and fingerprints) what it always did.
    if s.damp_mode != "mean":
        out.update(damp_mode=s.damp_mode)
    if s.output_metric is not None:
        out.update(output_metric=s.output_metric, metric_windows=s.metric_windows, metric_damp=s.metric_damp)
    if s.candidates:
        out.update(candidates=list(s.candidates), select_windows=s.select_windows)
    if not isinstance(s.allocation, A.Uniform):
        out.update(allocation=A.describe(s.allocation))
    return out


def _check_block_target(adapter: Adapter, parsed: PruneStructure, structure: str) -> None:
    """Refuse ``target="block"`` where the MLP's output is not added to the residual stream as it is:
    the target ``W x + r − r̂`` is the block output's error only when the block ends with ``r + mlp(x)``."""
    what = "The 'target' argument of prune_layerwise is 'block', which"
    if parsed.units != ("mlp",):
        raise InvalidArgumentError(f"{what} fits the MLP's output linear to the block's output: only structure='mlp' "
                                   f"(MLP channels) is implemented. Got {structure!r}.")
    tail = adapter.mlp_tail(adapter.blocks()[0]) if _HOOKS.mlp_tail else None
    if tail is not None:  # is ``finish(r, y)`` the plain sum?  (Gemma normalises y first)
        r, y = torch.randn(2, 1, 1, adapter.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            p = next(adapter.blocks()[0].parameters())
            summed = torch.equal(tail[1](r.to(p), y.to(p)), r.to(p) + y.to(p))
    if tail is None or not summed:
        raise InvalidArgumentError(f"{what} needs a block that ends with r + mlp(x); "
                                   f"{type(adapter.model).__name__} does not (use target='pruned' or 'dense').")


def _check_experts(model: nn.Module, sparsities: Sequence[float], allocation: A.Allocation, target: str,
                   candidates: tuple[str, ...]) -> None:
    """Refuse, naming the argument, what pruning the channels of a mixture of experts does not support:
    widths that differ between blocks (the experts' width is one config field, and save_pruned does not
    describe experts), the dense target (its cross products are not recorded per expert) and choosing
    masks by loss (candidates)."""
    name = type(model).__name__
    what = f"of prune_layerwise prunes the experts' channels of {name}, a mixture of experts"
    if not isinstance(allocation, A.Uniform) or len(set(sparsities)) > 1:
        argument = "allocation" if not isinstance(allocation, A.Uniform) else "sparsity"
        raise InvalidArgumentError(f"The {argument!r} argument {what}, which keeps the same width in every block: "
                                   "use one sparsity for every block and allocation='uniform'.")
    if target != "pruned":
        raise InvalidArgumentError(f"The 'target' argument {what}; only target='pruned' is implemented for experts.")
    if candidates:
        raise InvalidArgumentError(f"The 'candidates' argument {what}; choosing masks by loss is not implemented for "
                                   "experts. Use candidates=None.")


def _check_counts(adapter: Adapter, parsed: PruneStructure, sparsities: Sequence[float]) -> None:
    """Refuse a target that rounds to every unit of a block (MLP channels, key-value groups) or every
    weight of a linear, and warn when it rounds to none (once per distinct target)."""
    # The fewest units round to all first, and to none first: checking the smallest count covers all.
    blocks = adapter.blocks()
    for sparsity in dict.fromkeys(sparsities):
        if "mlp" in parsed.units:  # the dense MLP's channels, and the experts' (channels per expert)
            for name, kind in U.kinds(adapter, ["mlp"]).items():
                width = min(kind.count(b) for b in blocks)
                what = "MLP channels of a block" if name == "mlp" else "channels of an expert"
                if U.checked_prune_count(sparsity, width, units=what, caller="prune_layerwise") and \
                        kind.prune_count(sparsity, width) == 0:  # the experts' width keeps to a multiple of 8
                    warnings.warn(f"The 'sparsity' argument of prune_layerwise is {sparsity}, which prunes no channel "
                                  f"of an expert: the {width} channels kept round to the nearest multiple of "
                                  f"{EXPERT_WIDTH_MULTIPLE}.", UserWarning, stacklevel=4)
        if isinstance(parsed.rows, solvers.Unstructured):
            d_out, d_in = U.smallest_linear(adapter)
            U.checked_prune_count(sparsity, d_out * d_in, units=f"weights of a {d_out}×{d_in} linear",
                                  caller="prune_layerwise")
        if "heads" in parsed.units:
            U.checked_prune_count(sparsity, adapter.n_kv_heads, units="key-value groups of a block",
                                  caller="prune_layerwise")


def _warn_few_tokens(adapter: Adapter, structure: PruneStructure, batches: list[torch.Tensor],
                     ranks: D.Ranks | None = None) -> None:
    """Warn, naming 'calib', when the calibration holds fewer tokens than the widest solved linear has
    inputs: that layer's Gram matrix is then singular and its problem underdetermined.  Under a process
    group (``ranks``) the problems sum every rank's tokens, so the count is theirs together."""
    tokens = sum(b.numel() for b in batches) if ranks is None else sum(ranks.tokens)
    held = "" if ranks is None else f" (with the other ranks' shards: the {ranks.world} ranks together)"
    kind_linear = {"mlp": "the MLP's output linear", "heads": "the attention's output linear"}
    linears = [(kind_linear[name], kind.output_linear(b)) for b in adapter.blocks()
               for name, kind in U.kinds(adapter, structure.units).items() if name != "experts"]
    if structure.rows is not None:
        linears += [(f"linear {name!r}", m) for b in adapter.blocks() for g in adapter.linear_groups(b)
                    for name, m in g.items()]
    if not linears:  # Mixtral's MLP: only experts, each on the tokens routed to it
        return
    what, widest = max(((n, LinearView(m).d_in) for n, m in linears), key=lambda t: t[1])
    if tokens < widest:
        warnings.warn(f"The 'calib' argument of prune_layerwise holds {tokens} tokens{held}, fewer than the {widest} inputs "
                      f"of {what}: its problem is underdetermined and can report error 0 whatever is pruned; use at "
                      f"least {widest} tokens.", UserWarning, stacklevel=3)


class _Snapshot:
    """What undoing a run on ``model`` needs: a copy of every decoder block's parameters and buffers (with
    their devices and ``requires_grad`` flags), every block module's plain attributes (shapes such as
    ``in_features`` and head counts), every module's training flag and the config's fields.

    The copied values are written to a temporary file and mapped back (``torch.load(mmap=True)``), so
    they take disk, not memory, until :meth:`restore` reads them; the file's name is removed at once, so
    the operating system frees it when the snapshot goes.  The original ``Parameter`` objects are held
    by weak references only: the run replaces pruned parameters by smaller ones, and a strong reference
    would keep every original weight in memory until the end.  :meth:`restore` puts back an original
    ``Parameter`` that is still referenced elsewhere (so references taken before the run stay valid),
    holding the copied values, and a new one otherwise.
    """

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.config = copy.deepcopy(vars(model.config))
        self.training = [(m, m.training) for m in model.modules()]
        self.modules = []
        values: dict[str, torch.Tensor] = {}
        for k, m in enumerate(adapter.blocks().modules()):
            params = {}
            for name, p in m._parameters.items():
                if p is None:  # e.g. a bias added later
                    params[name] = None
                    continue
                values[f"{k}.p.{name}"] = p.detach()
                params[name] = (weakref.ref(p), p.requires_grad, p.device)
            buffers = {}
            for name, b in m._buffers.items():
                if b is not None:
                    values[f"{k}.b.{name}"] = b.detach()
                    buffers[name] = b.device
            plain = {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
            self.modules.append((m, params, buffers, plain))
        self.values = _on_disk(values)

    def restore(self) -> None:
        with torch.no_grad():
            for k, (m, params, buffers, plain) in enumerate(self.modules):
                for name in [n for n in m._parameters if n not in params]:
                    del m._parameters[name]
                for name, entry in params.items():
                    if entry is None:
                        m._parameters[name] = None
                        continue
                    ref, requires_grad, device = entry
                    saved = self.values[f"{k}.p.{name}"].to(device, copy=True)
                    p = ref()
                    if p is None:
                        p = nn.Parameter(saved, requires_grad=requires_grad)
                    else:
                        p.data = saved
                        p.requires_grad_(requires_grad)
                    m._parameters[name] = p
                for name, device in buffers.items():
                    m._buffers[name] = self.values[f"{k}.b.{name}"].to(device, copy=True)
                vars(m).update(plain)
        vars(self.model.config).clear()
        vars(self.model.config).update(self.config)
        for m, training in self.training:
            m.training = training


def _on_disk(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host copies of ``tensors`` backed by a temporary file (memory-mapped, read when used) instead of
    memory.  The file is unlinked at once; its pages live as long as the returned tensors."""
    with tempfile.TemporaryDirectory(prefix="spap-snapshot-", ignore_cleanup_errors=True) as folder:
        path = os.path.join(folder, "snapshot.pt")
        torch.save(tensors, path)
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")


def _run(model: nn.Module, batches: list[torch.Tensor], s: BlockSettings, checkpoint_dir: str | None, resume: bool,
         progress: bool) -> tuple[nn.Module, PruneReport]:
    """The block-by-block prune, with arguments already checked."""
    adapter = get_adapter(model)
    device, offload, propagate = s.device, s.offload, s.propagate
    B.add_biases(adapter, s.bias_switches)  # zero biases: outputs unchanged; undone with the snapshot
    settings = dict(_settings(s, model), n_batches=len(batches), calib_tokens=sum(b.numel() for b in batches))
    r = s.ranks
    if r is not None:  # this rank's batches and tokens, and the whole run's
        settings.update(ranks=r.world, calib_sequences=sum(r.sequences))

    # --- run --------------------------------------------------------------------------------------
    report = PruneReport(settings=settings, params_before=count_parameters(model))
    start = time.perf_counter()
    blocks = adapter.blocks()
    was_training = model.training
    model.eval()
    first = 0
    # The loss-aware metric's G, from the dense model (also on resume: the checkpoint does not keep it).
    clock = _Clock(device)
    output_grams = {}
    if s.output_metric is not None:
        with clock.stage("metric"), D.step(r, "the output metric's pass"):
            output_grams = _output_grams(model, adapter, batches, s)
            release_free_memory()  # the pass's per-sequence activations, freed into the heap
        if r is not None:
            with clock.stage("metric"):
                D.all_reduce_sum(r, [G for grams in output_grams.values() for G in grams.values()])
    report.metric_seconds = clock.seconds.get("metric", 0.0)
    if not isinstance(s.allocation, A.Uniform):  # per-block counts from the dense model (again on resume)
        with clock.stage("allocation"):
            s = _allocate(model, adapter, batches, s, output_grams, progress, report)
    if checkpoint_dir is not None:  # what makes it the same run: the dense model, the tokens, every setting
        with clock.stage("checkpoint"):
            run = ckpt.describe(model, batches, dict(settings, batch_size=len(batches[0]), device=device.type))
            if resume:
                first, hidden, kwargs, records, dense_hidden = ckpt.load(checkpoint_dir, run, adapter, device)
                report.layers.extend(records)
    if not resume:
        with clock.stage("inputs"), D.step(r, "capturing the first block's inputs"), \
                outside_blocks_on(model, blocks, device):
            hidden, kwargs = capture_block_inputs(model, blocks, batches, device, offload)
        # The dense model's stream, for the error-correcting target (identical until a block is pruned).
        dense_hidden = [h.clone() for h in hidden] if s.target != "pruned" else None
        if checkpoint_dir is not None:
            ckpt.start(checkpoint_dir, run)
    windows = None
    if s.candidates:  # the selection sequences' call arguments for every block (the embeddings run once more)
        with clock.stage("inputs"), outside_blocks_on(model, blocks, device):
            windows = selection.capture_windows(model, blocks, batches, s.select_windows, device, offload)
    bar = _progress(range(first, len(blocks)), progress, first, len(blocks))
    for i in bar:
        block_start = time.perf_counter()
        block = blocks[i]
        block.to(device)
        # built before the block's first pass, which may overwrite `hidden` (the MLP shortcut)
        scorer = None if windows is None else selection.TailScorer(adapter, i, windows, hidden, device)
        records, kept, mlp_inputs, tail = _prune_block(adapter, block, i, hidden, kwargs[i], s, dense_hidden,
                                                       output_grams.get(i), scorer, clock)
        report.layers.extend(records)
        if propagate == "pruned":
            with clock.stage("propagate"), D.step(r, f"propagating through block {i}"):
                _propagate(adapter, block, i, hidden, kwargs[i], kept, mlp_inputs, tail, device, offload)
        del mlp_inputs
        # The block's batches, freed into the heap: without it the peak creeps up from block to block.  On
        # the CPU _prune_block also releases before each pass of a batch: the holes that the batches before
        # leave in the heap raise the peak inside a block too.
        release_free_memory()
        block.to(offload if device.type == "cuda" else device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report.block_seconds.append(time.perf_counter() - block_start)
        if checkpoint_dir is not None:
            with clock.stage("checkpoint"):
                ckpt.save_block(checkpoint_dir, i, block, kept, hidden, kwargs, report.layers, dense_hidden)
        stop = _HOOKS.stop_after_blocks
        if stop is not None and i + 1 - first >= stop and i + 1 < len(blocks):
            raise ckpt.Interrupted(f"stopped after block {i} (test hook)")
    pruned = U.kinds(adapter, s.structure.units)  # "mlp" names the experts' channels too
    U.set_widths(adapter, {name: width for name, width in U.widths(adapter).items() if name in pruned})
    model.train(was_training)
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    report.stage_seconds = clock.seconds
    report.peak_memory = peak_memory(device)
    return model, report


class _Clock:
    """Wall seconds per stage of a run, summed over its blocks.  On CUDA the device is synchronised at
    the end of each stage, so that kernels are charged to the stage that queued them."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def _allocate(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], s: BlockSettings, output_grams: dict,
              progress: bool, report: PruneReport) -> BlockSettings:
    """Spread the budget ``s.sparsity`` over the blocks by ``s.allocation``; record the result and its time
    in ``report`` and return the settings with the per-block targets."""
    start = time.perf_counter()
    grams = output_grams
    if isinstance(s.allocation, A.Knapsack) and not grams:  # the costs need G even when the masks do not
        kind = "full" if s.structure.rows is None else "diag"
        grams = _output_grams(model, adapter, batches, dataclasses.replace(s, output_metric=kind))
    fractions, counts = A.allocate(model, adapter, batches, s.allocation, s.sparsity, s.structure.units,
                                   device=s.device, offload=s.offload,
                                   output_grams=grams, metric_kind=s.output_metric or "full",
                                   metric_damp=s.metric_damp, damp=s.damp, damp_mode=s.damp_mode,
                                   gram_dtype=s.gram_dtype, rows=s.structure.rows, progress=progress)
    report.allocation = {"sparsity": list(fractions), **{k: [c[k] for c in counts] for k in s.structure.units}}
    report.allocation_seconds = time.perf_counter() - start
    return dataclasses.replace(s, block_sparsity=tuple(fractions), counts=tuple(counts))


def _prune_block(adapter: Adapter, block: nn.Module, index: int, hidden: list[torch.Tensor], block_kwargs: list[dict],
                 settings: BlockSettings, dense_hidden: list[torch.Tensor] | None = None,
                 output_grams: dict[str, torch.Tensor] | None = None, scorer: selection.TailScorer | None = None,
                 clock: _Clock | None = None):
    """Capture the block's Gram matrices, solve its problems and write the results into it.

    With ``"mlp+heads"`` this takes two passes (:func:`_stages`): the first poses and solves the heads'
    problem and writes it into the block; the second runs the batches through the block with its
    attention pruned and poses the MLP's problem on the inputs that pruned attention gives the MLP's
    output linear.  (With ``target="dense"`` the dense model's stream runs through a copy of the dense
    block in both passes.)

    For an MLP-only prune with pruned propagation (and a family with :meth:`Adapter.mlp_tail`) the first
    pass stops at the MLP's output linear, replaces ``hidden[b]`` by the residual entering the MLP and
    returns the inputs of the output linear (``mlp_inputs``, one ``(batch, seq, width)`` tensor per
    batch), from which the caller computes the pruned block's output without running the block again.
    This trades memory (the MLP width instead of the hidden size per token) for a second pass; the
    equality with a full second pass is tested.  Returns ``(records, kept, mlp_inputs, tail)``, ``tail``
    the adapter's ``(entry, finish)`` pair when the shortcut was taken, else None.

    With ``dense_hidden`` (``target="dense"``) each batch first runs through the dense block from the
    dense model's stream (its outputs replace ``dense_hidden[b]``), recording the target linears'
    inputs, then from the pruned stream; every problem is then posed on the corrected weight
    ``solvers.corrected_weight(W, Ĥ, C)``.

    ``clock`` (if given) receives the time of the block's passes (``"forward"``), of the Gram products
    inside them (``"gram"``) and of building, solving and writing back its problems (``"solve"``).

    ``output_grams`` (``output_metric``) maps a target (``"mlp"``, ``"heads"`` or a linear's name) to its
    output-gradient Gram matrix; those problems choose their masks in that metric.

    With ``scorer`` (``candidates``) each unit kind's mask is chosen among the candidates' solutions by
    the model's loss (:func:`spap.selection.choose`) and its record holds the choice.
    """
    output_grams = output_grams or {}
    clock = clock or _Clock(settings.device)
    s = settings
    tail = None
    if s.mlp_tail and s.structure.units == ("mlp",) and s.propagate == "pruned":
        tail = adapter.mlp_tail(block)
    groups = adapter.linear_groups(block)
    stages = _stages(s.structure)
    # The dense model's stream needs the dense block for every stage; a later stage's block is partly pruned.
    dense_block = copy.deepcopy(block) if dense_hidden is not None and len(stages) > 1 else block
    records, kept = [], {}
    mlp_inputs: list[torch.Tensor | None] = []
    dense_out: list[torch.Tensor] = []
    offsets: dict[str, torch.Tensor] = {}  # target="block": D = Σ (r − r̂) x̂ᵀ per output linear
    for k, names in enumerate(stages):
        kinds = U.kinds(adapter, names)
        wanted: dict[str, nn.Module] = {}
        if s.structure.rows is not None:
            wanted = {next(iter(g)): next(iter(g.values())) for g in groups}
        for name, kind in kinds.items():
            if name != "experts":  # the experts are no linears: their inputs are recorded per expert
                wanted[name] = kind.output_linear(block)
        hooks = GramHooks(wanted, s.device, s.gram_dtype, cross=dense_hidden is not None)
        expert_grams = None
        if "experts" in kinds or (s.structure.rows is not None and adapter.has_experts):
            expert_grams = ExpertGrams(adapter.experts(block), s.device, s.gram_dtype, inputs=s.structure.rows is not None)
        if dense_block is not block:
            paths = {id(m): n for n, m in block.named_modules()}
            copies = dict(dense_block.named_modules())
            for name, module in wanted.items():
                hooks.add_reference(name, copies[paths[id(module)]])
        extra = []
        residuals: list[torch.Tensor] = []
        dense_residual: list[torch.Tensor] = []  # target="block": the dense stream's r of the batch in flight
        offset_seconds: list[float] = []
        if tail is not None:
            def stop_at_mlp_out(module, args):  # registered after the Gram hook, so it runs after it
                if hooks.recording:  # the dense stream's pass runs the whole block
                    return
                if s.target == "block":  # timed as a Gram product, synchronised on CUDA as GramHooks does
                    if s.device.type == "cuda":
                        torch.cuda.synchronize(s.device)
                    start = time.perf_counter()
                    offsets["mlp"] = _add_block_offset(offsets.get("mlp"), dense_residual.pop(), residuals[-1], args[0],
                                                       s.gram_dtype)
                    if s.device.type == "cuda":
                        torch.cuda.synchronize(s.device)
                    offset_seconds.append(time.perf_counter() - start)
                mlp_inputs.append(args[0].detach().to(hidden[0].device))  # NaN shows in the Gram check
                raise _StopBlock

            def record_residual(module, args):
                if not hooks.recording:
                    residuals.append(args[0].detach())
                elif s.target == "block":
                    dense_residual.append(args[0].detach())

            extra.append(tail[0].register_forward_pre_hook(record_residual))
            extra.append(wanted["mlp"].register_forward_pre_hook(stop_at_mlp_out))
        last = k == len(stages) - 1
        # the activations of the pass before, freed into the heap (see _run); on CUDA they live on the device
        release_host = release_free_memory if s.device.type == "cpu" else (lambda: None)
        try:
            with torch.no_grad(), clock.stage("forward"), D.step(s.ranks, f"the forward pass of block {index}"):
                for b, h in enumerate(hidden):
                    release_host()
                    if dense_hidden is not None:
                        hooks.recording = True
                        out = run_block(dense_block, dense_hidden[b], block_kwargs[b], s.device)
                        hooks.recording = False
                        release_host()
                        if last:
                            dense_hidden[b] = finite(out, f"dense output of block {index}").to(dense_hidden[b].device)
                    try:
                        out = run_block(block, h, block_kwargs[b], s.device)
                    except _StopBlock:
                        hidden[b] = residuals.pop().to(h.device)
                        continue
                    if s.propagate == "dense" and k == 0:  # the block is still dense in the first stage
                        dense_out.append(finite(out, f"output of block {index}").to(h.device))
        finally:
            hooks.remove()
            if expert_grams is not None:
                expert_grams.remove()
            for handle in extra:
                handle.remove()
        gram_seconds = hooks.seconds + sum(offset_seconds) + (expert_grams.seconds if expert_grams is not None else 0.0)
        clock.add("forward", -gram_seconds)
        clock.add("gram", gram_seconds)
        if s.ranks is not None:  # every rank's tokens in every problem
            with clock.stage("gram"):
                D.reduce_accumulators(s.ranks, list(hooks.accumulators.values()))
                D.all_reduce_sum(s.ranks, list(offsets.values()))
        with clock.stage("solve"):
            stage_records, stage_kept = _solve_block(block, index, hooks.accumulators, groups, kinds, s, output_grams,
                                                     scorer, expert_grams, offsets)
        records += stage_records
        kept.update(stage_kept)
    del dense_block
    if s.propagate == "dense":
        hidden[:] = dense_out
    return records, kept, mlp_inputs, tail


def _stages(structure: PruneStructure) -> list[tuple[str, ...]]:
    """The unit kinds solved after each pass through a block: heads before the MLP (``"mlp+heads"``),
    so that the MLP's problem is posed on the inputs the pruned attention gives it; one stage otherwise
    (row structures: every linear from the one pass)."""
    if structure.units == ("mlp", "heads"):
        return [("heads",), ("mlp",)]
    return [structure.units]


def _solve_block(block: nn.Module, index: int, grams: dict, groups: list, kinds: dict,
                 s: BlockSettings, output_grams: dict, scorer: selection.TailScorer | None,
                 expert_grams: ExpertGrams | None = None, offsets: dict | None = None):
    """Solve one block's problems from its Gram matrices and write the solutions into it; returns
    ``(records, kept)`` (see :func:`_prune_block`).  The experts (``expert_grams``, one accumulator per
    expert) are solved by :func:`_solve_experts`.  ``offsets`` (``target="block"``) maps a unit kind to
    its output linear's ``D`` (:func:`solvers.corrected_weight`)."""
    offsets = offsets or {}
    records, kept = [], {}
    accumulators = list(grams.items())
    if expert_grams is not None:
        accumulators += [(f"expert {e}", acc) for e, acc in enumerate(expert_grams.accumulators)]
    for key, acc in accumulators:
        if not torch.isfinite(acc.H).all():
            raise FloatingPointError(f"NaN or Inf in the calibration inputs of block {index} ({key}).")
    # Every solution is written after all are solved: each problem reads only its own linear, so solving
    # them in any order (or on several ranks) gives what solving and writing one by one gives.  A job poses
    # its problem only when it is solved, so that one problem's factorizations are held at a time.
    jobs: list[_Job] = []
    if s.structure.rows is not None:
        for g in groups:
            acc = grams[next(iter(g))]
            for name, module in g.items():
                def pose(view=LinearView(module), acc=acc, name=name):
                    # counts, not the fraction: check_arguments already refused or warned about the rounding
                    target = {} if isinstance(s.structure.rows, solvers.NM) else \
                        {"n_prune": U.prune_count(s.block_sparsity[index], view.weight.numel())}
                    p = solvers.LayerProblem(_fitted_weight(view, acc, s), acc.H, s.structure.rows, damp=s.damp,
                                             damp_mode=s.damp_mode, input_mean=acc.mean, n_samples=acc.n_samples,
                                             **target)
                    return p, _metric(p, s, output_grams.get(name))
                jobs.append(_Job(name, s.structure.rows, pose, lambda sol, view=LinearView(module): view.set_weight(sol.weight)))
    for name, kind in kinds.items():
        if name == "experts":
            continue
        def pose(kind=kind, name=name):
            # counts by the one rounding rule (units.prune_count), checked by check_arguments
            p = _group_problem(LinearView(kind.output_linear(block)), grams[name], kind.column_groups(block), s,
                               offsets.get(name), n_prune=s.counts[index][name])
            return p, _metric(p, s, output_grams.get(name))
        jobs.append(_Job(name, kind.column_groups(block), pose, lambda sol, kind=kind, name=name: kept.__setitem__(
            name, selection.write_units(kind, block, sol).cpu())))
    solutions, choices = _solve_jobs(jobs, block, kinds, index, s, scorer)
    for job, sol, chosen in zip(jobs, solutions, choices):
        job.write(sol)
        record = LayerRecord.from_solution(index, job.name, sol, job)
        if chosen is not None:
            record.seconds, record.selection = sum(chosen["seconds"].values()), chosen
        records.append(record)
    if expert_grams is not None and s.structure.rows is not None:
        records += _solve_expert_rows(index, expert_grams, s)
    if "experts" in kinds:
        expert_records, kept["experts"] = _solve_experts(kinds["experts"], block, index, expert_grams.accumulators, s)
        records += expert_records
    return records, kept


@dataclass
class _Job:
    """One problem of a block: its target's name and structure, ``pose()`` → ``(problem, metric)`` and
    ``write(solution)``, which writes the solution into the block."""

    name: str
    structure: Any
    pose: Any
    write: Any


def _solve_jobs(jobs: list[_Job], block: nn.Module, kinds: dict, index: int, s: BlockSettings,
                scorer: selection.TailScorer | None) -> tuple[list[solvers.Solution], list[dict | None]]:
    """Solve a block's problems ``jobs``; returns the solutions and, with ``scorer`` (``candidates``), each
    choice (else None).  Under a process group of several ranks each problem is posed and solved by one
    rank (:meth:`spap.distributed.Ranks.owner`) and broadcast, so every rank returns the same solutions."""
    def solve(job):
        p, metric = job.pose()
        if scorer is None or job.name not in kinds:
            return _solve(p, s.method, s.method_options, metric), None
        return selection.choose(p, block, kinds[job.name], s.candidates, s.method, s.method_options, scorer,
                                solve=lambda q, m, **o: _solve(q, m, o, metric))

    r = s.ranks
    if r is None:
        pairs = [solve(job) for job in jobs]
        return [sol for sol, _ in pairs], [chosen for _, chosen in pairs]
    mine = {}
    with D.step(r, f"solving block {index}"):
        for j, job in enumerate(jobs):
            if r.owner(j, index) == r.rank:
                mine[j] = solve(job)[0]
    device = next(block.parameters()).device
    return [D.to_device(D.broadcast(r, mine.get(j), r.owner(j, index)), device) for j in range(len(jobs))], [None] * len(jobs)


def _solve_experts(kind: U.ExpertChannels, block: nn.Module, index: int, accumulators: list, s: BlockSettings):
    """Solve every expert's problem (its down projection ``(hidden, width)`` on the Gram matrix of the
    tokens routed to it, pruning ``s.counts[index]["experts"]`` channels) and write the solutions into the
    experts (:func:`spap.selection.write_expert_units`); returns ``(records, kept)``, one record per
    expert (target ``"experts.E"``) and the kept channels ``(experts, kept)``.

    An expert no calibration token reached has no Gram matrix: its problem is posed on the identity
    (every input alike, so the mask follows the down projection's column norms, as magnitude pruning's).
    The loss-aware metric (``output_metric``) does not apply to experts: their problems use the plain
    reconstruction error."""
    experts = kind.experts(block)
    structure = kind.column_groups(block)
    solutions, records = [], []
    for e, acc in enumerate(accumulators):
        W = experts.down(e)
        if acc.n_samples > 0:
            data = dict(gram=acc.H, input_mean=acc.mean, n_samples=acc.n_samples)
        else:
            data = dict(gram=torch.eye(experts.width, dtype=torch.float64, device=acc.H.device))
        p = solvers.LayerProblem(W, structure=structure, n_prune=s.counts[index]["experts"], damp=s.damp,
                                 damp_mode=s.damp_mode, **data)
        solution = _solve(p, s.method, s.method_options, None)
        solutions.append(solution)
        records.append(LayerRecord.from_solution(index, f"experts.{e}", solution, p))
    return records, selection.write_expert_units(kind, block, solutions).cpu()


def _solve_expert_rows(index: int, grams: ExpertGrams, s: BlockSettings) -> list[LayerRecord]:
    """Unstructured and N:M on every expert: its ``[gate; up]`` projection ``(2·width, hidden)`` on the
    Gram matrix of its routed hidden states and its down projection ``(hidden, width)`` on that of its
    down-projection inputs (both weighted by the routing weight, both from the block's one pass, as the
    dense linears are); an expert no token reached is posed on the identity.  Returns one record per
    weight (targets ``"experts.E.gate_up"``, ``"experts.E.down"``)."""
    experts = grams.experts
    records = []
    for e in range(experts.n):
        for part, W, acc, write in (("gate_up", experts.gate_up(e), grams.input_accumulators[e], experts.set_gate_up),
                                    ("down", experts.down(e), grams.accumulators[e], experts.set_down)):
            if acc.n_samples > 0:
                data = dict(gram=acc.H, input_mean=acc.mean, n_samples=acc.n_samples)
            else:
                data = dict(gram=torch.eye(W.shape[1], dtype=torch.float64, device=acc.H.device))
            target = {} if isinstance(s.structure.rows, solvers.NM) else \
                {"n_prune": U.prune_count(s.block_sparsity[index], W.numel())}
            p = solvers.LayerProblem(W, structure=s.structure.rows, damp=s.damp, damp_mode=s.damp_mode, **data, **target)
            solution = _solve(p, s.method, s.method_options, None)
            write(e, solution.weight)
            records.append(LayerRecord.from_solution(index, f"experts.{e}.{part}", solution, p))
    return records


def _propagate(adapter: Adapter, block: nn.Module, index: int, hidden: list[torch.Tensor], block_kwargs: list[dict],
               kept: dict[str, torch.Tensor], mlp_inputs: list, tail, device: torch.device, offload: torch.device) -> None:
    """Replace ``hidden[b]`` by the pruned block's output for every batch ``b`` (kept on ``offload``)."""
    with torch.no_grad():
        for b, h in enumerate(hidden):
            if tail is not None:
                # `hidden` holds the residuals entering the MLP and `mlp_inputs` the inputs of its output
                # linear (first pass): only the pruned output linear is left to compute.
                # selected on the compute device: on the host, index_select of a wide bfloat16 tensor
                # costs more than moving all its columns (docs/performance.md, "On a GPU")
                x = mlp_inputs[b].to(device).index_select(-1, kept["mlp"].to(device))
                mlp_inputs[b] = None
                out = tail[1](h.to(device), adapter.mlp_out(block)(x))
            else:
                out = run_block(block, h, block_kwargs[b], device)
            hidden[b] = finite(out, f"output of block {index}").to(offload)


def _fitted_weight(view: LinearView, acc: solvers.GramAccumulator, s: BlockSettings,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """The weight a layer problem fits: the layer's own, or with ``target="dense"`` (``"block"``: and its
    ``offset``) the corrected one."""
    if acc.C is None:
        return view.weight
    return solvers.corrected_weight(view.weight, acc.H, acc.C, s.damp, s.damp_mode, offset).to(view.weight.dtype)


def _add_block_offset(total: torch.Tensor | None, r: torch.Tensor, r_hat: torch.Tensor, x_hat: torch.Tensor,
                      product_dtype: torch.dtype) -> torch.Tensor:
    """``total + Σ_t (r_t − r̂_t) x̂_tᵀ`` (float64; products in ``product_dtype``) for one batch: the block
    target's correction of the output linear's fit (``r``, ``r̂``: the dense and the pruned stream's residual
    where the MLP's output is added, ``(batch, seq, d_out)``; ``x̂``: the output linear's inputs)."""
    e = (r.to(x_hat.device) - r_hat.to(x_hat.device)).reshape(-1, r.shape[-1]).to(product_dtype)
    D = (e.T @ x_hat.detach().reshape(-1, x_hat.shape[-1]).to(product_dtype)).to(torch.float64)
    return D if total is None else total + D


def _metric(problem: solvers.LayerProblem, s: BlockSettings,
            output_gram: torch.Tensor | None) -> solvers.OutputMetric | None:
    """The loss-aware metric of one problem (``output_metric``), or None."""
    if output_gram is None:
        return None
    return solvers.OutputMetric.from_gram(output_gram.to(problem.weight.device), s.output_metric, s.metric_damp)


def _solve(problem: solvers.LayerProblem, method: str, options: dict,
           metric: solvers.OutputMetric | None) -> solvers.Solution:
    """``method`` on one problem, choosing the mask in ``metric`` when there is one."""
    if metric is None:
        return solvers.solve(problem, method, **options)
    return solvers.solve_in_metric(problem, metric, method, **options)


def _output_grams(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], s: BlockSettings) -> dict:
    """``G`` of every target of every block: ``grams[block][target]`` (targets named as in
    ``_prune_block``), full for the structured kinds' output linears, the diagonal for row structures'
    linears."""
    modules, diagonal = {}, set()
    for i, block in enumerate(adapter.blocks()):
        for name, kind in U.kinds(adapter, s.structure.units).items():
            if name != "experts":  # the experts' problems use the plain error (no linear to take G at)
                modules[i, name] = kind.output_linear(block)
        if s.structure.rows is not None:
            for g in adapter.linear_groups(block):
                for name, module in g.items():
                    modules[i, name] = module
                    diagonal.add((i, name))
    if not modules:  # Mixtral's "mlp": only experts, whose problems use the plain error
        return {}
    if s.output_metric == "diag":
        diagonal = set(modules)
    n_sequences = s.metric_windows
    if s.ranks is not None:  # the run's first metric_windows sequences: those of them this rank holds
        n_sequences = max(0, min(n_sequences - s.ranks.offset, s.ranks.sequences[s.ranks.rank]))
    grams = output_gradient_grams(model, batches, modules, diagonal=diagonal, n_sequences=n_sequences,
                                  device=s.device, blocks=adapter.blocks())
    per_block: dict[int, dict[str, torch.Tensor]] = {}
    for (i, name), G in grams.items():
        per_block.setdefault(i, {})[name] = G.to(s.offload)
    return per_block


class _StopBlock(Exception):
    """Ends a first pass at the MLP's output linear once its input is recorded."""


def _group_problem(view: LinearView, acc: solvers.GramAccumulator, structure: solvers.Structure,
                   settings: BlockSettings, offset: torch.Tensor | None = None, **target) -> solvers.LayerProblem:
    """One output projection's column-group problem (``target``: ``n_prune``; ``offset``: see
    :func:`_fitted_weight`); solved by the caller and written back with :func:`spap.selection.write_units`."""
    return solvers.LayerProblem(_fitted_weight(view, acc, settings, offset), acc.H, structure, bias=view.bias,
                                input_mean=acc.mean, n_samples=acc.n_samples, damp=settings.damp,
                                damp_mode=settings.damp_mode, **target)


def _progress(iterable, enabled: bool, done: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="pruning blocks", unit="block", initial=done, total=total)
