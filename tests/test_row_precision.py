"""benchmarks/row_precision.py and row_refit.py: the precision comparisons run both variants and leave
the solvers as they were."""

from __future__ import annotations

import importlib
import math

import solvers
from solvers.synthetic import make_problem

from .helpers import benchmark_module


def test_row_precision_solves_every_layer_both_ways(monkeypatch, capsys):
    bench = benchmark_module("row_precision")
    monkeypatch.setattr(bench.real_layers, "load", lambda: None)
    monkeypatch.setattr(bench.real_layers, "problem", lambda data, block, linear, structure, **target: make_problem(
        8, 32, kind="correlated", structure=structure, seed=block, **target))
    bench.main(["--structure", "2:4", "--blocks", "0", "1", "--linears", "a", "b"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 4 and all(len(row.split("|")) == 10 for row in rows)
    assert "sum of relative errors: float64" in out


def test_row_refit_times_cg_with_and_without_its_float32_phase():
    bench = benchmark_module("row_refit")
    refit = importlib.import_module("solvers.refit")
    p = make_problem(6, 40, kind="correlated", structure=solvers.Unstructured(), sparsity=0.5, seed=2)
    keep = solvers.solve(p, "magnitude").keep
    _, mixed = bench.time_refit(p, keep, "cg")
    _, float64_only = bench.time_refit(p, keep, "cg64")
    _, direct = bench.time_refit(p, keep, "cholesky")
    assert refit._FLOAT32_PHASE is True
    for weights in (mixed, float64_only):
        assert math.isclose(p.objective(weights), p.objective(direct), rel_tol=2 * refit._CG_RTOL, abs_tol=1e-14)
