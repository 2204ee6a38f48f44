"""Argument checks shared by every entry point of ``spap`` (the pipeline and the global methods).

The constraint objects and the one error template are those of :mod:`solvers.validation`; this module
adds the few constraints the model side needs (pairs, sequences, devices) and a table check, so each
entry point states its arguments as data and validates them once, before any work::

    The 'steps' argument of ddp_prune must be an int in the range [1, inf). Got 0 instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from solvers.validation import Boolean, Interval, InvalidArgumentError, NoneOr, Options, check

__all__ = ["Boolean", "Interval", "InvalidArgumentError", "NoneOr", "Options", "check", "check_table",
           "DecreasingPair", "DistinctFloats", "DistinctNames", "PathLike", "device", "finite"]


def check_table(caller: str, constraints: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Check every ``values[name]`` against ``constraints[name]``, in the table's order."""
    for name, constraint in constraints.items():
        check(name, values[name], constraint, caller)


@dataclass(frozen=True)
class DecreasingPair:
    """A pair ``(first, last)`` of floats with ``first >= last > 0`` (a schedule from first to last)."""

    def accepts(self, value: Any) -> bool:
        positive = Interval(float, 0, None, closed="neither")
        return (isinstance(value, (tuple, list)) and len(value) == 2 and all(positive.accepts(v) for v in value)
                and value[0] >= value[1])

    def __str__(self) -> str:
        return "a pair (first, last) of floats with first >= last > 0"


@dataclass(frozen=True)
class DistinctFloats:
    """A non-empty sequence of distinct numbers, each accepted by ``each``."""

    each: Interval

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            return False
        if not all(self.each.accepts(v) for v in value):
            return False
        levels = sorted(float(v) for v in value)
        return not any(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(levels, levels[1:]))

    def __str__(self) -> str:
        return f"a non-empty sequence of distinct numbers, each {self.each}"


@dataclass(frozen=True)
class DistinctNames:
    """A non-empty tuple or list of distinct strings (a string alone is refused: it would read as its letters)."""

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, str) for v in value)
                and len(set(value)) == len(value))

    def __str__(self) -> str:
        return "a non-empty tuple of distinct strings"


@dataclass(frozen=True)
class PathLike:
    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, os.PathLike))

    def __str__(self) -> str:
        return "a path (str or os.PathLike)"


def device(name: str, value: Any, caller: str) -> torch.device:
    """``value`` as a usable ``torch.device``, or an error naming the argument."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"The {name!r} argument of {caller} must be a torch device such as 'cpu' or "
                                   f"'cuda'. Got {value!r} instead.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"The {name!r} argument of {caller} is {dev}, but torch sees no CUDA device.")
    return dev


def finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` unchanged, or ``FloatingPointError`` naming ``what`` when it holds NaN or Inf."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"NaN or Inf in the {what}.")
    return x
