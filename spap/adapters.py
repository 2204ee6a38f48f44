"""Architecture adapters: where each model family keeps its decoder blocks, MLP and attention linears.

One adapter per family, chosen from ``config.model_type`` (never from a hub name), in the spirit of
SliceGPT's model adapters.  The pipeline only talks to this interface, so a new architecture is one new
adapter registered in :data:`ADAPTERS` and nothing else.

Weights are always seen as ``(d_out, d_in)`` through :class:`LinearView`, which hides GPT-2's ``Conv1D``
(it stores the transpose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    intermediate_key = "intermediate_size"  # config field of the MLP width
    # True: pruned heads are removed and the config gets fewer heads with an explicit head_dim.  False:
    # the family derives head_dim from hidden_size // num_heads, so fewer heads would not reload; pruned
    # heads are zeroed instead (shape kept).
    shrink_heads = True

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

    def attention(self, block: nn.Module) -> Attention:
        raise NotImplementedError

    def attention_out(self, block: nn.Module) -> nn.Module:
        """The linear whose columns are the heads' outputs (o_proj, out_proj, attn.c_proj)."""
        return self.attention(block).o

    def qkv_rows(self, block: nn.Module) -> list[tuple[nn.Module, int, str]]:
        """``(linear, first row, "q"|"k"|"v")``: where each projection's rows are (fused layers share one
        linear at different offsets)."""
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
        attn = block.self_attn
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


ADAPTERS: dict[str, Callable[[nn.Module], Adapter]] = {
    t: cls for cls in (LlamaFamily, OPT, GPT2) for t in cls.model_types
}


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise InvalidArgumentError(
            f"The 'model' argument is a {type(model).__name__} (model_type={model_type!r}), which spap does not "
            f"support. Supported model types: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[model_type](model)


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
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise InvalidArgumentError(f"The 'model' argument of {caller} has tensors on the meta device ({meta}): its "
                                   "weights were never loaded; load them (from_pretrained) before pruning.")
    return adapter
