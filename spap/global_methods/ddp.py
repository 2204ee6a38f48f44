"""``ddp_prune``: Deterministic Differentiable Pruning (DDP) of MLP channels and key-value groups.

DDP (Huang et al., "Deterministic Differentiable Structured Pruning for Large Language Models",
arXiv:2603.08065) learns one multiplicative gate per structure (an MLP channel, or a KV group: one key-value
head and its query heads) with every weight frozen, under an ℓ0 budget.  Instead of sampling stochastic
hard-concrete gates it optimises a *deterministic* soft surrogate of the ℓ0 count.  Our reading of it
(docs/ddp.md says which choices are ours):

- gate ``m = ReLU(z)``, one trainable ``z`` per unit, initialised to 1 (the dense model); ``m``
  multiplies the unit's columns of the input of its output linear (down_proj, o_proj) through forward
  pre-hooks;
- soft count ``K_τ(z) = Σ s_τ(z)`` with ``s_τ(z) = (1 + z / (|z| + τ)) / 2``, which tends to
  ``‖m‖₀ = #{z > 0}`` as ``τ → 0``; ``τ`` is annealed geometrically from ``tau[0]`` to ``tau[1]``;
- objective ``D(z) + λ·c(z) + (ρ/2)·c(z)²``: ``D`` is KL(dense ‖ gated) of the next-token distributions
  (``distill=True``) or the next-token cross-entropy, ``c`` the soft kept fraction minus its target
  (which ramps from the start value to ``1 − sparsity`` over the first ``warmup`` of the steps);
  ``z`` takes Adam steps, ``λ`` dual-ascent steps ``λ ← λ + lr_dual·c``;
- at the end, a hard mask with the exact count (the largest ``z``), the surviving gates folded into the
  output linears' columns, and the pruned units removed through the adapters (as in ``prune_layerwise``),
  so the smaller model computes exactly what the hard-gated model computes.

With ``allocation="global"`` the kept count is exact over all blocks of one unit type (at least one unit
per block), so blocks may keep different widths: the model works in memory, and saving it needs the
loader for non-uniform widths (the config still holds the dense widths).  ``allocation="uniform"`` keeps
the same count in every block (the widths of ``prune_layerwise``), updates the config, and saves and
reloads with stock transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from solvers.masks import keep_largest_overall, keep_largest_per_row

from .. import units as U
from ..adapters import LinearView
from ..capture import calibration_batches, check_calibration
from ..checks import Boolean, DecreasingPair, Interval, InvalidArgumentError, Options, check_table
from ..report import PruneReport, count_parameters, peak_memory, peak_memory_text
from ..units import PruneStructure, check_model

ALLOCATIONS = ("global", "uniform")
TEACHERS = ("cache", "online")
_CONSTRAINTS = {
    "sparsity": Interval(float, 0, 1, closed="left"),
    "steps": Interval(int, 1, None),
    "batch_size": Interval(int, 1, None),
    "seed": Interval(int, 0, None),
    "lr": Interval(float, 0, None, closed="neither"),
    "lr_dual": Interval(float, 0, None),
    "rho": Interval(float, 0, None),
    "warmup": Interval(float, 0, 1),
    "tau": DecreasingPair(),
    "distill": Boolean(),
    "teacher": Options(TEACHERS),
    "allocation": Options(ALLOCATIONS),
    "progress": Boolean(),
}
TEACHER_CACHE_LIMIT = 2 * 2**30  # bytes of cached float32 teacher log-probabilities before "online" is required


@dataclass
class DDPReport(PruneReport):
    """Returned by :func:`ddp_prune`: the :class:`PruneReport` totals plus what DDP learned.

    ``widths[i]`` is block ``i``'s kept count per unit type (``{"mlp": channels, "heads": KV groups}``);
    ``keep[t]`` the kept units of type ``t``, a bool tensor ``(n_blocks, n_units)``; ``gates[t]`` the final
    hard gates, a float tensor ``(n_blocks, n_units)``: the value ``ReLU(z)`` folded into the output linear
    for kept units (0 for a kept unit whose ``z`` ended ≤ 0), 0 for pruned ones; ``history`` one dict per
    step (``loss``, ``tau``, and per type ``kept_<type>``, the soft kept fraction, and ``lambda_<type>``,
    the mean multiplier).
    """

    widths: list[dict[str, int]] = field(default_factory=list)
    keep: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        """Whether every block keeps the same width of every type (then the config describes the model)."""
        return all(w == self.widths[0] for w in self.widths)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["keep"] = {t: [torch.nonzero(row).flatten().tolist() for row in k] for t, k in self.keep.items()}
        d["gates"] = {t: g.tolist() for t, g in self.gates.items()}
        return d

    def summary(self) -> str:
        lines = []
        for t in self.gates:
            ws = [w[t] for w in self.widths]
            total = self.gates[t].shape[1]
            dead = int((self.keep[t] & (self.gates[t] == 0)).sum()) if t in self.keep else 0
            lines.append(f"{t:<6} kept per block: min {min(ws)}, mean {sum(ws) / len(ws):.1f}, max {max(ws)} of {total}"
                         f" ({sum(ws)}/{total * len(ws)} = {sum(ws) / (total * len(ws)):.1%} kept"
                         f"{f', {dead} of them with gate 0' if dead else ''})")
        if self.history:
            last = self.history[-1]
            lines.append("last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({1 - self.params_after / self.params_before:.1%} fewer); time {self.seconds:.1f} s; "
            + peak_memory_text(self.peak_memory)
        )
        return "\n".join(lines)


def ddp_prune(
    model: nn.Module,
    calib: Any,
    sparsity: float = 0.3,
    *,
    structure: str = "mlp",
    steps: int = 200,
    lr: float = 0.05,
    lr_dual: float = 1.0,
    rho: float = 1000.0,
    tau: tuple[float, float] = (0.5, 0.02),
    warmup: float = 0.5,
    distill: bool = True,
    teacher: str = "cache",
    batch_size: int = 4,
    allocation: str = "global",
    seed: int = 0,
    tokenizer=None,
    progress: bool = True,
) -> tuple[nn.Module, DDPReport]:
    """Prune ``model`` in place with DDP and return ``(model, report)``.

    Parameters
    ----------
    model : transformers causal LM
        A supported family (:data:`spap.adapters.ADAPTERS`, or a found layout), on the device where it
        should train; modified in place.  Its weights are frozen during the run (``requires_grad`` is restored at the end).
    calib : list of str, LongTensor (n, seq), or iterable of LongTensor batches
        Calibration text or token ids (see :func:`spap.capture.calibration_batches`), split into windows.
    sparsity : float in [0, 1), default 0.3
        Fraction of each unit type pruned: ``n_blocks × ⌊sparsity·n + ½⌋`` of the ``n_blocks × n`` MLP
        channels and/or KV groups, the same totals as :func:`spap.prune_layerwise`.
    structure : {"mlp", "heads", "mlp+heads"}, default "mlp"
        The units, as in :func:`spap.prune_layerwise`: MLP intermediate channels; whole KV groups.
    steps : int ≥ 1, default 200
        Optimiser steps, one mini-batch of ``batch_size`` windows each.
    lr : float > 0, default 0.05
        Adam learning rate of the gate parameters ``z``.
    lr_dual : float ≥ 0, default 1.0
        Dual-ascent step of the multipliers ``λ`` (one per unit type, or per type and block when
        ``allocation="uniform"``); ``λ`` is in units of the loss per unit of kept fraction.
    rho : float ≥ 0, default 1000.0
        Weight of the quadratic term ``(ρ/2)·c²`` (augmented Lagrangian): a restoring force proportional
        to the violation, which keeps the count on its ramp while ``λ`` builds up and stops it overshooting.
    tau : (float, float), default (0.5, 0.02)
        Start and end temperature of the surrogate ``s_τ``, ``tau[0] ≥ tau[1] > 0``; annealed geometrically
        over the steps.
    warmup : float in [0, 1], default 0.5
        Fraction of the steps over which the kept target ramps linearly from the start value
        ``s_{tau[0]}(1)`` to ``1 − sparsity`` (0: the final target from the first step).
    distill : bool, default True
        Minimise KL(dense ‖ gated) of the next-token distributions; False: the next-token cross-entropy
        of the calibration text.
    teacher : {"cache", "online"}, default "cache"
        With ``distill``: the dense log-probabilities computed once and kept (``n × seq × vocab`` float32,
        refused above 2 GiB), or recomputed each step (one more forward pass per step, no memory).
    batch_size : int ≥ 1, default 4
        Windows per step.
    allocation : {"global", "uniform"}, default "global"
        Exact count over all blocks of a type (at least one unit per block; widths may differ between
        blocks) or in every block (one width, stock config).
    seed : int, default 0
        Seeds the order of the windows; the run is otherwise deterministic (same seed, same result on
        the same machine and thread count).
    tokenizer : optional
        Needed when ``calib`` is a list of strings.
    progress : bool, default True
        Show a progress bar over the steps.

    Returns
    -------
    model : the same object, pruned in place
    report : DDPReport
        Per-block widths, the final gates ``(n_blocks, n_units)`` per type, the per-step history, and the
        totals of :class:`PruneReport` (parameters before/after, seconds, peak memory).

    Failures.  Every argument is checked before any work, as in :func:`spap.prune_layerwise` (the model,
    the calibration ids, a sparsity that rounds to every unit of a block is refused and one that rounds
    to none warned about).  The model's weights change only after training, in the final fold and
    shrink, which allocates less than training did; a failure before it (a NaN or Inf loss or gate,
    which raises ``FloatingPointError``, any other exception, an interrupt) leaves the model as it was:
    weights, ``requires_grad`` flags, training mode, no hook left.
    """
    # --- validate everything before any model work ----------------------------------------------
    adapter = check_model(model, "ddp_prune")
    types = PruneStructure.parse(structure, caller="ddp_prune", units_only=True).units
    check_table("ddp_prune", _CONSTRAINTS, locals())
    units = _units(adapter, types, sparsity)
    device = next(model.parameters()).device
    windows = _windows(calib, tokenizer)
    check_calibration([w[None] for w in windows], model, "ddp_prune", min_length=1 if distill else 2)
    vocab = model.get_output_embeddings().weight.shape[0]
    cache_bytes = sum(w.numel() for w in windows) * vocab * 4
    if distill and teacher == "cache" and cache_bytes > TEACHER_CACHE_LIMIT:
        raise InvalidArgumentError(
            f"teacher='cache' would keep {cache_bytes / 2**30:.1f} GiB of dense log-probabilities "
            f"({sum(w.numel() for w in windows)} tokens × {vocab} words; the limit is "
            f"{TEACHER_CACHE_LIMIT / 2**30:g} GiB). Pass teacher='online', or fewer or shorter windows.")
    settings = {"sparsity": sparsity, "method": "ddp", "structure": structure, "steps": steps, "lr": lr,
                "lr_dual": lr_dual, "rho": rho, "tau": list(tau), "warmup": warmup, "distill": distill, "teacher": teacher,
                "batch_size": batch_size, "allocation": allocation, "seed": seed, "n_windows": len(windows),
                "calib_tokens": sum(w.numel() for w in windows), "model_type": model.config.model_type}

    # --- train the gates --------------------------------------------------------------------------
    report = DDPReport(settings=settings, params_before=count_parameters(model))
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout: the objective is deterministic
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        gates = _Gates(adapter, units, device)
        try:
            z = _train(model, gates, units, windows, steps=steps, lr=lr, lr_dual=lr_dual, rho=rho, tau=tau,
                       warmup=warmup, distill=distill, teacher=teacher, batch_size=batch_size, allocation=allocation,
                       seed=seed, progress=progress, history=report.history)
        finally:
            gates.remove()
        for t, v in z.items():
            if not torch.isfinite(v).all():
                raise FloatingPointError(f"NaN or Inf in the {t} gates after training; lower 'lr'.")

        # --- exact hard mask, fold, shrink: the first change to the model -------------------------
        blocks = adapter.blocks()
        keep = report.keep = {t: _hard_mask(z[t], u.keep_per_block, allocation) for t, u in units.items()}
        report.gates = {t: torch.where(keep[t], z[t].clamp(min=0), torch.zeros_like(z[t])) for t in units}
        report.widths = [{t: int(keep[t][i].sum()) for t in units} for i in range(len(blocks))]
        with torch.no_grad():
            for i, block in enumerate(blocks):
                for t, u in units.items():
                    _fold(u.kind, block, report.gates[t][i])
                    u.kind.keep(block, torch.nonzero(keep[t][i]).flatten())
        if report.uniform:  # one width everywhere: the config describes the model (stock save and reload)
            U.set_widths(adapter, {t: [w[t] for w in report.widths] for t in units})
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        model.train(was_training)
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    report.peak_memory = peak_memory(device)
    return model, report


@dataclass(frozen=True)
class _Unit:
    """One unit kind under training: ``n`` units per block, ``keep_per_block`` kept per block on average
    (exactly, for ``allocation="uniform"``)."""

    kind: U.UnitKind
    n: int
    keep_per_block: int


def _units(adapter, types: tuple[str, ...], sparsity: float) -> dict[str, _Unit]:
    """The unit kinds under training; a sparsity that rounds to every unit of a block is refused and one
    that rounds to none warned about (:func:`spap.units.checked_prune_count`)."""
    units = {}
    for name, kind in U.kinds(adapter, types).items():
        n = kind.dense_count()
        what = "MLP channels of a block" if name == "mlp" else "key-value groups of a block"
        prune = U.checked_prune_count(float(sparsity), n, units=what, caller="ddp_prune")
        units[name] = _Unit(kind, n, n - prune)
    return units


def _windows(calib: Any, tokenizer) -> list[torch.Tensor]:
    """The calibration windows, each a LongTensor ``(seq,)``."""
    return [row for batch in calibration_batches(calib, tokenizer, batch_size=1) for row in batch]


class _Gates:
    """The gate parameters ``z[t]`` (``(n_blocks, n_units)``, initialised to 1) and the unit gates
    (:meth:`spap.units.UnitKind.gate`) that multiply each unit's inputs of its output linear by
    ``ReLU(z)``.  ``active = False`` runs the dense model (the online teacher)."""

    def __init__(self, adapter, units: dict[str, _Unit], device: torch.device) -> None:
        blocks = adapter.blocks()
        self.z = {t: torch.ones(len(blocks), u.n, device=device, requires_grad=True) for t, u in units.items()}
        self.active = True
        self.handles = [u.kind.gate(block, self._multiplier(t, i))
                        for i, block in enumerate(blocks) for t, u in units.items()]

    def _multiplier(self, kind: str, index: int):
        return lambda: self.z[kind][index].clamp(min=0) if self.active else None  # ReLU(z), (n_units,)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _train(model: nn.Module, gates: _Gates, units: dict[str, _Unit], windows: list[torch.Tensor], *, steps: int,
           lr: float, lr_dual: float, rho: float, tau: tuple[float, float], warmup: float, distill: bool, teacher: str,
           batch_size: int, allocation: str, seed: int, progress: bool,
           history: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Optimise the gates; returns the final ``z`` per type, detached, ``(n_blocks, n_units)``."""
    device = next(model.parameters()).device
    cached = None
    if distill and teacher == "cache":
        gates.active = False
        with torch.no_grad():
            cached = [_log_probs(model, w[None].to(device))[0] for w in windows]
        gates.active = True
    z = gates.z
    n_blocks = next(iter(z.values())).shape[0]
    optimiser = torch.optim.Adam(list(z.values()), lr=lr)
    lam = {t: torch.zeros(n_blocks if allocation == "uniform" else 1, device=device) for t in units}
    order = _order(len(windows), steps * batch_size, seed)
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="DDP gates", unit="step")
    for step in bar:
        t_tau = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
        ramp = min(1.0, (step + 1) / (warmup * steps)) if warmup > 0 else 1.0
        picked = order[step * batch_size:(step + 1) * batch_size]
        optimiser.zero_grad(set_to_none=True)
        loss_value = 0.0
        for ids, rows in _same_length(windows, picked):
            x = ids.to(device)
            log_p = _log_probs(model, x)
            if distill:
                if cached is not None:
                    target = torch.stack([cached[r] for r in rows])
                else:
                    gates.active = False
                    with torch.no_grad():
                        target = _log_probs(model, x)
                    gates.active = True
                loss = F.kl_div(log_p.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            else:
                loss = F.nll_loss(log_p[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            loss = loss * len(rows) / len(picked)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"NaN or Inf in the DDP loss at step {step}: the model's outputs on the "
                                         "calibration windows are not finite.")
            loss.backward()
            loss_value += float(loss.detach())
        record = {"loss": loss_value, "tau": t_tau}
        penalty = 0.0
        constraints = {}
        for t, u in units.items():
            start_keep = u.n * (1 + 1 / (1 + tau[0])) / 2  # the soft count of a block at z = 1, τ = tau[0]
            soft = _soft_count(z[t], t_tau)  # (n_blocks,) soft kept count per block
            target_keep = start_keep - ramp * (start_keep - u.keep_per_block)
            c = (soft - target_keep) / u.n if allocation == "uniform" else (soft.mean() - target_keep).reshape(1) / u.n
            penalty = penalty + (lam[t] * c).mean() + rho / 2 * (c * c).mean()
            constraints[t] = c.detach()
            record[f"kept_{t}"] = float(soft.detach().sum()) / (u.n * n_blocks)
            record[f"lambda_{t}"] = float(lam[t].mean())
        penalty.backward()
        optimiser.step()
        for t in units:
            lam[t] += lr_dual * constraints[t]
        history.append(record)
        if progress:
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "tau"})
    return {t: v.detach().clone() for t, v in z.items()}


