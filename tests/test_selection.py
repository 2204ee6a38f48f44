"""Choosing each block's mask by the model's loss (``prune_layerwise(candidates=...)``, spap.selection)."""

from __future__ import annotations

import math

import pytest
import torch

import solvers
import spap
from spap.adapters import get_adapter
from spap.capture import capture_block_inputs, run_block

from .test_pipeline import CONFIGS, _ids, _model, _stop_after

CANDIDATES = ("admm", "obs")  # with the main method, spap
WINDOWS = 3  # with batch_size=2: two sequences of batch 0 and one of batch 1


def _prune(name, structure="mlp", **kwargs):
    options = dict(structure=structure, batch_size=2, progress=False)
    return spap.prune_layerwise(_model(name), _ids(), 0.5, **{**options, **kwargs})


def _loss(model, ids):
    """The model's own next-token loss (transformers' mean over the predicted tokens)."""
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def _first_block_pruned(name, structure, method):
    """The model with only block 0 pruned, by ``method`` alone (the run stopped after it, not undone), in the
    output metric that SPAP's default gives every candidate."""
    model = _model(name)
    with pytest.raises(spap.checkpoint.Interrupted), _stop_after(1):
        spap.prune_layerwise(model, _ids(), 0.5, structure=structure, method=method, batch_size=2,
                             output_metric="full", restore_on_failure=False, progress=False)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_adapters_head_gives_the_models_own_logits(name):
    model = _model(name)
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    ids = _ids(3, 24)
    hidden, kwargs = capture_block_inputs(model, blocks, [ids], torch.device("cpu"), torch.device("cpu"))
    with torch.no_grad():
        h = hidden[0]
        for i, block in enumerate(blocks):
            h = run_block(block, h, kwargs[i][0], torch.device("cpu"))
        expected = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(adapter.logits(h), expected, rtol=1e-5, atol=1e-5)


def test_without_candidates_nothing_changes():
    plain, report = _prune("llama")
    explicit, explicit_report = _prune("llama", candidates=None, select_windows=2)
    for (k, a), b in zip(plain.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), k
    assert "candidates" not in report.settings and "select_windows" not in report.settings
    assert all(r.selection is None for r in report.layers + explicit_report.layers)
    assert "chosen by loss" not in report.summary()


@pytest.mark.parametrize("name,structure", [("llama", "mlp"), ("llama", "heads"), ("opt", "mlp"), ("gpt2", "mlp")])
def test_the_kept_mask_has_the_lowest_loss_and_the_losses_are_the_models_own(name, structure):
    model, report = _prune(name, structure, candidates=CANDIDATES, select_windows=WINDOWS)
    ids = _ids()[:WINDOWS]
    assert report.settings["candidates"] == ["spap", *CANDIDATES] and report.settings["select_windows"] == WINDOWS
    for r in report.layers:
        losses = r.selection["loss"]
        assert list(losses) == ["spap", *CANDIDATES]
        assert r.selection["method"] == min(losses, key=losses.get)
        assert r.relative_error == r.selection["relative_error"][r.selection["method"]]
        assert r.seconds == pytest.approx(sum(r.selection["seconds"].values()))
    # Block 0, recomputed independently: each candidate alone prunes block 0, the rest stays dense.
    first = report.layers[0].selection
    alone = {m: _first_block_pruned(name, structure, m) for m in first["loss"]}
    for m, pruned in alone.items():
        assert first["loss"][m] == pytest.approx(_loss(pruned, ids), rel=1e-5), m
    winner = get_adapter(alone[first["method"]]).blocks()[0].state_dict()
    for k, v in get_adapter(model).blocks()[0].state_dict().items():
        assert torch.equal(v, winner[k]), k
    # The last block: its winner's loss is the pruned model's loss on the windows.
    last = report.layers[-1].selection
    assert last["loss"][last["method"]] == pytest.approx(_loss(model, ids), rel=1e-5)


