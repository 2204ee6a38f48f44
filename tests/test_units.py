"""spap.units on tiny random models of every supported family: counts, parameters, keep, gates, widths."""

from __future__ import annotations

import pytest
import torch

import solvers
from spap import units
from spap.adapters import LinearView, get_adapter
from spap.report import count_parameters
from spap.units import PruneStructure

from .test_pipeline import CONFIGS, _model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind_name", units.UNIT_KINDS)
def test_params_per_unit_is_what_removing_one_unit_removes(name, kind_name):
    model = _model(name)
    adapter = get_adapter(model)
    for kind in units.kinds(adapter, [kind_name]).values():  # "mlp": the experts' channels too
        _check_params_per_unit(model, adapter, kind)


def _check_params_per_unit(model, adapter, kind):
    block = adapter.blocks()[0]
    n = kind.count(block)
    assert n == kind.dense_count()
    before = count_parameters(model)
    kind.keep(block, torch.arange(1, n))
    if kind.shrinks:
        assert kind.count(block) == n - 1
        assert before - count_parameters(model) == kind.params_per_unit(adapter.blocks()[1])
    else:  # zeroed, not removed: shapes and the count read from the weights stay
        assert count_parameters(model) == before and kind.count(block) == n
        for module, offset, rows in kind.input_rows(block):
            assert not LinearView(module).weight[offset : offset + rows].any()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_zero_gate_computes_what_the_shrunk_block_computes(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    adapter = get_adapter(model)
    block = adapter.blocks()[1]
    kinds = units.kinds(adapter)
    # one unit dropped (unit 1); in every expert 8 channels (1 to 8), which keeps the width a multiple of 8,
    # as transformers' grouped_mm experts kernel needs
    dropped = {t: 8 if t == "experts" else 1 for t in kinds}
    keep = {t: torch.tensor([0] + list(range(1 + dropped[t], k.dense_count()))) for t, k in kinds.items()}
    masks = {t: torch.isin(torch.arange(k.dense_count()), keep[t]) for t, k in kinds.items()}
    handles = [k.gate(block, lambda m=masks[t]: m) for t, k in kinds.items() if t != "experts"]
    saved = None
    if "experts" in kinds:  # no linear to gate: zero channel 1's column of every expert's down projection
        down = adapter.experts(block).module.down_proj.data
        saved = down.clone()
        down[:, :, 1:9] = 0
    with torch.no_grad():
        gated = model(ids).logits
    for h in handles:
        h.remove()
    if saved is not None:
        adapter.experts(block).module.down_proj.data.copy_(saved)
    units.keep(adapter, block, keep)
    with torch.no_grad():
        shrunk = model(ids).logits
    torch.testing.assert_close(gated, shrunk, rtol=1e-5, atol=1e-5)


def test_set_widths_updates_the_config_only_for_uniform_widths():
    model = _model("llama")
    adapter = get_adapter(model)
    for block in adapter.blocks():
        units.keep(adapter, block, {"mlp": torch.arange(100), "heads": torch.tensor([1])})
    units.set_widths(adapter, units.widths(adapter))
    assert (model.config.intermediate_size, model.config.num_key_value_heads, model.config.num_attention_heads) == (100, 1, 2)
    model = _model("llama")
    adapter = get_adapter(model)
    units.keep(adapter, adapter.blocks()[0], {"mlp": torch.arange(100)})
    units.set_widths(adapter, units.widths(adapter))
    assert units.widths(adapter)["mlp"] == [100, 128] and model.config.intermediate_size == 128
    with pytest.raises(ValueError, match="'model'.*uniform widths.*block 0 has mlp width 100"):
        units.check_uniform(adapter, {"mlp": 128, "heads": 2}, "model", "its config")


def test_one_rounding_rule():
    assert [units.prune_count(s, n) for s, n in ((0.5, 5), (0.5, 3), (0.3, 1536), (0.25, 2), (0.97, 16))] == \
        [3, 2, 461, 1, 16]
    assert solvers.LayerProblem(torch.ones(2, 5), torch.eye(5), solvers.channels(5), sparsity=0.5).n_pruned_target == 3


@pytest.mark.parametrize("text, unit_kinds, rows", [
    ("mlp", ("mlp",), None), ("heads", ("heads",), None), ("mlp+heads", ("mlp", "heads"), None),
    ("unstructured", (), solvers.Unstructured()), ("2:4", (), solvers.NM(2, 4)),
])
def test_structure_is_parsed_once_into_a_typed_object(text, unit_kinds, rows):
    parsed = PruneStructure.parse(text)
    assert (parsed.units, parsed.rows) == (unit_kinds, rows)


@pytest.mark.parametrize("text", ["rows", "4:2", "0:4", "heads+mlp", 3, None])
def test_bad_structures_name_the_argument(text):
    with pytest.raises(ValueError, match="'structure' argument of prune_layerwise"):
        PruneStructure.parse(text)
    with pytest.raises(ValueError, match="'structure' argument of gisp must be one of 'mlp', 'heads', 'mlp\\+heads'"):
        PruneStructure.parse("unstructured" if text == "rows" else text, caller="gisp", units_only=True)
