"""Issue 15: bad inputs are refused before any work, rounding to all or no unit is never silent, and a
failed run leaves the caller's model as it was.

The catalogue is one table: each row calls one entry point (the solver API, ``prune_layerwise``, ``gisp``,
``ddp_prune``, ``leap_prune``) with one bad input and states the argument the one-line message must name.
Every entry point's first piece of work is replaced by a function that fails the test, so a row passes
only if the refusal comes before any work; the model's state dict must be unchanged.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import transformers

import solvers
import spap
from spap.adapters import LinearView, get_adapter

from .test_pipeline import CONFIGS, _ids

GISP, DDP, LEAP = (importlib.import_module(f"spap.global_methods.{name}") for name in ("gisp", "ddp", "leap"))


def _llama(layers: int = 2, **changes):
    """A tiny Llama (hidden 64, MLP 128, 4 heads in 2 KV groups, vocabulary 128, 64 positions)."""
    cfg = copy.deepcopy(CONFIGS["llama"])
    cfg.num_hidden_layers = layers
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _no_head():
    torch.manual_seed(0)
    return transformers.LlamaModel(copy.deepcopy(CONFIGS["llama"])).eval()


def _sequence_classifier():
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(copy.deepcopy(CONFIGS["llama"])).eval()


def _meta():
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["llama"]))


def _problem(**kwargs):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 60, generator=g, dtype=torch.float64)
    W = torch.randn(4, 16, generator=g, dtype=torch.float64)
    args = {"weight": W, "gram": X @ X.T, "structure": solvers.channels(16), "sparsity": 0.5} | kwargs
    return solvers.LayerProblem(args.pop("weight"), args.pop("gram"), args.pop("structure"), **args)


def _indefinite():
    """A symmetric Gram-like matrix with one eigenvalue at -1% of the mean: no X Xᵀ has it."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 60, generator=g, dtype=torch.float64)
    e, Q = torch.linalg.eigh(X @ X.T)
    e[0] = -0.01 * e.mean()
    H = Q @ torch.diag(e) @ Q.T
    return 0.5 * (H + H.T)


FAST_DDP = dict(steps=2, batch_size=2, progress=False)
FAST_LEAP = dict(steps=2, progress=False)

