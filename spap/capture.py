"""Calibration batches, first-block inputs, and Gram matrices of a block's linears.

The inputs of the first decoder block are captured with *all* its call arguments (attention mask,
position ids and embeddings, cache position, ...) by a forward pre-hook that records them and stops the
forward pass.  Whatever a transformers version passes to its blocks is replayed as is, so the pipeline
does not depend on the signature of any one version.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

import solvers


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def calibration_batches(calib: Any, tokenizer=None, *, batch_size: int = 8) -> list[torch.Tensor]:
    """Normalise ``calib`` to a list of LongTensors of token ids, each ``(batch, seq)``.

    Accepts a list of strings (tokenized with ``tokenizer``, one sequence each, no padding: give them
    equal token lengths, or use :func:`spap.data.random_windows`), a LongTensor ``(n, seq)`` (split into
    batches of ``batch_size``), or an iterable of such tensors or of dicts with ``"input_ids"``.
    """
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64) or calib.shape[0] == 0:
            raise ValueError(f"The 'calib' argument as a tensor must be a non-empty (n, seq) tensor of token ids. "
                             f"Got shape {tuple(calib.shape)} and dtype {calib.dtype}.")
        return list(calib.long().split(batch_size))
    if isinstance(calib, str):
        raise ValueError("The 'calib' argument must be a list of strings, not one string.")
    if isinstance(calib, Sequence) and calib and all(isinstance(t, str) for t in calib):
        if tokenizer is None:
            raise ValueError("The 'calib' argument is a list of strings, so the 'tokenizer' argument is required.")
        ids = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for t in calib]
        lengths = {len(i) for i in ids}
        if len(lengths) != 1:
            # Unequal lengths: one sequence per batch (no padding, so no mask to get wrong).
            return [i[None] for i in ids if len(i) > 0]
        return list(torch.stack(ids).split(batch_size))
    if isinstance(calib, Iterable):
        batches = []
        for b in calib:
            if isinstance(b, dict):
                b = b["input_ids"]
            if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2):
                raise ValueError(f"The 'calib' argument: every batch must be a tensor of token ids. Got {type(b).__name__}.")
            batches.append((b[None] if b.ndim == 1 else b).long())
        if batches:
            return batches
    raise ValueError(
        "The 'calib' argument must be a non-empty list of strings, a LongTensor (n, seq) of token ids, or an "
        f"iterable of such batches. Got {type(calib).__name__}."
    )


def _to(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def capture_first_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor],
                               device: torch.device, store: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the embeddings of every batch and return the first block's hidden states and keyword
    arguments, one per batch (hidden states on ``store``, keyword arguments on ``device``)."""
    hidden, kwargs_list = [], []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        hidden.append(h.detach().to(store))
        kwargs_list.append(kw)
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return hidden, _share_equal(kwargs_list)


def _share_equal(kwargs_list: list[dict]) -> list[dict]:
    """Reuse the previous batch's keyword arguments when they are equal (masks and rotary tables of
    equal-shaped batches are), so that 8 batches do not hold 8 copies of a 4-D attention mask."""
    out = []
    for kw in kwargs_list:
        if out and _equal(out[-1], kw):
            out.append(out[-1])
        else:
            out.append(kw)
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    """One block's output for one batch (the first element when the block returns a tuple)."""
    out = block(hidden.to(device), **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class GramHooks:
    """Forward pre-hooks that stream the inputs of some linears into float64 Gram accumulators.

    ``groups`` maps a name to a linear; linears that share an input should be given once (the first of
    the group), since the pipeline shares the Gram matrix.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, product_dtype: torch.dtype = torch.float64) -> None:
        self.accumulators: dict[str, solvers.GramAccumulator] = {}
        self._handles = []
        for name, module in modules.items():
            d_in = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features
            acc = self.accumulators[name] = solvers.GramAccumulator(d_in, device=device, product_dtype=product_dtype)
            self._handles.append(module.register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0])))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
