"""``leap_prune``: learn an unstructured mask end to end (LEAP, Mozaffari et al., arXiv 2605.17289).

Layer-wise methods (Wanda, SparseGPT, ADMM, SPAP) pick each layer's mask to reconstruct that layer's
outputs.  LEAP instead learns every weight's keep/prune decision against the model's own loss:

1. **Start from Wanda.**  One pass block by block (the pipeline's recipe: capture the block inputs,
   stream each linear's inputs into a Gram matrix, prune, feed the pruned block's outputs to the next
   block) gives the one-shot Wanda mask of every linear: keep the largest ``|W_ij|·‖x_j‖₂`` in every
   output row.  Each weight gets a logit ``θ_ij = ±a·min(1, |r_ij − k_i + ½| / (w·n))``: the sign is
   Wanda's decision, ``r_ij`` the rank of the weight's score in its row of ``n``, ``k_i`` the row's
   pruned count; so the weights Wanda ranks far from its threshold start at ``±a`` (``init_logit=a``,
   default 5: a sampled mask flips them with probability σ(−5) = 0.7%) and the ``w`` fraction on
   either side of it (``init_width=w``, default 0.05) start between, where a short training can move
   them (``init_width=0``: ``±a`` for every weight).
2. **Train the logits, weights frozen.**  Each step draws a relaxed Bernoulli (binary concrete,
   Gumbel-sigmoid) mask ``m = σ((θ + L)/τ)`` with logistic noise ``L = log u − log(1−u)``,
   ``u ~ U(0, 1)``, runs the model with ``W ⊙ m`` in every trained linear and takes an Adam step on
   ``θ`` for the loss ``CE + kl_weight·KL(dense ‖ masked) + c·d̄``: next-token cross-entropy on
   calibration windows, optionally the KL divergence from the dense model's next-token distribution,
   and an augmented-Lagrangian term on the expected density ``d̄ = mean σ(θ)`` (exactly the
   probability that a sampled mask keeps a weight, whatever ``τ``) with target ``d* = 1 − sparsity``.
   The temperature ``τ`` falls geometrically from ``temperature[0]`` to ``temperature[1]``.  The
   coefficient is ``c = μ + 50·μ₀·e`` with the relative gap ``e = (d̄ − d*)/d*`` and the multiplier
   updated by ``μ ← μ + 5·μ₀·e``; ``μ`` starts at ``μ₀``, where a fraction ``d*`` of the logits have a
   loss gradient larger than the density term's (the scale of ``∂CE/∂θ`` depends on the model and
   the batch, so no fixed weight would carry over).
3. **Project to the exact target.**  The final hard mask keeps the largest logits: over all trained
   linears together (``scope="global"``, as in the paper: each layer's sparsity is learned), per
   linear (``"layer"``) or per output row (``"row"``, Wanda's comparison group); the counts are
   Wanda's, so exactly Wanda's number of weights is pruned and ``steps=0`` returns Wanda's mask.
   Pruned weights are set to zero; nothing else in the model changes.

Memory.  One float32 logit per trained weight, its gradient, two Adam moments and the sampled mask kept
for the backward pass: 20 bytes per trained weight (SmolLM2-135M: 106M prunable weights, 2.1 GB when
every block trains at once), plus one byte per prunable weight for the hard masks.  ``blocks=`` trains
groups of blocks in turn, so only one group's logits and Adam moments exist at a time.

Compute.  Each step is one forward and one backward pass of the whole model on ``batch_size`` windows
(plus a forward of the dense model with ``kl_weight > 0``), and a dozen element-wise passes over the
trained logits (noise, mask, gradient, density term, Adam).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import solvers
from solvers.masks import keep_largest_across, keep_largest_per_row

from .. import units as U
from ..units import check_model
from ..adapters import Adapter, LinearView
from ..capture import GramHooks, calibration_batches, capture_block_inputs, check_calibration, run_block
from ..checks import Boolean, DecreasingPair, Interval, InvalidArgumentError, Options, check_table, finite
from ..report import peak_memory, peak_memory_text

SCOPES = ("global", "layer", "row")
_GRAM_BATCH = 8  # windows per Gram batch in the Wanda pass: prune_layerwise's default, so the masks agree
_DUAL_RATE = 5.0  # μ ← μ + rate·μ₀·(d̄ − d*)/d*
_PENALTY = 50.0  # the density term's coefficient is μ + penalty·μ₀·(d̄ − d*)/d*
_NOISE_EPS = 1e-6  # u is clamped to [eps, 1 − eps] before log(u/(1−u))
_CONSTRAINTS = {
    "sparsity": Interval(float, 0, 1, closed="neither"),
    "steps": Interval(int, 0, None),
    "lr": Interval(float, 0, None, closed="neither"),
    "seed": Interval(int, None, None),
    "scope": Options(SCOPES),
    "batch_size": Interval(int, 1, None),
    "init_logit": Interval(float, 0, None, closed="neither"),
    "init_width": Interval(float, 0, 1),
    "temperature": DecreasingPair(),
    "kl_weight": Interval(float, 0, None),
    "progress": Boolean(),
}


@dataclass
class LeapLayer:
    """One linear's final mask: ``kept`` of ``total`` weights, ``changed`` entries differ from Wanda's."""

    block: int
    name: str
    kept: int
    total: int
    changed: int


@dataclass
class LeapReport:
    """Returned by :func:`leap_prune`.  ``history`` has one entry per training step; memory in bytes."""

    settings: dict[str, Any]
    seconds: float = 0.0
    wanda_seconds: float = 0.0
    peak_memory: dict[str, int] = field(default_factory=dict)
    layers: list[LeapLayer] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable weights set to zero."""
        return 1 - sum(r.kept for r in self.layers) / sum(r.total for r in self.layers)

    @property
    def changed(self) -> float:
        """Fraction of the prunable weights whose keep/prune decision differs from Wanda's."""
        return sum(r.changed for r in self.layers) / sum(r.total for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"sparsity": self.sparsity, "changed": self.changed}

    def summary(self) -> str:
        """Per linear name: the range of sparsities over blocks and the share changed; then the totals."""
        lines = [f"{'linear':<10}{'blocks':>7}{'sparsity min-max':>19}{'changed vs Wanda':>18}"]
        for name in dict.fromkeys(r.name for r in self.layers):
            rs = [r for r in self.layers if r.name == name]
            s = [1 - r.kept / r.total for r in rs]
            changed = sum(r.changed for r in rs) / sum(r.total for r in rs)
            lines.append(f"{name:<10}{len(rs):>7}{f'{min(s):.3f}-{max(s):.3f}':>19}{changed:>18.2%}")
        last = self.history[-1] if self.history else {}
        lines.append(
            f"sparsity {self.sparsity:.4f}, {self.changed:.2%} of the mask changed vs Wanda; "
            f"{len(self.history)} steps, last loss {last.get('loss', float('nan')):.3f}; time {self.seconds:.1f} s "
            f"(Wanda {self.wanda_seconds:.1f} s); "
            + peak_memory_text(self.peak_memory)
        )
        return "\n".join(lines)


