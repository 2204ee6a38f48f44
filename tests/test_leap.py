"""spap.leap_prune (LEAP: learned unstructured masks) on tiny random-weight models, and a SmolLM2 smoke test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

import spap
from spap.adapters import LinearView, get_adapter
from solvers.masks import keep_largest_across

from .test_pipeline import CONFIGS

LLAMA_FAMILY = ["llama", "qwen3", "gemma2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the slow test's timing is for one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST = dict(steps=30, lr=0.3, progress=False)  # enough movement (up to 0.3 per step) to change the masks


def _model(name: str = "llama", layers: int = 2):
    cfg = copy.deepcopy(CONFIGS[name])
    setattr(cfg, "n_layer" if name == "gpt2" else "num_hidden_layers", layers)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=8, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _linears(model) -> list[torch.Tensor]:
    """Every prunable weight, (d_out, d_in), in the adapter's order."""
    adapter = get_adapter(model)
    return [LinearView(m).weight for b in adapter.blocks() for g in adapter.linear_groups(b) for m in g.values()]


def _target(numel: int, sparsity: float) -> int:
    return int(math.floor(sparsity * numel + 0.5))  # LayerProblem.n_pruned_target


@pytest.mark.parametrize("name", LLAMA_FAMILY)
@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_exact_sparsity_for_each_scope(name, scope):
    sparsity = 0.6
    model, report = spap.leap_prune(_model(name), _ids(), sparsity, scope=scope, **FAST)
    weights = _linears(model)
    zeros = [int((W == 0).sum()) for W in weights]
    targets = [_target(W.numel(), sparsity) for W in weights]
    assert sum(zeros) == sum(targets)
    if scope in ("layer", "row"):
        assert zeros == targets
    if scope == "row":  # Wanda's per-row counts: the layer's count spread evenly, the remainder on the first rows
        for W, target in zip(weights, targets):
            base, extra = divmod(target, W.shape[0])
            expected = torch.full((W.shape[0],), base)
            expected[:extra] += 1
            assert torch.equal((W == 0).sum(1), expected)
    assert report.sparsity == pytest.approx(sum(targets) / sum(W.numel() for W in weights))
    assert report.changed > 0  # the training moved the mask away from Wanda's
    assert len(report.history) == FAST["steps"]
    with torch.no_grad():
        assert torch.isfinite(model(_ids(2, 16)).logits).all()


@pytest.mark.parametrize("name", ["opt", "gpt2"])
def test_other_families_and_conv1d_weights(name):
    model, report = spap.leap_prune(_model(name), _ids(), 0.5, scope="layer", **FAST)
    for W in _linears(model):
        assert int((W == 0).sum()) == _target(W.numel(), 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(_ids(2, 16)).logits).all()


def test_only_pruned_weights_change():
    dense = dict(_model().named_parameters())
    model, _ = spap.leap_prune(_model(), _ids(), 0.5, **FAST)
    adapter = get_adapter(model)
    prunable = {id(m) for b in adapter.blocks() for g in adapter.linear_groups(b) for m in g.values()}
    prunable = {f"{n}.weight" for n, m in model.named_modules() if id(m) in prunable}
    for name, q in model.named_parameters():
        p = dense[name]
        if name in prunable:  # kept weights untouched, the others zero
            kept = q != 0
            assert torch.equal(q[kept], p[kept]) and not kept.all(), name
        else:
            assert torch.equal(q, p), name
    assert all(p.requires_grad for p in model.parameters())  # as before the run
    assert not any("forward" in m.__dict__ for m in model.modules())  # the masked forwards are removed


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_no_steps_gives_the_wanda_mask(scope):
    wanda, _ = spap.prune_layerwise(_model(), _ids(), 0.5, method="wanda", structure="unstructured", progress=False)
    model, report = spap.leap_prune(_model(), _ids(), 0.5, steps=0, scope=scope, progress=False)
    for a, b in zip(_linears(wanda), _linears(model)):
        assert torch.equal(a != 0, b != 0)
    assert report.changed == 0 and report.history == []


def test_same_seed_same_result_other_seed_other_mask():
    a, ra = spap.leap_prune(_model(), _ids(), 0.5, seed=3, **FAST)
    b, rb = spap.leap_prune(_model(), _ids(), 0.5, seed=3, **FAST)
    c, _ = spap.leap_prune(_model(), _ids(), 0.5, seed=4, **FAST)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.history == rb.history
    assert any(not torch.equal(x != 0, y != 0) for x, y in zip(_linears(a), _linears(c)))


def test_groups_of_blocks_train_in_turn_and_untrained_blocks_keep_wanda():
    wanda, _ = spap.prune_layerwise(_model(layers=3), _ids(), 0.5, method="wanda", structure="unstructured",
                                    progress=False)
    model, report = spap.leap_prune(_model(layers=3), _ids(), 0.5, blocks=[[2], [0]], **FAST)
    assert report.settings["groups"] == [[2], [0]]
    assert [h["group"] for h in report.history] == [0] * 30 + [1] * 30
    changed = {r.block: 0 for r in report.layers}
    for r in report.layers:
        changed[r.block] += r.changed
    assert changed[1] == 0 and changed[0] > 0 and changed[2] > 0
    per_block = len(report.layers) // 3
    for a, b in zip(_linears(wanda)[per_block : 2 * per_block], _linears(model)[per_block : 2 * per_block]):
        assert torch.equal(a != 0, b != 0)  # block 1 is in no group: Wanda's mask
    assert sum(int((W == 0).sum()) for W in _linears(model)) == sum(_target(W.numel(), 0.5) for W in _linears(model))
    _, by_size = spap.leap_prune(_model(layers=3), _ids(), 0.5, blocks=2, steps=1, progress=False)
    assert by_size.settings["groups"] == [[0, 1], [2]]


