"""structure="mlp+heads": the heads are solved first and the MLP's problem is posed on the inputs the
pruned attention gives it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import transformers

import spap
from spap.adapters import get_adapter

CONFIG = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=128, num_hidden_layers=2, max_position_embeddings=64)


def _ids(n=8, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _prune_recording(monkeypatch, **kwargs):
    """Prune a tiny Llama with 'mlp+heads'; returns (dense copy, pruned model, recorded problems in order)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG)).eval()
    dense = copy.deepcopy(model)
    problems = []
    solve = spap.pipeline._solve

    def recording(problem, method, options, metric):
        problems.append(problem)
        return solve(problem, method, options, metric)

    monkeypatch.setattr(spap.pipeline, "_solve", recording)
    spap.prune_layerwise(model, _ids(), 0.5, structure="mlp+heads", gram_dtype=torch.float64, progress=False,
                         **kwargs)
    return dense, model, problems


def _mlp_out_inputs(dense, pruned, ids):
    """For every block: the input of the dense MLP's down_proj when the MLP reads what the *pruned*
    model's block (pruned attention, previous blocks pruned) feeds it; shape (tokens, intermediate)."""
    entries = {}
    handles = [block.mlp.register_forward_pre_hook(lambda m, args, i=i: entries.__setitem__(i, args[0]))
               for i, block in enumerate(pruned.model.layers)]
    with torch.no_grad():
        pruned(ids)
        for h in handles:
            h.remove()
        out = []
        for i, block in enumerate(dense.model.layers):
            u = entries[i].reshape(-1, entries[i].shape[-1])
            out.append(F.silu(block.mlp.gate_proj(u)) * block.mlp.up_proj(u))
    return out


def test_mlp_problem_is_posed_on_the_pruned_attentions_outputs(monkeypatch):
    dense, pruned, problems = _prune_recording(monkeypatch, method="wanda_sp")
    assert [p.shape[1] for p in problems] == [64, 128, 64, 128]  # o_proj (heads) first, then down_proj
    inputs = _mlp_out_inputs(dense, pruned, _ids())
    for i, x in enumerate(inputs):
        p = problems[2 * i + 1]
        x = x.double()
        torch.testing.assert_close(p.H64, x.T @ x, rtol=1e-6, atol=1e-6 * float(p.H64.abs().max()))
        torch.testing.assert_close(p.input_mean.double(), x.mean(0), rtol=1e-6, atol=1e-8)
        assert p.n_samples == x.shape[0]


def test_mlp_problem_differs_from_the_dense_attentions_inputs(monkeypatch):
    """The old behaviour (both problems from the block's first pass) gives another Gram matrix."""
    dense, pruned, problems = _prune_recording(monkeypatch, method="wanda_sp")
    first = _mlp_out_inputs(dense, dense, _ids())[0].double()
    H_dense = first.T @ first
    assert (problems[1].H64 - H_dense).abs().max() > 1e-3 * H_dense.abs().max()


def test_heads_then_mlp_with_the_dense_target_and_candidates(monkeypatch):
    """target="dense" keeps a dense copy of the block for the reference stream, and candidates choose the
    heads first; both runs finish with the expected widths and a finite forward pass."""
    for kwargs in (dict(target="dense"), dict(candidates=("magnitude",))):
        _, pruned, problems = _prune_recording(monkeypatch, **kwargs)
        adapter = get_adapter(pruned)
        assert adapter.intermediate_size == 64 and adapter.n_kv_heads == 1
        assert [p.shape[1] for p in problems[:2]] in ([64, 128], [64, 64])
        with torch.no_grad():
            assert torch.isfinite(pruned(_ids(2, 16)).logits).all()


def test_reference_stream_of_the_mlp_comes_from_the_dense_block(monkeypatch):
    """With target="dense" the MLP problem's weight is the corrected one from C = Σ x_dense xᵀ, where
    x_dense is the dense block's down_proj input; on block 0 the pruned and dense streams enter equal,
    so with dense attention the MLP inputs would be equal and the corrected weight the weight itself."""
    dense, pruned, problems = _prune_recording(monkeypatch, target="dense", method="wanda_sp")
    W = dense.model.layers[0].mlp.down_proj.weight.double()
    assert (problems[1].weight.double() - W).abs().max() > 1e-6  # the attention was pruned: corrected