def leap_prune(
    model: nn.Module,
    calib: Any,
    sparsity: float = 0.5,
    *,
    steps: int = 200,
    lr: float = 0.05,
    blocks: None | int | Sequence[int] | Sequence[Sequence[int]] = None,
    seed: int = 0,
    scope: str = "global",
    batch_size: int = 1,
    train_seqlen: int | None = None,
    init_logit: float = 5.0,
    init_width: float = 0.05,
    temperature: tuple[float, float] = (1.0, 0.05),
    kl_weight: float = 0.0,
    tokenizer=None,
    progress: bool = True,
) -> tuple[nn.Module, LeapReport]:
    """Prune ``model`` in place with LEAP's learned unstructured masks and return ``(model, report)``.

    Parameters
    ----------
    model : transformers causal LM
        A supported family (:data:`spap.adapters.ADAPTERS`, or a found layout), on the device to train
        on.  Modified in place: only pruned weights change (to zero), and only when the run completes.
    calib : LongTensor (n, seq), list of str, or iterable of LongTensor batches (batch, seq)
        Calibration windows (see :func:`spap.capture.calibration_batches`), all of one length: the
        Wanda statistics and the training loss both use them.
    sparsity : float in (0, 1), default 0.5
        Fraction of the weights of every prunable linear (q, k, v, o, gate, up, down) to prune.
    steps : int >= 0, default 200
        Adam steps per group of blocks (``0``: Wanda's mask, through the same projection).
    lr : float > 0, default 0.05
        Adam learning rate of the logits (logit units per step, roughly).
    blocks : None, int, sequence of int, or sequence of sequences of int
        Which blocks' masks are learned, and how many at once.  ``None``: all blocks together.  An int
        ``k``: groups of ``k`` consecutive blocks, trained in turn.  A sequence of block indices: one
        group.  A sequence of sequences: these groups, in this order.  While a group trains, every
        other block runs with its current hard mask (Wanda's until its group is trained, its learned
        one after), so each group learns its mask inside the pruned model; a block in no group keeps
        Wanda's mask.  Memory is that of the largest group (see the module docstring).
    seed : int, default 0
        Seeds the mask noise and the order of the training windows: a run is reproducible.
    scope : {"global", "layer", "row"}, default "global"
        Where the final top-k of the logits is taken: over all linears of a group (each layer's
        sparsity is learned; the group has exactly Wanda's total), per linear, or per output row
        (Wanda's comparison group and per-row counts).
    batch_size : int >= 1, default 1
        Calibration windows per training step.
    train_seqlen : int >= 2, optional
        Tokens per training window: a random crop of each calibration window drawn (default: whole
        windows).  Lets the Wanda start use long windows (its cost is one pass) while each training
        step stays short.
    init_logit : float > 0, default 5.0
        ``a``: the starting logit is ``+a`` where Wanda keeps a weight and ``−a`` where it prunes it,
        except near Wanda's threshold (``init_width``).
    init_width : float in [0, 1], default 0.05
        The fraction of each row's weights on either side of Wanda's threshold (by the rank of
        ``|W_ij|·‖x_j‖₂`` in the row) whose starting logits ramp linearly from ``±a`` down to 0, so
        that a short training can move them.  ``0``: ``±a`` for every weight.
    temperature : (float, float), default (1.0, 0.05)
        First and last temperature ``τ`` of the relaxation, ``first >= last > 0``; geometric in between.
    kl_weight : float >= 0, default 0.0
        Weight of the KL divergence from the dense model (one more forward pass per step when > 0).
    tokenizer : optional
        Needed when ``calib`` is a list of strings.
    progress : bool, default True
        A progress bar over the training steps (loss, expected density, temperature).

    Returns
    -------
    model : the same module, pruned
    report : :class:`LeapReport`
        Per-linear kept/total and changes vs Wanda, per-step loss/density/temperature/multiplier,
        seconds, peak memory.
    """
    adapter = check_model(model, "leap_prune")
    n_blocks = len(adapter.blocks())
    check_table("leap_prune", _CONSTRAINTS, locals())
    groups = _groups(blocks, n_blocks)
    d_out, d_in = U.smallest_linear(adapter)  # its count rounds to all, or to none, first
    U.checked_prune_count(float(sparsity), d_out * d_in, units=f"weights of a {d_out}×{d_in} linear", caller="leap_prune")
    batches = calibration_batches(calib, tokenizer, batch_size=_GRAM_BATCH)
    check_calibration(batches, model, "leap_prune", min_length=2)
    if len({b.shape[1] for b in batches}) != 1:
        raise InvalidArgumentError("The 'calib' argument must hold windows of one length (LEAP batches them for "
                                   "training); use spap.data.random_windows or a LongTensor (n, seq).")
    windows = torch.cat(batches)
    if batch_size > windows.shape[0]:
        raise InvalidArgumentError(f"The 'batch_size' argument must be at most the number of calibration windows, "
                                   f"{windows.shape[0]}. Got {batch_size} instead.")
    if train_seqlen is not None:
        check_table("leap_prune", {"train_seqlen": Interval(int, 2, None)}, locals())
        if train_seqlen > windows.shape[1]:
            raise InvalidArgumentError(f"The 'train_seqlen' argument must be at most the calibration windows' "
                                       f"length, {windows.shape[1]}. Got {train_seqlen} instead.")

    settings = {"sparsity": sparsity, "steps": steps, "lr": lr, "groups": groups, "seed": seed, "scope": scope,
                "batch_size": batch_size, "train_seqlen": train_seqlen, "init_logit": init_logit,
                "init_width": init_width, "temperature": list(temperature), "kl_weight": kl_weight,
                "windows": windows.shape[0], "seqlen": windows.shape[1], "model_type": model.config.model_type}
    report = LeapReport(settings=settings)
    start = time.perf_counter()
    device = next(model.parameters()).device
    run = _Run(torch.Generator(device=device).manual_seed(seed))
    order = torch.Generator().manual_seed(seed + 1)
    was_training = model.training
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    layers: list[_MaskedLinear] = []
    try:
        model.eval()
        for p, _ in requires_grad:
            p.requires_grad_(False)
        _wanda_init(model, adapter, batches, float(sparsity), device, run, layers)
        report.wanda_seconds = time.perf_counter() - start
        bar = _progress(steps * len(groups), progress)
        stream = _windows(windows, batch_size, train_seqlen, order)
        for g, group in enumerate(groups):
            trained = [layer for layer in layers if layer.block in group]
            _train(model, trained, stream, g, steps, lr, init_logit, init_width, temperature, kl_weight, scope, run,
                   bar, report)
        if bar is not None:
            bar.close()
        for layer in layers:  # the model changes only here, once every mask is final
            layer.view.weight.masked_fill_(~layer.keep.to(layer.view.weight.device), 0)
            report.layers.append(LeapLayer(layer.block, layer.name, int(layer.keep.sum()), layer.keep.numel(),
                                           layer.changed))
    finally:
        for layer in layers:
            layer.detach()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    report.peak_memory = peak_memory(device)
    return model, report