# (id, model factory or None, call(model), argument named in the message)
CATALOGUE = [
    # --- the solver API -------------------------------------------------------------------------------
    ("solver-gram-not-psd", None, lambda m: _problem(gram=_indefinite()), "gram"),
    ("solver-gram-asymmetric", None, lambda m: _problem(gram=_indefinite() + torch.triu(torch.ones(16, 16), 1)), "gram"),
    ("solver-sparsity-rounds-to-all-groups", None, lambda m: _problem(sparsity=0.97), "sparsity"),
    ("solver-sparsity-rounds-to-all-weights", None,
     lambda m: _problem(structure=solvers.Unstructured(), sparsity=0.993), "sparsity"),
    ("solver-n-prune-all", None, lambda m: _problem(sparsity=None, n_prune=16), "n_prune"),
    ("solver-n-samples-zero", None, lambda m: _problem(n_samples=0), "n_samples"),
    ("solver-ColumnGroups-empty", None, lambda m: solvers.ColumnGroups(()), "groups"),
    ("solver-ColumnGroups-empty-group", None, lambda m: solvers.ColumnGroups(((0,), ())), "groups"),
    ("solver-ColumnGroups-negative", None, lambda m: solvers.ColumnGroups(((-1,),)), "groups"),
    ("solver-column_groups-empty", None, lambda m: solvers.column_groups([]), "groups"),
    ("solver-solve-not-a-problem", None, lambda m: solvers.solve("W", "spap"), "problem"),
    ("solver-solve-unknown-method", None, lambda m: solvers.solve(_problem(), "nope"), "method"),
    # --- prune_layerwise: the model -------------------------------------------------------------------
    ("prune-not-a-model", lambda: torch.nn.Linear(2, 2), lambda m: spap.prune_layerwise(m, _ids()), "model"),
    ("prune-LlamaModel-without-head", _no_head, lambda m: spap.prune_layerwise(m, _ids()), "model"),
    ("prune-sequence-classifier", _sequence_classifier, lambda m: spap.prune_layerwise(m, _ids()), "model"),
    ("prune-zero-layers", lambda: _llama(0), lambda m: spap.prune_layerwise(m, _ids()), "model"),
    ("prune-meta-device", _meta, lambda m: spap.prune_layerwise(m, _ids()), "model"),
    # --- prune_layerwise: calibration -----------------------------------------------------------------
    ("prune-id-above-vocab", _llama, lambda m: spap.prune_layerwise(m, _ids() + 100), "calib"),
    ("prune-negative-id", _llama, lambda m: spap.prune_layerwise(m, _ids() - 200), "calib"),
    ("prune-zero-length", _llama, lambda m: spap.prune_layerwise(m, torch.zeros(4, 0, dtype=torch.long)), "calib"),
    ("prune-longer-than-positions", _llama, lambda m: spap.prune_layerwise(m, _ids(4, 65)), "calib"),
    ("prune-dict-without-input_ids", _llama, lambda m: spap.prune_layerwise(m, [{"ids": _ids()}]), "calib"),
    ("prune-mapping-without-input_ids", _llama, lambda m: spap.prune_layerwise(m, {"attention_mask": _ids()}), "calib"),
    ("prune-float-batches", _llama, lambda m: spap.prune_layerwise(m, [_ids().float()]), "calib"),
    ("prune-empty-list", _llama, lambda m: spap.prune_layerwise(m, []), "calib"),
    # --- prune_layerwise: rounding ----------------------------------------------------------------------
    ("prune-mlp-rounds-to-all", _llama, lambda m: spap.prune_layerwise(m, _ids(), 0.997), "sparsity"),
    ("prune-heads-round-to-all", _llama, lambda m: spap.prune_layerwise(m, _ids(), 0.8, structure="heads"), "sparsity"),
    ("prune-mqa-heads-round-to-all", lambda: _llama(num_key_value_heads=1),
     lambda m: spap.prune_layerwise(m, _ids(), 0.5, structure="heads"), "sparsity"),
    ("prune-unstructured-rounds-to-all", _llama,
     lambda m: spap.prune_layerwise(m, _ids(), 0.9999, structure="unstructured"), "sparsity"),
    ("prune-restore-not-bool", _llama, lambda m: spap.prune_layerwise(m, _ids(), restore_on_failure="yes"),
     "restore_on_failure"),
    # --- gisp -----------------------------------------------------------------------------------------
    ("gisp-LlamaModel-without-head", _no_head, lambda m: spap.gisp(m, _ids(), [0.3], progress=False), "model"),
    ("gisp-zero-layers", lambda: _llama(0), lambda m: spap.gisp(m, _ids(), [0.3], progress=False), "model"),
    ("gisp-meta-device", _meta, lambda m: spap.gisp(m, _ids(), [0.3], progress=False), "model"),
    ("gisp-id-above-vocab", _llama, lambda m: spap.gisp(m, _ids() + 100, [0.3], progress=False), "calib"),
    ("gisp-longer-than-positions", _llama, lambda m: spap.gisp(m, _ids(4, 65), [0.3], progress=False), "calib"),
    ("gisp-one-token", _llama, lambda m: spap.gisp(m, _ids(4, 1), [0.3], progress=False), "calib"),
    ("gisp-margin-longer-than-positions", _llama,
     lambda m: spap.gisp(m, [(_ids(1, 60)[0], _ids(1, 5)[0], _ids(1, 3)[0])], [0.3], objective="margin",
                         progress=False), "calib"),
    # --- ddp_prune ------------------------------------------------------------------------------------
    ("ddp-LlamaModel-without-head", _no_head, lambda m: spap.ddp_prune(m, _ids(), **FAST_DDP), "model"),
    ("ddp-meta-device", _meta, lambda m: spap.ddp_prune(m, _ids(), **FAST_DDP), "model"),
    ("ddp-negative-id", _llama, lambda m: spap.ddp_prune(m, _ids() - 200, **FAST_DDP), "calib"),
    ("ddp-dict-without-input_ids", _llama, lambda m: spap.ddp_prune(m, [{"mask": _ids()}], **FAST_DDP), "calib"),
    ("ddp-longer-than-positions", _llama, lambda m: spap.ddp_prune(m, _ids(4, 65), **FAST_DDP), "calib"),
    ("ddp-mlp-rounds-to-all", _llama, lambda m: spap.ddp_prune(m, _ids(), 0.997, **FAST_DDP), "sparsity"),
    # --- leap_prune -----------------------------------------------------------------------------------
    ("leap-zero-layers", lambda: _llama(0), lambda m: spap.leap_prune(m, _ids(), **FAST_LEAP), "model"),
    ("leap-sequence-classifier", _sequence_classifier, lambda m: spap.leap_prune(m, _ids(), **FAST_LEAP), "model"),
    ("leap-id-above-vocab", _llama, lambda m: spap.leap_prune(m, _ids() + 100, **FAST_LEAP), "calib"),
    ("leap-zero-length", _llama, lambda m: spap.leap_prune(m, torch.zeros(4, 0, dtype=torch.long), **FAST_LEAP),
     "calib"),
    ("leap-rounds-to-all-weights", _llama, lambda m: spap.leap_prune(m, _ids(), 0.9999, **FAST_LEAP), "sparsity"),
]


