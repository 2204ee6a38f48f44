"""prune_layerwise on tiny random-weight models of every supported family."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers

import spap
from spap import units
from spap.adapters import LinearView, get_adapter

COMMON = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **COMMON)


def _configs():
    out = {
        "llama": transformers.LlamaConfig(**LLAMA_LIKE),
        "mistral": transformers.MistralConfig(**LLAMA_LIKE),
        "qwen2": transformers.Qwen2Config(**LLAMA_LIKE),
        "qwen3": transformers.Qwen3Config(head_dim=16, **LLAMA_LIKE),
        "gemma": transformers.GemmaConfig(head_dim=16, **LLAMA_LIKE),
        "gemma2": transformers.Gemma2Config(head_dim=16, **LLAMA_LIKE),
        "gemma3_text": transformers.Gemma3TextConfig(head_dim=16, **LLAMA_LIKE),
        "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                                      vocab_size=128, num_hidden_layers=2, max_position_embeddings=64),
        "gpt2": transformers.GPT2Config(n_embd=64, n_inner=128, n_head=4, n_layer=2, vocab_size=128, n_positions=64),
        # no adapter of their own: found by structure (spap.adapters.discover) and verified (spap.units.verify)
        "phi3": transformers.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **LLAMA_LIKE),  # fused qkv, gate_up
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                               **COMMON),  # query_key_value per head, biases, parallel residual
        "falcon": transformers.FalconConfig(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_kv_heads=2,
                                            new_decoder_architecture=True, bias=True, **COMMON),  # per KV group
        "starcoder2": transformers.Starcoder2Config(**LLAMA_LIKE),  # c_fc/c_proj, biases; removes pruned heads
        # mixtures of experts: 4 experts of 32 channels, 2 per token; Qwen2-MoE adds a shared expert of 64
        "mixtral": transformers.MixtralConfig(**{**LLAMA_LIKE, "intermediate_size": 32}, num_local_experts=4,
                                              num_experts_per_tok=2),
        "qwen2_moe": transformers.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                 num_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
    }
    return out


DISCOVERED = ("phi3", "gpt_neox", "falcon", "starcoder2")
MOE = ("mixtral", "qwen2_moe")


CONFIGS = _configs()
STRUCTURES = ["mlp", "heads", "mlp+heads", "unstructured", "2:4"]


def _model(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]))
    return model.eval()


@contextlib.contextmanager
def _hooks(**switches):
    """Set the pipeline's test switches (``spap.pipeline._HOOKS``) for the block."""
    saved = spap.pipeline._HOOKS
    spap.pipeline._HOOKS = spap.pipeline._TestHooks(**switches)
    try:
        yield
    finally:
        spap.pipeline._HOOKS = saved


def _stop_after(blocks: int):
    return _hooks(stop_after_blocks=blocks)