# ---------------------------------------------------------------------------------------------------
# Masked linears


class _Run:
    """State shared by every masked linear of one run: dense or masked forward, temperature, noise."""

    def __init__(self, noise: torch.Generator) -> None:
        self.noise = noise
        self.dense = False
        self.tau = 1.0


class _MaskedLinear:
    """Replaces one linear's ``forward`` with ``x ↦ x (W ⊙ m)ᵀ + b``.

    ``m`` is the hard mask ``keep`` (bool, shape ``(d_out, d_in)``) or, while ``logits`` is set, a
    fresh relaxed Bernoulli sample ``σ((θ + L)/τ)`` per call.  ``W`` is never written until
    :func:`leap_prune` applies the final masks.
    """

    def __init__(self, block: int, name: str, module: nn.Module, keep: torch.Tensor, norms: torch.Tensor,
                 run: _Run) -> None:
        self.block, self.name, self.module, self.run = block, name, module, run
        self.view = LinearView(module)
        self.keep = keep  # bool (d_out, d_in): Wanda's, then the learned one
        self.row_kept = keep.sum(1)  # Wanda's per-row counts: the targets of every projection
        self.norms = norms  # ‖x_j‖₂ of the calibration inputs, shape (d_in,)
        self.logits: nn.Parameter | None = None
        self.changed = 0
        module.forward = self.forward  # instance attribute: shadows the class's forward until detached

    def initial_logits(self, a: float, width: float) -> torch.Tensor:
        """``±a`` by Wanda's decision, scaled down near its threshold, shape ``(d_out, d_in)``, float32:
        ``θ = ±a·min(1, |r − k + ½|/(width·n))`` with ``r`` the ascending rank of ``|W_ij|·‖x_j‖₂`` in
        its row of ``n`` and ``k`` the row's pruned count (``width=0``: ``±a`` everywhere)."""
        theta = torch.full(self.keep.shape, -float(a), device=self.keep.device).masked_fill_(self.keep, float(a))
        if width == 0:
            return theta
        scores = self.view.weight.float().abs() * self.norms.to(self.keep.device)[None, :]
        order = torch.argsort(scores, dim=1, stable=True)
        n = scores.shape[1]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
        distance = (rank - (n - self.row_kept)[:, None]).float().add_(0.5).abs_().div_(width * n).clamp_(max=1)
        return theta.mul_(distance)

    def detach(self) -> None:
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, b = self.view.weight, self.view.bias
        if self.run.dense:
            return F.linear(x, W, b)
        if self.logits is None:
            return _MaskedLinearFn.apply(x, W, b, self.keep, None, 1.0)
        with torch.no_grad():
            u = torch.rand(W.shape, generator=self.run.noise, device=W.device, dtype=torch.float32)
            mask = u.logit_(_NOISE_EPS).add_(self.logits).div_(self.run.tau).sigmoid_()
        return _MaskedLinearFn.apply(x, W, b, mask, self.logits, self.run.tau)


