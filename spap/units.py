"""The prunable units of a model: MLP channels and key-value groups, through the adapter.

A *unit* is what structured pruning removes as a whole:

- an **MLP channel** (``"mlp"``): one column of the MLP's output linear (down_proj, fc2, c_proj) and
  the matching row, with its bias entry, of every input linear (gate_proj and up_proj, fc1, c_fc);
- a **key-value group** (``"heads"``): one key-value head (its rows of k and v) and the query heads
  that share it (their rows of q and their columns of the attention's output linear);
- an **expert channel** (``"experts"``, pruned by the structure ``"mlp"`` in a mixture of experts): one
  channel of one expert (:class:`ExpertChannels`), every expert keeping as many.

Every method that removes units goes through this module: the layer-wise pipeline, GISP (scores and
masks), DDP (gates), checkpoints and :func:`spap.load_pruned` (re-applying kept units).  Where the
linears are (fused ones at row offsets), the group size and transposed weights are the adapter's facts;
this module only combines them, so a new architecture is a new adapter and nothing here.  :func:`verify`
checks an adapter's facts on the model itself (that removing a unit computes what zeroing it does), and
:func:`check_model` runs it before any work on a layout found by structure.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import solvers

from .adapters import EXPERT_WIDTH_MULTIPLE, Adapter, LinearView
from .adapters import check_model as adapters_check_model
from .checks import InvalidArgumentError

UNIT_KINDS = ("mlp", "heads")  # what a structure names; "mlp" also names the experts' channels (ExpertChannels)
STRUCTURES = ("mlp", "heads", "mlp+heads", "unstructured", "N:M")
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class PruneStructure:
    """What a prune removes, parsed once from the user's string.

    ``units`` names the unit kinds removed whole (``("mlp",)``, ``("heads",)``, ``("mlp", "heads")``),
    empty for row structures; ``rows`` is the per-weight structure (``solvers.Unstructured()`` or
    ``solvers.NM(n, m)``), None for unit structures.
    """

    text: str
    units: tuple[str, ...]
    rows: solvers.Structure | None = None

    @classmethod
    def parse(cls, text: object, *, caller: str = "prune_layerwise", units_only: bool = False) -> "PruneStructure":
        """Parse ``"mlp"``, ``"heads"``, ``"mlp+heads"``, ``"unstructured"`` or ``"N:M"`` (``0 < N < M``);
        ``units_only`` refuses the row structures."""
        allowed = STRUCTURES[:3] if units_only else STRUCTURES
        message = (f"The 'structure' argument of {caller} must be one of {', '.join(map(repr, allowed))}"
                   + (" (e.g. '2:4')" if not units_only else "") + f". Got {text!r} instead.")
        if not isinstance(text, str):
            raise InvalidArgumentError(message)
        if text in ("mlp", "heads", "mlp+heads"):
            return cls(text, tuple(t for t in UNIT_KINDS if t in text.split("+")))
        if units_only:
            raise InvalidArgumentError(message)
        if text == "unstructured":
            return cls(text, (), solvers.Unstructured())
        m = _NM.match(text)
        if m:
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm:
                raise InvalidArgumentError(f"The 'structure' argument of {caller} is {text!r}; it must be N:M with "
                                           "0 < N < M (N kept of every M).")
            return cls(text, (), solvers.NM(n, mm))
        raise InvalidArgumentError(message)


class UnitKind:
    """One kind of unit of one model: where its weights are, how to count, gate and remove them.

    Subclasses set :attr:`name` and :attr:`columns_per_unit` and implement :meth:`output_linear`,
    :meth:`input_rows` and :meth:`dense_count`.
    """

    name: str
    shrinks = True  # whether keep() removes the other units' weights (False: zeroes them, shapes kept)

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    @property
    def columns_per_unit(self) -> int:
        raise NotImplementedError

    def output_linear(self, block: nn.Module) -> nn.Module:
        """The linear whose input columns the units own, ``columns_per_unit`` consecutive ones each."""
        raise NotImplementedError

    def input_rows(self, block: nn.Module) -> list[tuple[nn.Module, int, int]]:
        """``(linear, first row, rows per unit)`` for every linear whose output rows the units own (fused
        linears appear once per part, at its offset); unit ``u`` owns rows ``first + u·rows … + rows``."""
        raise NotImplementedError

    def dense_count(self) -> int:
        """Units per block as the config states them."""
        raise NotImplementedError

    def prune_count(self, sparsity: float, n: int) -> int:
        """Units of ``n`` that ``sparsity`` prunes in one block (:func:`prune_count`)."""
        return prune_count(sparsity, n)

    def linears(self, block: nn.Module) -> list[nn.Module]:
        """Every distinct linear holding the units' weights, input linears first."""
        out: dict[int, nn.Module] = {}
        for module, _, _ in self.input_rows(block):
            out.setdefault(id(module), module)
        out.setdefault(id(self.output_linear(block)), self.output_linear(block))
        return list(out.values())

    def count(self, block: nn.Module) -> int:
        """Units ``block`` holds now (read from its weights)."""
        return LinearView(self.output_linear(block)).d_in // self.columns_per_unit

    def params_per_unit(self, block: nn.Module) -> int:
        """Parameters (weights and biases) one unit of ``block`` holds."""
        n = 0
        for module, _, rows in self.input_rows(block):
            view = LinearView(module)
            n += rows * (view.d_in + (view.bias is not None))
        return n + LinearView(self.output_linear(block)).d_out * self.columns_per_unit

    def column_groups(self, block: nn.Module) -> solvers.ColumnGroups:
        """The units as column groups of the output linear: the structure of its layer problem."""
        d_in = LinearView(self.output_linear(block)).d_in
        return solvers.channels(d_in) if self.columns_per_unit == 1 else solvers.heads(d_in, self.columns_per_unit)

    def keep(self, block: nn.Module, idx: torch.Tensor) -> None:
        """Keep only units ``idx`` (sorted indices) of ``block``: remove the others' rows and columns."""
        parts: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}
        for module, offset, rows in self.input_rows(block):  # a fused linear's parts are cut in one go
            spans = _spans(idx, rows)
            parts.setdefault(id(module), (module, []))[1].append(spans + offset if offset else spans)
        for module, spans in parts.values():
            LinearView(module).keep_outputs(torch.cat(spans).to(module.weight.device))
        out = self.output_linear(block)
        LinearView(out).keep_inputs(_spans(idx, self.columns_per_unit).to(out.weight.device))

    def per_column(self, per_unit: torch.Tensor) -> torch.Tensor:
        """A per-unit tensor ``(n_units,)`` repeated over each unit's output-linear columns ``(n_columns,)``."""
        return per_unit.repeat_interleave(self.columns_per_unit) if self.columns_per_unit > 1 else per_unit

    def gate(self, block: nn.Module, multiplier: Callable[[], torch.Tensor | None]) -> RemovableHandle:
        """Multiply every unit's columns of the output linear's input by ``multiplier()`` (shape
        ``(n_units,)``), in a forward pre-hook; ``None`` leaves the input alone.  With a 0/1 multiplier the
        block computes what the block with only the kept units computes.  Returns the hook's handle."""
        def hook(module, args):
            m = multiplier()
            if m is None:
                return None
            m = self.per_column(m)
            x = args[0]
            return (x * m.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return self.output_linear(block).register_forward_pre_hook(hook)


class MLPChannels(UnitKind):
    """MLP intermediate channels: a column of the output linear and a row of each input linear."""

    name = "mlp"

    @property
    def columns_per_unit(self) -> int:
        return 1

    def output_linear(self, block):
        return self.adapter.mlp_out(block)

    def input_rows(self, block):
        return [(m, offset, 1) for m, offset in self.adapter.mlp_rows(block)]

    def dense_count(self) -> int:
        return self.adapter.intermediate_size


class KVGroups(UnitKind):
    """Key-value groups: one KV head (``head_dim`` rows of k and of v) and its query heads (their rows
    of q and their columns of the attention's output linear)."""

    name = "heads"

    @property
    def shrinks(self) -> bool:  # type: ignore[override]
        return self.adapter.shrink_heads

    @property
    def columns_per_unit(self) -> int:
        return self.adapter.kv_group_columns

    def output_linear(self, block):
        return self.adapter.attention_out(block)

    def input_rows(self, block):
        a = self.adapter
        rows = {"q": self.columns_per_unit, "k": a.head_dim, "v": a.head_dim, "qkv": self.columns_per_unit + 2 * a.head_dim}
        return [(m, offset, rows[part]) for m, offset, part in a.qkv_rows(block)]

    def dense_count(self) -> int:
        return self.adapter.n_kv_heads

    def keep(self, block: nn.Module, idx: torch.Tensor) -> None:
        """Keep key-value groups ``idx``; families that cannot shrink heads (``adapter.shrink_heads``
        False: head_dim derived from the hidden size) get the other groups' weights zeroed instead."""
        if self.shrinks:
            return super().keep(block, idx)
        dropped = _complement(idx, self.dense_count())
        for module, offset, rows in self.input_rows(block):
            view = LinearView(module)
            drop = offset + _spans(dropped, rows).to(module.weight.device)
            view.weight[drop] = 0  # a view of the stored weight (transposed for Conv1D): writes through
            if view.bias is not None:
                view.bias[drop] = 0
        out = LinearView(self.output_linear(block))
        out.weight[:, _spans(dropped, self.columns_per_unit).to(out.weight.device)] = 0


class ExpertChannels(UnitKind):
    """Channels of the experts of a mixture-of-experts MLP (:class:`spap.adapters.Experts`): channel ``c``
    of expert ``e`` is rows ``c`` and ``width + c`` of ``gate_up_proj[e]`` and column ``c`` of
    ``down_proj[e]``.  Each expert is its own layer problem (its down projection on the tokens routed to
    it); every expert keeps as many channels, so :meth:`count` is the channels *per expert* and the
    kept indices are ``(experts, kept)``.  The experts are no linear layers: :meth:`output_linear`,
    :meth:`input_rows` and :meth:`gate` do not apply (the pipeline and :func:`verify` use :meth:`experts`)."""

    name = "experts"

    @property
    def columns_per_unit(self) -> int:
        return 1

    def experts(self, block: nn.Module):
        return self.adapter.experts(block)

    def output_linear(self, block):
        raise NotImplementedError("the experts are no linear layers; use ExpertChannels.experts")

    def input_rows(self, block):
        raise NotImplementedError("the experts are no linear layers; use ExpertChannels.experts")

    def linears(self, block):
        return []

    def count(self, block: nn.Module) -> int:
        return self.experts(block).width

    def dense_count(self) -> int:
        return self.adapter.experts_width

    def prune_count(self, sparsity: float, n: int) -> int:
        """Channels of each expert's ``n`` that ``sparsity`` prunes: :func:`prune_count`, then, when ``n`` is
        a multiple of :data:`spap.adapters.EXPERT_WIDTH_MULTIPLE` (8), the kept width rounded to the nearest
        multiple of it (at least one multiple): transformers' default experts kernel (grouped_mm) fails on
        rows that do not span a multiple of 16 bytes, in the model and in its stock reload."""
        pruned = prune_count(sparsity, n)
        step = EXPERT_WIDTH_MULTIPLE
        if n % step or pruned == 0:
            return pruned
        kept = max(step, step * int((n - pruned) / step + 0.5))
        return n - kept

    def params_per_unit(self, block: nn.Module) -> int:
        """Parameters of one channel in every expert (its rows of gate and up, its column of down)."""
        experts = self.experts(block)
        return 3 * experts.n * experts.hidden

    def column_groups(self, block: nn.Module) -> solvers.ColumnGroups:
        return solvers.channels(self.count(block))

    def keep(self, block: nn.Module, idx: torch.Tensor) -> None:
        """Keep channels ``idx[e]`` of every expert ``e`` (``(experts, k)``; ``(k,)``: the same in all)."""
        self.experts(block).keep(idx)

    def gate(self, block, multiplier):
        raise NotImplementedError("the experts' channels cannot be gated by a hook on a linear")


def kinds(adapter: Adapter, names: Sequence[str] = UNIT_KINDS) -> dict[str, UnitKind]:
    """The unit kinds ``names`` (among ``"mlp"``, ``"heads"``, ``"experts"``) of ``adapter``'s model, by
    name.  In a mixture-of-experts family ``"mlp"`` stands for every MLP channel: the experts'
    (``"experts"``) and, where the block has one (Qwen2-MoE's shared expert), the dense MLP's."""
    classes = {"mlp": MLPChannels, "heads": KVGroups, "experts": ExpertChannels}
    out: dict[str, UnitKind] = {}
    for name in names:
        if name == "mlp" and adapter.has_experts:
            if adapter.dense_mlp:
                out["mlp"] = MLPChannels(adapter)
            out["experts"] = ExpertChannels(adapter)
        else:
            out[name] = classes[name](adapter)
    return out


def prune_count(sparsity: float, n: int) -> int:
    """Units of ``n`` that ``sparsity`` prunes (the package's one rounding rule, ``solvers.prune_count``)."""
    return solvers.prune_count(sparsity, n)


def checked_prune_count(sparsity: float, n: int, *, units: str, caller: str, argument: str = "sparsity") -> int:
    """:func:`prune_count`, refused (:class:`InvalidArgumentError` naming ``argument``) when it is all ``n``
    units and warned about (``UserWarning``) when it is none while ``sparsity > 0``
    (``solvers.checked_prune_count``); every entry point checks its counts with it before any work."""
    return solvers.checked_prune_count(sparsity, n, units=units, caller=caller, argument=argument)


def smallest_linear(adapter: Adapter) -> tuple[int, int]:
    """``(d_out, d_in)`` of the linear with the fewest weights over every block: where a fraction of
    weights rounds to all of them, or to none, first."""
    shapes = [LinearView(m).weight.shape for b in adapter.blocks() for g in adapter.linear_groups(b) for m in g.values()]
    shapes += [adapter.experts(b).down(0).shape for b in adapter.blocks() if adapter.has_experts]
    return tuple(min(shapes, key=lambda shape: shape[0] * shape[1]))


def keep(adapter: Adapter, block: nn.Module, kept: Mapping[str, torch.Tensor]) -> None:
    """Keep, in ``block``, the units ``kept[kind]`` (sorted indices) of each kind named."""
    for name, kind in kinds(adapter, [k for k in (*UNIT_KINDS, "experts") if k in kept]).items():
        if name in kept:
            kind.keep(block, kept[name])


def widths(adapter: Adapter) -> dict[str, list[int] | None]:
    """Units per block, read from the weights: ``{"mlp": [...], "heads": [...]}`` (and ``"experts"``, the
    channels per expert, in a mixture-of-experts family; no ``"mlp"`` without a dense MLP); ``"heads"`` is None
    where the family zeroes pruned heads instead of removing them (the weights then show no width)."""
    blocks = adapter.blocks()
    return {name: [kind.count(b) for b in blocks] if kind.shrinks else None for name, kind in kinds(adapter).items()}


def set_widths(adapter: Adapter, per_block: Mapping[str, Sequence[int] | None]) -> None:
    """Record per-block unit counts in the attention modules and, for a kind whose count is the same in
    every block, in the config (so that stock transformers reloads the model)."""
    blocks = adapter.blocks()
    heads = per_block.get("heads")
    if heads is not None and adapter.shrink_heads:
        for block, n_kv in zip(blocks, heads):
            adapter.set_block_heads(block, n_kv * adapter.kv_group_size, n_kv)
        if len(set(heads)) == 1:
            adapter.set_heads(heads[0] * adapter.kv_group_size, heads[0])
    mlp = per_block.get("mlp")
    if mlp is not None and len(set(mlp)) == 1:
        adapter.set_intermediate_size(mlp[0])
    experts = per_block.get("experts")
    if experts is not None and len(set(experts)) == 1:
        adapter.set_experts_width(experts[0])


def check_uniform(adapter: Adapter, dense: Mapping[str, int], name: str, what: str) -> None:
    """Refuse, naming argument ``name``, a model whose blocks do not all hold ``dense[kind]`` units."""
    now = widths(adapter)
    for kind, n in dense.items():
        counts = now[kind] if now[kind] is not None else [n] * len(adapter.blocks())
        for i, c in enumerate(counts):
            if c != n:
                raise InvalidArgumentError(
                    f"The {name!r} argument must have the uniform widths of {what} "
                    f"({', '.join(f'{k} {v}' for k, v in dense.items())}); block {i} has {kind} width {c}.")


def _spans(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Indices ``[u·size, (u+1)·size)`` for every ``u`` in ``idx``, concatenated in order."""
    if size == 1:
        return idx
    return (idx[:, None] * size + torch.arange(size, device=idx.device)).flatten()


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx.cpu()] = False
    return torch.nonzero(mask).flatten()


# --- checking an adapter's layout on the model itself ------------------------------------------------------

VERIFY_TOKENS = 8  # random tokens of the one forward pass behind verify()
_UNIT_NAMES = {"mlp": "MLP channel", "heads": "key-value group"}


def check_model(model: nn.Module, caller: str, *, experts: bool = False) -> Adapter:
    """:func:`spap.adapters.check_model`, and for a layout found by structure (a :class:`Discovered`
    adapter) :func:`verify` once per model: an unknown or mismatching layout is refused, naming the
    'model' argument of ``caller``, before any work.  A mixture-of-experts model is refused unless
    ``experts`` (the callers that prune experts: :func:`spap.prune_layerwise`)."""
    adapter = adapters_check_model(model, caller)
    if adapter.has_experts and not experts:
        raise InvalidArgumentError(f"The 'model' argument of {caller} is a {type(model).__name__}, whose MLPs are "
                                   f"mixtures of experts, which {caller} does not prune; spap.prune_layerwise does.")
    if adapter.discovered and not adapter.layout.verified:
        verify(adapter, caller)
        adapter.layout.verified = True
    return adapter


def verify(adapter: Adapter, caller: str = "prune_layerwise") -> None:
    """Check that ``adapter`` describes its model, on the model itself, or raise
    :class:`InvalidArgumentError` naming what did not match.

    One forward pass of :data:`VERIFY_TOKENS` random tokens records block 0's call arguments and the
    last block's output; :meth:`Adapter.logits` of that output must give the model's logits.  Then, on a
    float64 copy of block 0 run on the recorded input, for the MLP channel and then the key-value group
    whose output-projection columns weigh most (in a mixture-of-experts family, the dense MLP's if it has
    one, and the experts: :func:`_experts_match`): the block with that unit removed (:meth:`UnitKind.keep`,
    as the pipeline removes it) must compute what the block computes when that unit's columns of the
    output projection's input are zeroed by a hook (:meth:`UnitKind.gate`), and zeroing them must change
    the output.  A :class:`Discovered` adapter removes pruned heads (``shrink_heads`` True) when that
    matches and its config reloads fewer heads (``Layout.fewer_heads_reload``), else zeroes them if that
    matches.  Heads are not checked with a single
    key-value group (nothing can be pruned).  The model is left as it was.
    """
    model = adapter.model
    name = type(model).__name__
    block = adapter.blocks()[0]
    call, last, logits = _record_forward(model, adapter)
    ours = adapter.logits(last).to(logits.dtype)
    if ours.shape != logits.shape or not torch.allclose(ours, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
        raise InvalidArgumentError(
            f"The 'model' argument of {caller} is a {name} whose layout spap found does not match the model: the "
            f"modules taken for its head ({', '.join(type(m).__name__ for m in adapter.head())}) applied to the last "
            "block's output do not give the model's logits.")
    problems = []
    mlp = kinds(adapter, ["mlp"])
    if ("mlp" in mlp and not _unit_matches(mlp["mlp"], block, call, problems)) or \
            ("experts" in mlp and not _experts_match(mlp["experts"], block, call, problems)):
        raise InvalidArgumentError(f"The 'model' argument of {caller} is a {name} whose layout spap found does not "
                                   f"match block 0: {problems[-1]}.")
    if adapter.n_kv_heads < 2:  # nothing to prune, nothing to check: the count reads from the weights if it can
        if adapter.discovered:
            adapter.layout.shrink_heads = adapter.layout.fewer_heads_reload
        return
    heads = kinds(adapter, ["heads"])["heads"]
    # A found layout removes heads only where the block runs with fewer (and the config reloads it).
    modes = (True, False) if adapter.discovered and adapter.layout.fewer_heads_reload else (adapter.shrink_heads,)
    for shrink in modes:
        if adapter.discovered:
            adapter.layout.shrink_heads = shrink
        if _unit_matches(heads, block, call, problems):
            return
    raise InvalidArgumentError(f"The 'model' argument of {caller} is a {name} whose layout spap found does not match "
                               f"block 0: {'; '.join(problems)}.")


def _record_forward(model: nn.Module, adapter: Adapter):
    """``((args, kwargs) of block 0, last block's output, logits)`` of one forward pass of the model in
    eval mode on random token ids (a generator of its own: the global random state is untouched)."""
    blocks = adapter.blocks()
    embeddings = model.get_input_embeddings()
    vocab = embeddings.weight.shape[0]
    ids = torch.randint(0, vocab, (1, VERIFY_TOKENS), generator=torch.Generator().manual_seed(0))
    seen: dict[str, object] = {}

    def first(module, args, kwargs):
        seen["call"] = (args, kwargs)

    def last(module, args, output):
        seen["last"] = output[0] if isinstance(output, tuple) else output

    handles = [blocks[0].register_forward_pre_hook(first, with_kwargs=True), blocks[-1].register_forward_hook(last)]
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            logits = model(ids.to(embeddings.weight.device), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training:
            m.training = flag
    return seen["call"], seen["last"], logits


def _float64(x):
    """``x`` with every floating tensor (in tuples, lists and dicts too) as float64."""
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_float64(v) for v in x)
    if isinstance(x, dict):
        return {k: _float64(v) for k, v in x.items()}
    return x


def _float64_twin(block: nn.Module) -> nn.Module:
    """A float64 copy of ``block`` in eval mode; experts modules in it run transformers' eager experts loop
    (the grouped_mm one has no float64 kernel; both compute the same sum)."""
    twin = copy.deepcopy(block).double().eval()
    for m in twin.modules():
        if hasattr(m, "gate_up_proj") and getattr(m, "config", None) is not None:
            m.config = copy.copy(m.config)  # the copy's own: the model keeps its implementation
            m.config._experts_implementation = "eager"
    return twin


def _unit_matches(kind: UnitKind, block: nn.Module, call, problems: list[str]) -> bool:
    """Whether removing one unit from a float64 copy of ``block`` computes what zeroing its input to the
    output projection computes (and zeroing changes the output); else a sentence in ``problems``."""
    twin = _float64_twin(block)
    args, kwargs = _float64(call[0]), _float64(call[1])

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = twin(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    n = kind.count(twin)
    W = LinearView(kind.output_linear(twin)).weight
    unit = int(W.reshape(W.shape[0], n, -1).square().sum((0, 2)).argmax())
    paths = {id(m): p for p, m in twin.named_modules()}
    inputs = dict.fromkeys(paths[id(m)] for m, _, _ in kind.input_rows(twin))
    label = f"{_UNIT_NAMES[kind.name]} {unit}"
    what = f"{label} (its rows of {', '.join(inputs)}, its columns of {paths[id(kind.output_linear(twin))]})"
    mask = torch.ones(n, dtype=torch.float64)
    mask[unit] = 0
    dense = run()
    handle = kind.gate(twin, lambda: mask)
    try:
        zeroed = run()
    finally:
        handle.remove()
    effect = float((dense - zeroed).abs().max())
    if not effect > 0:
        problems.append(f"zeroing the input of {label} to {paths[id(kind.output_linear(twin))]} changed nothing (the "
                        "linear taken for its output projection is not on the block's path)")
        return False
    kind.keep(twin, torch.tensor([u for u in range(n) if u != unit]))
    mode = "removing" if kind.shrinks else "zeroing the weights of"
    try:
        pruned = run()
    except (RuntimeError, ValueError, IndexError) as e:
        problems.append(f"{mode} {what} makes the block fail ({type(e).__name__}: {str(e).splitlines()[0]})")
        return False
    error = float((pruned - zeroed).abs().max()) if pruned.shape == zeroed.shape else float("inf")
    if not error <= 1e-6 * effect:
        problems.append(f"{mode} {what} changed the block's output by {error:.3g}, zeroing its input to the output "
                        f"projection by {effect:.3g}: the rows or columns taken for it are not its own")
        return False
    return True


def _experts_match(kind: ExpertChannels, block: nn.Module, call, problems: list[str]) -> bool:
    """On a float64 copy of ``block`` run on the recorded call: whether the experts' inputs as the pipeline
    records them (:meth:`spap.adapters.Experts.routed`, weighted and summed through each down projection)
    give the experts module's output, and whether removing one channel of every expert (its heaviest
    column of the down projection; :meth:`ExpertChannels.keep`) computes what zeroing those columns
    computes (and zeroing them changes the output); else a sentence in ``problems``."""
    twin = _float64_twin(block)
    args, kwargs = _float64(call[0]), _float64(call[1])
    experts = kind.experts(twin)
    where = next(p for p, m in twin.named_modules() if m is experts.module)

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = twin(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    seen: dict[str, torch.Tensor] = {}

    def compare(module, a, kw, output):
        rebuilt = torch.zeros_like(output)
        for e, tokens, _, x, weight in experts.routed(a, kw):
            rebuilt.index_add_(0, tokens, (x @ experts.down(e).T) * weight[:, None].to(x.dtype))
        seen["error"] = (rebuilt - output).abs().max()
        seen["scale"] = output.abs().max()

    handle = experts.module.register_forward_hook(compare, with_kwargs=True)
    try:
        dense = run()
    finally:
        handle.remove()
    if not float(seen["error"]) <= 1e-9 * max(float(seen["scale"]), 1e-30):
        problems.append(f"the experts' inputs recomputed from the call of {where} do not give its output (off by "
                        f"{float(seen['error']):.3g}): its routing or its gate_up_proj/down_proj are not as spap reads them")
        return False
    down = experts.module.down_proj.data
    n, width = experts.n, experts.width
    heaviest = down.square().sum(1).argmax(1)  # (n,): every expert's channel with the heaviest down column
    saved = down.clone()
    down[torch.arange(n), :, heaviest] = 0
    zeroed = run()
    down.copy_(saved)
    effect = float((dense - zeroed).abs().max())
    if not effect > 0:
        problems.append(f"zeroing one column of every expert's down projection in {where} changed nothing (the "
                        "experts are not on the block's path)")
        return False
    keep = torch.stack([torch.tensor([c for c in range(width) if c != int(heaviest[e])]) for e in range(n)])
    kind.keep(twin, keep)
    try:
        pruned = run()
    except (RuntimeError, ValueError, IndexError) as e:
        problems.append(f"removing one channel of every expert of {where} makes the block fail "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})")
        return False
    error = float((pruned - zeroed).abs().max()) if pruned.shape == zeroed.shape else float("inf")
    if not error <= 1e-6 * effect:
        problems.append(f"removing one channel of every expert of {where} (its rows of gate_up_proj, its column of "
                        f"down_proj) changed the block's output by {error:.3g}, zeroing its column of down_proj by "
                        f"{effect:.3g}: the rows or columns taken for it are not its own")
        return False
    return True