def _ids(n=8, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_structure_runs_with_exact_sparsity_and_reloads(name, structure, tmp_path):
    model = _model(name)
    adapter = get_adapter(model)
    width, kv = adapter.intermediate_size, adapter.n_kv_heads
    experts_width = adapter.experts_width if adapter.has_experts else None
    routers = {n: p.clone() for n, p in model.named_parameters() if ".gate." in n or "shared_expert_gate" in n}
    experts = {n: p.clone() for n, p in model.named_parameters() if ".experts." in n}
    dense = {n: LinearView(m).weight.clone() for n, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and "shared_expert_gate" not in n}
    model, report = spap.prune_layerwise(model, _ids(), 0.5, structure=structure, progress=False)
    # routers (Mixtral's and Qwen2-MoE's gate, Qwen2-MoE's shared_expert_gate) are never changed
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in routers.items())
    if adapter.has_experts and "mlp" in structure:  # every expert keeps half its channels
        assert adapter.experts_width == experts_width // 2
        for block in adapter.blocks():
            e = adapter.experts(block)
            assert (e.width, tuple(e.module.gate_up_proj.shape)) == (experts_width // 2, (4, experts_width, 64))
    elif adapter.has_experts and structure == "heads":  # heads leave the experts alone
        assert all(torch.equal(p, model.get_parameter(n)) for n, p in experts.items())
    elif adapter.has_experts:  # every expert's [gate; up] and down projection, rows of (d_out, d_in)
        for block in adapter.blocks():
            e = adapter.experts(block)
            for W in [e.gate_up(i) for i in range(e.n)] + [e.down(i) for i in range(e.n)]:
                if structure == "2:4":
                    assert bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
                else:
                    assert int((W == 0).sum()) >= W.numel() // 2
    if "mlp" in structure and adapter.dense_mlp:
        assert adapter.intermediate_size == width // 2
        for block in adapter.blocks():
            assert LinearView(adapter.mlp_out(block)).d_in == width // 2
            parts = [id(m) for m, _ in adapter.mlp_rows(block)]  # a fused [gate; up] linear holds two
            assert all(LinearView(m).d_out == parts.count(id(m)) * (width // 2) for m in adapter.mlp_in(block))
    if "heads" in structure and adapter.shrink_heads:
        assert adapter.n_kv_heads == kv - round(0.5 * kv)
        assert model.config.num_attention_heads == adapter.n_kv_heads * (4 // kv)
    if "heads" in structure and not adapter.shrink_heads:  # OPT, GPT-2, ...: same shapes, pruned heads zeroed
        heads = units.kinds(adapter, ["heads"])["heads"]
        for block in adapter.blocks():
            W = LinearView(heads.output_linear(block)).weight
            zero_groups = (W.reshape(W.shape[0], kv, -1) == 0).all(-1).all(0)
            assert int(zero_groups.sum()) == round(0.5 * kv)
            for module, offset, rows in heads.input_rows(block):  # each part of a fused linear at its offset
                part = LinearView(module).weight[offset : offset + kv * rows].reshape(kv, -1)
                assert torch.equal((part == 0).all(-1), zero_groups)
    if structure in ("unstructured", "2:4"):
        for n, m in model.named_modules():
            if n in dense and ".layers." in f".{n}." or (n in dense and ".h." in f".{n}."):
                W = LinearView(m).weight
                assert W.shape == dense[n].shape
                if structure == "2:4":
                    assert bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
                else:
                    assert int((W == 0).sum()) >= W.numel() // 2
    assert report.params_after <= report.params_before
    ids = _ids(2, 16)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    spap.save_model(model, None, tmp_path / "out", report=report)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / "spap_report.json").is_file()


def test_bad_arguments_fail_before_any_work():
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(sparsity=1.0), "'sparsity'"),
        (dict(structure="rows"), "'structure'"),
        (dict(method="nope"), "'method'"),
        (dict(method_options={"rho": 1}), "unknown option"),
        (dict(structure="unstructured", method_options={"uncompensated": 0.3}), "applies to column groups"),
        (dict(propagate="sideways"), "'propagate'"),
        (dict(batch_size=0), "'batch_size'"),
        (dict(resume=True), "checkpoint_dir"),
        (dict(damp=-0.1), "'damp'"),
        (dict(device="gpu0"), "'device'"),
        (dict(offload="nowhere"), "'offload'"),
        (dict(structure="4:2"), "'structure'"),
        (dict(structure="2:7"), "multiple of 7"),
        (dict(gram_dtype=torch.float16), "'gram_dtype'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            spap.prune_layerwise(model, _ids(), **{"sparsity": 0.3, **kwargs}, progress=False)
    with pytest.raises(ValueError, match="'calib'"):
        spap.prune_layerwise(model, "just one string", 0.3, progress=False)
    with pytest.raises(ValueError, match="'tokenizer'"):
        spap.prune_layerwise(model, ["some text", "more text"], 0.3, progress=False)
    with pytest.raises(ValueError, match="does not support.*Supported model types"):
        spap.prune_layerwise(torch.nn.Linear(2, 2), _ids(), 0.3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_same_seed_same_result():
    a, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.3, progress=False)
    b, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.3, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("structure", ["mlp+heads", "unstructured"])
def test_resume_after_interruption_gives_the_identical_result(structure, tmp_path):
    cfg = copy.deepcopy(CONFIGS["llama"])
    cfg.num_hidden_layers = 4
    fresh = lambda: transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()  # noqa: E731
    torch.manual_seed(0)
    reference, _ = spap.prune_layerwise(fresh(), _ids(), 0.5, structure=structure, progress=False)
    torch.manual_seed(0)
    model = fresh()
    with pytest.raises(spap.checkpoint.Interrupted), _stop_after(2):
        spap.prune_layerwise(model, _ids(), 0.5, structure=structure, checkpoint_dir=str(tmp_path), progress=False)
    torch.manual_seed(0)
    resumed, report = spap.prune_layerwise(fresh(), _ids(), 0.5, structure=structure, checkpoint_dir=str(tmp_path),
                                           resume=True, progress=False)
    assert [r.block for r in report.layers] == sorted(r.block for r in report.layers)
    assert {r.block for r in report.layers} == {0, 1, 2, 3}
    assert len(report.block_seconds) == 2 and all(s > 0 for s in report.block_seconds)  # blocks 2 and 3 only
    ref_state = reference.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_resume_refuses_other_arguments(tmp_path):
    with pytest.raises(spap.checkpoint.Interrupted), _stop_after(1):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="different arguments"):
        spap.prune_layerwise(_model("llama"), _ids(), 0.25, checkpoint_dir=str(tmp_path), resume=True, progress=False)


def test_dense_propagation_and_list_of_batches():
    model, report = spap.prune_layerwise(_model("llama"), list(_ids().split(3)), 0.25, propagate="dense", progress=False)
    assert report.settings["n_batches"] == 3 and model.config.intermediate_size == 96


def test_nan_in_activations_names_the_block():
    model = _model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="block 1"):
        spap.prune_layerwise(model, _ids(), 0.3, progress=False)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_mlp_tail_shortcut_equals_the_full_second_pass(name):
    """The first pass may stop at down_proj and the second run only the MLP: same model as full passes."""
    fast, _ = spap.prune_layerwise(_model(name), _ids(), 0.5, progress=False)
    with _hooks(mlp_tail=False):
        full, _ = spap.prune_layerwise(_model(name), _ids(), 0.5, progress=False)
    for (k, a), b in zip(fast.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "opt", "gpt2"])
