"""SPAP on real SmolLM2-135M layer problems (slow group: loads the model and runs calibration text)."""

from __future__ import annotations

import pytest
import torch

import solvers

pytestmark = pytest.mark.slow

LAYERS = (0, 15, 29)


@pytest.fixture(scope="module")
def real_problems():
    """Dense-input Gram matrices of down_proj and o_proj in three blocks, from 8 C4 windows of 256 tokens."""
    from spap.data import c4_documents, random_windows
    from spap.models import load_model

    model, tokenizer = load_model("smollm2")
    ids = random_windows(c4_documents(0, 500), tokenizer, n=8, seqlen=256, seed=0)
    accs, handles = {}, []
    for layer in LAYERS:
        block = model.model.layers[layer]
        for name, module in (("down_proj", block.mlp.down_proj), ("o_proj", block.self_attn.o_proj)):
            acc = accs[(layer, name)] = (solvers.GramAccumulator(module.in_features), module.weight.detach().clone())
            handles.append(module.register_forward_pre_hook(lambda mod, args, acc=acc[0]: acc.add_batch(args[0])))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return accs, model.config.head_dim if hasattr(model.config, "head_dim") else 64


@pytest.mark.parametrize("layer", LAYERS)
def test_spap_beats_score_selections_on_down_proj(real_problems, layer):
    accs, _ = real_problems
    acc, W = accs[(layer, "down_proj")]
    p = solvers.LayerProblem(W, acc.H, solvers.channels(W.shape[1]), sparsity=0.3)
    spap = solvers.solve(p, "spap")
    assert int((~spap.keep).sum()) == round(0.3 * W.shape[1])
    assert spap.stats["local_optimum"]
    for method in ("magnitude", "wanda"):
        other = solvers.solve(p, method, refit=True)
        assert spap.objective <= other.objective * (1 + 1e-9), method
    assert 0 < spap.relative_error < 1


@pytest.mark.parametrize("layer", LAYERS)
def test_spap_prunes_heads_of_o_proj(real_problems, layer):
    accs, head_dim = real_problems
    acc, W = accs[(layer, "o_proj")]
    p = solvers.LayerProblem(W, acc.H, solvers.heads(W.shape[1], head_dim), n_prune=3)
    spap = solvers.solve(p, "spap")
    exact = solvers.solve(p, "exact")  # C(9, 3) = 84 head sets: the global optimum
    assert spap.objective <= exact.objective * (1 + 1e-6)
