"""Data-parallel pruning under torch.distributed: two gloo processes on the CPU give the single-process
result, and a failure on one rank stops both (spap.distributed)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import spap
from spap.checks import InvalidArgumentError
from spap.distributed import shard
from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.update(extra)
    return env


def _torchrun(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=600)


def _ranks(tmp_path: Path, structure: str, *extra: str):
    run = _torchrun([str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), structure, *extra])
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return run, results


def test_shards_are_consecutive_and_cover_every_item():
    for n in range(0, 12):
        for world in range(1, 5):
            slices = [shard(n, world, r) for r in range(world)]
            assert [i for s in slices for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1


@pytest.mark.parametrize("structure", ["mlp", "mlp+heads", "unstructured", "2:4"])
def test_two_processes_give_the_single_process_result(structure, tmp_path):
    """Each rank prunes on half of the calibration windows; both end with the model one process prunes on
    all of them: the same shapes and masks, the same weights to round-off, the same report."""
    reference, report = worker.prune(worker.tiny_model(), worker.calibration(), structure)
    run, results = _ranks(tmp_path, structure)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = reference.state_dict()
    for result in results:
        assert "error" not in result
        assert result["records"] == [(r.block, r.target, r.kept, r.total) for r in report.layers]
        assert result["settings"]["ranks"] == 2 and result["settings"]["calib_sequences"] == 8
        assert result["state"].keys() == expected.keys()
        for key, value in expected.items():
            got = result["state"][key]
            assert got.shape == value.shape, key
            assert torch.equal(got == 0, value == 0), key  # the same weights pruned
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("sequences, warned", [(6, False), (2, True)])
def test_the_few_tokens_warning_counts_every_ranks_tokens(sequences, warned, tmp_path):
    """The down projection has 128 inputs.  Six sequences of 32 tokens are 96 per rank and 192 in the
    problems: no rank warns.  Two sequences are 64 tokens together: every rank warns, with that count."""
    run, results = _ranks(tmp_path, "mlp", "--sequences", str(sequences))
    assert run.returncode == 0, run.stderr[-3000:]
    for result in results:
        few = [w for w in result["warnings"] if w.startswith("The 'calib' argument")]
        assert few == ([f"The 'calib' argument of prune_layerwise holds {32 * sequences} tokens (with the other "
                        f"ranks' shards: the 2 ranks together), fewer than the 128 inputs of the MLP's output "
                        f"linear: its problem is underdetermined and can report error 0 whatever is pruned; use "
                        f"at least 128 tokens."] if warned else [])


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 fails in block 1; rank 0 stops with an error naming it instead of waiting, and both models are
    restored to the dense weights (restore_on_failure)."""
    run, results = _ranks(tmp_path, "mlp", "--fail-rank", "1")
    assert run.returncode != 0
    assert results[1]["error"] == "ValueError: planted failure on rank 1"
    assert results[0]["error"].startswith("RankFailed: rank 1 of 2 failed while propagating through block 1: "
                                          "ValueError: planted failure on rank 1")
    dense = worker.tiny_model().state_dict()
    for result in results:
        for key, value in dense.items():
            assert torch.equal(result["state"][key], value), key


def test_options_without_a_data_parallel_run_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(spap.distributed, "active", lambda: True)
    model = worker.tiny_model()
    for options, named in [(dict(checkpoint_dir=str(tmp_path)), "'checkpoint_dir'"),
                           (dict(allocation="owl"), "'allocation'"),
                           (dict(candidates=("spap", "obs")), "'candidates'")]:
        with pytest.raises(InvalidArgumentError, match=named):
            spap.prune_layerwise(model, worker.calibration(), 0.5, **options)


