"""Architecture adapters: where each model family keeps its decoder blocks, MLP and attention linears.

One adapter per family, chosen from ``config.model_type`` (never from a hub name), in the spirit of
SliceGPT's model adapters; the mixture-of-experts families (:class:`Mixtral`, :class:`Qwen2Moe`) also
describe their experts (:class:`Experts`).  The pipeline only talks to this interface, so a new architecture is one new
adapter registered in :data:`ADAPTERS` and nothing else.  Any other decoder-only model gets a
:class:`Discovered` adapter: its block list, attention and MLP linears are found by their structure
(:func:`discover`), and :func:`spap.units.verify` checks the layout on the model itself before a run.

Weights are always seen as ``(d_out, d_in)`` through :class:`LinearView`, which hides GPT-2's ``Conv1D``
(it stores the transpose).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .checks import InvalidArgumentError


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as ``(d_in, d_out)``: transformers' ``Conv1D`` (GPT-2)."""
    return type(module).__name__ == "Conv1D"


class LinearView:
    """A linear layer as ``y = x Wᵀ + b`` with ``W`` of shape ``(d_out, d_in)``, for ``nn.Linear`` or
    transformers' ``Conv1D`` (weight stored as ``(d_in, d_out)``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.transposed = is_transposed(module)

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight.data
        return w.T if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return None if b is None else b.data

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    def as_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor stored like the weight (e.g. its gradient) seen as ``(d_out, d_in)``."""
        return t.T if self.transposed else t

    def set_weight(self, W: torch.Tensor) -> None:
        """Replace the weight (same shape), keeping dtype and device."""
        w = self.module.weight
        w.data.copy_((W.T if self.transposed else W).to(dtype=w.dtype, device=w.device))

    def keep_inputs(self, idx: torch.Tensor) -> None:
        """Keep only the input features ``idx`` (columns of ``W``)."""
        W = self.weight[:, idx].clone()
        self._replace(W, self.bias.clone() if self.bias is not None else None)

    def keep_outputs(self, idx: torch.Tensor) -> None:
        """Keep only the output features ``idx`` (rows of ``W``, entries of the bias)."""
        W = self.weight[idx].clone()
        self._replace(W, self.bias[idx].clone() if self.bias is not None else None)

    def _replace(self, W: torch.Tensor, b: torch.Tensor | None) -> None:
        m = self.module
        m.weight = nn.Parameter((W.T if self.transposed else W).contiguous(), requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b.contiguous(), requires_grad=False)
        if self.transposed:
            m.nf = W.shape[0]
            if hasattr(m, "nx"):
                m.nx = W.shape[1]
        else:
            m.out_features, m.in_features = W.shape


# transformers' default experts kernel (grouped_mm) needs every row of the experts' parameters to span a
# multiple of 16 bytes: 8 channels in bfloat16 or float16 (4 in float32).  Pruned widths keep to it.
EXPERT_WIDTH_MULTIPLE = 8


