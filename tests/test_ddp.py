"""ddp_prune (Deterministic Differentiable Pruning) on tiny random-weight models, and a SmolLM2 smoke test."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import spap
from spap.adapters import LinearView, get_adapter

COMMON = dict(vocab_size=128, num_hidden_layers=3, max_position_embeddings=64)
LLAMA_LIKE = dict(hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=3, **COMMON)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **LLAMA_LIKE),
    "gemma2": lambda: transformers.Gemma2Config(head_dim=16, **LLAMA_LIKE),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64,
                                          vocab_size=128, num_hidden_layers=3, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_inner=96, n_head=4, n_layer=3, vocab_size=128, n_positions=64),
}
FAST = dict(steps=6, batch_size=2, progress=False)


def _model(name: str = "llama"):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def _ids(n: int = 6, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("structure", ["mlp", "heads", "mlp+heads"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_target_and_forward_after_shrinking(name, structure, allocation):
    model = _model(name)
    adapter = get_adapter(model)
    width, kv, heads, blocks = adapter.intermediate_size, adapter.n_kv_heads, adapter.n_heads, len(adapter.blocks())
    model, report = spap.ddp_prune(model, _ids(), 0.5, structure=structure, allocation=allocation, lr=0.2, **FAST)
    mlp_keep, kv_keep = width - round(0.5 * width), kv - round(0.5 * kv)
    assert len(report.widths) == blocks
    if "mlp" in structure:
        ws = [w["mlp"] for w in report.widths]
        assert sum(ws) == blocks * mlp_keep and min(ws) >= 1  # exact over the model, every block keeps one
        for block, w in zip(adapter.blocks(), ws):
            assert LinearView(adapter.mlp_out(block)).d_in == w
            assert all(LinearView(m).d_out == w for m in adapter.mlp_in(block))
        assert torch.equal(report.keep["mlp"].sum(1), torch.tensor(ws))
        assert not (report.gates["mlp"][~report.keep["mlp"]]).any()
    if "heads" in structure:
        ws = [w["heads"] for w in report.widths]
        assert sum(ws) == blocks * kv_keep and min(ws) >= 1
        group_cols = adapter.head_dim * (heads // kv)
        for i, (block, w) in enumerate(zip(adapter.blocks(), ws)):
            o = LinearView(adapter.attention_out(block)).weight
            assert int(report.keep["heads"][i].sum()) == w
            if adapter.shrink_heads:
                assert o.shape[1] == w * group_cols
            else:  # OPT, GPT-2: shapes kept, pruned heads zeroed
                assert o.shape[1] == kv * group_cols
                assert (o.reshape(o.shape[0], kv, -1)[:, ~report.keep["heads"][i]] == 0).all()
    if allocation == "uniform":
        assert report.uniform
        if "mlp" in structure:
            assert adapter.intermediate_size == mlp_keep
        if "heads" in structure and adapter.shrink_heads:
            assert adapter.n_kv_heads == kv_keep and model.config.num_attention_heads == kv_keep * heads // kv
    logits = _logits(model, _ids(2, 16))
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()
    assert report.params_after < report.params_before or not adapter.shrink_heads


def _gated_logits(dense, report, structure, ids):
    """Logits of the dense model with the final hard gates applied to the output linears' inputs."""
    adapter = get_adapter(dense)
    handles = []
    for i, block in enumerate(adapter.blocks()):
        if "mlp" in structure:
            g = report.gates["mlp"][i]
            handles.append(adapter.mlp_out(block).register_forward_pre_hook(lambda m, a, g=g: (a[0] * g,)))
        if "heads" in structure:
            g = report.gates["heads"][i].repeat_interleave(adapter.head_dim * (adapter.n_heads // adapter.n_kv_heads))
            handles.append(adapter.attention_out(block).register_forward_pre_hook(lambda m, a, g=g: (a[0] * g,)))
    try:
        return _logits(dense, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("structure", ["mlp", "heads", "mlp+heads"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "opt"])
def test_shrunk_model_equals_the_gated_model(name, structure):
    dense = _model(name)
    model, report = spap.ddp_prune(copy.deepcopy(dense), _ids(), 0.4, structure=structure, lr=0.2, **FAST)
    ids = _ids(2, 16)
    torch.testing.assert_close(_logits(model, ids), _gated_logits(dense, report, structure, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", ["mlp", "heads", "mlp+heads"])
def test_only_the_folded_gates_change_kept_weights(structure):
    dense = _model("llama")
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    model, report = spap.ddp_prune(copy.deepcopy(dense), _ids(), 0.5, structure=structure, lr=0.2, **FAST)
    adapter = get_adapter(dense)
    hd, group = adapter.head_dim, adapter.n_heads // adapter.n_kv_heads
    expected = dict(before)
    for i in range(len(adapter.blocks())):
        p = f"model.layers.{i}."
        if "mlp" in structure:
            g, keep = report.gates["mlp"][i], torch.nonzero(report.keep["mlp"][i]).flatten()
            for name in ("gate_proj", "up_proj"):
                expected[p + f"mlp.{name}.weight"] = before[p + f"mlp.{name}.weight"][keep]
            expected[p + "mlp.down_proj.weight"] = before[p + "mlp.down_proj.weight"][:, keep] * g[keep]
        if "heads" in structure:
            g, kv = report.gates["heads"][i], torch.nonzero(report.keep["heads"][i]).flatten()
            q_rows = (kv[:, None] * group * hd + torch.arange(group * hd)).flatten()
            kv_rows = (kv[:, None] * hd + torch.arange(hd)).flatten()
            expected[p + "self_attn.q_proj.weight"] = before[p + "self_attn.q_proj.weight"][q_rows]
            expected[p + "self_attn.k_proj.weight"] = before[p + "self_attn.k_proj.weight"][kv_rows]
            expected[p + "self_attn.v_proj.weight"] = before[p + "self_attn.v_proj.weight"][kv_rows]
            scale = g.repeat_interleave(group * hd)[q_rows]
            expected[p + "self_attn.o_proj.weight"] = before[p + "self_attn.o_proj.weight"][:, q_rows] * scale
    after = dict(model.named_parameters())
    assert after.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(after[name].detach(), value), name
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored


def test_same_seed_same_result_and_online_teacher_matches_cache():
    runs = []
    for seed, teacher in ((3, "cache"), (3, "cache"), (3, "online"), (4, "cache")):
        model, report = spap.ddp_prune(_model(), _ids(), 0.5, structure="mlp+heads", seed=seed, teacher=teacher,
                                       lr=0.2, **FAST)
        runs.append((model.state_dict(), report))
    (a, ra), (b, rb), (c, rc), (d, rd) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ra.widths == rb.widths and all(torch.equal(ra.gates[t], rb.gates[t]) for t in ra.gates)
    assert ra.history == rb.history
    assert rc.widths == ra.widths and all(torch.equal(ra.gates[t], rc.gates[t]) for t in ra.gates)
    assert rd.history != ra.history  # another seed, another order of windows


def test_training_moves_the_soft_count_to_the_target_and_cleans_up():
    model = _model()
    model, report = spap.ddp_prune(model, _ids(8), 0.5, structure="mlp", steps=60, batch_size=2, distill=False,
                                   progress=False)
    first, last = report.history[0], report.history[-1]
    assert first["kept_mlp"] == pytest.approx((1 + 1 / 1.5) / 2) and abs(last["kept_mlp"] - 0.5) < 0.02
    assert last["tau"] == pytest.approx(0.02) and last["lambda_mlp"] != 0
    adapter = get_adapter(model)
    assert all(not adapter.mlp_out(b)._forward_pre_hooks for b in adapter.blocks())  # gate hooks removed
    assert report.to_dict()["gates"]["mlp"][0][0] == pytest.approx(float(report.gates["mlp"][0, 0]))
    assert "kept per block" in report.summary()


def test_uniform_allocation_saves_and_reloads_with_stock_transformers(tmp_path):
    model, report = spap.ddp_prune(_model(), _ids(), 0.5, structure="mlp+heads", allocation="uniform", lr=0.2, **FAST)
    spap.save_model(model, None, tmp_path / "out", report=report)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(2, 16)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


@pytest.mark.parametrize("kwargs, message", [
    (dict(structure="unstructured"), "'structure' argument of ddp_prune must be one of 'mlp', 'heads'"),
    (dict(structure="2:4"), "'structure'"),
    (dict(sparsity=1.0), "'sparsity' argument of ddp_prune must be a float in the range \\[0, 1\\)"),
    (dict(sparsity=True), "'sparsity'"),
    (dict(steps=0), "'steps' argument of ddp_prune must be an int in the range \\[1, inf\\)"),
    (dict(steps=2.5), "'steps'"),
    (dict(batch_size=0), "'batch_size'"),
    (dict(lr=0.0), "'lr' argument of ddp_prune must be a float in the range \\(0, inf\\)"),
    (dict(lr_dual=-1.0), "'lr_dual' argument of ddp_prune must be a float in the range \\[0, inf\\)"),
    (dict(rho=float("nan")), "'rho'"),
    (dict(tau=(0.01, 0.5)), "'tau' argument of ddp_prune must be a pair"),
    (dict(tau=0.1), "'tau'"),
    (dict(warmup=1.5), "'warmup' argument of ddp_prune must be a float in the range \\[0, 1\\]"),
    (dict(distill="kl"), "'distill' argument of ddp_prune must be a bool"),
    (dict(teacher="disk"), "'teacher' argument of ddp_prune must be one of 'cache', 'online'"),
    (dict(allocation="layer"), "'allocation' argument of ddp_prune must be one of 'global', 'uniform'"),
    (dict(seed=-1), "'seed'"),
    (dict(structure="heads", sparsity=0.9), "would prune all 3 key-value groups"),
    (dict(calib="some text"), "'calib' argument must be a list of strings"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    model = _model()
    dense = copy.deepcopy(model.state_dict())
    calib = kwargs.pop("calib", _ids())
    sparsity = kwargs.pop("sparsity", 0.3)
    with pytest.raises(ValueError, match=message):
        spap.ddp_prune(model, calib, sparsity, progress=False, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())


def test_unsupported_model_and_oversized_teacher_cache_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="spap does not support"):
        spap.ddp_prune(torch.nn.Linear(2, 2), _ids())
    monkeypatch.setattr(spap.global_methods.ddp, "TEACHER_CACHE_LIMIT", 1000)
    with pytest.raises(ValueError, match="teacher='online'"):
        spap.ddp_prune(_model(), _ids(), progress=False)


@pytest.mark.slow
def test_smollm2_smoke_few_steps():
    torch.set_num_threads(1)
    model, tok = spap.load_model("smollm2")
    calib = spap.data.random_windows(spap.data.c4_documents(0, 50), tok, n=4, seqlen=128, seed=0)
    model, report = spap.ddp_prune(model, calib, 0.3, structure="mlp+heads", steps=3, batch_size=2, progress=False)
    assert sum(w["mlp"] for w in report.widths) == 30 * (1536 - 461)
    assert sum(w["heads"] for w in report.widths) == 30 * 2  # round(0.3 × 3) = 1 of 3 KV groups per block
    assert report.history[-1]["loss"] >= 0 and len(report.history) == 3
    logits = _logits(model, calib[:1, :32])
    assert torch.isfinite(logits).all()
