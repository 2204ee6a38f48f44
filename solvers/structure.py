"""Sparsity structures of one linear layer's weight ``W`` of shape ``(d_out, d_in)``.

Convention: a row of ``W`` is an output channel; a column is an input feature and indexes the Gram
matrix ``H`` of shape ``(d_in, d_in)``.  Structured pruning removes whole *column groups* (an MLP
intermediate channel is one column of ``down_proj``; an attention head is ``head_dim`` contiguous columns
of ``o_proj``), which is what makes the layer physically smaller.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .validation import InvalidArgumentError


@dataclass(frozen=True)
class ColumnGroups:
    """Prune whole groups of columns.  Columns in no group are never pruned.

    Parameters
    ----------
    groups : tuple of tuple of int
        Disjoint column indices, one tuple per group.  Build it with :func:`channels`, :func:`heads`
        or :func:`column_groups`.
    """

    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        g = self.groups
        ok = isinstance(g, tuple) and len(g) > 0 and all(
            isinstance(grp, tuple) and len(grp) > 0
            and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in grp)
            for grp in g)
        if not ok:
            shown = repr(g) if not isinstance(g, tuple) or len(g) <= 4 else f"a tuple of {len(g)} groups"
            raise InvalidArgumentError(
                "The 'groups' argument of ColumnGroups must be a non-empty tuple of non-empty tuples of column "
                f"indices (ints >= 0); build it with channels, heads or column_groups. Got {shown[:80]} instead."
            )

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def group_size(self) -> int | None:
        """The common size of every group, or ``None`` when sizes differ."""
        sizes = {len(g) for g in self.groups}
        return sizes.pop() if len(sizes) == 1 else None

    def index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor of shape ``(n_groups, group_size)``; only for equal-sized groups."""
        if self.group_size is None:
            raise ValueError("index() needs equal-sized groups")
        return torch.tensor(self.groups, dtype=torch.long, device=device).reshape(self.n_groups, -1)

    def columns(self, group_mask: torch.Tensor) -> torch.Tensor:
        """Expand a boolean mask over groups, shape ``(n_groups,)``, to column indices (LongTensor)."""
        picked = [c for g, on in zip(self.groups, group_mask.tolist()) if on for c in g]
        return torch.tensor(sorted(picked), dtype=torch.long, device=group_mask.device)

    def column_keep_mask(self, keep_groups: torch.Tensor, d_in: int) -> torch.Tensor:
        """Boolean ``(d_in,)`` mask of kept columns for a boolean ``(n_groups,)`` kept-group mask."""
        keep = torch.ones(d_in, dtype=torch.bool, device=keep_groups.device)
        pruned = self.columns(~keep_groups)
        keep[pruned] = False
        return keep

    def __repr__(self) -> str:
        size = self.group_size
        shape = f"size {size}" if size is not None else "mixed sizes"
        return f"ColumnGroups({self.n_groups} groups of {shape})"


