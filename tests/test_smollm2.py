"""End to end on the real SmolLM2-135M (slow group): prune, save, reload with stock transformers, evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import spap
from spap.data import calibration_set, wikitext_rows
from spap.eval import perplexity

pytestmark = pytest.mark.slow

EVAL = dict(seqlen=1024, max_windows=4)


def _mlp_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


@pytest.fixture(scope="module")
def calib():
    _, tok = spap.load_model("smollm2")
    return calibration_set("c4", tok, n=8, seqlen=256, seed=0)


def test_spap_30pct_mlp_reloads_smaller_and_beats_magnitude(calib, tmp_path):
    model, tok = spap.load_model("smollm2")
    dense_mlp = _mlp_params(model)
    model, report = spap.prune_layerwise(model, calib, 0.3, method="spap", structure="mlp", progress=False)
    assert all(r.kept == 1536 - 461 for r in report.layers)
    spap.save_model(model, tok, tmp_path / "pruned", report=report)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == 1075
    assert math.isclose(1 - _mlp_params(reloaded) / dense_mlp, 461 / 1536, rel_tol=1e-9)  # 30.0% fewer
    ids = calib[:1, :64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)

    ppl_spap = perplexity(reloaded, tok, wikitext_rows(), **EVAL)
    magnitude, _ = spap.prune_layerwise(spap.load_model("smollm2")[0], calib, 0.3, method="magnitude", progress=False)
    ppl_magnitude = perplexity(magnitude, tok, wikitext_rows(), **EVAL)
    assert math.isfinite(ppl_spap)
    assert ppl_spap < ppl_magnitude, (ppl_spap, ppl_magnitude)


def test_dense_perplexity_matches_the_reference_protocol():
    """The shared data README's dense figure: first 16 windows of 2048 tokens of WikiText-2 test, 20.71."""
    model, tok = spap.load_model("smollm2")
    assert round(perplexity(model, tok, wikitext_rows(), seqlen=2048, max_windows=16), 2) == 20.71
