"""How much to prune where: per-block targets, OWL and the knapsack allocation (solvers.allocation,
spap.allocation, prune_layerwise(sparsity=..., allocation=...))."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import solvers
from solvers.synthetic import make_problem
import spap
from spap.allocation import OWL, Knapsack

CFG = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=128, num_hidden_layers=4, max_position_embeddings=64)


def _model(layers: int = 4):
    torch.manual_seed(0)
    cfg = copy.deepcopy(CFG)
    cfg.num_hidden_layers = layers
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=8, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _mlp_widths(model) -> list[int]:
    return [b.mlp.down_proj.in_features for b in model.model.layers]


# --- the mathematics -------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_choose_counts_is_the_exact_optimum(data):
    layers = data.draw(st.integers(1, 4))
    counts = [sorted(data.draw(st.sets(st.integers(0, 8), min_size=1, max_size=4))) for _ in range(layers)]
    costs = [data.draw(st.lists(st.floats(0, 10), min_size=len(c), max_size=len(c))) for c in counts]
    best: dict[int, float] = {}
    for combo in itertools.product(*[range(len(c)) for c in counts]):
        t = sum(counts[i][j] for i, j in enumerate(combo))
        best[t] = min(best.get(t, np.inf), sum(costs[i][j] for i, j in enumerate(combo)))
    total = data.draw(st.sampled_from(sorted(best)))
    chosen = solvers.choose_counts(costs, counts, total)
    assert sum(chosen) == total and all(c in counts[i] for i, c in enumerate(chosen))
    assert sum(costs[i][counts[i].index(c)] for i, c in enumerate(chosen)) == pytest.approx(best[total], abs=1e-9)
    unreachable = max(best) + 1
    with pytest.raises(solvers.InvalidArgumentError, match="reaches"):
        solvers.choose_counts(costs, counts, unreachable)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(2, 50)), min_size=1, max_size=8), st.data())
def test_round_to_budget_hits_the_total_exactly(pairs, data):
    fractions, sizes = [p[0] for p in pairs], [p[1] for p in pairs]
    total = data.draw(st.integers(0, sum(s - 1 for s in sizes)))
    counts = solvers.round_to_budget(fractions, sizes, total)
    assert sum(counts) == total and all(0 <= c <= s - 1 for c, s in zip(counts, sizes))
    if total == round(sum(min(f * s, s - 1) for f, s in zip(fractions, sizes))):  # no budget shift: nearest ints
        assert all(abs(c - min(f * s, s - 1)) < 1 + 1e-9 for c, f, s in zip(counts, fractions, sizes))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=10), st.floats(0.1, 0.8), st.floats(0, 0.1))
def test_owl_sparsities_average_to_the_budget_and_spare_outliers(ratios, sparsity, spread):
    out = solvers.outlier_sparsities(ratios, sparsity, spread)
    assert np.mean(out) == pytest.approx(sparsity, abs=1e-12)
    assert max(out) - min(out) <= 2 * spread + 1e-12
    order = np.argsort(ratios, kind="stable")
    assert all(out[order[k]] >= out[order[k + 1]] - 1e-12 for k in range(len(order) - 1))


def test_owl_equal_ratios_give_the_uniform_sparsity():
    assert solvers.outlier_sparsities([0.3] * 5, 0.4, 0.08) == pytest.approx([0.4] * 5)


def test_removal_costs_are_the_greedy_masks_objectives():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, 80, dtype=torch.float64, generator=gen)
    W = torch.randn(5, 12, dtype=torch.float64, generator=gen)
    problem = solvers.LayerProblem(W, X @ X.T, solvers.channels(12), n_prune=1)
    costs = solvers.removal_costs(problem, 9)
    assert costs[0] == 0 and np.all(np.diff(costs) >= 0)
    for p in (1, 4, 9):
        sol = solvers.solve(solvers.LayerProblem(W, X @ X.T, solvers.channels(12), n_prune=p), "obs")
        assert costs[p] == pytest.approx(sol.objective, rel=1e-8)
    with pytest.raises(solvers.InvalidArgumentError, match="max_prune"):
        solvers.removal_costs(problem, 12)


# --- per-block targets -----------------------------------------------------------------------------

def test_sequence_of_targets_prunes_each_block_and_reloads(tmp_path):
    model, report = spap.prune_layerwise(_model(), _ids(), [0.25, 0.5, 0.0, 0.75], progress=False)
    assert _mlp_widths(model) == [96, 64, 128, 32]
    assert [r.kept for r in report.layers] == [96, 64, 128, 32]
    assert report.settings["sparsity"] == [0.25, 0.5, 0.0, 0.75]
    tok = _ids(2, 16)
    expected = model(tok).logits
    spap.save_pruned(model, None, tmp_path / "out")
    loaded, _ = spap.load_pruned(tmp_path / "out")
    assert torch.allclose(loaded(tok).logits, expected, atol=1e-5)


def test_mapping_by_index_and_pattern_first_match_wins():
    model, _ = spap.prune_layerwise(_model(), _ids(), {1: 0.5, "model.layers.[23]": 0.25, "*": 0.125}, progress=False)
    assert _mlp_widths(model) == [112, 64, 96, 96]


def test_heads_per_block_targets():
    model, _ = spap.prune_layerwise(_model(), _ids(), [0.5, 0.0, 0.5, 0.0], structure="heads", progress=False)
    assert [b.self_attn.k_proj.out_features // 16 for b in model.model.layers] == [1, 2, 1, 2]


def test_unstructured_per_block_targets():
    model, report = spap.prune_layerwise(_model(), _ids(), [0.5, 0.25, 0.0, 0.5], structure="unstructured",
                                         progress=False)
    zeros = [float((b.mlp.up_proj.weight == 0).double().mean()) for b in model.model.layers]
    assert zeros == pytest.approx([0.5, 0.25, 0.0, 0.5], abs=1e-9)
    rows = {line.split()[0]: line.split() for line in report.summary().splitlines()[1:8]}
    assert rows["q"][1:3] == ["4", "2048-4096/4096"]  # the kept range stays a column of its own


BAD = [
    (dict(sparsity=[0.3, 0.3]), "has 2 targets; the model has 4 blocks"),
    (dict(sparsity=[0.3, 0.3, 1.0, 0.3]), "the target of block 2 is 1.0"),
    (dict(sparsity={0: 0.3}), "no target for block 1"),
    (dict(sparsity={7: 0.3, "*": 0.2}), "has the key 7"),
    (dict(sparsity={0.5: 0.3}), "has the key 0.5"),
    (dict(sparsity="0.3"), "must be a float in"),
    (dict(sparsity=[0.3, 0.3, 0.3, 0.999]), "all 128 MLP channels|every MLP channel"),
    (dict(allocation="best"), "'allocation' argument"),
    (dict(sparsity=[0.3] * 4, allocation="owl"), "must then be a float"),
    (dict(structure="2:4", allocation="knapsack"), "only 'uniform' applies"),
    (dict(structure="unstructured", allocation=Knapsack(row_levels=0)), "row_levels"),
    (dict(structure="unstructured", allocation=Knapsack(row_spread=-0.1)), "row_spread"),
    (dict(structure="2:4", allocation="owl"), "only 'uniform' applies"),
    (dict(allocation=OWL(threshold=0.0)), "threshold"),
    (dict(allocation=OWL(spread=-0.1)), "spread"),
    (dict(allocation=Knapsack(levels=0)), "levels"),
    (dict(allocation=Knapsack(max_sparsity=1.0)), "max_sparsity"),
    (dict(allocation=Knapsack(windows=0)), "windows"),
    (dict(allocation=OWL(windows=2.5)), "windows"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_targets_fail_before_any_work(kwargs, message):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"sparsity": 0.3, **kwargs}
    with pytest.raises(ValueError, match=message):
        spap.prune_layerwise(model, _ids(), kwargs.pop("sparsity"), progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- allocation rules ------------------------------------------------------------------------------

def _uniform_params(structure="mlp", sparsity=0.5):
    return spap.prune_layerwise(_model(), _ids(), sparsity, structure=structure, progress=False)[1].params_after


@pytest.mark.parametrize("allocation", ["owl", "knapsack", OWL(spread=0.2), Knapsack(levels=8, windows=3)])
def test_allocations_keep_the_uniform_budget_exactly(allocation):
    model, report = spap.prune_layerwise(_model(), _ids(), 0.5, allocation=allocation, progress=False)
    assert report.params_after == _uniform_params()
    assert sum(_mlp_widths(model)) == 4 * 64 and min(_mlp_widths(model)) >= 1
    assert report.allocation["mlp"] == [128 - w for w in _mlp_widths(model)]
    assert report.settings["allocation"]["name"] in ("owl", "knapsack")
    assert report.allocation_seconds > 0


def test_knapsack_prunes_most_where_removal_costs_least():
    model = _model()
    with torch.no_grad():  # block 2's MLP barely reaches the output: removing its channels costs almost nothing
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    model, report = spap.prune_layerwise(model, _ids(), 0.5, allocation="knapsack", progress=False)
    widths = _mlp_widths(model)
    assert widths[2] == min(widths) and widths[2] < 64
    assert len(set(widths)) > 1


def test_knapsack_mlp_and_heads_budgets_are_separate():
    model, report = spap.prune_layerwise(_model(), _ids(), 0.5, structure="mlp+heads", allocation="knapsack",
                                         progress=False)
    assert sum(report.allocation["mlp"]) == 4 * 64 and sum(report.allocation["heads"]) == 4 * 1
    assert report.params_after == _uniform_params("mlp+heads")


def test_owl_on_unstructured_spreads_the_sparsity():
    model, report = spap.prune_layerwise(_model(), _ids(), 0.5, structure="unstructured",
                                         allocation=OWL(spread=0.1), progress=False)
    fractions = report.allocation["sparsity"]
    assert np.mean(fractions) == pytest.approx(0.5) and max(fractions) - min(fractions) == pytest.approx(0.2)
    zeros = [float((b.mlp.up_proj.weight == 0).double().mean()) for b in model.model.layers]
    assert zeros == pytest.approx(fractions, abs=1 / (128 * 64))


def test_resume_with_an_allocation_gives_the_identical_result(tmp_path):
    reference, _ = spap.prune_layerwise(_model(), _ids(), 0.5, allocation="knapsack", progress=False)
    saved = spap.pipeline._HOOKS
    spap.pipeline._HOOKS = spap.pipeline._TestHooks(stop_after_blocks=2)
    try:
        with pytest.raises(spap.checkpoint.Interrupted):
            spap.prune_layerwise(_model(), _ids(), 0.5, allocation="knapsack", checkpoint_dir=str(tmp_path),
                                 progress=False)
    finally:
        spap.pipeline._HOOKS = saved
    with pytest.raises(ValueError, match="different arguments"):
        spap.prune_layerwise(_model(), _ids(), 0.5, allocation="owl", checkpoint_dir=str(tmp_path), resume=True,
                             progress=False)
    resumed, _ = spap.prune_layerwise(_model(), _ids(), 0.5, allocation="knapsack", checkpoint_dir=str(tmp_path),
                                      resume=True, progress=False)
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed.state_dict().items())


# --- the knapsack for unstructured targets ---------------------------------------------------------

def test_row_removal_costs_are_the_sparsegpt_objectives():
    problem = make_problem(12, 40, kind="correlated", structure=solvers.Unstructured(), n_prune=0)
    counts = [0, 100, 240, 479]
    costs = solvers.row_removal_costs(problem, counts)
    assert costs[0] == 0
    for k, c in zip(counts[1:], costs[1:]):
        alone = dataclasses.replace(problem, n_prune=k)
        sol = solvers.solve(alone, "sparsegpt")
        assert int((sol.weight == 0).sum()) >= k
        assert c == pytest.approx(alone.objective(sol.weight), rel=1e-9)
    with pytest.raises(solvers.InvalidArgumentError, match="n_prunes"):
        solvers.row_removal_costs(problem, [481])
    with pytest.raises(solvers.InvalidArgumentError, match="unstructured"):
        solvers.row_removal_costs(make_problem(12, 40, structure=solvers.NM(2, 4)), [10])


def test_row_levels_hold_the_uniform_fraction_and_stay_in_range():
    from spap.allocation import row_levels

    levels = row_levels(Knapsack(row_levels=8, row_spread=0.25), 0.5)
    assert levels == pytest.approx([0.25, 0.375, 0.5, 0.625, 0.75])
    assert row_levels(Knapsack(row_levels=10, row_spread=0.5, max_sparsity=0.8), 0.3) == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert row_levels(Knapsack(row_spread=0.0), 0.4) == [0.4]


def _zeros(model) -> int:
    return sum(int((m.weight == 0).sum()) for b in model.model.layers for m in b.modules()
               if isinstance(m, torch.nn.Linear))


def test_unstructured_knapsack_keeps_the_budget_and_prunes_most_where_cheap():
    model = _model()
    with torch.no_grad():  # block 2 barely reaches the residual stream: pruning it costs almost nothing
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
    uniform, _ = spap.prune_layerwise(copy.deepcopy(model), _ids(), 0.5, structure="unstructured", progress=False)
    pruned, report = spap.prune_layerwise(model, _ids(), 0.5, structure="unstructured",
                                          allocation=Knapsack(row_levels=16, windows=3), progress=False)
    fractions = report.allocation["sparsity"]
    assert fractions[2] == max(fractions) > 0.5 and len(set(fractions)) > 1
    assert all(f * 16 == pytest.approx(round(f * 16)) for f in fractions)  # on the grid
    assert _zeros(pruned) == _zeros(uniform)  # every linear's size is a multiple of 16: the budget is exact
    zeros = [float((b.mlp.gate_proj.weight == 0).double().mean()) for b in pruned.model.layers]
    assert zeros == pytest.approx(fractions, abs=1e-12)
    assert report.settings["allocation"]["name"] == "knapsack" and report.allocation_seconds > 0
