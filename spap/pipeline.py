"""``prune_layerwise``: prune a Hugging Face causal LM block by block.

The sequential recipe (as in SparseGPT and llm-compressor's sequential pipeline):

1. capture the first block's inputs and call arguments for every calibration batch;
2. for each block: move it alone to the compute device, run the batches through it with hooks that
   accumulate each linear's Gram matrix (float64), build one :class:`solvers.LayerProblem` per target,
   solve it, write the result into the block (removing channels/heads physically for structured
   targets), then run the batches through the *pruned* block to get the next block's inputs
   (``propagate="dense"`` keeps the dense outputs instead);
3. update the config so the smaller model saves and reloads with stock transformers.

Peak memory is one block, its Gram matrices and the calibration activations (kept on ``offload``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
from torch import nn

import solvers

from . import checkpoint as ckpt
from .adapters import Adapter, LinearView, get_adapter
from .capture import GramHooks, calibration_batches, capture_block_inputs, run_block
from .report import LayerRecord, PruneReport, count_parameters, peak_memory

STRUCTURES = ("mlp", "heads", "mlp+heads", "unstructured", "N:M")
_NM = re.compile(r"^(\d+):(\d+)$")


def _parse_structure(structure: str) -> tuple[set[str], solvers.Structure | None]:
    """``(targets, row_structure)``: targets among {"mlp", "heads"}; or the unstructured/N:M structure."""
    if not isinstance(structure, str):
        raise ValueError(f"The 'structure' argument must be one of {', '.join(STRUCTURES)} (e.g. '2:4'). Got {structure!r}.")
    if structure in ("mlp", "heads", "mlp+heads"):
        return set(structure.split("+")), None
    if structure == "unstructured":
        return set(), solvers.Unstructured()
    m = _NM.match(structure)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"The 'structure' argument {structure!r} must be N:M with 0 < N < M (N kept of every M).")
        return set(), solvers.NM(n, mm)
    raise ValueError(
        f"The 'structure' argument must be one of 'mlp', 'heads', 'mlp+heads', 'unstructured' or 'N:M' such as "
        f"'2:4'. Got {structure!r} instead."
    )


def prune_layerwise(
    model: nn.Module,
    calib: Any,
    sparsity: float = 0.3,
    *,
    method: str = "spap",
    structure: str = "mlp",
    tokenizer=None,
    method_options: dict | None = None,
    damp: float = 0.01,
    gram_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: str | torch.device = "cpu",
    propagate: str = "pruned",
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    _stop_after_blocks: int | None = None,
    _mlp_tail: bool = True,
):
    """Prune ``model`` in place, block by block, and return ``(model, report)``.

    Parameters
    ----------
    model : transformers causal LM
        A supported family (see :data:`spap.adapters.ADAPTERS`); modified in place.
    calib : list of str, LongTensor (n, seq), or iterable of LongTensor batches
        Calibration text or token ids (see :func:`spap.capture.calibration_batches`).
    sparsity : float in [0, 1), default 0.3
        Fraction of MLP channels / attention KV groups / weights pruned in every block (ignored for N:M,
        whose pattern fixes it).  Every block prunes the same count, so all blocks keep one width.
    method : str, default "spap"
        A registered solver (``solvers.available_methods()``).
    structure : {"mlp", "heads", "mlp+heads", "unstructured", "N:M"}, default "mlp"
        ``"mlp"`` prunes intermediate channels (rows of gate/up or fc1, columns of down or fc2);
        ``"heads"`` prunes whole key-value groups (all query heads of a KV head, and the KV head), which
        keeps grouped-query attention valid (OPT and GPT-2, whose head_dim is derived from the hidden
        size, keep their shapes and store the pruned heads as zeros); unstructured and N:M keep shapes and store zeros.
    tokenizer : optional
        Needed when ``calib`` is a list of strings.
    method_options : dict, optional
        Passed to the solver; checked against ``solvers.get_solver(method).options`` before any work.
    damp : float, default 0.01
        Relative damping of every Gram matrix (see ``solvers.LayerProblem``).
    gram_dtype : torch.float32 (default) or torch.float64
        Precision of each batch's ``XᵀX``; the sum over batches is float64 either way.  float32 products
        halve the capture time on CPU; docs/pipeline.md measures the effect on the solutions.
    batch_size : int, default 8
        Sequences per forward pass when ``calib`` is a tensor.
    device : str or torch.device, optional
        Where blocks run and problems are solved; default CUDA when available, else CPU.
    offload : str or torch.device, default "cpu"
        Where calibration activations live between blocks.
    propagate : {"pruned", "dense"}, default "pruned"
        Next block's inputs from the pruned block (default) or from the dense block.
    checkpoint_dir : str, optional
        Save progress after every block (block weights and next inputs) for ``resume``.
    resume : bool, default False
        Continue from the last finished block in ``checkpoint_dir``; the result is identical to an
        uninterrupted run with the same arguments.
    progress : bool, default True
        Show a progress bar over blocks.
    _stop_after_blocks, _mlp_tail
        Testing hooks: raise :class:`spap.checkpoint.Interrupted` after that many blocks (to test
        ``resume``); switch the MLP shortcut off (to test it against full second passes).

    Returns
    -------
    model : the same object, pruned in place
    report : PruneReport
        Per solved problem: block, target, structure, kept/total, relative error, seconds; totals:
        parameters before/after, wall time, solver time, peak memory.
    """
    # --- validate everything before any model work ----------------------------------------------
    adapter = get_adapter(model)
    targets, row_structure = _parse_structure(structure)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"The 'sparsity' argument must be a float in [0, 1). Got {sparsity!r} instead.")
    method_options = dict(method_options or {})
    probe = row_structure if row_structure is not None else solvers.channels(1)
    solvers.check_method(method, method_options, probe)
    if isinstance(row_structure, solvers.NM):
        widths = {LinearView(m).d_in for g in adapter.linear_groups(adapter.blocks()[0]) for m in g.values()}
        if any(w % row_structure.m for w in widths):
            raise ValueError(f"The 'structure' argument {structure!r} needs every linear's input width to be a "
                             f"multiple of {row_structure.m}; this model's widths are {sorted(widths)}.")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"The 'damp' argument must be a float >= 0. Got {damp!r} instead.")
    if gram_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"The 'gram_dtype' argument must be torch.float32 or torch.float64. Got {gram_dtype!r}.")
    if propagate not in ("pruned", "dense"):
        raise ValueError(f"The 'propagate' argument must be 'pruned' or 'dense'. Got {propagate!r} instead.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"The 'batch_size' argument must be a positive int. Got {batch_size!r} instead.")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise ValueError(f"The 'checkpoint_dir' argument must be a path or None. Got {checkpoint_dir!r} instead.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the 'checkpoint_dir' argument.")
    device = _device("device", device or ("cuda" if torch.cuda.is_available() else "cpu"))
    offload = _device("offload", offload)
    n_kv_prune = round(sparsity * adapter.n_kv_heads) if "heads" in targets else 0
    if "heads" in targets and n_kv_prune >= adapter.n_kv_heads:
        raise ValueError(f"sparsity={sparsity} would prune all {adapter.n_kv_heads} key-value groups.")
    batches = calibration_batches(calib, tokenizer, batch_size=batch_size)
    settings = {"sparsity": sparsity, "method": method, "structure": structure, "method_options": method_options,
                "damp": damp, "gram_dtype": str(gram_dtype), "propagate": propagate, "n_batches": len(batches),
                "calib_tokens": sum(b.numel() for b in batches), "model_type": model.config.model_type}

    # --- run --------------------------------------------------------------------------------------
    report = PruneReport(settings=settings, params_before=count_parameters(model))
    start = time.perf_counter()
    blocks = adapter.blocks()
    was_training = model.training
    model.eval()
    first = 0
    if resume:
        first, hidden, kwargs, records = ckpt.load(checkpoint_dir, settings, adapter, device)
        report.layers.extend(records)
    else:
        with _outside_blocks_on(model, blocks, device):
            hidden, kwargs = capture_block_inputs(model, blocks, batches, device, offload)
        if checkpoint_dir is not None:
            ckpt.start(checkpoint_dir, settings)
    bar = _progress(range(first, len(blocks)), progress, first, len(blocks))
    for i in bar:
        block_start = time.perf_counter()
        block = blocks[i]
        block.to(device)
        tail = adapter.mlp_tail(block) if (_mlp_tail and targets == {"mlp"} and propagate == "pruned") else None
        records, kept, mlp_inputs = _prune_block(adapter, block, i, hidden, kwargs[i], device, targets, row_structure,
                                                 sparsity, n_kv_prune, method, method_options, damp, propagate,
                                                 gram_dtype, tail)
        report.layers.extend(records)
        if propagate == "pruned":
            with torch.no_grad():
                for b, h in enumerate(hidden):
                    if tail is not None:
                        # `hidden` holds the residuals entering the MLP and `mlp_inputs` the inputs of its
                        # output linear (first pass): only the pruned output linear is left to compute.
                        x = mlp_inputs[b].index_select(-1, kept["mlp"].to(mlp_inputs[b].device)).to(device)
                        mlp_inputs[b] = None
                        out = tail[1](h.to(device), adapter.mlp_out(block)(x))
                    else:
                        out = run_block(block, h, kwargs[i][b], device)
                    hidden[b] = _checked(out, f"output of block {i}").to(offload)
        block.to(offload if device.type == "cuda" else device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report.block_seconds.append(time.perf_counter() - block_start)
        if checkpoint_dir is not None:
            ckpt.save_block(checkpoint_dir, i, block, kept, hidden, kwargs, report.layers)
        if _stop_after_blocks is not None and i + 1 - first >= _stop_after_blocks and i + 1 < len(blocks):
            raise ckpt.Interrupted(f"stopped after block {i} (test hook)")
    if "mlp" in targets:
        adapter.set_intermediate_size(LinearView(adapter.mlp_out(blocks[0])).d_in)
    if "heads" in targets and adapter.shrink_heads:
        group = adapter.n_heads // adapter.n_kv_heads
        adapter.set_heads(adapter.n_heads - n_kv_prune * group, adapter.n_kv_heads - n_kv_prune)
    model.train(was_training)
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    report.peak_memory = peak_memory(device)
    return model, report


def _prune_block(adapter: Adapter, block: nn.Module, index: int, hidden, block_kwargs, device, targets,
                 row_structure, sparsity, n_kv_prune, method, options, damp, propagate, gram_dtype, tail=None):
    """Capture the block's Gram matrices, solve its problems and write the results into it.

    With ``tail`` (MLP pruning, pruned propagation) the first pass stops at the MLP's output linear,
    replaces ``hidden[b]`` by the residual entering the MLP and returns the inputs of the output linear
    (``mlp_inputs``, one ``(batch, seq, width)`` tensor per batch), from which the caller computes the
    pruned block's output without running the block again.  This trades memory (the MLP width instead of
    the hidden size per token) for a second pass; the equality with a full second pass is tested.
    Returns ``(records, kept, mlp_inputs)``.
    """
    groups = adapter.linear_groups(block)
    wanted: dict[str, nn.Module] = {}
    if row_structure is not None:
        wanted = {next(iter(g)): next(iter(g.values())) for g in groups}
    if "mlp" in targets:
        wanted["mlp_out"] = adapter.mlp_out(block)
    if "heads" in targets:
        wanted["o"] = adapter.attention_out(block)
    hooks = GramHooks(wanted, device, gram_dtype)
    extra = []
    residuals: list[torch.Tensor] = []
    mlp_inputs: list[torch.Tensor | None] = []
    if tail is not None:
        def stop_at_mlp_out(module, args):  # registered after the Gram hook, so it runs after it
            mlp_inputs.append(args[0].detach().to(hidden[0].device))  # NaN shows in the Gram check
            raise _StopBlock

        extra.append(tail[0].register_forward_pre_hook(lambda m, args: residuals.append(args[0].detach())))
        extra.append(wanted["mlp_out"].register_forward_pre_hook(stop_at_mlp_out))
    dense_out = []
    try:
        with torch.no_grad():
            for b, h in enumerate(hidden):
                try:
                    out = run_block(block, h, block_kwargs[b], device)
                except _StopBlock:
                    hidden[b] = residuals.pop().to(h.device)
                    continue
                if propagate == "dense":
                    dense_out.append(_checked(out, f"output of block {index}").to(h.device))
    finally:
        hooks.remove()
        for handle in extra:
            handle.remove()
    if propagate == "dense":
        hidden[:] = dense_out
    records, kept = [], {}
    grams = hooks.accumulators
    for key, acc in grams.items():
        if not torch.isfinite(acc.H).all():
            raise FloatingPointError(f"NaN or Inf in the calibration inputs of block {index} ({key}).")
    if row_structure is not None:
        for g in groups:
            acc = grams[next(iter(g))]
            for name, module in g.items():
                view = LinearView(module)
                target = {} if isinstance(row_structure, solvers.NM) else {"sparsity": float(sparsity)}
                p = solvers.LayerProblem(view.weight, acc.H, row_structure, damp=damp, input_mean=acc.mean,
                                         n_samples=acc.n_samples, **target)
                sol = solvers.solve(p, method, **options)
                view.set_weight(sol.weight)
                records.append(LayerRecord.from_solution(index, name, sol, p))
    if "mlp" in targets:
        out = LinearView(adapter.mlp_out(block))
        idx, record = _solve_groups(out, grams["mlp_out"], solvers.channels(out.d_in), index, "mlp", method, options,
                                    damp=damp, sparsity=float(sparsity))
        kept["mlp"] = idx.cpu()
        _keep_mlp_channels(adapter, block, idx)
        records.append(record)
    if "heads" in targets:
        o = LinearView(adapter.attention_out(block))
        group_cols = adapter.head_dim * (adapter.n_heads // adapter.n_kv_heads)
        kv, record = _solve_groups(o, grams["o"], solvers.heads(o.d_in, group_cols), index, "heads", method, options,
                                   damp=damp, n_prune=n_kv_prune)
        kept["heads"] = kv.cpu()
        _keep_kv_groups(adapter, block, kv)
        records.append(record)
    return records, kept, mlp_inputs


class _StopBlock(Exception):
    """Ends a first pass at the MLP's output linear once its input is recorded."""


