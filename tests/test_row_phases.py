"""benchmarks/row_phases.py: each phase of SPAP's row solve is timed once per call, and the solver is
left as it was."""

from __future__ import annotations

import importlib

import pytest

import solvers

from .helpers import benchmark_module


@pytest.mark.parametrize("target", ["0.5", "2:4"])
def test_phases_count_every_call_and_restore_the_solver(target):
    bench = benchmark_module("row_phases")
    penalty = importlib.import_module("solvers.penalty")
    before = {name: getattr(penalty, name) for name in ("refit_rows", "refit_rows_below", "_project_count", "cholesky")}
    structure, options = bench.structure_of(target)
    problem = bench.correlated_problem(12, 32, structure, options, "cpu")
    total, clock = bench.phases(problem)
    # 5 values of ρ with 3 rounds each: one projection per round plus the first, one Cholesky per ρ.
    assert clock["selection"][1] == 16 and clock["Cholesky per ρ"][1] == 5
    assert clock["final refit"][1] == 1 and clock["guard"][1] == 1
    assert all(seconds >= 0 for seconds, _ in clock.values()) and total > 0
    assert {name: getattr(penalty, name) for name in before} == before
    assert solvers.solve(problem, "spap").keep.sum() == problem.shape[0] * problem.shape[1] - problem.n_pruned_target