def test_forward_floor_is_the_model_own_pass_through_the_blocks(name):
    """forward_pass runs the blocks as the prune does and gives what the model's last block gives."""
    from spap.capture import forward_pass

    model = _model(name)
    blocks = get_adapter(model).blocks()
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    batches = list(_ids().split(4))
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    handle.remove()
    ours = forward_pass(model, blocks, batches, torch.device("cpu"), torch.device("cpu"))
    for a, b in zip(ours, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert spap.forward_seconds(model, _ids(), batch_size=4) > 0
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for kwargs, message in [(dict(batch_size=0), "'batch_size'"), (dict(device="gpu0"), "'device'"),
                            (dict(offload="nowhere"), "'offload'")]:
        with pytest.raises(ValueError, match=message):
            spap.forward_seconds(model, _ids(), **kwargs)
    with pytest.raises(ValueError, match="'calib'"):
        spap.forward_seconds(model, "just one string")


@pytest.mark.parametrize("structure, stages", [
    ("mlp", {"metric", "inputs", "forward", "gram", "solve", "propagate"}),
    ("unstructured", {"inputs", "forward", "gram", "solve", "propagate"}),
])
def test_report_splits_the_time_by_stage(structure, stages, tmp_path):
    _, report = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, progress=False)
    assert set(report.stage_seconds) == stages
    assert all(v >= 0 for v in report.stage_seconds.values())
    assert sum(report.stage_seconds.values()) <= report.seconds
    assert report.solver_seconds <= report.stage_seconds["solve"]  # the solvers run inside the solve stage
    assert report.metric_seconds == report.stage_seconds.get("metric", 0.0)
    assert "time by stage: " in report.summary()
    _, report = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, progress=False,
                                     checkpoint_dir=str(tmp_path / "ck"))
    assert set(report.stage_seconds) == stages | {"checkpoint"}


# --- CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs them on one) ------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("structure", ["mlp", "mlp+heads", "unstructured", "2:4"])
@pytest.mark.parametrize("start", ["cpu", "cuda"])
def test_cuda_prune_from_a_model_on_either_device(structure, start):
    """Blocks run on CUDA; a model that starts on the host goes back there (offload), one that starts on
    CUDA with offload="cuda" stays there; the result has the CPU run's shapes and parameter count."""
    cpu, cpu_report = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, device="cpu",
                                           progress=False)
    model = _model("llama").to(start)
    model, report = spap.prune_layerwise(model, _ids(), 0.5, structure=structure, device="cuda", offload=start,
                                         progress=False)
    assert report.peak_memory["cuda"] > 0 and report.stage_seconds["solve"] > 0
    assert report.params_after == cpu_report.params_after
    assert {p.device.type for p in model.parameters()} == {start}
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in cpu.parameters()]
    with torch.no_grad():
        assert torch.isfinite(model(_ids(2, 16).to(start)).logits).all()
    assert spap.forward_seconds(model, _ids(), device="cuda", offload=start) > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("structure", ["mlp", "unstructured"])
def test_cuda_resume_gives_the_identical_result(structure, tmp_path):
    reference, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, device="cuda",
                                        progress=False)
    with pytest.raises(spap.checkpoint.Interrupted), _stop_after(1):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, device="cuda",
                             checkpoint_dir=str(tmp_path), progress=False)
    resumed, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, device="cuda",
                                      checkpoint_dir=str(tmp_path), resume=True, progress=False)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
