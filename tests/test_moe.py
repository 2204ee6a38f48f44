"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE): each expert's channels are units, the routers stay.

Every structure's prune, save with spap.save_model and stock reload with identical logits runs in
tests/test_pipeline.py::test_structure_runs_with_exact_sparsity_and_reloads (CONFIGS "mixtral", "qwen2_moe");
verify on them in tests/test_discovery.py::test_every_family_layout_verifies_on_its_model."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import spap
from spap import pipeline, units
from spap.adapters import Experts, get_adapter
from spap.capture import ExpertGrams

from .test_pipeline import CONFIGS, MOE, _hooks, _ids, _model


def _routed_by_hand(model, block_index: int, ids: torch.Tensor):
    """``(hidden, top_k_index, top_k_weights)`` the experts of block ``block_index`` receive for ``ids``,
    recorded from the model's own forward (no spap code)."""
    seen = {}
    experts = get_adapter(model).blocks()[block_index].mlp.experts

    def record(module, args):
        seen["args"] = [a.detach().clone() for a in args]

    handle = experts.register_forward_pre_hook(record)
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return seen["args"]


@pytest.mark.parametrize("name", MOE)
def test_each_expert_gram_is_built_from_the_tokens_routed_to_it(name):
    """H_e = Σ w² x xᵀ over the tokens the router sends to expert e, x = act(gate_e h) · up_e h."""
    model = _model(name)
    adapter = get_adapter(model)
    ids = _ids(2, 16)
    hidden, index, weights = _routed_by_hand(model, 1, ids)
    grams = ExpertGrams(adapter.experts(adapter.blocks()[1]), torch.device("cpu"))
    with torch.no_grad():
        model(ids, use_cache=False)
    grams.remove()
    module = adapter.blocks()[1].mlp.experts
    for e in range(4):
        rows = [(t, k) for t in range(index.shape[0]) for k in range(index.shape[1]) if index[t, k] == e]
        H = torch.zeros(32, 32, dtype=torch.float64)
        for t, k in rows:
            gate, up = (module.gate_up_proj[e] @ hidden[t]).chunk(2)
            x = (torch.nn.functional.silu(gate) * up * weights[t, k]).double()
            H += torch.outer(x, x)
        acc = grams.accumulators[e]
        assert acc.n_samples == len(rows) > 0
        torch.testing.assert_close(acc.H, H, rtol=1e-5, atol=1e-6)
    # the accumulators saw as many (token, expert) pairs as the router picked
    assert sum(a.n_samples for a in grams.accumulators) == index.numel()


@pytest.mark.parametrize("name", MOE)
def test_routing_is_unchanged_by_pruning_the_experts(name):
    """MLP pruning leaves the attention, so block 0's router sees the same input and picks the same experts
    with the same weights."""
    model = _model(name)
    ids = _ids(2, 16)
    before = _routed_by_hand(model, 0, ids)
    model, _ = spap.prune_layerwise(model, _ids(), 0.5, structure="mlp", progress=False)
    after = _routed_by_hand(model, 0, ids)
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_an_expert_without_tokens_is_solved_on_the_identity():
    """No calibration token reached expert 3: its problem is posed on H = I, so it keeps the channels whose
    down-projection columns are largest, with their weights unchanged."""
    model = _model("mixtral")
    adapter = get_adapter(model)
    block = adapter.blocks()[0]
    settings = pipeline.check_arguments(model, 0.5, structure="mlp", progress=False)
    kind = units.kinds(adapter, ["mlp"])["experts"]
    experts = kind.experts(block)
    grams = ExpertGrams(experts, torch.device("cpu"))
    grams.remove()  # filled by hand below
    accumulators = grams.accumulators
    gen = torch.Generator().manual_seed(0)
    for e in range(3):
        accumulators[e].add_batch(torch.randn(64, 32, generator=gen))
    down = experts.down(3).clone()
    records, kept = pipeline._solve_experts(kind, block, 0, accumulators, settings)
    assert kept.shape == (4, 16) and [r.target for r in records] == [f"experts.{e}" for e in range(4)]
    largest = down.square().sum(0).topk(16).indices.sort().values
    assert torch.equal(kept[3], largest)
    torch.testing.assert_close(adapter.experts(block).down(3), down[:, largest])