class Experts:
    """One block's mixture-of-experts experts, stored as 3-D parameters of one module (transformers'
    ``MixtralExperts``, ``Qwen2MoeExperts``): ``gate_up_proj`` of shape ``(n, 2·width, hidden)`` whose rows
    are ``[gate; up]``, and ``down_proj`` of shape ``(n, hidden, width)``.

    The router (a sibling module) picks ``k`` experts per token with weights; expert ``e`` adds
    ``weight · down_proj[e] (act(gate_e x) · up_e x)`` to the token's output.  Channel ``c`` of expert ``e``
    is row ``c`` and row ``width + c`` of ``gate_up_proj[e]`` and column ``c`` of ``down_proj[e]``; every
    expert keeps as many channels, so the parameters stay rectangular and one config field holds the
    width.  The module's forward (whichever experts implementation the config picks) is never replaced:
    :meth:`record` recomputes each expert's inputs from the module's own call arguments.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def n(self) -> int:
        """Experts in the block."""
        return self.module.down_proj.shape[0]

    @property
    def width(self) -> int:
        """Channels of every expert (the inputs of its down projection)."""
        return self.module.down_proj.shape[2]

    @property
    def hidden(self) -> int:
        return self.module.down_proj.shape[1]

    def down(self, e: int) -> torch.Tensor:
        """Expert ``e``'s down projection ``(hidden, width)``: the weight of its layer problem (a view)."""
        return self.module.down_proj.data[e]

    def gate_up(self, e: int) -> torch.Tensor:
        """Expert ``e``'s fused ``[gate; up]`` projection ``(2·width, hidden)`` (a view)."""
        return self.module.gate_up_proj.data[e]

    def set_gate_up(self, e: int, W: torch.Tensor) -> None:
        """Replace expert ``e``'s ``[gate; up]`` projection (same shape), keeping dtype and device."""
        g = self.module.gate_up_proj.data
        g[e].copy_(W.to(dtype=g.dtype, device=g.device))

    def set_down(self, e: int, W: torch.Tensor) -> None:
        """Replace expert ``e``'s down projection (same shape), keeping dtype and device."""
        d = self.module.down_proj.data
        d[e].copy_(W.to(dtype=d.dtype, device=d.device))

    def keep(self, idx: torch.Tensor) -> None:
        """Keep channels ``idx[e]`` (sorted, ``(n, k)``; a 1-D ``(k,)`` keeps the same in every expert) of
        every expert ``e``: its rows of both halves of ``gate_up_proj``, its columns of ``down_proj``."""
        m = self.module
        gate_up, down = m.gate_up_proj.data, m.down_proj.data
        idx = idx.to(down.device)
        if idx.dim() == 1:
            idx = idx.expand(self.n, -1)
        rows = torch.cat([idx, idx + self.width], dim=1)
        gate_up = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
        down = torch.gather(down, 2, idx[:, None, :].expand(-1, down.shape[1], -1))
        m.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=False)
        m.down_proj = nn.Parameter(down.contiguous(), requires_grad=False)
        if hasattr(m, "intermediate_dim"):
            m.intermediate_dim = idx.shape[1]

    def routed(self, args: tuple, kwargs: dict):
        """For every expert that the call ``module(*args, **kwargs)`` routes tokens to: ``(e, tokens, h, x,
        weight)``, the token indices ``(t,)``, their hidden states (the inputs of its ``[gate; up]``
        projection) ``(t, hidden)``, the inputs of its down projection ``(t, width)`` and the routing
        weights ``(t,)``.  Computed from the call arguments (hidden states ``(tokens, hidden)``,
        top-k expert indices and weights ``(tokens, k)``) as the module computes them."""
        names = ("hidden_states", "top_k_index", "top_k_weights")
        hidden, index, weights = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        gate_up = self.module.gate_up_proj
        for e in range(self.n):
            tokens, slot = torch.where(index == e)
            if tokens.numel() == 0:
                continue
            h = hidden[tokens].to(gate_up.dtype)
            gate, up = nn.functional.linear(h, gate_up[e]).chunk(2, dim=-1)
            yield e, tokens, h, self.module.act_fn(gate) * up, weights[tokens, slot]

    def record(self, fn: Callable[..., None]):
        """Call ``fn(e, tokens, h, x, weight)`` (see :meth:`routed`) for every expert on every forward call
        of the module, from a forward pre-hook; returns its handle."""
        def hook(module, args, kwargs):
            with torch.no_grad():
                for routed in self.routed(args, kwargs):
                    fn(*routed)

        return self.module.register_forward_pre_hook(hook, with_kwargs=True)


def _experts_problem(module: nn.Module) -> str | None:
    """Why spap cannot prune this experts module (a layout :class:`Experts` does not describe), or None."""
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = [f"{k}={getattr(module, k)!r}" for k, v in flags.items() if getattr(module, k, v) != v]
    shapes = [getattr(getattr(module, n, None), "shape", None) for n in ("gate_up_proj", "down_proj")]
    if odd or any(s is None or len(s) != 3 for s in shapes) or shapes[0][1] != 2 * shapes[1][2]:
        return (f"its {type(module).__name__} is not gate_up_proj (experts, 2·width, hidden) with rows [gate; up] and "
                f"down_proj (experts, hidden, width){' (' + ', '.join(odd) + ')' if odd else ''}")
    return None