def test_kl_to_the_dense_model_batches_and_crops():
    model, report = spap.leap_prune(_model(), list(_ids().split(4)), 0.5, kl_weight=1.0, batch_size=3,
                                    train_seqlen=9, **FAST)
    assert all(h["kl"] > 0 for h in report.history)
    assert all(h["loss"] == pytest.approx(h["ce"] + h["kl"]) for h in report.history)
    assert "changed vs Wanda" in report.summary()


def test_expected_density_is_held_near_the_target():
    _, report = spap.leap_prune(_model(), _ids(), 0.5, steps=60, progress=False)
    assert all(abs(h["density"] - 0.5) < 0.05 for h in report.history)
    taus = [h["tau"] for h in report.history]
    assert taus[0] == 1.0 and taus[-1] == pytest.approx(0.05) and taus == sorted(taus, reverse=True)


def test_top_k_over_several_tensors_breaks_ties_by_index():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        tensors = [torch.randn(int(torch.randint(1, 20, (1,), generator=g)), 3, generator=g).round() for _ in range(3)]
        flat = torch.cat([t.flatten() for t in tensors])
        for k in (0, 1, flat.numel() // 2, flat.numel()):
            expected = torch.zeros(flat.numel(), dtype=torch.bool)
            expected[torch.argsort(flat, descending=True, stable=True)[:k]] = True
            assert torch.equal(torch.cat([m.flatten() for m in keep_largest_across(tensors, k)]), expected), (trial, k)


def test_bad_arguments_fail_before_any_work():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(sparsity=0.0), "'sparsity'"),
        (dict(sparsity=1.0), "'sparsity'"),
        (dict(sparsity="half"), "'sparsity'"),
        (dict(steps=-1), "'steps'"),
        (dict(steps=2.5), "'steps'"),
        (dict(lr=0), "'lr'"),
        (dict(lr=float("nan")), "'lr'"),
        (dict(blocks=0), "'blocks'"),
        (dict(blocks=[2]), r"'blocks'.*\[0, 2\)"),
        (dict(blocks=[[0], [0]]), "'blocks'"),
        (dict(blocks=[[]]), "'blocks'"),
        (dict(blocks="0"), "'blocks'"),
        (dict(seed=1.5), "'seed'"),
        (dict(scope="column"), "'scope'.*'global', 'layer', 'row'"),
        (dict(batch_size=0), "'batch_size'"),
        (dict(batch_size=9), "'batch_size'.*at most"),
        (dict(train_seqlen=1), "'train_seqlen'"),
        (dict(train_seqlen=33), "'train_seqlen'.*at most"),
        (dict(init_logit=0.0), "'init_logit'"),
        (dict(temperature=(0.1, 1.0)), "'temperature'"),
        (dict(temperature=(1.0, 0.0)), "'temperature'"),
        (dict(temperature=1.0), "'temperature'"),
        (dict(kl_weight=-1.0), "'kl_weight'"),
        (dict(progress="yes"), "'progress'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            spap.leap_prune(model, _ids(), **{"progress": False, **kwargs})
    with pytest.raises(ValueError, match="'calib'"):
        spap.leap_prune(model, "one string", progress=False)
    with pytest.raises(ValueError, match="'calib'.*one length"):
        spap.leap_prune(model, [_ids(2, 8), _ids(2, 9)], progress=False)
    with pytest.raises(ValueError, match="does not support"):
        spap.leap_prune(torch.nn.Linear(2, 2), _ids())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_failed_run_leaves_the_model_as_it_was():
    model = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="block 1"):
        spap.leap_prune(model, _ids(), 0.5, progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) or torch.isnan(v).any() for k, v in before.items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_smollm2_a_few_steps_on_the_last_blocks():
    """SmolLM2-135M, 4 windows of 128 C4 tokens, 3 steps on the last two blocks, 1 thread: 45 s on a busy
    2-core machine, model load included (LEAP 21 s, of which the Wanda start 16 s)."""
    from spap.data import c4_documents, random_windows

    model, tok = spap.load_model("smollm2")
    calib = random_windows(c4_documents(0, 500), tok, n=4, seqlen=128, seed=0)
    model, report = spap.leap_prune(model, calib, 0.5, steps=3, lr=1.0, blocks=[28, 29], progress=False)
    weights = _linears(model)
    assert len(weights) == 30 * 7
    assert sum(int((W == 0).sum()) for W in weights) >= sum(_target(W.numel(), 0.5) for W in weights)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    assert {r.block for r in report.layers if r.changed} <= {28, 29}
    assert all(math.isfinite(h["loss"]) for h in report.history)
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1, :32]).logits).all()