def _no_work(monkeypatch):
    """Replace the first piece of work of every entry point by a failure of the test."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(spap.pipeline, "_run", work)
    monkeypatch.setattr(spap.pipeline, "_Snapshot", work)
    monkeypatch.setattr(GISP, "_scoring", work)
    monkeypatch.setattr(DDP, "_Gates", work)
    monkeypatch.setattr(LEAP, "_wanda_init", work)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factory, call, argument", [row[1:] for row in CATALOGUE], ids=[row[0] for row in CATALOGUE])
def test_bad_input_is_refused_before_any_work_with_a_one_line_message(factory, call, argument, monkeypatch):
    _no_work(monkeypatch)
    model = factory() if factory is not None else None
    meta = model is not None and any(p.is_meta for p in model.parameters())
    before = _state(model) if model is not None and not meta else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rounding warnings of other rows are tested below
        with pytest.raises(solvers.InvalidArgumentError) as info:
            call(model)
    message = str(info.value)
    assert f"'{argument}'" in message, message
    assert "\n" not in message, message
    if before is not None:
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_the_catalogue_covers_every_entry_point():
    ids = [row[0] for row in CATALOGUE]
    assert len(ids) == len(set(ids)) >= 30
    for prefix in ("solver-", "prune-", "gisp-", "ddp-", "leap-"):
        assert sum(i.startswith(prefix) for i in ids) >= 4, prefix


# --- rounding to no unit, too few tokens: warned, never silent -------------------------------------------


def test_layer_problem_warns_when_the_sparsity_rounds_to_no_group_but_not_at_zero():
    with pytest.warns(UserWarning, match=r"'sparsity' argument of LayerProblem is 0.01, which rounds to 0 of 16"):
        assert _problem(sparsity=0.01).n_pruned_target == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _problem(sparsity=0.0)
        _problem(sparsity=None, n_prune=0)


def test_layer_problem_warns_about_fewer_samples_than_inputs():
    with pytest.warns(UserWarning, match=r"'n_samples' argument of LayerProblem is 8, fewer than the 16 inputs"):
        _problem(n_samples=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _problem(n_samples=60)


def test_gram_round_off_is_not_refused():
    """A rank-deficient Gram matrix from float32 products (fewer tokens than inputs) is PSD up to round-off."""
    acc = solvers.GramAccumulator(256, product_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    scale = torch.ones(256)
    scale[:3] = 1e3  # outlier inputs, as in real activations
    acc.add_batch((torch.randn(100, 32, generator=g) @ torch.randn(32, 256, generator=g)) * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solvers.LayerProblem(torch.randn(8, 256), acc.H, solvers.channels(256), sparsity=0.5, n_samples=acc.n_samples)


def _model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


@pytest.mark.parametrize("kv_heads, sparsity, expected", [(2, 0.2, "0 of 2 key-value groups"),
                                                          (1, 0.3, "0 of 1 key-value groups")],
                         ids=["heads-0.2-of-2-groups", "mqa"])
def test_prune_layerwise_warns_when_heads_round_to_none(kv_heads, sparsity, expected):
    model = _llama(num_key_value_heads=kv_heads)
    with pytest.warns(UserWarning, match=f"'sparsity' argument of prune_layerwise is {sparsity}, which rounds to {expected}"):
        spap.prune_layerwise(model, _ids(), sparsity, structure="heads", progress=False)
    assert model.config.num_key_value_heads == kv_heads


def test_prune_layerwise_warns_about_fewer_tokens_than_inputs_and_not_at_zero_sparsity(monkeypatch):
    _no_work(monkeypatch)
    with pytest.warns(UserWarning, match=r"'calib' argument of prune_layerwise holds 32 tokens, fewer than the 128"):
        with pytest.raises(AssertionError, match="work started"):
            spap.prune_layerwise(_llama(), _ids(2, 16), 0.3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="work started"):
            spap.prune_layerwise(_llama(), _ids(), 0.0, structure="mlp+heads", progress=False)


@pytest.mark.parametrize("call, match", [
    (lambda m: spap.gisp(m, _ids(), [0.001], progress=False), r"'sparsities' argument of gisp starts at 0.001, which rounds to 0"),
    (lambda m: spap.ddp_prune(m, _ids(), 0.2, structure="heads", **FAST_DDP), r"'sparsity' argument of ddp_prune is 0.2, which rounds to 0 of 2"),
    (lambda m: spap.leap_prune(m, _ids(), 1e-5, **FAST_LEAP), r"'sparsity' argument of leap_prune is 1e-05, which rounds to 0 of 2048"),
], ids=["gisp", "ddp", "leap"])
def test_global_methods_warn_when_the_target_rounds_to_none_before_any_work(call, match, monkeypatch):
    _no_work(monkeypatch)
    model = _llama()
    before = _state(model)
    with pytest.warns(UserWarning, match=match), pytest.raises(AssertionError, match="work started"):
        call(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --- a failed run leaves the model as it was ---------------------------------------------------------------


def _snapshot(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.clone()
    return {
        "state": _state(model),
        "config": model.config.to_dict(),
        "shapes": {k: tuple(p.shape) for k, p in model.named_parameters()},
        "params": list(model.parameters()),  # held, as a caller's optimizer would hold them
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "logits": logits,
    }


def _assert_as_before(model, before, ids):
    after = _snapshot(model, ids)
    assert after["config"] == before["config"]
    assert after["shapes"] == before["shapes"]
    assert all(a is b for a, b in zip(after["params"], before["params"], strict=True))  # the same Parameter objects
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0, equal_nan=True)
    assert not any(m._forward_pre_hooks or m._forward_hooks or "forward" in vars(m) for m in model.modules())


def _plant_nan_in_block_1(model):
    with torch.no_grad():
        get_adapter(model).blocks()[1].input_layernorm.weight[3] = float("nan")


def _fail_in_block_2(monkeypatch, structure, error):
    """``solvers.solve`` raises ``error`` on block 2's second problem (its first when it has one)."""
    per_block = {"mlp": 1, "heads": 1, "unstructured": 7}[structure]
    target = 2 * per_block + min(1, per_block - 1)
    solve, calls = solvers.solve, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == target + 1:
            raise error
        return solve(*args, **kwargs)

    monkeypatch.setattr(solvers, "solve", failing)
    monkeypatch.setattr(solvers.metric, "solve", failing)  # SPAP's default solves in the output metric


