"""Non-uniform widths outside spap: what stock transformers builds, and the inference benchmark's
per-block MLP widths (docs/gisp.md, "Saving non-uniform widths")."""

from __future__ import annotations

import pytest
import torch
import transformers

import spap
from spap.eval import throughput

from .helpers import benchmark_module

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5)


def test_stock_llama_does_not_build_per_layer_widths():
    """transformers' ``per_layer_config`` (HeterogeneousConfigMixin) stores per-layer ``intermediate_size``
    and ``num_key_value_heads``, but LlamaMLP and LlamaAttention read the global value, which the mixin
    refuses.  When this test fails, stock transformers builds such a Llama: spap.save_pruned could then
    write a checkpoint that ``from_pretrained`` loads."""
    heterogeneity = pytest.importorskip("transformers.integrations.heterogeneity")
    for per_layer in ({0: {"intermediate_size": 40}, 2: {"intermediate_size": 70}}, {1: {"num_key_value_heads": 2}}):
        config = transformers.LlamaConfig(**TINY, per_layer_config=per_layer)
        assert config.is_heterogeneous
        with pytest.raises(heterogeneity.AmbiguousGlobalPerLayerAttributeError):
            transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def inference():
    return benchmark_module("inference")


def test_parse_widths(inference):
    assert inference.parse_widths("ramp:398:1138", 30, 1536)[::29] == [398, 1138]
    assert sum(inference.parse_widths("ramp:398:1138", 30, 1536)) == 30 * 768  # SmolLM2's uniform 50%
    assert inference.parse_widths("alt:10:20", 4, 96) == [10, 20, 10, 20]
    assert inference.parse_widths("1,2,3,96", 4, 96) == [1, 2, 3, 96]
    for bad in ("1,2,3", "0,2,3,4", "ramp:10:97", "ramp:10", "1,2,3,x"):
        with pytest.raises(ValueError):
            inference.parse_widths(bad, 4, 96)


def test_build_widths_is_spaps_layout(inference, monkeypatch):
    monkeypatch.setitem(inference.SHAPES, "tiny", TINY)
    widths = inference.parse_widths("ramp:24:72", 4, 96)
    model = inference.build_widths("tiny", widths, torch.float32, "cpu")
    uniform = inference.build("tiny", 0.5, torch.float32, "cpu")  # 48 per block: the same total
    assert spap.layer_widths(model)["intermediate_size"] == widths
    assert model.config.intermediate_size == 96  # widths differ: the config keeps the dense size
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in uniform.parameters())
    runs = throughput(model, prompt_len=8, new_tokens=2, repeats=1)
    assert all(v > 0 for vs in runs.values() for v in vs)
