"""Evaluation: perplexity with the standard protocol, zero-shot accuracy (:mod:`spap.zeroshot`), and
generation speed."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from .zeroshot import TASKS, TaskResult, table as zeroshot_table, zeroshot

__all__ = ["perplexity", "throughput", "tokens_per_second", "zeroshot", "zeroshot_table", "TaskResult", "TASKS"]


def perplexity(model: nn.Module, tokenizer, text_or_rows: str | Sequence[str], *, seqlen: int = 2048,
               max_windows: int | None = None, device: str | torch.device | None = None, progress: bool = False) -> float:
    """Perplexity over non-overlapping windows of ``seqlen`` tokens.

    The standard protocol of SparseGPT/Wanda: join the rows with ``"\\n\\n"``, tokenize once, cut into
    consecutive windows of ``seqlen`` tokens, drop the remainder, and average the next-token negative
    log-likelihood over every predicted token of the first ``max_windows`` windows (all by default).
    """
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"The 'seqlen' argument must be an int ≥ 2. Got {seqlen!r}.")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows <= 0):
        raise ValueError(f"The 'max_windows' argument must be a positive int or None. Got {max_windows!r}.")
    text = text_or_rows if isinstance(text_or_rows, str) else "\n\n".join(text_or_rows)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The text holds {ids.numel()} tokens, fewer than one window of seqlen={seqlen}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll, count = 0.0, 0
    windows = range(n)
    if progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, desc="perplexity", unit="window")
    with torch.no_grad():
        for w in windows:
            x = ids[w * seqlen : (w + 1) * seqlen][None].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            nll += float(loss)
            count += seqlen - 1
    return math.exp(nll / count)


def throughput(model: nn.Module, *, prompt_len: int = 128, new_tokens: int = 32, batch: int = 1,
               device: str | torch.device | None = None, repeats: int = 1, warmup: int = 0) -> dict[str, list[float]]:
    """Prefill and decode throughput of every repeat, in tokens/s: ``{"prefill": [...], "decode": [...]}``.

    Prefill is one forward pass over ``batch`` random prompts of ``prompt_len`` tokens with the KV cache
    on; decode is ``new_tokens`` greedy steps of ``batch`` tokens each from that cache.  ``warmup``
    untimed repeats come first (allocator and kernel selection).  CUDA work is synchronised before
    each clock read.
    """
    for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("batch", batch, 1),
                             ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"The '{name}' argument must be an int >= {low}. Got {value!r}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # transformers 5 names the key-value cache `cache` (argument and output); `past_key_values` before.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: dict[str, list[float]] = {"prefill": [], "decode": []}
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = clock()
            res = model(input_ids=x, use_cache=True)
            t1 = clock()
            past, nxt = res[key], res.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                res = model(input_ids=nxt, use_cache=True, **{key: past})
                past, nxt = res[key], res.logits[:, -1:].argmax(-1)
            t2 = clock()
            if i >= warmup:
                out["prefill"].append(batch * prompt_len / (t1 - t0))
                out["decode"].append(batch * new_tokens / (t2 - t1))
    return out


def tokens_per_second(model: nn.Module, *, prompt_len: int = 128, new_tokens: int = 32, batch: int = 1,
                      device: str | torch.device | None = None, repeats: int = 1) -> dict[str, float]:
    """Prefill and decode throughput (tokens/s) with greedy generation of random prompts (best of ``repeats``)."""
    runs = throughput(model, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, device=device, repeats=repeats)
    return {k: max(v) for k, v in runs.items()}