@pytest.mark.parametrize("structure", ["mlp", "heads", "unstructured"])
@pytest.mark.parametrize("failure", ["nan-in-block-1", "solver-error-in-block-2", "interrupt-in-block-2"])
def test_a_failed_prune_layerwise_leaves_the_model_as_it_was(failure, structure, monkeypatch):
    model = _llama(3)
    model.train()  # the run switches to eval mode; a failure must switch back
    if failure == "nan-in-block-1":
        _plant_nan_in_block_1(model)
        expected, match = FloatingPointError, "block 1"
    elif failure == "solver-error-in-block-2":
        _fail_in_block_2(monkeypatch, structure, RuntimeError("solver failed"))
        expected, match = RuntimeError, "solver failed"
    else:
        _fail_in_block_2(monkeypatch, structure, KeyboardInterrupt())
        expected, match = KeyboardInterrupt, None
    ids = _ids(2, 16)
    before = _snapshot(model, ids)
    with pytest.raises(expected, match=match):
        spap.prune_layerwise(model, _ids(), 0.5, structure=structure, progress=False)
    _assert_as_before(model, before, ids)


def test_without_restore_a_failed_run_leaves_the_finished_blocks_pruned(monkeypatch):
    model = _llama(3)
    _fail_in_block_2(monkeypatch, "mlp", RuntimeError("solver failed"))
    with pytest.raises(RuntimeError, match="solver failed"):
        spap.prune_layerwise(model, _ids(), 0.5, progress=False, restore_on_failure=False)
    adapter = get_adapter(model)
    assert [LinearView(adapter.mlp_out(b)).d_in for b in adapter.blocks()] == [64, 64, 128]
    assert model.config.intermediate_size == 128


def _fail_at_ddp_step_3(monkeypatch):
    """The third step raises (``_soft_count`` runs once per unit type and step: twice for mlp+heads)."""
    soft_count, calls = DDP._soft_count, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("step 3 failed")
        return soft_count(*args, **kwargs)

    monkeypatch.setattr(DDP, "_soft_count", failing)


@pytest.mark.parametrize("failure", ["nan-in-block-1", "error-at-step-3"])
def test_a_failed_ddp_prune_leaves_the_model_as_it_was(failure, monkeypatch):
    model = _llama(3)
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)  # mixed flags: each must come back as it was
    if failure == "nan-in-block-1":
        _plant_nan_in_block_1(model)
        expected, match = FloatingPointError, "NaN or Inf in the DDP loss"
    else:
        _fail_at_ddp_step_3(monkeypatch)
        expected, match = RuntimeError, "step 3 failed"
    ids = _ids(2, 16)
    before = _snapshot(model, ids)
    with pytest.raises(expected, match=match):
        spap.ddp_prune(model, _ids(), 0.5, structure="mlp+heads", steps=5, batch_size=2, progress=False)
    _assert_as_before(model, before, ids)
