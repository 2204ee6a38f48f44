"""The error-correcting target (``target="dense"``): the corrected weight, its objective, the pipeline."""

from __future__ import annotations

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


def test_dense_target_the_mlp_shortcut_and_resume_give_the_same_weights(tmp_path):
    reference, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="dense", progress=False)
    with _hooks(mlp_tail=False):
        full, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="dense", progress=False)
    with pytest.raises(spap.checkpoint.Interrupted), _hooks(stop_after_blocks=1):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="dense", checkpoint_dir=str(tmp_path), progress=False)
    resumed, _ = spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="dense", checkpoint_dir=str(tmp_path),
                                      resume=True, progress=False)
    ref = reference.state_dict()
    for model in (full, resumed):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


def test_dense_target_needs_pruned_propagation():
    with pytest.raises(ValueError, match="'target'.*propagate='pruned'"):
        spap.prune_layerwise(_model("llama"), _ids(), 0.5, target="dense", propagate="dense", progress=False)
    with pytest.raises(ValueError, match="'target' argument of prune_layerwise must be one of 'pruned', 'dense'"):
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
