"""``benchmarks/dry_run.py`` on its tiny shape: it prunes every block, reports each one, and checks its
arguments before building anything."""

import json

import pytest

from .helpers import benchmark_module


@pytest.fixture(scope="module")
def dry_run():
    return benchmark_module("dry_run")


def test_tiny_dry_run_prunes_every_block_and_reports_it(dry_run, tmp_path, capsys):
    out = tmp_path / "figures.json"
    result = dry_run.main(["--shape", "tiny", "--device", "cpu", "--n", "4", "--seqlen", "32", "--threads", "1",
                           "--quiet", "--json", str(out)])
    shape = dry_run.SHAPES["tiny"]
    assert len(result["block_s"]) == shape["num_hidden_layers"] and all(s > 0 for s in result["block_s"])
    # 30% of 128 channels pruned in each of 2 blocks: 38 channels x (3 linears x 64) weights per block.
    assert result["params_before"] - result["params_after"] == 2 * 38 * 3 * shape["hidden_size"]
    assert result["peak_device_gib"] is None and result["peak_host_gib"] > 0
    assert json.loads(out.read_text())["total_s"] == result["total_s"]
    assert result["floor_s"] > 0 and set(result["stage_s"]) >= {"forward", "gram", "solve", "propagate"}
    printed = capsys.readouterr().out
    assert "per block: mean" in printed and "x the forward pass" in printed and "time by stage: " in printed


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "--method must be one of"),
    (["--structure", "rows"], "--structure must be"),
    (["--structure", "4:2"], "--structure must be"),
    (["--method", "sparsegpt"], "cannot prune --structure mlp"),
    (["--n", "0"], "--n must be at least 1"),
    (["--sparsity", "1.0"], "--sparsity must be in"),
])
def test_bad_arguments_stop_before_the_model_is_built(dry_run, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(dry_run, "build", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(SystemExit):
        dry_run.main(["--shape", "tiny", "--device", "cpu", *argv])
    assert message in capsys.readouterr().err
