"""The loss-aware output metric (solvers/metric.py): its factor, and the reduction of the weighted
problem to the plain problem of ``R W``, checked against a direct solve of the weighted problem."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import solvers
from solvers import InvalidArgumentError, LayerProblem, OutputMetric, solve_in_metric
from solvers.synthetic import make_problem

f64 = torch.float64


def _problem(seed: int, d_out: int = 4, d_in: int = 6, n_prune: int = 2, damp: float = 0.0, structure=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=f64)
    X = torch.randn(d_in, 3 * d_in, generator=g, dtype=f64) * torch.rand(d_in, 1, generator=g, dtype=f64)
    A = torch.randn(d_out, d_out, generator=g, dtype=f64)
    G = A @ A.T + 0.1 * torch.eye(d_out, dtype=f64)
    structure = structure or solvers.channels(d_in)
    return LayerProblem(W, X @ X.T, structure, n_prune=n_prune, damp=damp, input_mean=X.mean(1), n_samples=3 * d_in), G


def _direct(problem: LayerProblem, G: torch.Tensor, keep_cols: torch.Tensor) -> tuple[torch.Tensor, float]:
    """min over Ŵ with zero pruned columns of ½ tr((Ŵ−W) H (Ŵ−W)ᵀ G), solved as one least-squares
    system in vec(Ŵ) (columns stacked: tr(D H Dᵀ G) = vec(D)ᵀ (H ⊗ G) vec(D)); nothing of solvers used."""
    W, H = problem.W64, problem.H64
    d_out, d_in = W.shape
    Q = torch.kron(H, G)  # (d_in·d_out)²: entry ((j,r),(k,s)) = H_jk G_rs
    free = keep_cols.repeat_interleave(d_out)  # vec index j·d_out + r is free when column j is kept
    w = W.T.reshape(-1)
    # minimise ½ (x − w)ᵀ Q (x − w) with x = 0 outside `free`: Q_FF x_F = (Q w)_F
    x = torch.zeros_like(w)
    x[free] = torch.linalg.solve(Q[free][:, free], (Q @ w)[free])
    W_hat = x.reshape(d_in, d_out).T
    D = W_hat - W
    return W_hat, 0.5 * float(torch.trace(D @ H @ D.T @ G))


def test_full_factor_squares_to_the_damped_normalised_metric():
    _, G = _problem(0)
    m = OutputMetric.from_gram(G, "full", damp=0.05)
    expected = G / G.diagonal().mean() + 0.05 * torch.eye(4, dtype=f64)
    torch.testing.assert_close(m.factor.T @ m.factor, expected)
    torch.testing.assert_close(m.factor @ m.inverse, torch.eye(4, dtype=f64))
    d = OutputMetric.from_gram(G, "diag", damp=0.05)
    torch.testing.assert_close(d.factor**2, expected.diagonal())


@pytest.mark.parametrize("seed", range(4))
def test_weighted_problem_reduces_to_the_plain_problem_of_RW(seed):
    """Brute force over every mask of the weighted objective (direct solve per mask) against the exact
    solver on R W: same best mask, same weight, same weighted error."""
    problem, G = _problem(seed)
    m = OutputMetric.from_gram(G, "full", damp=1e-3)
    G_d = m.factor.T @ m.factor
    sol = solve_in_metric(problem, m, "exact")
    best = min(
        (_direct(problem, G_d, keep)[1], tuple(keep.tolist()))
        for pruned in itertools.combinations(range(6), 2)
        for keep in [torch.ones(6, dtype=torch.bool).index_fill(0, torch.tensor(pruned), False)]
    )
    assert tuple(sol.keep.tolist()) == best[1]
    W_direct, err_direct = _direct(problem, G_d, sol.keep)
    torch.testing.assert_close(sol.weight, W_direct)
    assert sol.stats["metric_error"] == pytest.approx(err_direct, rel=1e-9)
    assert sol.stats["metric_error"] == pytest.approx(m.error(problem, sol.weight), rel=1e-9)
    # The refit does not depend on G: the plain refit of W on the chosen mask is the same weight.
    torch.testing.assert_close(sol.weight, solvers.refit_columns(problem, sol.keep))
    assert sol.error == pytest.approx(problem.error(sol.weight))


def test_a_metric_can_change_the_best_mask():
    changed = 0
    for seed in range(12):
        problem, G = _problem(seed)
        plain = solvers.solve(problem, "exact")
        weighted = solve_in_metric(problem, OutputMetric.from_gram(G, "full", damp=1e-3), "exact")
        assert weighted.error >= plain.error - 1e-9  # the plain optimum is optimal for the plain error
        changed += not torch.equal(plain.keep, weighted.keep)
    assert changed > 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(["spap", "obs", "admm", "wanda_sp", "flap"]),
       kind=st.sampled_from(["full", "diag"]))
def test_any_column_solver_keeps_its_mask_and_count_in_a_metric(seed, method, kind):
    problem, G = _problem(seed, d_out=5, d_in=10, n_prune=4, damp=0.01)
    sol = solve_in_metric(problem, OutputMetric.from_gram(G, kind), method)
    assert int((~sol.keep).sum()) == 4
    assert torch.all(sol.weight[:, ~sol.keep] == 0)
    assert sol.error == pytest.approx(problem.error(sol.weight))


@pytest.mark.parametrize("method", ["spap", "obs", "admm"])
def test_the_identity_metric_changes_nothing(method):
    problem, _ = _problem(3, d_out=5, d_in=10, n_prune=4, damp=0.01)
    plain = solvers.solve(problem, method)
    same = solve_in_metric(problem, OutputMetric.from_gram(torch.eye(5, dtype=f64), "full", damp=1e-6), method)
    assert torch.equal(plain.keep, same.keep)
    torch.testing.assert_close(plain.weight, same.weight, rtol=1e-5, atol=1e-8)


def test_rows_take_the_diagonal_and_keep_their_mask():
    problem, G = _problem(5, d_out=4, d_in=8, n_prune=12, damp=0.01, structure=solvers.Unstructured())
    with pytest.raises(InvalidArgumentError, match="kind='diag'"):
        solve_in_metric(problem, OutputMetric.from_gram(G, "full"), "spap")
    sol = solve_in_metric(problem, OutputMetric.from_gram(G, "diag"), "sparsegpt")
    assert int((~sol.keep).sum()) == 12 and torch.all(sol.weight[~sol.keep] == 0)
    # A uniform diagonal scales every row alike: the mask is the plain one.
    uniform = solve_in_metric(problem, OutputMetric.from_gram(torch.full((4,), 3.0, dtype=f64), "diag"), "sparsegpt")
    assert torch.equal(uniform.keep, solvers.solve(problem, "sparsegpt").keep)


@pytest.mark.parametrize("G, kind, match", [
    (torch.randn(3, 4), "full", "square"),
    (torch.full((3, 3), float("nan")), "full", "NaN"),
    (-torch.eye(3), "full", "positive"),
    (torch.ones(3), "full", "whole 'G'"),
    (torch.eye(3), "low-rank", "kind"),
])
def test_bad_metric_is_refused_naming_the_argument(G, kind, match):
    with pytest.raises(InvalidArgumentError, match=match):
        OutputMetric.from_gram(G, kind)


def test_metric_of_the_wrong_width_is_refused():
    problem, _ = _problem(0)
    with pytest.raises(InvalidArgumentError, match="'metric'.*width 3"):
        solve_in_metric(problem, OutputMetric.from_gram(torch.eye(3), "full"), "spap")


# --- the pipeline: G from the dense model's backward pass, masks chosen in its metric ----------------

def _tiny():
    from .test_pipeline import _ids, _model
    return _model("llama"), _ids()


def test_output_gradient_grams_equal_autograd_by_hand():
    from spap.adapters import get_adapter
    from spap.gradients import output_gradient_grams

    model, ids = _tiny()
    block = get_adapter(model).blocks()[1]
    modules = {"down": block.mlp.down_proj, "o": block.self_attn.o_proj}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grams = output_gradient_grams(model, list(ids.split(3)), modules, diagonal={"o"}, n_sequences=5,
                                  device=torch.device("cpu"))
    expected_down = torch.zeros(grams["down"].shape, dtype=f64)
    expected_o = torch.zeros(grams["o"].shape, dtype=f64)
    for row in ids[:5]:
        outputs = {}
        handles = [m.register_forward_hook(lambda m, a, out, k=k: outputs.__setitem__(k, out)) for k, m in modules.items()]
        logits = model(row[None]).logits
        for h in handles:
            h.remove()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum")
        g_down, g_o = torch.autograd.grad(loss, [outputs["down"], outputs["o"]])
        expected_down += g_down[0].double().T @ g_down[0].double()
        expected_o += (g_o[0].double() ** 2).sum(0)
    torch.testing.assert_close(grams["down"], expected_down, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(grams["o"], expected_o, rtol=1e-4, atol=1e-8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("name", ["llama", "gemma2", "opt", "gpt2"])
def test_output_gradient_grams_with_the_head_in_chunks_equal_the_full_logits(name, recompute):
    """The head runs on a few positions at a time (chunks of 5 of 31 scored positions here); the grams
    equal those of the model's own forward with its whole logits, for families whose head differs
    (Gemma 2's soft-capping, OPT's final norm, GPT-2's tied head), with the blocks' activations kept or
    recomputed in the backward pass; the blocks' forward is the class's own again afterwards."""
    from spap.adapters import get_adapter
    from spap.gradients import output_gradient_grams

    from .test_pipeline import _ids, _model

    model, ids = _model(name).double(), _ids(4, 32)  # float64: only the order of the sums differs
    out = get_adapter(model).mlp_out(get_adapter(model).blocks()[0])
    grams = output_gradient_grams(model, [ids], {"out": out}, n_sequences=4, device=torch.device("cpu"),
                                  head_chunk=5, recompute=recompute)
    assert not any("forward" in vars(block) for block in get_adapter(model).blocks())
    expected = torch.zeros_like(grams["out"])
    for row in ids:
        seen = {}
        handle = out.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
        logits = model(row[None], use_cache=False).logits
        handle.remove()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum")
        g, = torch.autograd.grad(loss, seen["out"])
        g = g.reshape(-1, g.shape[-1]).double()
        expected += g.T @ g
    torch.testing.assert_close(grams["out"], expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("structure", ["mlp", "heads"])
def test_a_flat_metric_gives_the_plain_run_and_a_sharp_one_other_masks(structure):
    import spap

    model, ids = _tiny()
    _, plain = spap.prune_layerwise(model, ids, 0.5, structure=structure, output_metric=None, progress=False)
    model, ids = _tiny()
    _, flat = spap.prune_layerwise(model, ids, 0.5, structure=structure, output_metric="full", metric_damp=1e8,
                                   progress=False)
    assert [r.relative_error for r in flat.layers] == pytest.approx([r.relative_error for r in plain.layers], rel=1e-6)
    model, ids = _tiny()
    _, sharp = spap.prune_layerwise(model, ids, 0.5, structure=structure, output_metric="full", metric_damp=1e-3,
                                    progress=False)
    assert sharp.settings["output_metric"] == "full"
    if structure == "mlp":  # the tiny model has 2 key-value groups a block: one choice, often the same
        errors = [(s.relative_error, p.relative_error) for s, p in zip(sharp.layers, plain.layers)]
        assert any(abs(s - p) > 1e-9 for s, p in errors)
    assert torch.isfinite(model(ids[:2]).logits).all()


def test_rows_take_a_diagonal_metric_and_refuse_a_full_one():
    import spap

    model, ids = _tiny()
    with pytest.raises(InvalidArgumentError, match="'output_metric'.*'diag'"):
        spap.prune_layerwise(model, ids, 0.5, structure="unstructured", output_metric="full", progress=False)
    model, report = spap.prune_layerwise(model, ids, 0.5, structure="unstructured", output_metric="diag",
                                         progress=False)
    assert all(r.kept == r.total // 2 for r in report.layers)


@pytest.mark.parametrize("keyword, value", [("output_metric", "kfac"), ("metric_windows", 0), ("metric_damp", 0.0),
                                            ("damp_mode", "per-channel")])
def test_bad_metric_arguments_are_refused_before_any_work(keyword, value):
    import spap

    model, ids = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=f"'{keyword}'"):
        spap.prune_layerwise(model, ids, 0.5, progress=False, **{keyword: value})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_metric_run_resumes_to_the_same_weights(tmp_path):
    import spap

    from .test_pipeline import _stop_after

    model, ids = _tiny()
    reference, _ = spap.prune_layerwise(model, ids, 0.5, output_metric="full", progress=False)
    model, ids = _tiny()
    with pytest.raises(spap.checkpoint.Interrupted), _stop_after(1):
        spap.prune_layerwise(model, ids, 0.5, output_metric="full", checkpoint_dir=str(tmp_path), progress=False)
    model, ids = _tiny()
    with pytest.raises(InvalidArgumentError, match="output_metric"):  # another setting: refused
        spap.prune_layerwise(model, ids, 0.5, output_metric="diag", checkpoint_dir=str(tmp_path), resume=True,
                             progress=False)
    resumed, _ = spap.prune_layerwise(model, ids, 0.5, output_metric="full", checkpoint_dir=str(tmp_path),
                                      resume=True, progress=False)
    ref = reference.state_dict()
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["pruned", "dense"])
def test_a_ridge_per_input_reaches_every_layer_problem(target):
    import spap

    model, ids = _tiny()
    _, plain = spap.prune_layerwise(model, ids, 0.5, damp=0.3, target=target, progress=False)
    model, ids = _tiny()
    model, ridge = spap.prune_layerwise(model, ids, 0.5, damp=0.3, damp_mode="diag", target=target, progress=False)
    assert ridge.settings["damp_mode"] == "diag"
    assert [r.relative_error for r in ridge.layers] != pytest.approx([r.relative_error for r in plain.layers])
    assert torch.isfinite(model(ids[:2]).logits).all()


def test_the_report_times_the_metric_and_says_so():
    import spap

    model, ids = _tiny()
    _, report = spap.prune_layerwise(model, ids, 0.5, output_metric="full", progress=False)
    assert 0 < report.metric_seconds < report.seconds and "output metric" in report.summary()
    model, ids = _tiny()
    _, plain = spap.prune_layerwise(model, ids, 0.5, output_metric=None, progress=False)
    assert plain.metric_seconds == 0 and "output metric" not in plain.summary()


@pytest.mark.parametrize("method, structure, resolved", [("spap", "mlp", "full"), ("spap", "heads", "full"),
                                                          ("spap", "unstructured", None), ("spap", "2:4", None),
                                                          ("obs", "mlp", None), ("admm", "mlp", None)])
def test_auto_is_the_full_metric_for_spap_on_column_structures_only(method, structure, resolved):
    import spap

    model, _ = _tiny()
    assert spap.pipeline.check_arguments(model, 0.5, method=method, structure=structure).output_metric == resolved


@pytest.mark.parametrize("structure", ["channels", "unstructured"])
def test_with_weight_is_the_problem_posed_afresh(structure):
    """A problem for another weight that shares the Gram's derived matrices solves exactly as one built
    from scratch, and leaves the original untouched."""
    import dataclasses

    p = make_problem(6, 16, kind="correlated", structure=solvers.parse_structure(structure, 16), sparsity=0.5, seed=4)
    p.hessian_inverse  # noqa: B018 (shared with the copy once computed)
    W2 = torch.randn(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fresh = solvers.solve(dataclasses.replace(p, weight=W2), "spap")
    shared = solvers.solve(p.with_weight(W2), "spap")
    assert torch.equal(fresh.keep, shared.keep) and torch.equal(fresh.weight, shared.weight)
    assert p.with_weight(W2).hessian_inverse is p.hessian_inverse and torch.equal(p.W64, p.weight.double())
    for bad, message in [(W2[:3], "shape"), (W2.long(), "float"), (W2 * float("nan"), "NaN")]:
        with pytest.raises(ValueError, match=message):
            p.with_weight(bad)
    with pytest.raises(ValueError, match="'bias'"):
        p.with_weight(W2, torch.zeros(5))