def test_expert_widths_keep_to_a_multiple_of_8_and_run_with_the_default_kernel(tmp_path):
    """30 % of 32 channels is 10 by the one rounding rule; the 22 kept round to 24, which transformers'
    grouped_mm kernel (its default) runs, in memory and after a stock reload."""
    model = _model("mixtral")
    assert model.config._experts_implementation == "grouped_mm"
    model, report = spap.prune_layerwise(model, _ids(), 0.3, structure="mlp", progress=False)
    assert model.config.intermediate_size == 24
    assert {(r.kept, r.total) for r in report.layers} == {(24, 32)}
    ids = _ids(2, 16)
    with torch.no_grad():
        logits = model(ids).logits
    spap.save_model(model, None, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="'sparsity'.*prunes no channel of an expert"):
        pipeline.check_arguments(_model("mixtral"), 0.05, structure="mlp")


def test_resume_gives_the_identical_result(tmp_path):
    reference, _ = spap.prune_layerwise(_model("qwen2_moe"), _ids(), 0.5, structure="mlp", progress=False)
    with pytest.raises(spap.checkpoint.Interrupted), _hooks(stop_after_blocks=1):
        spap.prune_layerwise(_model("qwen2_moe"), _ids(), 0.5, structure="mlp", checkpoint_dir=str(tmp_path),
                             progress=False)
    resumed, _ = spap.prune_layerwise(_model("qwen2_moe"), _ids(), 0.5, structure="mlp", checkpoint_dir=str(tmp_path),
                                      resume=True, progress=False)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_verify_refuses_experts_cut_in_the_wrong_rows(monkeypatch):
    """An Experts.keep that cuts the up half at the gate half's rows is caught: removing a channel does not
    compute what zeroing it does."""
    adapter = get_adapter(_model("mixtral"))
    units.verify(adapter)

    def wrong_keep(self, idx):
        m = self.module
        idx = idx.expand(self.n, -1) if idx.dim() == 1 else idx
        rows = torch.cat([idx, idx], dim=1)  # the gate rows twice: the up rows are lost
        m.gate_up_proj = torch.nn.Parameter(torch.gather(m.gate_up_proj.data, 1, rows[:, :, None].expand(
            -1, -1, m.gate_up_proj.shape[2])), requires_grad=False)
        m.down_proj = torch.nn.Parameter(torch.gather(m.down_proj.data, 2, idx[:, None, :].expand(
            -1, m.down_proj.shape[1], -1)), requires_grad=False)

    monkeypatch.setattr(Experts, "keep", wrong_keep)
    with pytest.raises(ValueError, match="'model'.*removing one channel of every expert of mlp.experts.*not its own"):
        units.verify(adapter)


@pytest.mark.parametrize("name, kwargs, argument", [
    ("qwen2_moe", dict(sparsity=[0.25, 0.5]), "'sparsity'"),
    ("qwen2_moe", dict(allocation="owl"), "'allocation'"),
    ("qwen2_moe", dict(target="dense"), "'target'"),
    ("qwen2_moe", dict(candidates=("magnitude",)), "'candidates'"),
    ("mixtral", dict(method="flap"), "'method'.*bias of the experts' down projection \\(mlp.experts.down_proj\\)"),
])
def test_what_experts_do_not_support_is_refused_before_any_work(name, kwargs, argument):
    model = _model(name)
    before = copy.deepcopy(model.state_dict())
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=argument):
        spap.prune_layerwise(model, _ids(), kwargs.pop("sparsity"), structure="mlp", progress=False, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_unstructured_knapsack_refuses_experts():
    model = _model("mixtral")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'allocation'.*'knapsack'.*not its experts"):
        spap.prune_layerwise(model, _ids(), 0.5, structure="unstructured", allocation="knapsack", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_other_entry_points_refuse_experts(tmp_path):
    model = _model("mixtral")
    with pytest.raises(ValueError, match="'model' argument of gisp is a MixtralForCausalLM, whose MLPs are mixtures"):
        spap.gisp(model, _ids(), (0.5,), progress=False)
    with pytest.raises(ValueError, match="'model'.*save it with spap.save_model"):
        spap.save_pruned(model, None, tmp_path / "out")


def test_a_block_without_experts_is_refused():
    config = copy.deepcopy(CONFIGS["qwen2_moe"])
    config.mlp_only_layers = [1]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="'model'.*block 1 spap cannot prune: it has a dense MLP"):
        spap.prune_layerwise(model, _ids(), 0.5, progress=False)


def test_info_describes_the_experts(tmp_path, capsys):
    from spap.cli import main

    _model("qwen2_moe").save_pretrained(tmp_path / "moe")
    main(["info", str(tmp_path / "moe")])
    assert "MLP width 64; 4 experts' width 32; heads 4" in capsys.readouterr().out