@dataclass(frozen=True)
class Unstructured:
    """Prune individual weights; the target counts weights over the whole layer."""

    def __repr__(self) -> str:
        return "Unstructured()"


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: in each row, every block of ``m`` consecutive columns keeps ``n``.

    ``NM(2, 4)`` is the 2:4 pattern that sparse tensor cores accelerate.  Its sparsity is ``1 - n/m``.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise InvalidArgumentError(
                f"The 'n' and 'm' arguments of NM must be ints with 0 < n < m. Got n={self.n!r}, m={self.m!r}."
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __repr__(self) -> str:
        return f"NM({self.n}:{self.m})"


Structure = Union[ColumnGroups, Unstructured, NM]


def channels(d_in: int) -> ColumnGroups:
    """One group per column: the intermediate channels of an MLP (columns of ``down_proj``)."""
    _positive("d_in", d_in, "channels")
    return ColumnGroups(tuple((i,) for i in range(d_in)))


def heads(d_in: int, head_dim: int) -> ColumnGroups:
    """Contiguous groups of ``head_dim`` columns: the attention heads of ``o_proj``."""
    _positive("d_in", d_in, "heads")
    _positive("head_dim", head_dim, "heads")
    if d_in % head_dim:
        raise InvalidArgumentError(
            f"The 'head_dim' argument of heads must divide d_in={d_in}. Got {head_dim!r} instead."
        )
    return ColumnGroups(tuple(tuple(range(h * head_dim, (h + 1) * head_dim)) for h in range(d_in // head_dim)))


def column_groups(groups: Sequence[Sequence[int]]) -> ColumnGroups:
    """Arbitrary disjoint groups of column indices (checked against the layer in ``LayerProblem``)."""
    try:
        as_tuples = tuple(tuple(int(c) for c in g) for g in groups)
    except (TypeError, ValueError):
        as_tuples = ()
    if not as_tuples or any(len(g) == 0 or min(g) < 0 for g in as_tuples):
        raise InvalidArgumentError("The 'groups' argument of column_groups must be a non-empty sequence of non-empty "
                                   f"groups of column indices (ints >= 0). Got {groups!r:.80} instead.")
    flat = [c for g in as_tuples for c in g]
    if len(flat) != len(set(flat)):
        raise InvalidArgumentError("The 'groups' argument of column_groups must be disjoint; a column repeats.")
    return ColumnGroups(as_tuples)


def parse_structure(spec: str, d_in: int, *, head_dim: int | None = None) -> Structure:
    """Build a structure from a short string: ``"channels"``, ``"heads"``, ``"unstructured"`` or ``"N:M"``."""
    if spec == "channels":
        return channels(d_in)
    if spec == "heads":
        if head_dim is None:
            raise InvalidArgumentError("structure 'heads' needs the 'head_dim' argument.")
        return heads(d_in, head_dim)
    if spec == "unstructured":
        return Unstructured()
    if ":" in spec:
        left, _, right = spec.partition(":")
        if left.isdigit() and right.isdigit():
            return NM(int(left), int(right))
    raise InvalidArgumentError(
        f"The 'structure' argument must be one of 'channels', 'heads', 'unstructured' or 'N:M' such as '2:4'. "
        f"Got {spec!r} instead."
    )


def prune_count(sparsity: float, n: int) -> int:
    """How many of ``n`` units a fraction ``sparsity`` prunes: ``⌊sparsity·n + ½⌋`` (halves round up).

    The one rounding rule of the package: layer problems, the pipeline's key-value groups and the
    global methods' per-block counts all use it, so a sparsity means the same count everywhere.
    """
    return int(math.floor(sparsity * n + 0.5))


def checked_prune_count(sparsity: float, n: int, *, units: str, caller: str, argument: str = "sparsity") -> int:
    """:func:`prune_count`, refused when it is all ``n`` units and warned about when it is none.

    ``units`` says what is counted (``"channels"``, ``"key-value groups per block"``, ...) and
    ``argument`` which argument of ``caller`` the fraction came from; both appear in the one-line
    message.  A sparsity of exactly 0 is a deliberate no-op and gets no warning.
    """
    k = prune_count(sparsity, n)
    if k >= n:
        below = (n - 0.5) / n
        raise InvalidArgumentError(
            f"The {argument!r} argument of {caller} is {sparsity}, which would prune all {n} {units} "
            f"(floor(s*n + 1/2) = {k}); at least one must stay, so it must be below {below:.6g}."
        )
    if k == 0 and sparsity > 0:
        warnings.warn(
            f"The {argument!r} argument of {caller} is {sparsity}, which rounds to 0 of {n} {units} "
            f"(floor(s*n + 1/2) = 0): nothing is pruned; {0.5 / n:.6g} or more prunes one.",
            UserWarning, stacklevel=3,
        )
    return k


def _positive(name: str, value: int, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"The {name!r} argument of {caller} must be a positive int. Got {value!r} instead.")
