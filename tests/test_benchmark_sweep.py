"""The end-to-end sweep's bookkeeping (no model is loaded): which runs it plans, and the shared cache of
``benchmarks/harness.py``."""

import json

import pytest

from .helpers import benchmark_module


@pytest.fixture(scope="module")
def e2e():
    return benchmark_module("end_to_end")


@pytest.fixture(scope="module")
def harness():
    return benchmark_module("harness")


def test_row_targets_choose_the_unstructured_runs(e2e):
    jobs = e2e.jobs_for(["unstructured"], [0.3], ["sparsegpt", "wanda"], False, ["2:4", "0.5"])
    assert [(j.structure, j.method, j.sparsity) for j in jobs] == [
        ("2:4", "sparsegpt", None), ("2:4", "wanda", None),
        ("unstructured", "sparsegpt", 0.5), ("unstructured", "wanda", 0.5)]


def test_structured_runs_cover_every_method_and_sparsity(e2e):
    jobs = e2e.jobs_for(["structured"], [0.2, 0.5], None, True)
    methods = set(e2e.STRUCTURED_METHODS) | {"flap+refit", "wanda_sp+refit", "magnitude+refit"}
    assert {(j.method, j.sparsity) for j in jobs} == {(m, s) for m in methods for s in (0.2, 0.5)}
    assert {j.structure for j in jobs} == {"mlp"}


def test_two_sweeps_add_to_one_cache_without_losing_runs(harness, tmp_path):
    path = tmp_path / "cache.json"
    harness.save_result(path, "a", {"wikitext_ppl": 1.0})
    stale = harness.load_cache(path)  # what a second sweep read before the first one wrote again
    harness.save_result(path, "b", {"wikitext_ppl": 2.0})
    assert "b" not in stale
    merged = harness.save_result(path, "c", {"wikitext_ppl": 3.0})
    assert sorted(merged) == ["a", "b", "c"] == sorted(json.loads(path.read_text()))
    assert not path.with_suffix(".json.tmp").exists()


def test_bad_row_target_is_refused_before_any_run(e2e, capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--row-targets", "3:4", "--report"])
    assert "--row-targets" in capsys.readouterr().err


def test_a_non_default_damping_is_its_own_cached_run(e2e):
    default, damped = (e2e.jobs_for(["structured"], [0.3], ["spap"], False, damp=d)[0] for d in (0.01, 0.1))
    assert default.key("quick") == "quick|mlp|spap|0.3"
    assert damped.key("quick") == "quick|mlp|spap@damp=0.1|0.3" and damped.damp == 0.1


@pytest.mark.parametrize("method", ["sparsegtp", "admm+bias"])
def test_unknown_method_is_refused_before_any_run(e2e, capsys, method):
    with pytest.raises(SystemExit):
        e2e.main(["--methods", method, "--report"])
    assert "--methods" in capsys.readouterr().err


def test_report_leaves_out_the_rows_of_the_model_level_scripts(e2e, tmp_path, capsys):
    row = {"wikitext_ppl": 40.0, "c4_ppl": 45.0, "prune_s": 10.0, "solver_s": 5.0, "threads": 1,
           "peak_rss_gib": 2.0, "params": 100, "sum_rel_err": 1.5}
    cache = {
        "quick|dense": {"wikitext_ppl": 20.0, "c4_ppl": 25.0, "params": 120},
        "quick|unstructured|spap|0.5": {**row, "method": "spap", "sparsity": 0.5},
        # as written by leap_run.py and ddp_run.py: no solver time or layer error
        "quick|unstructured|leap@steps=200|0.5": {"method": "leap", "sparsity": 0.5, "wikitext_ppl": 39.0, "c4_ppl": 44.0},
        "quick|mlp|ddp|0.2": {"method": "ddp", "sparsity": 0.2, "wikitext_ppl": 41.0, "c4_ppl": 46.0},
    }
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(cache))
    e2e.main(["--report", "--cache", str(path)])
    out = capsys.readouterr().out
    assert "| 50% | spap | 40.00 |" in out
    assert "leap" not in out and "ddp" not in out


def test_a_further_keyword_is_its_own_cached_run_and_reaches_the_worker(e2e):
    job = e2e.jobs_for(["structured"], [0.3], ["spap"], False, extra=(("output_metric", "full"), ("x", "3")))[0]
    assert job.key("quick") == "quick|mlp|spap@output_metric=full@x=3|0.3"
    again = e2e.Job.from_payload(json.loads(json.dumps(job.__dict__)))  # as the worker receives it
    assert again == job and again.prune_keywords() == {"output_metric": "full", "x": 3}


def test_solver_options_set_on_the_command_line_join_the_methods_own(e2e):
    extra = (("method_options", "{'round_precision': 'float64'}"), ("allocation", "owl"))
    job = e2e.jobs_for(["unstructured"], [], ["admm+refit"], False, row_targets=["0.5"], extra=extra)[0]
    assert job.key("quick") == "quick|unstructured|admm+refit@method_options={'round_precision': 'float64'}@allocation=owl|0.5"
    assert e2e.solver_and_keywords(job) == ("admm", {"final": "refit", "round_precision": "float64"}, {"allocation": "owl"})


def test_a_malformed_setting_is_refused_before_any_run(e2e, capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--set", "output_metric", "--report"])
    assert "--set" in capsys.readouterr().err


def test_report_gives_prune_time_in_forward_passes_and_by_stage(e2e, tmp_path, capsys):
    row = {"wikitext_ppl": 40.0, "c4_ppl": 45.0, "prune_s": 30.0, "solver_s": 5.0, "threads": 1, "peak_rss_gib": 2.0,
           "params": 100, "sum_rel_err": 1.5, "structure": "mlp", "method": "spap", "sparsity": 0.3}
    cache = {"quick|mlp|spap|0.3": {**row, "floor_s": 20.0, "stage_s": {"forward": 18.0, "solve": 6.0, "gram": 2.0}},
             "quick|mlp|obs|0.3": {**row, "method": "obs"}}  # cached before the floor was measured
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(cache))
    e2e.main(["--report", "--cache", str(path)])
    out = capsys.readouterr().out
    assert "| 30% | spap | 40.00 | 45.00 |  | 30 | 1.50 | 5 |" in out
    assert "| 30% | obs | 40.00 | 45.00 |  | 30 |  | 5 |" in out
    assert "| forward | solve | gram | other |" in out
    assert "| mlp | 30% | spap | 20 | 30 | 1.50 | 0.90 | 0.30 | 0.10 | 0.20 |" in out


def test_another_calibration_seed_is_its_own_cached_run_and_reaches_the_worker(e2e):
    default, other = (e2e.jobs_for(["structured"], [0.3], ["spap"], False, calib_seed=s)[0] for s in (0, 2))
    assert default.key("quick") == "quick|mlp|spap|0.3"
    assert other.key("quick") == "quick|mlp|spap@calib_seed=2|0.3" and e2e.is_variant(other.label)
    assert e2e.Job.from_payload(json.loads(json.dumps(other.__dict__))).calib_seed == 2


def test_a_negative_calibration_seed_is_refused_before_any_run(e2e, capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--calib-seed", "-1", "--report"])
    assert "--calib-seed" in capsys.readouterr().err