def test_heads_then_mlp_scores_the_mlp_with_the_chosen_heads():
    model, report = _prune("llama", "mlp+heads", candidates=CANDIDATES, select_windows=WINDOWS)
    assert [(r.block, r.target) for r in report.layers] == [(0, "heads"), (0, "mlp"), (1, "heads"), (1, "mlp")]
    last = report.layers[-1].selection
    assert last["loss"][last["method"]] == pytest.approx(_loss(model, _ids()[:WINDOWS]), rel=1e-5)


def test_windows_of_unequal_lengths_from_several_batches():
    ids = _ids()
    calib = [ids[i, :20 + 2 * i] for i in range(8)]  # unequal lengths: one sequence per batch
    model, report = spap.prune_layerwise(_model("llama"), calib, 0.5, candidates=CANDIDATES, select_windows=2,
                                         progress=False)
    assert report.settings["n_batches"] == 8
    last = report.layers[-1].selection
    tokens = [19, 21]  # predicted tokens of the first two sequences
    expected = (_loss(model, calib[0][None]) * tokens[0] + _loss(model, calib[1][None]) * tokens[1]) / sum(tokens)
    assert last["loss"][last["method"]] == pytest.approx(expected, rel=1e-5)


def test_the_main_method_alone_equals_the_plain_run():
    plain, _ = _prune("llama", "mlp+heads")
    chosen, report = _prune("llama", "mlp+heads", candidates=("spap",))
    for (k, a), b in zip(plain.state_dict().items(), chosen.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(r.selection["method"] == "spap" and list(r.selection["loss"]) == ["spap"] for r in report.layers)
    assert all(math.isfinite(r.selection["loss"]["spap"]) for r in report.layers)
    assert "chosen by loss: spap 4 (of 4 problems)" in report.summary()


def test_bad_candidates_fail_before_any_work():
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    cases = [
        (dict(candidates=("nope",)), "'candidates'.*'nope'.*not a registered solver"),
        (dict(candidates=()), "'candidates'.*non-empty tuple of distinct strings"),
        (dict(candidates=("admm", "admm")), "'candidates'.*distinct"),
        (dict(candidates="admm"), "'candidates'"),
        (dict(candidates=("admm", 3)), "'candidates'"),
        (dict(candidates=("sparsegpt",)), "'candidates'.*'sparsegpt'.*does not support"),
        (dict(candidates=("admm",), structure="unstructured"), "'candidates'.*'unstructured'"),
        (dict(candidates=("admm",), structure="2:4"), "'candidates'.*'2:4'"),
        (dict(candidates=("admm",), select_windows=0), "'select_windows'"),
        (dict(candidates=("admm",), select_windows=1.5), "'select_windows'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(solvers.InvalidArgumentError, match=message):
            spap.prune_layerwise(model, _ids(), **{"sparsity": 0.5, **kwargs}, progress=False)
    handle.remove()
    assert not calls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_resume_with_candidates_gives_the_identical_result(tmp_path):
    reference, ref_report = _prune("llama", candidates=CANDIDATES)
    with pytest.raises(spap.checkpoint.Interrupted), _stop_after(1):
        _prune("llama", candidates=CANDIDATES, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="different arguments.*candidates"):
        _prune("llama", candidates=("obs",), checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="different arguments.*select_windows"):
        _prune("llama", candidates=CANDIDATES, select_windows=2, checkpoint_dir=str(tmp_path), resume=True)
    resumed, report = _prune("llama", candidates=CANDIDATES, checkpoint_dir=str(tmp_path), resume=True)
    ref_state = reference.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    # the first block's record comes from the checkpoint, choice included (timings aside)
    def untimed(r):
        return {**r.__dict__, "seconds": 0, "selection": {**r.selection, "seconds": 0, "score_seconds": 0}}

    assert [untimed(r) for r in report.layers] == [untimed(r) for r in ref_report.layers]
