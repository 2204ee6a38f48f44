"""Declarative argument checks with one error template.

Every public entry point states its constraints as data (``Interval``, ``Options``, ...) and calls
:func:`check` once; inner code does not repeat the checks.  The message always names the argument, the
caller and the allowed values, e.g.::

    The 'sparsity' argument of LayerProblem must be a float in the range [0, 1). Got 1.5 instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable


class InvalidArgumentError(ValueError, TypeError):
    """Raised for an argument outside its allowed values; a ``ValueError`` (and ``TypeError``)."""


@dataclass(frozen=True)
class Interval:
    """A real (or integer) number in a range; ``None`` bounds are open-ended."""

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"  # "both", "left", "right", "neither"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return False
        low_ok = self.low is None or (
            value >= self.low if self.closed in ("both", "left") else value > self.low
        )
        high_ok = self.high is None or (
            value <= self.high if self.closed in ("both", "right") else value < self.high
        )
        return low_ok and high_ok

    def __str__(self) -> str:
        name = "an int" if self.kind is int else "a float"
        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{name} in the range {left}{low}, {high}{right}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class Boolean:
    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def __str__(self) -> str:
        return "a bool"


@dataclass(frozen=True)
class NoneOr:
    inner: Any

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def __str__(self) -> str:
        return f"None or {self.inner}"


def check(name: str, value: Any, constraint: Any, caller: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``constraint.accepts(value)``."""
    if not constraint.accepts(value):
        raise InvalidArgumentError(
            f"The {name!r} argument of {caller} must be {constraint}. Got {value!r} instead."
        )


def check_options(options: dict, constraints: dict, caller: str) -> None:
    """Check a keyword dictionary against a constraint table; unknown keys are errors too."""
    unknown = sorted(set(options) - set(constraints))
    if unknown:
        allowed = ", ".join(sorted(constraints)) or "none"
        raise InvalidArgumentError(
            f"{caller} got unknown option(s) {', '.join(map(repr, unknown))}; allowed: {allowed}."
        )
    for key, value in options.items():
        check(key, value, constraints[key], caller)


def one_of(name: str, value: Any, allowed: Iterable, caller: str) -> None:
    check(name, value, Options(tuple(allowed)), caller)