def _cli(tiny_model_dir: Path, out: Path, failing_rank: int | None = None, single: bool = False):
    args = ["-m", "spap", "prune", str(tiny_model_dir / "model"), "--calib", str(tiny_model_dir / "calib.txt"),
            "--calib-windows", "4", "--seqlen", "32", "--sparsity", "0.5", "--device", "cpu", "--out", str(out)]
    env = _env()
    if failing_rank is not None:  # a sitecustomize that plants a failure in block 1 of that rank
        site = out.parent / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            "import os\n"
            f"if os.environ.get('RANK') == '{failing_rank}':\n"
            "    from tests.distributed_worker import plant_failure\n"
            f"    plant_failure({failing_rank})\n")
        env = _env(PYTHONPATH=os.pathsep.join([str(site), env["PYTHONPATH"]]))
    if single:
        return subprocess.run([sys.executable, *args, "--batch-size", "2"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
    return _torchrun(args, env)


def test_torchrun_command_line_saves_the_single_process_model(tiny_model_dir, tmp_path):
    run = _cli(tiny_model_dir, tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1  # rank 0 alone saves and prints
    single = _cli(tiny_model_dir, tmp_path / "one", single=True)
    assert single.returncode == 0, single.stderr[-3000:]
    two = safetensors.torch.load_file(tmp_path / "two" / "model.safetensors")
    one = safetensors.torch.load_file(tmp_path / "one" / "model.safetensors")
    assert two.keys() == one.keys()
    for key in one:
        assert two[key].shape == one[key].shape, key
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_torchrun_command_line_failure_leaves_no_output(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    run = _cli(tiny_model_dir, out, failing_rank=1)
    assert run.returncode != 0
    assert "planted failure" in run.stderr and "rank 1 of 2 failed" in run.stderr
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_benchmark_comparison_counts_flipped_weights_and_names_the_first_tensor():
    from tests.helpers import benchmark_module

    compare = benchmark_module("distributed").compare
    a = {"x": torch.tensor([1.0, 0.0, 2.0]), "y": torch.tensor([[0.0, 3.0]])}
    assert compare(a, {k: v.clone() for k, v in a.items()}) == {
        "same_masks": True, "flipped_weights": 0, "first_difference": None, "max_abs_diff": 0.0}
    b = {"x": torch.tensor([1.0, 0.5, 2.0]), "y": torch.tensor([[4.0, 0.0]])}
    assert compare(a, b) == {"same_masks": False, "flipped_weights": 3, "first_difference": "x",
                             "max_abs_diff": 4.0}
    assert compare(a, {"x": a["x"], "y": torch.zeros(2, 1)})["first_difference"] == "y"  # another shape


@pytest.mark.slow
def test_smollm2_two_processes_keep_the_single_process_masks():
    """SmolLM2 at 30% MLP channels (loss-aware metric on), 16 C4 windows of 128 tokens: two gloo processes
    prune the same MLP channels as one.

    The two runs sum the same float64 terms of ``H`` and ``G`` in another order (each rank's partial sum,
    then the all-reduce), so their problems differ by round-off.  2048 tokens, more than the 1536 inputs
    of ``down_proj``, make every problem determined; with fewer (8 windows: 1024 tokens) many masks have
    nearly the same error, and on one machine that round-off flipped channels in blocks 15-29 (first in 15).
    One thread per process in both runs: a float32 GEMM on two threads sums in another order as well.

    On one CI machine a rank of the two-process run was once killed by SIGABRT, a native abort whose
    message the captured output cut off (the same run passes here, four times in a row).  A run that
    crashes is run once more, and what each rank printed last goes into a warning; a second crash fails."""
    from tests.helpers import benchmark_module

    argv = ["--procs", "1", "2", "--windows", "16", "--seqlen", "128", "--threads", "1"]
    try:
        rows = benchmark_module("distributed").main(argv)
    except RuntimeError as crash:
        warnings.warn(f"retrying once after a crash: {crash}", RuntimeWarning)
        rows = benchmark_module("distributed").main(argv)
    assert [r["procs"] for r in rows] == [1, 2]
    assert rows[1]["same_masks"], (rows[1]["flipped_weights"], rows[1]["first_difference"])
    assert rows[1]["params_after"] == rows[0]["params_after"]
    assert rows[1]["max_abs_diff"] < 1e-3


def test_benchmark_reports_what_each_rank_printed_last(tmp_path):
    """A failed torchrun launch names each rank's last stderr lines (torchrun's --log-dir layout), without
    the progress bars."""
    from tests.helpers import benchmark_module

    rank_errors = benchmark_module("distributed").rank_errors
    assert rank_errors(tmp_path / "logs2") == ""
    for rank, text in [(0, "Loading weights: 100%|####| 272/272 [00:00<00:00, 19447.53it/s]\rstarted\n"),
                       (1, "started\nterminate called after throwing an instance of 'gloo::IoException'\n"
                           "Fatal Python error: Aborted\n")]:
        folder = tmp_path / "logs2" / "run_id" / "attempt_0" / str(rank)
        folder.mkdir(parents=True)
        (folder / "stderr.log").write_text(text)
    assert rank_errors(tmp_path / "logs2", lines=2) == (
        "rank 0, attempt_0:\nstarted\n"
        "rank 1, attempt_0:\nterminate called after throwing an instance of 'gloo::IoException'\n"
        "Fatal Python error: Aborted")
