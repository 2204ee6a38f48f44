"""FLAP's bias compensation on families whose output linears have no bias (spap.bias)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import solvers
import spap
from spap.adapters import LinearView, get_adapter
from spap.bias import check_compensation, switched_linears

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             num_hidden_layers=2, max_position_embeddings=64)


def _model(config):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()


def _ids(n=8, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def test_switches_are_read_from_the_family_classes():
    llama = get_adapter(_model(transformers.LlamaConfig(**SHAPE)))
    assert switched_linears(llama, "mlp_bias") == ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
    assert switched_linears(llama, "attention_bias") == tuple(f"self_attn.{p}_proj" for p in "koqv")
    qwen3 = get_adapter(_model(transformers.Qwen3Config(head_dim=16, **SHAPE)))
    assert switched_linears(qwen3, "mlp_bias") == ()  # no such field: Qwen3's MLP has no bias
    assert switched_linears(qwen3, "attention_bias") == tuple(f"self_attn.{p}_proj" for p in "koqv")
    qwen2 = get_adapter(_model(transformers.Qwen2Config(**SHAPE)))
    assert "self_attn.o_proj" not in switched_linears(qwen2, "attention_bias")


@pytest.mark.parametrize("structure", ["mlp", "heads", "mlp+heads"])
def test_flap_keeps_its_compensation_on_a_biasless_llama_and_reloads(structure, tmp_path, monkeypatch):
    model = _model(transformers.LlamaConfig(**SHAPE))
    adapter = get_adapter(model)
    solutions = []
    solve = spap.pipeline._solve

    def recording(problem, method, options, metric):
        sol = solve(problem, method, options, metric)
        solutions.append((problem, sol))
        return sol

    monkeypatch.setattr(spap.pipeline, "_solve", recording)
    spap.prune_layerwise(model, _ids(), 0.5, method="flap", structure=structure, progress=False)
    units = [u for u in ("heads", "mlp") if u in structure]  # solved heads first, then the MLP
    assert len(solutions) == len(units) * len(adapter.blocks())
    x = torch.randn(5, 128, dtype=torch.float64)
    for k, (problem, sol) in enumerate(solutions):
        block = adapter.blocks()[k // len(units)]
        kind = spap.units.kinds(adapter, [units[k % len(units)]])[units[k % len(units)]]
        out = LinearView(kind.output_linear(block))
        assert sol.bias is not None and float(sol.bias.abs().max()) > 1e-4  # a real compensation
        assert out.bias is not None
        torch.testing.assert_close(out.bias, sol.bias.to(out.bias.dtype))
        cols = problem.structure.column_keep_mask(sol.keep, problem.shape[1])
        torch.testing.assert_close(out.weight, sol.weight[:, cols])
        # the pruned layer computes the solver's compensated layer on the kept inputs
        xin = x[:, : problem.shape[1]]
        expected = xin @ sol.weight.double().T + sol.bias.double()
        got = xin[:, cols].float() @ out.weight.T + out.bias
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
        for m in kind.linears(block):  # the other linears the switch turned on hold zeros
            if m is not kind.output_linear(block):
                assert m.bias is not None and not m.bias.any()
    assert model.config.mlp_bias == ("mlp" in structure)
    assert model.config.attention_bias == ("heads" in structure)
    spap.save_model(model, None, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_zero_biases_leave_the_dense_outputs_unchanged():
    model = _model(transformers.LlamaConfig(**SHAPE))
    ids = _ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
        adapter = get_adapter(model)
        spap.bias.add_biases(adapter, check_compensation(adapter, ["mlp", "heads"], ["flap"], "test"))
        assert model.model.layers[1].mlp.up_proj.bias is not None
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("name,config,structure,linear", [
    ("mistral", transformers.MistralConfig(**SHAPE), "mlp", "mlp.down_proj"),
    ("mistral", transformers.MistralConfig(**SHAPE), "heads", "self_attn.o_proj"),
    ("qwen2", transformers.Qwen2Config(**SHAPE), "heads", "self_attn.o_proj"),
    ("qwen3", transformers.Qwen3Config(head_dim=16, **SHAPE), "mlp+heads", "mlp.down_proj"),
])
def test_flap_is_refused_before_any_work_where_no_bias_can_be_added(name, config, structure, linear):
    model = _model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(solvers.InvalidArgumentError, match=f"'method'.*'flap'.*{name}.*{linear}.*no bias"):
        spap.prune_layerwise(model, _ids(), 0.5, method="flap", structure=structure, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(solvers.InvalidArgumentError, match="'candidates'.*'flap'"):
        spap.prune_layerwise(model, _ids(), 0.5, structure=structure, candidates=("flap",), progress=False)


def test_qwen3_heads_get_attention_bias_and_other_methods_add_nothing():
    model = _model(transformers.Qwen3Config(head_dim=16, **SHAPE))
    spap.prune_layerwise(model, _ids(), 0.5, method="flap", structure="heads", progress=False)
    assert model.config.attention_bias and model.model.layers[0].self_attn.o_proj.bias is not None
    plain = _model(transformers.LlamaConfig(**SHAPE))
    spap.prune_layerwise(plain, _ids(), 0.5, method="wanda_sp", structure="mlp+heads", progress=False)
    assert not plain.config.mlp_bias and plain.model.layers[0].mlp.down_proj.bias is None


def test_a_failed_run_removes_the_added_biases(monkeypatch):
    model = _model(transformers.LlamaConfig(**SHAPE))
    names = set(model.state_dict())

    def fail(*args, **kwargs):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(spap.pipeline, "_solve", fail)
    with pytest.raises(RuntimeError, match="solver failed"):
        spap.prune_layerwise(model, _ids(), 0.5, method="flap", structure="mlp", progress=False)
    assert set(model.state_dict()) == names and model.config.mlp_bias is False


def test_flap_resume_equals_an_uninterrupted_run(tmp_path):
    """The zero biases are added before the checkpoint's fingerprint and before finished blocks are
    loaded back, so a resumed FLAP run is bit for bit the uninterrupted one."""
    reference = _model(transformers.LlamaConfig(**SHAPE))
    spap.prune_layerwise(reference, _ids(), 0.5, method="flap", structure="mlp+heads", progress=False)
    model = _model(transformers.LlamaConfig(**SHAPE))
    run = dict(method="flap", structure="mlp+heads", progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    saved = spap.pipeline._HOOKS
    spap.pipeline._HOOKS = spap.pipeline._TestHooks(stop_after_blocks=1)
    try:
        with pytest.raises(spap.checkpoint.Interrupted):
            spap.prune_layerwise(model, _ids(), 0.5, **run)
    finally:
        spap.pipeline._HOOKS = saved
    model = _model(transformers.LlamaConfig(**SHAPE))
    spap.prune_layerwise(model, _ids(), 0.5, resume=True, **run)
    a, b = reference.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
