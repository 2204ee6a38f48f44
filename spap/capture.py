"""Calibration batches, first-block inputs, and Gram matrices of a block's linears.

The inputs of the first decoder block are captured with *all* its call arguments (attention mask,
position ids and embeddings, cache position, ...) by a forward pre-hook that records them and stops the
forward pass.  Whatever a transformers version passes to its blocks is replayed as is, so the pipeline
does not depend on the signature of any one version.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import solvers

from .adapters import LinearView, block_output
from .checks import InvalidArgumentError


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def calibration_batches(calib: Any, tokenizer=None, *, batch_size: int = 8) -> list[torch.Tensor]:
    """Normalise ``calib`` to a list of LongTensors of token ids, each ``(batch, seq)``.

    Accepts a list of strings (tokenized with ``tokenizer``, one sequence each, no padding: give them
    equal token lengths, or use :func:`spap.data.random_windows`), an integer tensor ``(n, seq)`` (split
    into batches of ``batch_size``), or an iterable of such tensors (or 1-D ones) or of dicts with
    ``"input_ids"`` (a tokenizer's output, one mapping or several).  Whether the ids fit a model is
    :func:`check_calibration`'s job.
    """
    if isinstance(calib, Mapping):
        if "input_ids" not in calib:
            raise InvalidArgumentError(f"The 'calib' argument is a mapping without 'input_ids' (its keys: "
                                       f"{', '.join(map(repr, list(calib)[:6]))}).")
        return calibration_batches(calib["input_ids"], tokenizer, batch_size=batch_size)
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or not _integer(calib) or calib.shape[0] == 0:
            raise InvalidArgumentError(f"The 'calib' argument as a tensor must be a non-empty (n, seq) tensor of token "
                                       f"ids. Got shape {tuple(calib.shape)} and dtype {calib.dtype}.")
        return list(calib.long().split(batch_size))
    if isinstance(calib, str):
        raise InvalidArgumentError("The 'calib' argument must be a list of strings, not one string.")
    if isinstance(calib, Sequence) and calib and all(isinstance(t, str) for t in calib):
        if tokenizer is None:
            raise InvalidArgumentError("The 'calib' argument is a list of strings, so the 'tokenizer' argument is required.")
        ids = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for t in calib]
        lengths = {len(i) for i in ids}
        if len(lengths) != 1:
            # Unequal lengths: one sequence per batch (no padding, so no mask to get wrong).
            return [i[None] for i in ids if len(i) > 0]
        return list(torch.stack(ids).split(batch_size))
    if isinstance(calib, Iterable):
        batches = []
        for i, b in enumerate(calib):
            if isinstance(b, Mapping):
                if "input_ids" not in b:
                    raise InvalidArgumentError(f"The 'calib' argument: batch {i} is a dict without 'input_ids' (its keys: "
                                               f"{', '.join(map(repr, list(b)[:6]))}).")
                b = b["input_ids"]
            if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2) or not _integer(b):
                what = f"a {b.dtype} tensor of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
                raise InvalidArgumentError(f"The 'calib' argument: every batch must be a 1-D or 2-D integer tensor of "
                                           f"token ids. Batch {i} is {what}.")
            batches.append((b[None] if b.ndim == 1 else b).long())
        if batches:
            return batches
    raise InvalidArgumentError(
        "The 'calib' argument must be a non-empty list of strings, a LongTensor (n, seq) of token ids, or an "
        f"iterable of such batches. Got {type(calib).__name__}."
    )


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_calibration(batches: list[torch.Tensor], model: nn.Module, caller: str, *, min_length: int = 1) -> None:
    """Refuse, naming the 'calib' argument of ``caller``, batches that ``model`` cannot run: none at all,
    a batch with no sequence or with sequences shorter than ``min_length`` tokens, a token id outside
    ``[0, vocabulary)`` (the rows of the input embedding), or sequences longer than the model's
    positions (``config.max_position_embeddings``, GPT-2's ``n_positions``).  Without it these end in an
    ``IndexError`` deep in torch or transformers, or, for rotary positions, in positions the model never
    saw.  One pass over the ids; no model work."""
    if not batches:
        raise InvalidArgumentError(f"The 'calib' argument of {caller} holds no sequence.")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = embedding.weight.shape[0] if embedding is not None else model.config.vocab_size
    positions = getattr(model.config, "max_position_embeddings", None)
    for i, b in enumerate(batches):
        if b.shape[0] == 0 or b.shape[1] < min_length:
            raise InvalidArgumentError(f"The 'calib' argument of {caller}: batch {i} has shape {tuple(b.shape)}; every "
                                       f"batch needs sequences of at least {min_length} token{'s' * (min_length > 1)}.")
        low, high = int(b.min()), int(b.max())
        if low < 0 or high >= vocab:
            raise InvalidArgumentError(f"The 'calib' argument of {caller}: batch {i} holds token id "
                                       f"{low if low < 0 else high}, outside the model's vocabulary [0, {vocab}).")
        if positions is not None and b.shape[1] > positions:
            raise InvalidArgumentError(f"The 'calib' argument of {caller}: batch {i} has sequences of {b.shape[1]} "
                                       f"tokens, more than the model's {positions} positions.")


def to_device(x: Any, device: torch.device | str) -> Any:
    """``x`` with every tensor inside it (tuples, lists, dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                         device: torch.device, store: torch.device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first block's hidden states for every batch, and every block's keyword arguments.

    Returns ``(hidden, kwargs)``: ``hidden[b]`` is the input of block 0 for batch ``b`` (on ``store``)
    and ``kwargs[i][b]`` the keyword arguments the model passes to block ``i`` for batch ``b`` (on
    ``device``).  Blocks can receive different arguments: Gemma 2/3 give sliding-window layers their own
    mask and, in Gemma 3, their own rotary tables, so replaying block 0's arguments everywhere would be
    wrong.  While capturing, every block's ``forward`` is replaced by a recorder that returns its input
    untouched and the last one stops the pass, so no block is computed: the cost is the embeddings.
    """
    hidden: list[torch.Tensor] = []
    per_block: list[list[dict]] = [[] for _ in blocks]

    def recorder(i: int):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            per_block[i].append({k: v for k, v in kwargs.items() if k not in _CACHE_ARGS})
            if i == 0:
                hidden.append(h.detach().to(store))
            if i == len(blocks) - 1:
                raise _Stop
            return h  # ignored: the next recorder only looks at its keyword arguments

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # instance attribute: shadows the class's forward until deleted
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for block in blocks:
            del block.forward
    if any(len(kw) != len(batches) for kw in per_block):
        raise RuntimeError("Not every decoder block was called once per calibration batch; the model's forward "
                           "does not run its blocks in order, which the pipeline needs.")
    return hidden, share_equal(per_block)


_CACHE_ARGS = ("past_key_value", "past_key_values", "use_cache")


def share_equal(per_block: list[list[dict]]) -> list[list[dict]]:
    """Replace equal keyword values by one shared object (masks and rotary tables are equal across
    equal-shaped batches and across most blocks), so that 30 blocks × 8 batches do not hold 240 copies
    of a 4-D attention mask."""
    seen: list[Any] = []

    def shared(v: Any) -> Any:
        if isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v)):
            for u in seen:
                if _equal(u, v):
                    return u
            seen.append(v)
        return v

    return [[{k: shared(v) for k, v in kw.items()} for kw in block] for block in per_block]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    """One block's output for one batch (see :func:`block_output`)."""
    return block_output(block(hidden.to(device), **kwargs))


class GramHooks:
    """Forward pre-hooks that stream the inputs of some linears into float64 Gram accumulators.

    ``modules`` maps a name to a linear; linears that share an input should be given once (the first of
    the group), since the pipeline shares the Gram matrix.  With ``cross`` every forward pass alternates:
    a *reference* pass (``recording = True``: the dense model's inputs, only kept) and then a pass over the
    same tokens whose inputs are accumulated together with the reference (``C = Σ x_ref xᵀ``, see
    :func:`solvers.corrected_weight`).  ``seconds`` is the wall time spent accumulating (on CUDA the
    device is synchronised around each product so that the forward pass is not counted in it).
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, product_dtype: torch.dtype = torch.float64,
                 *, cross: bool = False) -> None:
        self.accumulators: dict[str, solvers.GramAccumulator] = {}
        self.recording = False
        self.seconds = 0.0
        self._sync = device.type == "cuda"
        self._references: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, module in modules.items():
            d_in = LinearView(module).d_in
            acc = self.accumulators[name] = solvers.GramAccumulator(d_in, device=device, product_dtype=product_dtype,
                                                                    cross=cross)
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name, acc=acc: self._add(name, acc, args[0])))

    def _add(self, name: str, acc: solvers.GramAccumulator, x: torch.Tensor) -> None:
        if self.recording:
            self._references[name] = x.detach()
            return
        if self._sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        if acc.C is not None:
            acc.add_batch(x, reference=self._references.pop(name))
        else:
            acc.add_batch(x)
        if self._sync:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start

    def add_reference(self, name: str, module: nn.Module) -> None:
        """Take ``name``'s reference input (``cross``) from ``module`` instead, another copy of the linear
        (the dense block's, when the watched block is already partly pruned)."""
        def record(m, args, name=name):
            if self.recording:
                self._references[name] = args[0].detach()

        self._handles.append(module.register_forward_pre_hook(record))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ExpertGrams:
    """A forward pre-hook on a block's experts module (:class:`spap.adapters.Experts`) that streams, for
    every expert, the inputs of its down projection on the tokens routed to it into a float64 Gram
    accumulator of its own (``accumulators[e]``, ``width`` inputs each) and, with ``inputs``, the inputs
    of its ``[gate; up]`` projection (the routed hidden states) into ``input_accumulators[e]``.

    Each input is scaled by the token's routing weight: the expert's output enters the block's output
    multiplied by it, so ``H_e = Σ w² x xᵀ`` makes the expert's problem the error it adds to the block's
    output.  An expert no calibration token is routed to keeps an empty accumulator
    (``n_samples == 0``).  ``seconds`` as in :class:`GramHooks`.
    """

    def __init__(self, experts, device: torch.device, product_dtype: torch.dtype = torch.float64, *,
                 inputs: bool = False) -> None:
        self.experts = experts
        self.accumulators = [solvers.GramAccumulator(experts.width, device=device, product_dtype=product_dtype)
                             for _ in range(experts.n)]
        self.input_accumulators = [solvers.GramAccumulator(experts.hidden, device=device, product_dtype=product_dtype)
                                   for _ in range(experts.n)] if inputs else None
        self.seconds = 0.0
        self._sync = device.type == "cuda"
        self._handle = experts.record(self._add)

    def _add(self, e: int, tokens: torch.Tensor, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
        if self._sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        self.accumulators[e].add_batch(x * weight[:, None].to(x.dtype))
        if self.input_accumulators is not None:
            self.input_accumulators[e].add_batch(h * weight[:, None].to(h.dtype))
        if self._sync:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start

    def remove(self) -> None:
        self._handle.remove()


def forward_pass(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: torch.device,
                 offload: torch.device) -> list[torch.Tensor]:
    """One forward pass of ``batches`` through the decoder blocks, run as the prune runs it: the
    embeddings, then each block moved to ``device`` in turn over every batch, its outputs kept on
    ``offload``, and moved back.  Nothing is recorded: this is the pass no layer-wise prune avoids.
    Returns the last block's output for every batch (on ``offload``)."""
    with outside_blocks_on(model, blocks, device):
        hidden, kwargs = capture_block_inputs(model, blocks, batches, device, offload)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            home = next(block.parameters()).device
            block.to(device)
            for b, h in enumerate(hidden):
                hidden[b] = run_block(block, h, kwargs[i][b], device).to(offload)
            block.to(home)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return hidden


class outside_blocks_on:
    """Temporarily move every parameter and buffer outside the decoder blocks to ``device``."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        self.model, self.device = model, device
        inside = {id(m) for m in blocks.modules()}
        self.modules = [m for m in model.modules() if id(m) not in inside]
        self.home: list[tuple[nn.Module, torch.device]] = []

    def __enter__(self):
        for m in self.modules:
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                self.home.append((m, t.device))
                break
            move_direct(m, self.device)
        return self

    def __exit__(self, *exc):
        for m, dev in self.home:
            move_direct(m, dev)
        return False


def move_direct(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s own parameters (in place, so references stay valid) and buffers to ``device``."""
    for name, p in list(module.named_parameters(recurse=False)):
        p.data = p.data.to(device)
    for name, b in list(module.named_buffers(recurse=False)):
        module._buffers[name] = b.to(device)