@dataclass
class Attention:
    """Attention linears of one block: ``q``/``k``/``v`` read the block input, ``o`` writes it back."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module


class Adapter:
    """How to find things in one model family.  Subclasses set the class attributes and the methods."""

    model_types: tuple[str, ...] = ()
    discovered = False  # True for a layout found by structure (Discovered), which spap.units.verify checks
    intermediate_key = "intermediate_size"  # config field of the MLP width
    # True: pruned heads are removed and the config gets fewer heads with an explicit head_dim.  False:
    # the family derives head_dim from hidden_size // num_heads, so fewer heads would not reload; pruned
    # heads are zeroed instead (shape kept).
    shrink_heads = True
    # Mixture-of-experts families: the config field of every expert's width (None: no experts), and
    # whether the block also has a dense MLP (mlp_in/mlp_out: Qwen2-MoE's shared expert; Mixtral has none).
    experts_key: str | None = None
    dense_mlp = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- blocks ----------------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def mlp_in(self, block: nn.Module) -> list[nn.Module]:
        """Linears whose *rows* are the MLP channels (gate and up, or fc1)."""
        raise NotImplementedError

    def mlp_out(self, block: nn.Module) -> nn.Module:
        """The linear whose *columns* are the MLP channels (down_proj, fc2)."""
        raise NotImplementedError

    def mlp_rows(self, block: nn.Module) -> list[tuple[nn.Module, int]]:
        """``(linear, first row)`` for every part of the MLP's input whose rows are the channels: channel
        ``c`` is row ``first + c`` of each (a fused ``[gate; up]`` linear appears twice, at 0 and at the
        width)."""
        return [(m, 0) for m in self.mlp_in(block)]

    def attention(self, block: nn.Module) -> Attention:
        raise NotImplementedError

    def experts(self, block: nn.Module) -> Experts | None:
        """The block's mixture-of-experts experts (:class:`Experts`), None in a family without them."""
        return None

    @property
    def has_experts(self) -> bool:
        return self.experts_key is not None

    @property
    def experts_width(self) -> int:
        """Channels of every expert, as the config states them."""
        return getattr(self.config, self.experts_key)

    def set_experts_width(self, width: int) -> None:
        setattr(self.config, self.experts_key, width)

    def attention_module(self, block: nn.Module) -> nn.Module:
        """The block's attention module (where the head counts are cached)."""
        return block.self_attn

    def attention_out(self, block: nn.Module) -> nn.Module:
        """The linear whose columns are the heads' outputs (o_proj, out_proj, attn.c_proj)."""
        return self.attention(block).o

    def qkv_rows(self, block: nn.Module) -> list[tuple[nn.Module, int, str]]:
        """``(linear, first row, "q"|"k"|"v"|"qkv")``: where each projection's rows are (fused layers share
        one linear at different offsets).  ``"qkv"``: a linear whose rows hold, for every key-value group
        in turn, its query heads, its key head and its value head (GPT-NeoX, Falcon)."""
        a = self.attention(block)
        return [(a.q, 0, "q"), (a.k, 0, "k"), (a.v, 0, "v")]

    def mlp_tail(self, block: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None:
        """``(entry, finish)`` when the block ends with ``out = finish(r, mlp_out(x))``, where ``r`` is the
        input of module ``entry`` (the residual stream after attention) and ``x`` the input of
        :meth:`mlp_out`; ``None`` when the family has no such form.

        Lets the pipeline skip the second pass for MLP pruning: with ``r`` and ``x`` recorded in the
        first pass, the pruned block's output is ``finish(r, pruned_mlp_out(x[..., kept]))``.
        """
        return None

    def head(self) -> list[nn.Module]:
        """The modules that turn the last block's output into logits, in the order the model applies them
        (the final norm, any projection, the language-model head)."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits ``(batch, seq, vocab)`` from the last block's output ``(batch, seq, hidden)``,
        as the causal LM's own forward computes them (:meth:`head`, then any logit soft-capping)."""
        for module in self.head():
            hidden = module(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2 and 3
        return hidden if cap is None else torch.tanh(hidden / cap) * cap

    def linear_groups(self, block: nn.Module) -> list[dict[str, nn.Module]]:
        """The block's linears, grouped by shared input (one Gram matrix per group), in forward order."""
        a = self.attention(block)
        return [
            {"q": a.q, "k": a.k, "v": a.v},
            {"o": a.o},
            {f"mlp_in{i}": m for i, m in enumerate(self.mlp_in(block))},
            {"mlp_out": self.mlp_out(block)},
        ]

    # --- shapes ----------------------------------------------------------------------------------
    @property
    def intermediate_size(self) -> int:
        return getattr(self.config, self.intermediate_key)

    def set_intermediate_size(self, width: int) -> None:
        setattr(self.config, self.intermediate_key, width)

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    @property
    def kv_group_size(self) -> int:
        """Query heads that share one key-value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_group_columns(self) -> int:
        """Columns of the attention output linear that one key-value group's query heads own."""
        return self.head_dim * self.kv_group_size

    def set_heads(self, n_heads: int, n_kv_heads: int) -> None:
        head_dim = self.head_dim
        self.config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
        self.config.num_attention_heads = n_heads
        self.config.num_key_value_heads = n_kv_heads
        for block in self.blocks():
            self.set_block_heads(block, n_heads, n_kv_heads)

    def set_block_heads(self, block: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """Head counts cached by one block's attention module (older transformers keep ``num_heads``;
        the config is left alone, so blocks may differ)."""
        attn = self.attention_module(block)
        for name, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = self.kv_group_size  # pruning whole groups keeps the group size


class LlamaFamily(Adapter):
    """Llama, SmolLM, TinyLlama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3: gated MLP, GQA."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def mlp_in(self, block):
        return [block.mlp.gate_proj, block.mlp.up_proj]

    def mlp_out(self, block):
        return block.mlp.down_proj

    def attention(self, block):
        a = block.self_attn
        return Attention(a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def head(self):
        return [self.model.model.norm, self.model.lm_head]

    def mlp_tail(self, block):
        if hasattr(block, "pre_feedforward_layernorm"):  # Gemma 2 and 3: norms before and after the MLP
            post = block.post_feedforward_layernorm
            return block.pre_feedforward_layernorm, lambda r, y: r + post(y)
        return block.post_attention_layernorm, lambda r, y: r + y


class OPT(Adapter):
    """OPT: plain MLP ``fc1 → ReLU → fc2`` with biases; multi-head attention."""

    model_types = ("opt",)
    intermediate_key = "ffn_dim"
    shrink_heads = False  # OPTAttention derives head_dim from hidden_size // num_heads

    def blocks(self):
        return self.model.model.decoder.layers

    def head(self):
        decoder = self.model.model.decoder  # OPT-350m has no final norm, and projects to a narrower embedding
        return [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None] + [self.model.lm_head]

    def mlp_in(self, block):
        return [block.fc1]

    def mlp_out(self, block):
        return block.fc2

    def attention(self, block):
        a = block.self_attn
        return Attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj)


class GPT2(Adapter):
    """GPT-2: ``Conv1D`` layers (transposed weights), fused ``c_attn``; plain MLP with biases."""

    model_types = ("gpt2",)
    intermediate_key = "n_inner"
    shrink_heads = False  # GPT2Attention derives head_dim from n_embd // n_head

    @property
    def intermediate_size(self) -> int:
        return self.config.n_inner or 4 * self.config.n_embd

    def blocks(self):
        return self.model.transformer.h

    def head(self):
        return [self.model.transformer.ln_f, self.model.lm_head]

    def mlp_in(self, block):
        return [block.mlp.c_fc]

    def mlp_out(self, block):
        return block.mlp.c_proj

    def attention(self, block):
        raise NotImplementedError("GPT-2 fuses q, k and v in c_attn; use qkv_rows and attention_out")

    def attention_out(self, block):
        return block.attn.c_proj

    def qkv_rows(self, block):
        d = self.config.n_embd  # c_attn's output is [q | k | v], each n_embd wide
        return [(block.attn.c_attn, 0, "q"), (block.attn.c_attn, d, "k"), (block.attn.c_attn, 2 * d, "v")]

    def linear_groups(self, block):
        return [{"c_attn": block.attn.c_attn}, {"attn.c_proj": block.attn.c_proj},
                {"mlp.c_fc": block.mlp.c_fc}, {"mlp.c_proj": block.mlp.c_proj}]


class Mixtral(LlamaFamily):
    """Mixtral: Llama's attention; the MLP is a mixture of experts (``mlp.gate`` the router, which is
    never changed, ``mlp.experts`` the experts, each of ``intermediate_size`` channels), with no dense MLP."""

    model_types = ("mixtral",)
    experts_key = "intermediate_size"
    dense_mlp = False

    def experts(self, block):
        return Experts(block.mlp.experts)

    def mlp_in(self, block):
        raise NotImplementedError("Mixtral has no dense MLP; its channels are the experts' (experts())")

    def mlp_out(self, block):
        raise NotImplementedError("Mixtral has no dense MLP; its channels are the experts' (experts())")

    def mlp_tail(self, block):
        return None  # the MLP's output is the experts', not one output linear's

    def linear_groups(self, block):  # the experts are no linears (the pipeline solves them per expert)
        a = self.attention(block)
        return [{"q": a.q, "k": a.k, "v": a.v}, {"o": a.o}]


class Qwen2Moe(LlamaFamily):
    """Qwen2-MoE: Qwen2's attention; the MLP is a mixture of experts (``mlp.gate`` the router,
    ``mlp.experts`` of ``moe_intermediate_size`` channels each) plus a shared expert, an ordinary gated MLP
    (``mlp.shared_expert``, ``shared_expert_intermediate_size`` channels) whose output is scaled by the
    router-like linear ``mlp.shared_expert_gate``; neither router is changed (the default
    :meth:`linear_groups` holds the attention and the shared expert only).  Every block must hold
    experts (``mlp_only_layers`` empty, ``decoder_sparse_step`` 1)."""

    model_types = ("qwen2_moe",)
    experts_key = "moe_intermediate_size"
    intermediate_key = "shared_expert_intermediate_size"

    def experts(self, block):
        return Experts(block.mlp.experts)

    def mlp_in(self, block):
        return [block.mlp.shared_expert.gate_proj, block.mlp.shared_expert.up_proj]

    def mlp_out(self, block):
        return block.mlp.shared_expert.down_proj

    def mlp_tail(self, block):
        return None  # the MLP's output adds the experts' to the shared expert's


# --- structural discovery: every other decoder-only model ------------------------------------------------

# Where decoder-only models in transformers keep things, by module name (first match wins).
ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")
SEPARATE_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
ATTENTION_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
MLP_NAMES = ("mlp", "feed_forward", "ffn")  # else the block itself holds the MLP linears (as OPT's does)
MLP_OUT_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "w2", "fc_out")
GATED_MLP_NAMES = (("gate_proj", "up_proj"), ("w1", "w3"))
MLP_IN_NAMES = ("gate_up_proj", "fc1", "dense_h_to_4h", "c_fc", "up_proj", "fc_in")
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")
# The fused q/k/v linears whose output is viewed group by group ([q heads, k, v] of each key-value group:
# GPT-NeoX, Falcon, Bloom, Persimmon); every other fused linear is [all q | all k | all v] (Phi-3, GPT-2).
PER_GROUP_QKV_NAMES = ("query_key_value",)
# Config fields of the MLP width and of the key-value head count, as transformers' configs name them.
INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
EXPERT_NAMES = ("experts", "block_sparse_moe")


@dataclass
class Layout:
    """What :func:`discover` found: module paths (the block list's in the model, the others' in a block),
    how the q/k/v rows are laid out, the sizes, and the config fields that set them.

    ``qkv_layout``: ``"separate"`` (q, k, v linears), ``"concatenated"`` (one linear, rows
    ``[q | k | v]``) or ``"per_group"`` (one linear, rows ``[q heads, k, v]`` of each key-value group).
    ``mlp_fused``: the one MLP input linear holds ``[gate; up]`` (channel ``c`` in rows ``c`` and
    ``width + c``).  ``fewer_heads_reload``: a model built from a config with other head counts (and an
    explicit ``head_dim``) has the matching shapes.  ``shrink_heads`` as :attr:`Adapter.shrink_heads`:
    False (pruned heads zeroed) until :func:`spap.units.verify` finds that the block with fewer heads runs
    and computes what the zeroed block does (and ``fewer_heads_reload``); ``verified`` once it has
    checked the layout on the model.
    """

    blocks: str
    attention: str
    qkv: tuple[str, ...]
    qkv_layout: str
    attention_out: str
    mlp_in: tuple[str, ...]
    mlp_fused: bool
    mlp_out: str
    head: tuple[str, ...]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_key: str
    kv_key: str | None
    fewer_heads_reload: bool
    shrink_heads: bool = False
    verified: bool = False


class Discovered(Adapter):
    """A decoder-only model of a family without its own adapter, described by a :class:`Layout` that
    :func:`discover` found in the model's modules.  MLP pruning removes channels and writes the width to
    the config field found for it; heads are removed only where a model built from the reduced config has
    the reduced shapes and :func:`spap.units.verify` found that the reduced block computes what the zeroed
    one does (else, and before that check, pruned heads are zeroed)."""

    discovered = True

    def __init__(self, model: nn.Module, layout: Layout) -> None:
        super().__init__(model)
        self.layout = layout
        self.intermediate_key = layout.intermediate_key

    @property
    def shrink_heads(self) -> bool:  # type: ignore[override]
        return self.layout.shrink_heads

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layout.blocks)

    def mlp_in(self, block):
        return [block.get_submodule(p) for p in self.layout.mlp_in]

    def mlp_rows(self, block):
        if self.layout.mlp_fused:
            fused = self.mlp_in(block)[0]
            return [(fused, 0), (fused, LinearView(self.mlp_out(block)).d_in)]
        return super().mlp_rows(block)

    def mlp_out(self, block):
        return block.get_submodule(self.layout.mlp_out)

    def attention(self, block):
        if self.layout.qkv_layout != "separate":
            raise NotImplementedError(f"{type(self.model).__name__} fuses q, k and v in {self.layout.qkv[0]}; use "
                                      "qkv_rows and attention_out")
        q, k, v = (block.get_submodule(p) for p in self.layout.qkv)
        return Attention(q, k, v, self.attention_out(block))

    def attention_module(self, block):
        return block.get_submodule(self.layout.attention)

    def attention_out(self, block):
        return block.get_submodule(self.layout.attention_out)

    def qkv_rows(self, block):
        layout = self.layout
        if layout.qkv_layout == "separate":
            return super().qkv_rows(block)
        fused = block.get_submodule(layout.qkv[0])
        if layout.qkv_layout == "per_group":
            return [(fused, 0, "qkv")]
        # [q | k | v] with the block's current number of key-value groups (fewer once it is pruned)
        n_kv = LinearView(fused).d_out // (self.head_dim * (self.kv_group_size + 2))
        q_rows = n_kv * self.kv_group_columns
        return [(fused, 0, "q"), (fused, q_rows, "k"), (fused, q_rows + n_kv * self.head_dim, "v")]

    def linear_groups(self, block):
        layout = self.layout
        attention = {p: block.get_submodule(p) for p in layout.qkv}
        return [attention, {layout.attention_out: self.attention_out(block)},
                {p: block.get_submodule(p) for p in layout.mlp_in}, {layout.mlp_out: self.mlp_out(block)}]

    def head(self):
        return [self.model.get_submodule(p) for p in self.layout.head]

    @property
    def intermediate_size(self) -> int:
        return getattr(self.config, self.intermediate_key, None) or LinearView(self.mlp_out(self.blocks()[0])).d_in

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads if self.shrink_heads else self.layout.n_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, self.layout.kv_key) if self.shrink_heads else self.layout.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    def set_heads(self, n_heads: int, n_kv_heads: int) -> None:
        self.config.head_dim = self.layout.head_dim
        self.config.num_attention_heads = n_heads
        setattr(self.config, self.layout.kv_key, n_kv_heads)
        for block in self.blocks():
            self.set_block_heads(block, n_heads, n_kv_heads)

    def set_block_heads(self, block, n_heads, n_kv_heads):
        super().set_block_heads(block, n_heads, n_kv_heads)
        attn = self.attention_module(block)
        if hasattr(attn, "num_kv_heads"):  # Falcon's name
            attn.num_kv_heads = n_kv_heads


LAYOUT_ATTRIBUTE = "_spap_layout"  # where get_adapter keeps a model's found layout (deep copies keep it too)


def _is_linear(module: nn.Module | None) -> bool:
    """A module computing ``x Wᵀ + b`` with a 2-D weight: ``nn.Linear`` (and subclasses such as
    ``FalconLinear``) or ``Conv1D``."""
    if module is None:
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) or is_transposed(module)) and isinstance(weight, torch.Tensor) \
        and weight.dim() == 2


def _child(parent: nn.Module, names: tuple[str, ...], where: str = "") -> tuple[str, nn.Module] | None:
    """The first of ``names`` that is a linear child of ``parent``, as ``(path, module)``."""
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module) and _is_linear(module):
            return (f"{where}.{name}" if where else name), module
    return None


def _named_child(parent: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first of ``names`` that is a child module of ``parent``, as ``(name, module)``."""
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return name, module
    return None


def _shape(module: nn.Module) -> tuple[int, int]:
    view = LinearView(module)
    return view.d_out, view.d_in


class _NotFound(InvalidArgumentError):
    """What :func:`discover` did not find (:func:`get_adapter` words it as a refusal of the 'model' argument)."""


def discover(model: nn.Module) -> Layout:
    """Find ``model``'s layout from its modules and config (no weight is read and no forward run), or
    raise :class:`InvalidArgumentError` naming what was not found, where, and the names looked for.

    Blocks: the first ``nn.ModuleList`` of ``config.num_hidden_layers`` modules of one class.  In block 0:
    the attention module (:data:`ATTENTION_NAMES`) with separate q/k/v linears or one fused linear, and its
    output linear; the MLP (a child in :data:`MLP_NAMES`, or the block itself) with its output linear and
    its input linears (gate and up, one fused ``[gate; up]`` twice the width, or one plain).  Head count
    from ``config.num_attention_heads``, ``head_dim`` from ``config.head_dim`` or ``hidden_size // heads``,
    the key-value groups from the k (or fused) linear's rows.  A config field must set the MLP width
    (:data:`INTERMEDIATE_KEYS`; checked by building the model on the meta device with another width), and
    pruned heads can be removed only when a config with other head counts and an explicit ``head_dim``
    builds the matching shapes (``fewer_heads_reload``; checked with one key-value group more).
    Mixture-of-experts MLPs are refused (:class:`Mixtral` and :class:`Qwen2Moe` have adapters of their own).
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    blocks_path = next((path for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                        and (n_layers is None or len(m) == n_layers) and len({type(b) for b in m}) == 1
                        and any(_is_linear(x) for x in m[0].modules())), None)
    if config is None or blocks_path is None:
        raise _NotFound(f"found no decoder block list in {name} (an nn.ModuleList of num_hidden_layers={n_layers} "
                        "blocks of one class holding linear layers)")
    block = model.get_submodule(blocks_path)[0]
    where = f"block 0 of {name} ({blocks_path}.0)"

    # --- attention
    found = _named_child(block, ATTENTION_NAMES)
    if found is None:
        raise _NotFound(f"found no attention module in {where} (looked for {', '.join(ATTENTION_NAMES)})")
    attn_path, attn = found
    inner = _named_child(attn, ATTENTION_NAMES)  # GPT-Neo: attn.attention holds the linears
    if inner is not None and not any(_is_linear(m) for m in attn.children()):
        attn_path, attn = f"{attn_path}.{inner[0]}", inner[1]
    fused = _child(attn, FUSED_QKV_NAMES, attn_path)
    separate = next((parts for names in SEPARATE_QKV_NAMES
                     if all(parts := [_child(attn, (n,), attn_path) for n in names])), None)
    if fused is None and separate is None:
        raise _NotFound(f"found no q/k/v projections in {where} (looked in {attn_path} for "
                        f"{', '.join('/'.join(n) for n in SEPARATE_QKV_NAMES)} or a fused {', '.join(FUSED_QKV_NAMES)})")
    out = _child(attn, ATTENTION_OUT_NAMES, attn_path)
    if out is None:
        raise _NotFound(f"found no attention output projection in {where} (looked in {attn_path} for "
                        f"{', '.join(ATTENTION_OUT_NAMES)})")
    n_heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // n_heads if n_heads else None)
    if not n_heads or not head_dim:
        raise _NotFound(f"found no head count in the config of {name} (num_attention_heads)")
    q_rows = n_heads * head_dim
    if _shape(out[1])[1] != q_rows:
        raise _NotFound(f"the attention output projection {out[0]} of {where} has {_shape(out[1])[1]} inputs, not "
                        f"num_attention_heads × head_dim = {n_heads} × {head_dim}")
    if separate is not None:
        qkv, layout = tuple(p for p, _ in separate), "separate"
        k_rows = _shape(separate[1][1])[0]
        ok = _shape(separate[0][1])[0] == q_rows and _shape(separate[2][1])[0] == k_rows and k_rows % head_dim == 0
        n_kv = k_rows // head_dim
    else:
        qkv = (fused[0],)
        layout = "per_group" if fused[0].rsplit(".", 1)[-1] in PER_GROUP_QKV_NAMES else "concatenated"
        extra = _shape(fused[1])[0] - q_rows  # the k and v rows
        ok = extra > 0 and extra % (2 * head_dim) == 0
        n_kv = extra // (2 * head_dim)
    if not ok or n_kv == 0 or n_heads % n_kv:
        raise _NotFound(f"the q/k/v projections {', '.join(qkv)} of {where} have rows that do not split into "
                        f"{n_heads} query heads of {head_dim} and whole key-value heads")

    # --- MLP
    found = _named_child(block, MLP_NAMES)
    mlp_path, mlp = found if found is not None else ("", block)
    if any(getattr(mlp, n, None) is not None for n in EXPERT_NAMES):
        raise _NotFound(f"found a mixture-of-experts MLP in {where} ({mlp_path or 'the block'} holds experts), which "
                        "spap prunes only in the families with an adapter of their own (Mixtral, Qwen2-MoE)")
    mlp_where = f" in {mlp_path}" if mlp_path else ""
    out_mlp = _child(mlp, MLP_OUT_NAMES, mlp_path)
    if out_mlp is None or out_mlp[1] is out[1]:
        raise _NotFound(f"found no MLP output projection in {where} (looked{mlp_where} for {', '.join(MLP_OUT_NAMES)})")
    width = _shape(out_mlp[1])[1]
    gated = next((parts for names in GATED_MLP_NAMES if all(parts := [_child(mlp, (n,), mlp_path) for n in names])),
                 None)
    single = _child(mlp, MLP_IN_NAMES, mlp_path)
    if gated is not None:
        mlp_in, mlp_fused = tuple(p for p, _ in gated), False
        ok = all(_shape(m)[0] == width for _, m in gated)
    elif single is not None:
        mlp_in, mlp_fused = (single[0],), _shape(single[1])[0] == 2 * width
        ok = _shape(single[1])[0] in (width, 2 * width)
    else:
        raise _NotFound(f"found no MLP input projection in {where} (looked{mlp_where} for "
                        f"{', '.join('/'.join(n) for n in GATED_MLP_NAMES)}, {', '.join(MLP_IN_NAMES)})")
    if not ok:
        raise _NotFound(f"the MLP input projections {', '.join(mlp_in)} of {where} do not have {width} rows (or "
                        f"2 × {width} fused), the inputs of {out_mlp[0]}")

    # --- head: the final norm (beside the block list) and the language-model head
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_path = next((p for p, m in model.named_modules() if m is lm_head), None) if lm_head is not None else None
    if head_path is None:
        raise _NotFound(f"found no language-model head in {name} (get_output_embeddings()); load it with "
                        "transformers.AutoModelForCausalLM")
    parent_path = blocks_path.rpartition(".")[0]
    norm = _named_child(model.get_submodule(parent_path), FINAL_NORM_NAMES)
    head = ((f"{parent_path}.{norm[0]}" if parent_path else norm[0]),) if norm is not None else ()

    # --- the config fields that set the widths, checked on a model built on the meta device
    def rebuilt_block(changes: dict) -> nn.Module | None:
        cfg = copy.deepcopy(config)
        try:
            for key, value in changes.items():
                setattr(cfg, key, value)
            with torch.device("meta"):
                return type(model)(cfg).get_submodule(blocks_path)[0]
        except (AttributeError, TypeError, ValueError, RuntimeError, KeyError):
            return None  # the config refuses the value, or the model does not build from it

    key = None
    for candidate in INTERMEDIATE_KEYS:
        if hasattr(config, candidate) and getattr(config, candidate) in (width, None):
            small = rebuilt_block({candidate: width // 2})
            if small is not None and _shape(small.get_submodule(out_mlp[0]))[1] == width // 2:
                key = candidate
                break
    if key is None:
        raise _NotFound(f"found no config field of {name} that sets its MLP width {width} (looked for "
                        f"{', '.join(INTERMEDIATE_KEYS)}), so a pruned model would not reload")
    kv_key = next((k for k in KV_HEAD_KEYS if getattr(config, k, None) == n_kv), None)
    reloads = False
    if kv_key is not None:  # one key-value group more (fewer may be none): do the config's counts set the shapes?
        g = n_heads // n_kv
        other = rebuilt_block({"num_attention_heads": n_heads + g, kv_key: n_kv + 1, "head_dim": head_dim})
        rows = (n_heads + g + 2 * (n_kv + 1)) * head_dim
        reloads = other is not None and _shape(other.get_submodule(out[0]))[1] == (n_heads + g) * head_dim and \
            sum(_shape(other.get_submodule(p))[0] for p in qkv) == rows
    return Layout(blocks=blocks_path, attention=attn_path, qkv=qkv, qkv_layout=layout, attention_out=out[0],
                  mlp_in=mlp_in, mlp_fused=mlp_fused, mlp_out=out_mlp[0], head=head + (head_path,), n_heads=n_heads,
                  n_kv_heads=n_kv, head_dim=head_dim, intermediate_key=key, kv_key=kv_key,
                  fewer_heads_reload=reloads)


ADAPTERS: dict[str, Callable[[nn.Module], Adapter]] = {
    t: cls for cls in (LlamaFamily, OPT, GPT2, Mixtral, Qwen2Moe) for t in cls.model_types
}


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder block returned: the first element when it returns a tuple (older
    transformers' blocks, and families that also return attention weights or a cache)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``: its family's from ``model.config.model_type``, or a :class:`Discovered`
    one whose layout :func:`discover` finds (once per model, kept in its attribute :data:`LAYOUT_ATTRIBUTE`,
    which a deep copy copies; unverified until :func:`spap.units.verify`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type](model)
    layout = getattr(model, LAYOUT_ATTRIBUTE, None) if isinstance(model, nn.Module) else None
    if not isinstance(layout, Layout):
        try:
            layout = discover(model)
        except _NotFound as e:
            raise InvalidArgumentError(
                f"The 'model' argument is a {type(model).__name__} (model_type={model_type!r}), which spap does not "
                f"support: {e}. Supported model types (with their own adapters): {', '.join(sorted(ADAPTERS))}; "
                "other decoder-only models are supported when their layout is found (docs/extending.md)."
            ) from None
        setattr(model, LAYOUT_ATTRIBUTE, layout)
    return Discovered(model, layout)


def check_model(model: nn.Module, caller: str) -> Adapter:
    """The adapter for a model that a pruning run can use, or :class:`InvalidArgumentError` naming the
    'model' argument of ``caller``: a supported family, a causal LM (with its language-model head, where
    the decoder blocks are where the adapter looks), at least one decoder block, and every weight loaded
    (no tensor on the meta device).  Reads no weight, so it costs nothing next to a run."""
    adapter = get_adapter(model)
    name = type(model).__name__
    head = getattr(model, "get_output_embeddings", lambda: None)()
    try:
        blocks = adapter.blocks()
    except AttributeError:
        blocks = None
    if head is None or blocks is None:
        raise InvalidArgumentError(
            f"The 'model' argument of {caller} is a {name}, not a causal language model with its head: load it with "
            f"transformers.AutoModelForCausalLM (e.g. LlamaForCausalLM rather than LlamaModel).")
    if len(blocks) == 0:
        raise InvalidArgumentError(f"The 'model' argument of {caller} is a {name} with no decoder blocks "
                                   "(0 hidden layers): there is nothing to prune.")
    if adapter.has_experts:
        for i, block in enumerate(blocks):
            mlp = getattr(block, "mlp", None)
            problem = "it has a dense MLP (the config's mlp_only_layers or decoder_sparse_step)" \
                if getattr(mlp, "experts", None) is None else _experts_problem(mlp.experts)
            if problem is not None:
                raise InvalidArgumentError(f"The 'model' argument of {caller} is a {name} whose block {i} spap cannot "
                                           f"prune: {problem}; every block must hold a mixture of experts.")
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise InvalidArgumentError(f"The 'model' argument of {caller} has tensors on the meta device ({meta}): its "
                                   "weights were never loaded; load them (from_pretrained) before pruning.")
    return adapter