def _solve_groups(view: LinearView, acc, structure: solvers.Structure, index: int, name: str, method: str,
                  options: dict, **target) -> tuple[torch.Tensor, LayerRecord]:
    """Solve one output projection's column-group problem and write its weight and bias back.

    Returns the indices of the kept groups (on the weight's device) and the layer's record; the caller
    shrinks the block to those groups.
    """
    p = solvers.LayerProblem(view.weight, acc.H, structure, bias=view.bias, input_mean=acc.mean,
                             n_samples=acc.n_samples, **target)
    sol = solvers.solve(p, method, **options)
    view.set_weight(sol.weight)
    if sol.bias is not None and view.bias is not None:
        view.bias.copy_(sol.bias.to(view.bias.dtype))
    return torch.nonzero(sol.keep).flatten(), LayerRecord.from_solution(index, name, sol, p)


def _keep_mlp_channels(adapter: Adapter, block: nn.Module, idx: torch.Tensor) -> None:
    for module in adapter.mlp_in(block):
        LinearView(module).keep_outputs(idx.to(module.weight.device))
    out = adapter.mlp_out(block)
    LinearView(out).keep_inputs(idx.to(out.weight.device))


def _keep_kv_groups(adapter: Adapter, block: nn.Module, kv: torch.Tensor) -> None:
    """Keep the key-value groups ``kv`` (each: one KV head and its query heads): remove the others'
    q/k/v rows and o columns, or zero them where the family cannot shrink heads (``shrink_heads``)."""
    hd, group = adapter.head_dim, adapter.n_heads // adapter.n_kv_heads
    q_rows = (kv[:, None] * group * hd + torch.arange(group * hd, device=kv.device)).flatten()
    kv_rows = (kv[:, None] * hd + torch.arange(hd, device=kv.device)).flatten()
    out = LinearView(adapter.attention_out(block))
    if adapter.shrink_heads:
        for module, offset, kind in adapter.qkv_rows(block):
            if offset:
                raise NotImplementedError("Shrinking heads of a fused q/k/v linear; set shrink_heads = False.")
            LinearView(module).keep_outputs((q_rows if kind == "q" else kv_rows).to(module.weight.device))
        out.keep_inputs(q_rows.to(out.weight.device))
        return
    for module, offset, kind in adapter.qkv_rows(block):
        view, rows = LinearView(module), q_rows if kind == "q" else kv_rows
        width = adapter.n_heads * hd if kind == "q" else adapter.n_kv_heads * hd
        drop = offset + _complement(rows, width).to(module.weight.device)
        view.weight[drop] = 0  # a view of the stored weight (transposed for Conv1D): writes through
        if view.bias is not None:
            view.bias[drop] = 0
    out.weight[:, _complement(q_rows, adapter.n_heads * hd).to(out.weight.device)] = 0


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx.cpu()] = False
    return torch.nonzero(mask).flatten()


def apply_kept(adapter: Adapter, block: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Re-apply recorded channel/group selections to a dense block (resume)."""
    if "mlp" in kept:
        _keep_mlp_channels(adapter, block, kept["mlp"])
    if "heads" in kept:
        _keep_kv_groups(adapter, block, kept["heads"])


def _device(name: str, value) -> torch.device:
    """``value`` as a usable torch.device, or a ValueError naming the argument."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"The {name!r} argument must be a torch device such as 'cpu' or 'cuda'. Got {value!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"The {name!r} argument is {device}, but torch sees no CUDA device.")
    return device


def _checked(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"NaN or Inf in the {what}.")
    return x


class _outside_blocks_on:
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
            _move_direct(m, self.device)
        return self

    def __exit__(self, *exc):
        for m, dev in self.home:
            _move_direct(m, dev)
        return False


def _move_direct(module: nn.Module, device: torch.device) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        p.data = p.data.to(device)
    for name, b in list(module.named_buffers(recurse=False)):
        module._buffers[name] = b.to(device)


def _progress(iterable, enabled: bool, done: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="pruning blocks", unit="block", initial=done, total=total)
