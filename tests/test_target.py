"""The error-correcting targets (``target="dense"`` and ``"block"``): the corrected weight, its objective,
the pipeline."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import solvers
import spap

from .test_pipeline import _hooks, _ids, _model



def _inputs(d_in=6, p=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, p, generator=g, dtype=torch.float64)
    X_hat = X + 0.3 * torch.randn(d_in, p, generator=g, dtype=torch.float64)
    W = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    return W, X, X_hat


def test_the_corrected_weight_is_the_weight_when_the_inputs_agree():
    W, X, _ = _inputs()
    H = X @ X.T
    torch.testing.assert_close(solvers.corrected_weight(W, H, H, 0.01), W, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.1])
def test_the_corrected_problem_is_the_dense_fit_up_to_a_constant(damp):
    W, X, X_hat = _inputs()
    H_hat, C = X_hat @ X_hat.T, X @ X_hat.T
    problem = solvers.LayerProblem(solvers.corrected_weight(W, H_hat, C, damp), H_hat, solvers.channels(6), sparsity=0.5,
                                   damp=damp)
    ridge = damp * float(H_hat.diagonal().mean())

    def direct(W_hat):  # ½‖Ŵ X̂ − W X‖² + ½ δ'‖Ŵ − W‖²
        return 0.5 * float(((W_hat @ X_hat - W @ X) ** 2).sum()) + 0.5 * ridge * float(((W_hat - W) ** 2).sum())

    g = torch.Generator().manual_seed(1)
    gaps = [problem.objective(W_hat) - direct(W_hat) for W_hat in (torch.randn(4, 6, generator=g, dtype=torch.float64)
                                                                     for _ in range(5))]
    assert max(gaps) - min(gaps) < 1e-8 * max(1.0, abs(gaps[0]))


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_an_offset_makes_the_corrected_problem_the_fit_of_a_corrected_output(damp):
    W, X, X_hat = _inputs()
    E = torch.randn(4, X.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H_hat, C, D = X_hat @ X_hat.T, X @ X_hat.T, E @ X_hat.T
    problem = solvers.LayerProblem(solvers.corrected_weight(W, H_hat, C, damp, offset=D), H_hat, solvers.channels(6),
                                   sparsity=0.5, damp=damp)
    ridge = damp * float(H_hat.diagonal().mean())

    def direct(W_hat):  # ½‖Ŵ X̂ − (W X + E)‖² + ½ δ'‖Ŵ − W‖²
        return 0.5 * float(((W_hat @ X_hat - W @ X - E) ** 2).sum()) + 0.5 * ridge * float(((W_hat - W) ** 2).sum())

    g = torch.Generator().manual_seed(1)
    gaps = [problem.objective(W_hat) - direct(W_hat) for W_hat in (torch.randn(4, 6, generator=g, dtype=torch.float64)
                                                                     for _ in range(5))]
    assert max(gaps) - min(gaps) < 1e-8 * max(1.0, abs(gaps[0]))
    with pytest.raises(ValueError, match="'offset' argument of corrected_weight"):
        solvers.corrected_weight(W, H_hat, C, damp, offset=D.T)


def test_the_exact_solve_of_the_corrected_problem_minimises_the_dense_fit():
    W, X, X_hat = _inputs(d_in=5, p=30, seed=2)
    H_hat, C = X_hat @ X_hat.T, X @ X_hat.T
    problem = solvers.LayerProblem(solvers.corrected_weight(W, H_hat, C, 0.0), H_hat, solvers.channels(5), n_prune=2,
                                   damp=0.0)
    solution = solvers.solve(problem, "exact")

    def best_fit(kept):  # least squares of W X on the kept rows of X̂, in closed form
        A = X_hat[list(kept)]
        W_k = torch.linalg.lstsq(A.T, (W @ X).T).solution.T
        return 0.5 * float(((W_k @ A - W @ X) ** 2).sum())

    best = min(itertools.combinations(range(5), 3), key=best_fit)
    assert tuple(torch.nonzero(solution.keep).flatten().tolist()) == best


def test_the_cross_accumulator_sums_reference_times_input():
    acc = solvers.GramAccumulator(3, cross=True)
    x, ref = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    acc.add_batch(x, reference=ref)
    torch.testing.assert_close(acc.C, (ref.reshape(-1, 3).T @ x.reshape(-1, 3)).double(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'reference'"):
        acc.add_batch(x)
    with pytest.raises(ValueError, match="'reference'"):
        solvers.GramAccumulator(3).add_batch(x, reference=ref)


@pytest.mark.parametrize("structure", ["mlp", "heads", "unstructured"])
def test_dense_target_leaves_the_first_block_alone_and_changes_the_rest(structure):
    _, plain = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, progress=False)
    model, fitted = spap.prune_layerwise(_model("llama"), _ids(), 0.5, structure=structure, target="dense",
                                         progress=False)
    first = [r for r in plain.layers if r.block == 0]
    assert [r.relative_error for r in fitted.layers if r.block == 0] == pytest.approx([r.relative_error for r in first],
                                                                                      rel=1e-9)
    assert [r.relative_error for r in fitted.layers if r.block == 1] != [r.relative_error for r in plain.layers
                                                                         if r.block == 1]
    assert fitted.settings["target"] == "dense" and torch.isfinite(model(_ids(2, 8)).logits).all()


@pytest.mark.parametrize("target", ["dense", "block"])
def test_the_mlp_shortcut_and_resume_give_the_same_weights(target, tmp_path):
    reference, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.5, target=target, progress=False)
    runs = []
    if target == "dense":  # the block target needs the shortcut's residuals: without it, it is refused
        with _hooks(mlp_tail=False):
            runs.append(spap.prune_layerwise(_model("llama"), _ids(), 0.5, target=target, progress=False)[0])
    with pytest.raises(spap.checkpoint.Interrupted), _hooks(stop_after_blocks=1):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, target=target, checkpoint_dir=str(tmp_path), progress=False)
    runs.append(spap.prune_layerwise(_model("llama"), _ids(), 0.5, target=target, checkpoint_dir=str(tmp_path),
                                     resume=True, progress=False)[0])
    ref = reference.state_dict()
    for model in runs:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


def _inputs_at(model, layer: int, ids):
    """``(r, x)`` at block ``layer`` of ``model`` on ``ids``: the residual entering the MLP's output addition
    (the post-attention norm's input) and the MLP output linear's inputs, each ``(tokens, width)``."""
    block, seen = model.model.layers[layer], {}
    handles = [block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("r", a[0])),
               block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return [seen[k].reshape(-1, seen[k].shape[-1]).double() for k in ("r", "x")]


def test_block_target_fits_the_dense_blocks_output_on_the_kept_channels():
    """Block 1's pruned down_proj is the least-squares fit, on its kept channels, of the dense block's output
    minus the pruned stream's residual (``W x + r − r̂``), with the solvers' ridge toward ``W``."""
    ids = _ids()
    dense = _model("llama")
    pruned, report = spap.prune_layerwise(_model("llama"), ids, 0.5, target="block", progress=False)
    assert report.settings["target"] == "block"
    mixed = copy.deepcopy(dense)  # the model as block 1 was solved: block 0 pruned, block 1 dense
    mixed.model.layers[0] = copy.deepcopy(pruned.model.layers[0])
    (r, x), (r_hat, x_hat) = _inputs_at(dense, 1, ids), _inputs_at(mixed, 1, ids)
    W = dense.model.layers[1].mlp.down_proj.weight.double()
    gate, kept_gate = dense.model.layers[1].mlp.gate_proj.weight, pruned.model.layers[1].mlp.gate_proj.weight
    kept = [int((gate == row).all(1).nonzero()) for row in kept_gate]  # the kept channels, by their gate rows
    H = x_hat.T @ x_hat
    ridge = 0.01 * float(H.diagonal().mean())

    def fit(T):  # (tokens, d_out) targets: the ridge-regularised least squares on the kept channels
        return torch.linalg.solve(H[kept][:, kept] + ridge * torch.eye(len(kept), dtype=torch.float64),
                                  x_hat[:, kept].T @ T + ridge * W[:, kept].T).T

    expected = fit(x @ W.T + r - r_hat)  # the dense block's output less the pruned stream's residual
    torch.testing.assert_close(pruned.model.layers[1].mlp.down_proj.weight.double(), expected, rtol=1e-3, atol=1e-5)
    # and it is not the dense target's fit: the residual's error changes it
    assert not torch.allclose(expected, fit(x @ W.T), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name, structure, match", [
    ("llama", "heads", "only structure='mlp'"),
    ("llama", "unstructured", "only structure='mlp'"),
    ("gemma2", "mlp", "ends with r \\+ mlp\\(x\\); Gemma2ForCausalLM does not"),
    ("gpt_neox", "mlp", "ends with r \\+ mlp\\(x\\); GPTNeoXForCausalLM does not"),
])
def test_block_target_is_refused_where_the_mlp_output_is_not_added_to_the_residual(name, structure, match):
    with pytest.raises(ValueError, match=f"'target' argument of prune_layerwise is 'block'.*{match}"):
        spap.prune_layerwise(_model(name), _ids(), 0.5, structure=structure, target="block", progress=False)


def test_dense_target_needs_pruned_propagation():
    with pytest.raises(ValueError, match="'target'.*propagate='pruned'"):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="dense", propagate="dense", progress=False)
    with pytest.raises(ValueError, match="'target'.*propagate='pruned'"):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="block", propagate="dense", progress=False)
    with pytest.raises(ValueError, match="'target' argument of prune_layerwise must be one of 'pruned', 'dense', 'block'"):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="both", progress=False)


def test_the_validation_split_holds_no_calibration_document(monkeypatch):
    from spap import data

    docs = [f"doc{i} " + " ".join(str(j) for j in range(i % 7 * 10 + 30)) for i in range(500)]
    monkeypatch.setattr(data, "c4_documents", lambda start, stop, path=None: docs[start:stop])

    class Words:  # one token per word
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    used: list[int] = []
    calib = data.random_windows(docs, Words(), n=16, seqlen=40, seed=0, used=used)
    validation = data.validation_documents(Words(), n=16, seqlen=40, seed=0)
    assert calib.shape == (16, 40) and len(used) == 16
    assert set(validation) == {d for i, d in enumerate(docs) if i not in set(used)}