class _MaskedLinearFn(torch.autograd.Function):
    """``y = x (W ⊙ m)ᵀ + b`` with ``m = σ((θ + L)/τ)`` computed by the caller; gradients for ``x`` and
    ``θ`` only (``∂y/∂θ`` through ``∂m/∂θ = m(1 − m)/τ``).  Saves ``x`` and ``m``, not ``W ⊙ m``,
    which the backward pass recomputes: one weight-sized tensor per linear instead of two."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, logits, tau):
        ctx.save_for_backward(x, weight, mask)
        ctx.tau = tau
        return F.linear(x, (weight * mask).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight * mask).to(grad_out.dtype)
        if ctx.needs_input_grad[4]:
            g = grad_out.reshape(-1, grad_out.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
            grad_logits = g.mul_(weight).mul_(mask).mul_(1 - mask).div_(ctx.tau)
        return grad_x, None, None, None, grad_logits, None


# ---------------------------------------------------------------------------------------------------
# Wanda start


def _wanda_init(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], sparsity: float,
                device: torch.device, run: _Run, layers: list[_MaskedLinear]) -> None:
    """Wanda's mask for every prunable linear, as :func:`spap.prune_layerwise` (``method="wanda"``,
    ``structure="unstructured"``, pruned propagation) computes it; each linear is left masked."""
    blocks = adapter.blocks()
    wanda = solvers.get_solver("wanda")
    with torch.no_grad():
        hidden, kwargs = capture_block_inputs(model, blocks, batches, device, device)
        for i, block in enumerate(blocks):
            groups = adapter.linear_groups(block)
            hooks = GramHooks({next(iter(g)): next(iter(g.values())) for g in groups}, device, torch.float32)
            try:
                for b, h in enumerate(hidden):
                    run_block(block, h, kwargs[i][b], device)
            finally:
                hooks.remove()
            for key, acc in hooks.accumulators.items():
                if not torch.isfinite(acc.H).all():
                    raise FloatingPointError(f"NaN or Inf in the calibration inputs of block {i} ({key}).")
            for g in groups:
                acc = hooks.accumulators[next(iter(g))]
                for name, module in g.items():
                    weight = LinearView(module).weight  # the count, checked by leap_prune before any work
                    problem = solvers.LayerProblem(weight, acc.H, solvers.Unstructured(),
                                                   n_prune=U.prune_count(sparsity, weight.numel()))
                    _, keep, _ = wanda.fn(problem)  # the registered function: the mask without the error report
                    norms = acc.H.diagonal().clamp_min(0).sqrt().float()
                    layers.append(_MaskedLinear(i, name, module, keep, norms, run))
            for b, h in enumerate(hidden):  # the pruned block's outputs feed the next block
                hidden[b] = finite(run_block(block, h, kwargs[i][b], device), f"output of block {i}")


# ---------------------------------------------------------------------------------------------------
# Training one group


def _train(model: nn.Module, trained: list[_MaskedLinear], stream, group: int, steps: int, lr: float,
           init_logit: float, init_width: float, temperature: tuple[float, float], kl_weight: float, scope: str,
           run: _Run, bar, report: LeapReport) -> None:
    """Learn the logits of ``trained`` for ``steps`` steps, then set their hard masks (``scope``)."""
    for layer in trained:
        layer.logits = nn.Parameter(layer.initial_logits(init_logit, init_width))
    params = [layer.logits for layer in trained]
    n = sum(p.numel() for p in params)
    target = sum(int(layer.row_kept.sum()) for layer in trained) / n  # Wanda's density, 1 − sparsity
    try:
        optimizer = torch.optim.Adam(params, lr=lr)
        mu = None
        with torch.no_grad():
            gap = (sum(float(torch.sigmoid(p).sum()) for p in params) / n - target) / target
        first, last = temperature
        for t in range(steps):
            run.tau = first * (last / first) ** (t / max(steps - 1, 1))
            ids = next(stream).to(params[0].device)
            ce, kl = _loss(model, ids, kl_weight, run)
            loss = ce + kl_weight * kl if kl_weight else ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is None:  # a linear the loss does not reach
                        p.grad = torch.zeros_like(p)
                if mu is None:
                    mu = mu0 = _initial_multiplier(params, n, target)
                c = mu + _PENALTY * mu0 * gap  # the augmented Lagrangian's coefficient (last step's gap)
                density = 0.0
                for p in params:  # the density term's gradient, added to the loss's: c σ(θ)(1 − σ(θ)) / n
                    s = torch.sigmoid(p)
                    density += float(s.sum())
                    p.grad.add_(s.mul_(1 - s), alpha=c / n)
                density /= n
            optimizer.step()
            report.history.append({"group": group, "step": t, "loss": loss.item(), "ce": ce.item(),
                                   "kl": kl.item(), "density": density, "tau": run.tau, "mu": c})
            gap = (density - target) / target
            mu += _DUAL_RATE * mu0 * gap
            if bar is not None:
                bar.set_postfix(group=group, loss=f"{float(loss):.3f}", density=f"{density:.4f}", tau=f"{run.tau:.3f}")
                bar.update()
        del optimizer
        for p in params:
            p.grad = None
            if not torch.isfinite(p).all():
                raise FloatingPointError(f"NaN or Inf in the mask logits of group {group}; lower 'lr'.")
        with torch.no_grad():
            keeps = _project([p.detach() for p in params], [layer.row_kept for layer in trained], scope)
    finally:
        for layer in trained:
            layer.logits = None
    for layer, keep in zip(trained, keeps):
        layer.changed = int((keep != layer.keep).sum())
        layer.keep = keep


def _loss(model: nn.Module, ids: torch.Tensor, kl_weight: float, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of the masked model on ``ids`` (batch, seq), and the KL divergence
    from the dense model's next-token distribution (0 when ``kl_weight`` is 0); means over tokens."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    log_q = logits.log_softmax(-1)
    ce = F.nll_loss(log_q.flatten(0, 1), ids[:, 1:].flatten())
    if not kl_weight:
        return ce, torch.zeros(())
    with torch.no_grad():
        run.dense = True
        try:
            log_p = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        finally:
            run.dense = False
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return ce, kl


def _initial_multiplier(params: list[nn.Parameter], n: int, target: float) -> float:
    """``μ`` such that a fraction ``target`` of the logits have ``|∂CE/∂θ|`` above the density term's
    ``μ σ'(θ)/n``: the ``1 − target`` quantile of ``|∂CE/∂θ| / σ'(θ)``, times ``n`` (estimated on at
    most 2²⁰ evenly spaced logits)."""
    stride = max(1, n >> 20)
    ratios = []
    for p in params:
        s = torch.sigmoid(p.flatten()[::stride])
        ratios.append(p.grad.flatten()[::stride].abs() / (s * (1 - s)))
    q = float(torch.quantile(torch.cat(ratios).double(), 1 - target))
    return max(q, 1e-12) * n


# ---------------------------------------------------------------------------------------------------
# Exact projection


def _project(logits: list[torch.Tensor], row_kept: list[torch.Tensor], scope: str) -> list[torch.Tensor]:
    """Keep masks with the largest logits: per row (``row_kept[l][i]`` in row ``i`` of linear ``l``),
    per linear (``row_kept[l].sum()``) or over all linears (the sum of those).  Ties go to the lower
    index (row-major within a linear, linears in order)."""
    if scope == "row":
        return [keep_largest_per_row(theta, counts) for theta, counts in zip(logits, row_kept)]
    if scope == "layer":
        return [keep_largest_across([theta], int(counts.sum()))[0] for theta, counts in zip(logits, row_kept)]
    return keep_largest_across(logits, sum(int(c.sum()) for c in row_kept))


# ---------------------------------------------------------------------------------------------------
# Arguments, windows, progress


def _groups(blocks: Any, n_blocks: int) -> list[list[int]]:
    """``blocks`` as a list of groups of block indices (see :func:`leap_prune`)."""
    allowed = (f"The 'blocks' argument must be None, a group size (int >= 1), a sequence of block indices or a "
               f"sequence of such sequences, with indices in [0, {n_blocks}) used once.")
    if blocks is None:
        return [list(range(n_blocks))]
    if isinstance(blocks, numbers.Integral) and not isinstance(blocks, bool):
        if blocks < 1:
            raise InvalidArgumentError(f"{allowed} Got {blocks!r} instead.")
        return [list(range(i, min(i + blocks, n_blocks))) for i in range(0, n_blocks, blocks)]
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        raise InvalidArgumentError(f"{allowed} Got {blocks!r} instead.")
    nested = all(isinstance(g, Sequence) and not isinstance(g, str) for g in blocks)
    groups = [list(g) for g in blocks] if nested else [list(blocks)]
    flat = [i for g in groups for i in g]
    valid = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < n_blocks for i in flat)
    if not valid or not all(groups) or len(flat) != len(set(flat)):
        raise InvalidArgumentError(f"{allowed} Got {blocks!r} instead.")
    return [[int(i) for i in g] for g in groups]


def _windows(windows: torch.Tensor, batch_size: int, seqlen: int | None, generator: torch.Generator):
    """Endless batches ``(batch_size, seqlen)``: each pass over the windows in a fresh random order, each
    window cropped at a random offset to ``seqlen`` tokens (``None``: whole windows)."""
    length = windows.shape[1]
    seqlen = seqlen or length
    while True:
        order = torch.randperm(windows.shape[0], generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            starts = torch.randint(length - seqlen + 1, (batch_size,), generator=generator)
            yield torch.stack([windows[w, s : s + seqlen] for w, s in zip(order[i : i + batch_size], starts)])


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="LEAP", unit="step")