def _soft_count(z: torch.Tensor, tau: float) -> torch.Tensor:
    """``Σ_j s_τ(z_j)`` over the last axis, ``s_τ(z) = (1 + z / (|z| + τ)) / 2``: a smooth step from 0 to 1
    that tends to ``1[z > 0] = ‖ReLU(z)‖₀`` as ``τ → 0``.  Its slope ``τ / (2 (|z| + τ)²)`` decays like
    ``τ / z²`` away from 0 (a sigmoid's decays like ``exp(−|z|/τ)``), so gates far from 0 still feel the
    budget when ``τ`` is small.  ``z`` of shape ``(n_blocks, n_units)`` gives ``(n_blocks,)``."""
    return ((1 + z / (z.abs() + tau)) / 2).sum(-1)


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``(batch, seq, vocab)``, float32."""
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def _order(n: int, length: int, seed: int) -> list[int]:
    """``length`` window indices: consecutive seeded permutations of ``range(n)``."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < length:
        out.extend(torch.randperm(n, generator=gen).tolist())
    return out[:length]


def _same_length(windows: list[torch.Tensor], picked: list[int]):
    """``(ids (batch, seq), rows)`` for each run of equal-length windows among ``picked``."""
    by_length: dict[int, list[int]] = {}
    for r in picked:
        by_length.setdefault(windows[r].numel(), []).append(r)
    for rows in by_length.values():
        yield torch.stack([windows[r] for r in rows]), rows


def _hard_mask(z: torch.Tensor, keep_per_block: int, allocation: str) -> torch.Tensor:
    """Boolean ``(n_blocks, n_units)``: the ``keep_per_block`` largest ``z`` of every block ("uniform"), or
    the ``n_blocks × keep_per_block`` largest overall with every block's largest kept ("global").  Ties go
    to the lower index, so the mask is deterministic."""
    if allocation == "uniform":
        return keep_largest_per_row(z, keep_per_block)
    return keep_largest_overall(z, z.shape[0] * keep_per_block, min_per_row=1)


def _fold(kind: U.UnitKind, block: nn.Module, gate: torch.Tensor) -> None:
    """Scale each unit's input columns of its output linear by ``gate`` (``(n_units,)``)."""
    view = LinearView(kind.output_linear(block))
    view.set_weight(view.weight * kind.per_column(gate).to(view.weight.dtype)[None, :])
