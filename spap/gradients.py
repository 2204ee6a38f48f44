"""Output-gradient Gram matrices ``G = Σ g gᵀ`` of chosen linears, for the loss-aware output metric.

``g`` is the gradient of the calibration loss (next-token cross-entropy, summed over tokens) with
respect to a linear's output at one token; ``G`` weights that linear's output error by how much the
loss cares about each output direction (:class:`solvers.OutputMetric`).  One forward and one backward
pass of the *dense* model per calibration sequence: the weights do not need gradients (they are switched
off for the pass), so the backward pass computes activation gradients only, about the cost of the
forward pass again.  The whole model runs on one device for it.

The language-model head runs on a few positions at a time (``head_chunk``): its logits, a
``(positions, vocab)`` matrix with a vocabulary of tens of thousands, would otherwise be the largest
tensors of the pass, three times over (logits, log-softmax and their gradient).  The blocks' forward
stops at the last block's output; the head's gradient with respect to that output is accumulated chunk
by chunk and then sent back through the blocks in one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .adapters import LinearView, block_output, get_adapter


def output_gradient_grams(model: nn.Module, batches: list[torch.Tensor], modules: dict[Hashable, nn.Module], *,
                          diagonal: Collection[Hashable] = frozenset(), n_sequences: int,
                          device: torch.device, blocks: nn.ModuleList | None = None,
                          head_chunk: int = 256, recompute: bool = True) -> dict[Hashable, torch.Tensor]:
    """``G`` for every linear of ``modules`` from the first ``n_sequences`` calibration sequences.

    Parameters
    ----------
    model : causal LM
        The dense model; its parameters, devices and training mode are unchanged afterwards.
    batches : list of LongTensor (batch, seq)
        Calibration token ids; the first ``n_sequences`` rows (in order) are used, one at a time.
    modules : dict of key → linear (any hashable key)
        The linears whose output gradients are wanted (``nn.Linear`` or GPT-2's ``Conv1D``).
    diagonal : collection of keys
        Linears for which only ``diag G`` is kept (shape ``(d_out,)``; row structures use no more).
    n_sequences : int
        How many calibration sequences the backward passes run.
    device : torch.device
        Where the model runs for the pass (it is moved there and back).
    blocks : nn.ModuleList, optional
        The decoder blocks, to name the first one whose output is NaN or Inf when the loss is (default:
        the adapter's).
    head_chunk : int
        Positions per evaluation of the language-model head (memory, not the result: the loss is a sum
        over positions).
    recompute : bool
        Keep only each block's input from the forward pass and recompute the block's activations during
        the backward pass (activation checkpointing, one more forward pass of the blocks): the memory of
        the pass is then one block's activations, not every block's.

    Raises ``FloatingPointError`` when the loss of a sequence is NaN or Inf (naming the first such block).

    Returns
    -------
    dict of key → float64 tensor on ``device``: ``(d_out, d_out)``, or ``(d_out,)`` for ``diagonal``.
    """
    grams: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        d_out = LinearView(module).d_out
        shape = (d_out,) if name in diagonal else (d_out, d_out)
        grams[name] = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(name: Hashable, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64)
        if name in diagonal:
            grams[name] += (g * g).sum(0)
        else:
            grams[name] += g.T @ g

    def on_output(name: Hashable):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: add(name, grad))
        return hook

    adapter = get_adapter(model)
    blocks = adapter.blocks() if blocks is None else blocks
    handles = [m.register_forward_hook(on_output(name)) for name, m in modules.items()]
    bad_blocks: list[int] = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(
            lambda m, args, out, i=i: bad_blocks.append(i) if not torch.isfinite(
                block_output(out)).all() else None))
    handles.append(blocks[-1].register_forward_hook(_stop_at_last_block))  # after the NaN check
    sequences = [row for b in batches for row in b][:n_sequences]  # batches are (batch, seq)
    embed = model.get_input_embeddings()
    try:
        with _on_device_without_weight_grads(model, device), torch.enable_grad(), \
                _checkpointed(blocks if recompute else []):
            for ids in sequences:
                ids = ids.reshape(1, -1).to(device)
                x = embed(ids).detach().requires_grad_(True)  # gradients flow through activations only
                try:
                    model(inputs_embeds=x, use_cache=False)
                    raise RuntimeError("The output metric's forward pass did not reach the last decoder block.")
                except _LastBlockOutput as stop:
                    hidden = stop.hidden
                loss, grad = _head_loss_gradient(adapter, hidden, ids, head_chunk)
                if not math.isfinite(loss):
                    where = f"the output of block {bad_blocks[0]}" if bad_blocks else "the model's logits"
                    raise FloatingPointError(f"NaN or Inf in {where} of the dense model (the output metric's "
                                             "forward pass on the calibration tokens).")
                hidden.backward(grad)
    finally:
        for h in handles:
            h.remove()
    return grams


class _LastBlockOutput(Exception):
    """Ends the metric's forward pass at the last block, carrying its output (the head runs by chunks)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _stop_at_last_block(module, args, output):
    raise _LastBlockOutput(block_output(output))


def _head_loss_gradient(adapter, hidden: torch.Tensor, ids: torch.Tensor, chunk: int) -> tuple[float, torch.Tensor]:
    """The summed next-token cross-entropy of one sequence from the last block's output ``hidden``
    ``(1, seq, d)``, and its gradient with respect to ``hidden``, with the head run on ``chunk``
    positions at a time so that at most ``(chunk, vocab)`` logits exist at once."""
    grad = torch.zeros_like(hidden)
    loss = 0.0
    last = hidden.shape[1] - 1  # the last position predicts nothing
    for start in range(0, last, chunk):
        stop = min(start + chunk, last)
        piece = hidden[:, start:stop].detach().requires_grad_(True)
        logits = adapter.logits(piece)[0]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: softmax in float32
        chunk_loss = F.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="sum")
        grad[:, start:stop], = torch.autograd.grad(chunk_loss, piece)
        loss += chunk_loss.item()
    return loss, grad


@contextmanager
def _checkpointed(blocks):
    """Run every block of ``blocks`` under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, so
    the hooks on its linears see the recomputed pass as well as the first one)."""
    own = [(block, block.__dict__.get("forward")) for block in blocks]
    for block, _ in own:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        block.forward = checkpointed
    try:
        yield
    finally:
        for block, previous in own:
            if previous is None:
                del block.forward
            else:
                block.forward = previous


@contextmanager
def _on_device_without_weight_grads(model: nn.Module, device: torch.device):
    """Move every parameter and buffer to ``device``, switch off parameter gradients and put the model in
    eval mode; put all three back afterwards."""
    params = [(p, p.device, p.requires_grad) for p in model.parameters()]
    buffers = [(m, name, b.device) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    training = [(m, m.training) for m in model.modules()]
    try:
        for p, _, _ in params:
            p.data = p.data.to(device)
            p.requires_grad_(False)
        for m, name, _ in buffers:
            m._buffers[name] = m._buffers[name].to(device)
        model.eval()
        yield
    finally:
        for p, home, requires_grad in params:
            p.data = p.data.to(home)
            p.requires_grad_(requires_grad)
            p.grad = None
        for m, name, home in buffers:
            m._buffers[name] = m._buffers[name].to(home)
        for m, was in training:
            m.training = was
