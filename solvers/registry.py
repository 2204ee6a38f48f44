"""Solvers register by name; :func:`solve` validates once and dispatches.

A solver is a function ``fn(problem, **options) -> (weight64, keep, stats)`` registered with
:func:`register`, which declares the structures it supports, its paper and a constraint table for its
options (scikit-learn style).  :func:`solve` checks the options against the table, times the call,
computes the errors and wraps everything in a :class:`~solvers.solution.Solution`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .validation import InvalidArgumentError, check_options
from .problem import LayerProblem
from .solution import Solution
from .structure import NM, ColumnGroups, Unstructured

SolverFn = Callable[..., "tuple[torch.Tensor, torch.Tensor, dict[str, Any]]"]


@dataclass(frozen=True)
class SolverSpec:
    """What a registered solver is: its name, function, supported structures, paper and options."""

    name: str
    fn: SolverFn
    structures: tuple[type, ...]
    reference: str
    options: dict[str, Any]
    summary: str
    compensates_bias: bool = False  # returns a new bias (Solution.bias) that the layer must use
    check: Callable[[dict[str, Any], object], None] | None = None  # options against a structure

    def supports(self, structure: object) -> bool:
        return isinstance(structure, self.structures)

    def check_structure(self, options: dict[str, Any], structure: object) -> None:
        """Raise :class:`InvalidArgumentError` for options that do not apply to ``structure``."""
        if self.check is not None:
            self.check(options, structure)


_REGISTRY: dict[str, SolverSpec] = {}

ALL_STRUCTURES = (ColumnGroups, Unstructured, NM)


def register(
    name: str,
    *,
    structures: tuple[type, ...] = ALL_STRUCTURES,
    reference: str = "",
    options: dict[str, Any] | None = None,
    summary: str = "",
    compensates_bias: bool = False,
    check: Callable[[dict[str, Any], object], None] | None = None,
) -> Callable[[SolverFn], SolverFn]:
    """Decorator that registers ``fn`` under ``name``.  ``compensates_bias``: the solver returns a new
    bias (``stats["bias"]``, :attr:`Solution.bias`) that the layer must use, also where it had none.
    ``check(options, structure)``: raises for options that do not apply to a structure (run with the
    option table's check, before any work)."""

    def wrap(fn: SolverFn) -> SolverFn:
        if name in _REGISTRY:
            raise ValueError(f"solver {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = SolverSpec(name, fn, structures, reference, dict(options or {}),
                                     summary or (doc[0] if doc else ""), compensates_bias, check)
        return fn

    return wrap


def available_methods() -> list[str]:
    """Names of the registered solvers, in registration order."""
    return list(_REGISTRY)


def get_solver(name: str) -> SolverSpec:
    """The :class:`SolverSpec` registered under ``name``."""
    if name not in _REGISTRY:
        raise InvalidArgumentError(
            f"The 'method' argument of solve must be one of {', '.join(map(repr, _REGISTRY))}. Got {name!r} instead."
        )
    return _REGISTRY[name]


def check_method(method: str, options: dict[str, Any] | None = None, structure: object | None = None) -> SolverSpec:
    """Validate a method name, its options and (optionally) a structure before any work is done."""
    spec = get_solver(method)
    if structure is not None and not spec.supports(structure):
        allowed = ", ".join(s.__name__ for s in spec.structures)
        raise InvalidArgumentError(
            f"Method {method!r} does not support structure {structure!r}; it supports: {allowed}."
        )
    check_options(dict(options or {}), spec.options, f"solve(method={method!r})")
    if structure is not None:
        spec.check_structure(dict(options or {}), structure)
    return spec


def solve(problem: LayerProblem, method: str = "spap", **options: Any) -> Solution:
    """Solve one layer's pruning problem with the named method.

    Parameters
    ----------
    problem : LayerProblem
    method : str, default "spap"
        A name from :func:`available_methods`.
    **options
        The method's options; see ``get_solver(method).options`` for the allowed values.

    Returns
    -------
    Solution
    """
    if not isinstance(problem, LayerProblem):
        raise InvalidArgumentError(f"The 'problem' argument of solve must be a LayerProblem. Got {type(problem).__name__}.")
    spec = get_solver(method)
    if not spec.supports(problem.structure):
        allowed = ", ".join(s.__name__ for s in spec.structures)
        raise InvalidArgumentError(
            f"Method {method!r} does not support structure {problem.structure!r}; it supports: {allowed}."
        )
    check_options(options, spec.options, f"solve(method={method!r})")
    spec.check_structure(options, problem.structure)
    start = time.perf_counter()
    weight64, keep, stats = spec.fn(problem, **options)
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    seconds = time.perf_counter() - start
    bias = stats.pop("bias", None)
    return solution_of(problem, weight64, keep, method, bias, {"seconds": seconds, **stats})


def solution_of(problem: LayerProblem, weight64: torch.Tensor, keep: torch.Tensor, method: str,
                bias: torch.Tensor | None = None, stats: dict | None = None) -> Solution:
    """The :class:`Solution` of ``problem`` with the float64 weight ``weight64``: its undamped error,
    relative error and damped objective, the weight in the problem's dtype."""
    error = problem.error(weight64)
    return Solution(
        weight=weight64.to(problem.weight.dtype),
        keep=keep,
        error=error,
        relative_error=error / max(problem.dense_energy, 1e-300),
        objective=problem.objective(weight64, error=error),
        method=method,
        bias=bias,
        stats=dict(stats or {}),
    )
