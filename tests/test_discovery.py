"""Structural discovery of families without an adapter (spap.adapters.discover) and the check of a layout
on the model itself (spap.units.verify); the pruning, saving and reloading of every family runs in
tests/test_pipeline.py::test_structure_runs_with_exact_sparsity_and_reloads."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import spap
from spap import adapters, units
from spap.adapters import Discovered, LinearView, discover, get_adapter

from .test_pipeline import COMMON, CONFIGS, DISCOVERED, _ids, _model


def _built(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name, qkv_layout, mlp_fused, n_kv, shrink", [
    ("phi3", "concatenated", True, 2, False),  # Phi3Attention slices q/k/v by the config's dense head count
    ("gpt_neox", "per_group", False, 4, False),  # head_dim = hidden_size // heads
    ("falcon", "per_group", False, 2, False),
    ("starcoder2", "separate", False, 2, True),  # fewer heads run and reload: removed, as Llama's are
])
def test_discovery_finds_the_layout(name, qkv_layout, mlp_fused, n_kv, shrink):
    model = _model(name)
    adapter = units.check_model(model, "test")
    assert isinstance(adapter, Discovered) and adapter.layout.verified
    layout = adapter.layout
    assert (layout.qkv_layout, layout.mlp_fused, adapter.n_kv_heads, adapter.shrink_heads) == (qkv_layout, mlp_fused,
                                                                                                 n_kv, shrink)
    assert (adapter.n_heads, adapter.head_dim, adapter.intermediate_size) == (4, 16, 128)
    block = adapter.blocks()[0]
    assert LinearView(adapter.mlp_out(block)).d_in == 128
    assert get_adapter(model).layout is layout  # found once per model
    twin = copy.deepcopy(model)  # e.g. GispResult.materialize: the copy keeps the verified layout
    assert get_adapter(twin).layout.verified and get_adapter(twin).shrink_heads == shrink


def test_falcon_multi_query_is_one_key_value_group():
    """Falcon-7B's layout: [all q heads | k | v], one key-value head; MLP channels prune and reload."""
    config = transformers.FalconConfig(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, multi_query=True,
                                       **COMMON)
    model = _built(config)
    adapter = units.check_model(model, "test")
    assert adapter.n_kv_heads == 1 and adapter.layout.kv_key is None
    with pytest.raises(ValueError, match="'sparsity'.*key-value groups"):
        spap.prune_layerwise(model, _ids(), 0.5, structure="heads", progress=False)
    model, _ = spap.prune_layerwise(model, _ids(), 0.5, structure="mlp", progress=False)
    assert model.config.ffn_hidden_size == 64


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_family_layout_verifies_on_its_model(name):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units.verify(get_adapter(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_layout_not_found_is_refused_naming_what_and_where():
    model = _model("phi3")
    for block in model.model.layers:  # an MLP whose output projection has a name spap does not know
        block.mlp.proj_out = block.mlp.down_proj
        del block.mlp.down_proj
    with pytest.raises(ValueError, match=r"does not support: found no MLP output projection in block 0 of "
                                         r"Phi3ForCausalLM \(model.layers.0\) \(looked in mlp for down_proj, fc2"):
        spap.prune_layerwise(model, _ids(), 0.3, progress=False)


def test_a_layout_that_does_not_match_is_refused_before_calibration(monkeypatch):
    """Phi-3's fused qkv_proj taken as laid out per key-value group (as GPT-NeoX's query_key_value is):
    removing a group's rows does not compute what zeroing its heads does, so the run is refused before any
    calibration pass and the model is left as it was."""
    monkeypatch.setattr(adapters, "PER_GROUP_QKV_NAMES", ("qkv_proj",))
    model = _model("phi3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    monkeypatch.setattr(spap.pipeline, "calibration_batches", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"Phi3ForCausalLM whose layout spap found does not match block 0: .*"
                                         r"key-value group \d+ \(its rows of self_attn.qkv_proj"):
        spap.prune_layerwise(model, _ids(), 0.3, structure="heads", progress=False)
    assert not calls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("config", [
    transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                num_attention_heads=4, num_key_value_heads=2, **COMMON),
    transformers.OlmoeConfig(hidden_size=64, intermediate_size=32, num_experts=4, num_attention_heads=4,
                             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON),
], ids=["qwen3_moe", "olmoe"])
def test_mixture_of_experts_without_an_adapter_is_refused(config):
    """Mixtral and Qwen2-MoE have adapters (tests/test_moe.py); other mixtures of experts are not found."""
    with pytest.raises(ValueError, match="found a mixture-of-experts MLP in block 0.*only in the families with an "
                                         "adapter of their own"):
        get_adapter(_built(config))


def test_discovered_families_are_not_in_the_adapter_table():
    assert not set(DISCOVERED) & set(adapters.ADAPTERS)
    assert discover(_model("llama")).qkv_layout == "separate"  # the adapters' families are found alike


@pytest.mark.parametrize("name", ["phi3", "starcoder2", "gpt_neox"])  # GPT-NeoX saves lm_head as embed_out
def test_per_block_widths_save_and_load_with_save_pruned(name, tmp_path):
    """Non-uniform widths of a found layout: spap.save_pruned writes them, spap.load_pruned rebuilds them."""
    model, _ = spap.prune_layerwise(_model(name), _ids(), [0.25, 0.5], structure="mlp+heads", progress=False)
    ids = _ids(2, 16)
    with torch.no_grad():
        logits = model(ids).logits
    spap.save_pruned(model, None, tmp_path / "out")
    reloaded, _ = spap.load_pruned(tmp_path / "out")
    assert spap.layer_widths(reloaded) == spap.layer_widths(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)
