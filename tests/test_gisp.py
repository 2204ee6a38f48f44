"""spap.gisp on tiny random-weight models: exact sparsity, nesting, determinism, materialise, save/load."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers

import spap
from spap.adapters import LinearView, get_adapter
from spap.global_methods.gisp import _margin_sum, _masked

COMMON = dict(vocab_size=128, num_hidden_layers=3, max_position_embeddings=64)
GQA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4, **COMMON)
CONFIGS = {
    "llama": transformers.LlamaConfig(**GQA),
    "qwen2": transformers.Qwen2Config(**GQA),  # q/k/v biases
    "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64,
                                  vocab_size=128, num_hidden_layers=3, max_position_embeddings=64),
    "gpt2": transformers.GPT2Config(n_embd=64, n_inner=96, n_head=4, n_layer=3, vocab_size=128, n_positions=64),
}
SPARSITIES = [0.2, 0.5]


def _model(name: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name])).eval()


def _ids(n=6, seqlen=24):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _triples(n=5):
    gen = torch.Generator().manual_seed(2)
    draw = lambda k: torch.randint(0, 128, (k,), generator=gen).tolist()  # noqa: E731
    return [(draw(6 + i), draw(1 + i % 3), draw(2 + i % 2)) for i in range(n)]


def _alive(result, sparsity, n_blocks):
    """The kept sets at ``sparsity`` as boolean masks (what the masking hooks take)."""
    kept = result.kept[sparsity]
    widths = {"mlp": result.dense_widths["mlp"], "heads": result.dense_widths["heads"]}
    alive = {t: torch.zeros(n_blocks, widths[t], dtype=torch.bool) for t in kept[0]}
    for i, k in enumerate(kept):
        for t, idx in k.items():
            alive[t][i, idx] = True
    return alive


def _unchanged(model, state, flags):
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


CASES = [("llama", "mlp"), ("llama", "heads"), ("llama", "mlp+heads"), ("qwen2", "mlp+heads"), ("opt", "mlp+heads"),
         ("gpt2", "mlp+heads")]


@pytest.mark.parametrize("name,structure", CASES)
def test_exact_sparsity_nested_sets_and_materialised_forward(name, structure):
    model = _model(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    result = spap.gisp(model, _ids(), SPARSITIES, structure=structure, steps_per_target=2, batch_size=3, progress=False)
    _unchanged(model, state, flags)
    adapter = get_adapter(model)
    n_blocks = len(adapter.blocks())
    counts = {"mlp": adapter.intermediate_size * n_blocks, "heads": adapter.n_kv_heads * n_blocks}
    assert [s.target for s in result.steps] == pytest.approx([0.1, 0.2, 0.35, 0.5])
    for s in SPARSITIES:
        widths = result.widths(s)
        assert set(widths) == set(structure.split("+"))
        assert all(min(w) >= 1 for w in widths.values())  # one channel / KV group left in every block
        removed = {t: counts[t] - sum(w) for t, w in widths.items()}
        params = sum(removed[t] * result.unit_params[t] for t in removed)
        assert params / result.structure_params == pytest.approx(result.achieved[s])
        if len(widths) == 1:  # one type: exactly ⌊s·N + ½⌋ of the N structures
            (t,) = widths
            assert removed[t] == math.floor(s * counts[t] + 0.5)
        else:  # within half an MLP channel's parameters of the target
            assert abs(params - s * result.structure_params) <= result.unit_params["mlp"] / 2
    for low, high in zip(result.kept[0.2], result.kept[0.5]):  # nested: a higher sparsity keeps a subset
        for t in low:
            assert set(high[t].tolist()) <= set(low[t].tolist())
    ids = _ids(2, 16)
    for s in SPARSITIES:
        pruned = result.materialize(model, s)
        widths, shapes = result.widths(s), spap.layer_widths(pruned)
        assert shapes["intermediate_size"] == widths.get("mlp", [adapter.intermediate_size] * n_blocks)
        if "heads" in widths and adapter.shrink_heads:
            assert shapes["num_key_value_heads"] == widths["heads"]
        if "heads" in widths and not adapter.shrink_heads:  # OPT, GPT-2: removed heads stored as zeros
            for block, kv in zip(get_adapter(pruned).blocks(), widths["heads"]):
                W = LinearView(get_adapter(pruned).attention_out(block)).weight
                assert int((W.reshape(W.shape[0], adapter.n_kv_heads, -1) == 0).all(-1).all(0).sum()) == adapter.n_kv_heads - kv
        with torch.no_grad():
            logits = pruned(ids).logits
            alive = _alive(result, s, n_blocks)
            with _masked(spap.units.kinds(adapter, list(alive)), adapter.blocks(), alive):
                masked = model(ids).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, masked, rtol=1e-5, atol=1e-5)  # shrinking = masking
    _unchanged(model, state, flags)


def test_same_seed_same_result_and_normalisations():
    runs = [spap.gisp(_model("llama"), _ids(), [0.3], structure="mlp+heads", steps_per_target=3, batch_size=2,
                      batches_per_step=2, seed=7, progress=False) for _ in range(2)]
    for a, b in zip(runs[0].kept[0.3], runs[1].kept[0.3]):
        assert all(torch.equal(a[t], b[t]) for t in a)
    assert [s.objective for s in runs[0].steps] == [s.objective for s in runs[1].steps]
    again = spap.GispResult.from_dict(json.loads(json.dumps(runs[0].to_dict())))
    assert again.achieved == runs[0].achieved and again.steps == runs[0].steps
    assert all(torch.equal(a[t], b[t]) for a, b in zip(again.kept[0.3], runs[0].kept[0.3]) for t in a)
    for normalize in ("sum", "none"):
        result = spap.gisp(_model("llama"), _ids(), [0.3], structure="mlp+heads", normalize=normalize, progress=False)
        assert result.achieved[0.3] == pytest.approx(0.3, abs=result.unit_params["mlp"] / result.structure_params)


def test_margin_objective_matches_unpadded_sequences_and_prunes():
    model = _model("llama")
    triples = [tuple(torch.tensor(p) for p in t) for t in _triples()]
    with torch.no_grad():
        padded = float(_margin_sum(model, triples, torch.device("cpu")))
        expected = 0.0
        for prompt, good, bad in triples:
            for answer, sign in ((good, 1), (bad, -1)):
                ids = torch.cat([prompt, answer])[None]
                logp = model(ids).logits[0, :-1].log_softmax(-1)
                nll = -logp[len(prompt) - 1 :].gather(1, answer[:, None]).mean()
                expected += sign * float(nll)
    assert padded == pytest.approx(expected, rel=1e-5, abs=1e-6)
    result = spap.gisp(model, _triples(), [0.25, 0.5], objective="margin", structure="mlp", steps_per_target=2,
                       batch_size=2, progress=False)
    assert sum(result.widths(0.5)["mlp"]) == 3 * 96 - 144
    for low, high in zip(result.kept[0.25], result.kept[0.5]):
        assert set(high["mlp"].tolist()) <= set(low["mlp"].tolist())


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_save_pruned_load_pruned_round_trip(name, tmp_path):
    model = _model(name)
    result = spap.gisp(model, _ids(), [0.4], structure="mlp+heads", steps_per_target=2, progress=False)
    pruned = result.materialize(model, 0.4)
    assert len(set(result.widths(0.4)["mlp"])) > 1  # non-uniform widths: the case stock transformers cannot load
    with pytest.raises(ValueError, match="save_pruned"):
        spap.save_model(pruned, None, tmp_path / "stock")
    spap.save_pruned(pruned, None, tmp_path / "out")
    with pytest.raises(RuntimeError):  # the weights' shapes differ from config.json's
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = _ids(2, 16)
    for loaded, _ in (spap.load_pruned(tmp_path / "out"), spap.load_model(tmp_path / "out")):
        assert spap.layer_widths(loaded) == spap.layer_widths(pruned)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, pruned(ids).logits)
    with pytest.raises(FileNotFoundError, match="spap_widths.json"):
        spap.load_pruned(tmp_path)


def test_non_uniform_heads_decode_with_the_kv_cache():
    model = _model("llama")
    result = spap.gisp(model, _ids(), [0.4], structure="heads", steps_per_target=2, progress=False)
    assert len(set(result.widths(0.4)["heads"])) > 1
    pruned = result.materialize(model, 0.4)
    ids = _ids(1, 12)
    with torch.no_grad():
        full = pruned(ids).logits
        past = pruned(ids[:, :10], use_cache=True).past_key_values
        step = pruned(ids[:, 10:], past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 10:], rtol=1e-5, atol=1e-5)


def test_bad_arguments_fail_before_any_work():
    model = _model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    cases = [
        (dict(sparsities=[]), "'sparsities'.*distinct numbers, each a float in the range \\(0, 1\\)"),
        (dict(sparsities=[0.2, 1.0]), "'sparsities'"),
        (dict(sparsities=[0.3, 0.3]), "'sparsities'"),
        (dict(sparsities=0.3), "'sparsities'"),
        (dict(sparsities=[0.9]), "'sparsities'.*at most 0.75"),  # one of 4 KV groups kept per block
        (dict(structure="unstructured"), "'structure'.*'mlp', 'heads', 'mlp\\+heads'"),
        (dict(objective="accuracy"), "'objective'.*'perplexity', 'margin'"),
        (dict(normalize="max"), "'normalize'.*'mean', 'sum', 'none'"),
        (dict(steps_per_target=0), "'steps_per_target'"),
        (dict(batch_size=0), "'batch_size'"),
        (dict(batches_per_step=0), "'batches_per_step'"),
        (dict(seed=1.5), "'seed'"),
        (dict(objective="margin"), "'calib'.*\\(prompt, correct, incorrect\\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            spap.gisp(model, _ids(), **{"sparsities": [0.3], "structure": "heads", **kwargs}, progress=False)
    with pytest.raises(ValueError, match="'calib'"):
        spap.gisp(model, _ids() + 1000, [0.3], progress=False)
    with pytest.raises(ValueError, match="'calib'"):
        spap.gisp(model, [([1, 2], [3])], [0.3], objective="margin", progress=False)
    with pytest.raises(ValueError, match="'calib'"):
        spap.gisp(model, [([1, 2], [], [3])], [0.3], objective="margin", progress=False)
    with pytest.raises(ValueError, match="does not support.*Supported model types"):
        spap.gisp(torch.nn.Linear(2, 2), _ids(), [0.3])
    result = spap.gisp(model, _ids(), [0.3], steps_per_target=1, progress=False)
    with pytest.raises(ValueError, match="'sparsity'.*0.3"):
        result.materialize(model, 0.5)
    with pytest.raises(ValueError, match="uniform widths"):
        result.materialize(result.materialize(model, 0.3), 0.3)
    _unchanged(model, state, flags)


@pytest.mark.slow
def test_smollm2_smoke():
    """SmolLM2-135M, 4 C4 windows of 128 tokens, two steps: nested non-uniform sub-networks that run."""
    torch.set_num_threads(1)
    model, tok = spap.load_model("smollm2")
    calib = spap.data.calibration_set("c4", tok, n=4, seqlen=128, seed=0)
    result = spap.gisp(model, calib, [0.2, 0.3], structure="mlp", steps_per_target=1, batch_size=2, progress=False)
    widths = result.widths(0.3)["mlp"]
    assert 30 * 1536 - sum(widths) == math.floor(0.3 * 30 * 1536 + 0.5) and len(set(widths)) > 1
    for low, high in zip(result.kept[0.2], result.kept[0.3]):
        assert set(high["mlp"].tolist()) <= set(low["mlp"].tolist())
    pruned = result.materialize(model, 0.3)
    with torch.no_grad():
        logits = pruned(calib[:1, :64]).logits
    assert torch.isfinite(logits).all()
    assert result.steps[0].objective < 5  # dense next-token NLL on C4 (about 3.2)
