"""Exact projections onto each structure: from scores to a mask with exactly the target count.

Masks are chosen by rank (``topk``), never by a ``<=`` threshold: dequantized weights share magnitudes,
and a threshold then prunes too many or too few.  Ties are broken by index (stable sort), so masks are
deterministic.
"""

from __future__ import annotations

import math
import struct

import torch

from .problem import LayerProblem
from .structure import NM, ColumnGroups, Unstructured


def keep_largest(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` largest entries of a 1-D tensor (ties: lower index wins).

    The ``n_keep``-th largest value splits the entries above it, kept, from those equal to it, kept in
    index order until the count is reached.  On the host it is found by selection (``kthvalue``, linear
    time, on a band bracketed by a sample for large inputs; a full stable sort of a 576×1536 layer took
    six times as long, and SPAP projects every iteration); on CUDA by a radix sort, which is the faster
    of the two there.
    """
    n = scores.numel()
    if n_keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if bool(torch.isnan(scores).any()):  # NaN compares false: rank by a stable sort instead (NaN first)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.argsort(scores, descending=True, stable=True)[:n_keep]] = True
        return keep
    if scores.is_cuda:
        # On CUDA kthvalue took 0.5 s on an 8B gate_proj's 58.7M scores and a radix sort under 10 ms
        # (benchmarks/row_phases.py, docs/performance.md).
        threshold = torch.sort(scores).values[n - n_keep]
    else:
        threshold = _kth_largest_host(scores, n_keep)
    keep = scores > threshold
    short = n_keep - int(keep.sum())
    if short:
        keep[torch.nonzero(scores == threshold).flatten()[:short]] = True
    return keep


# From this many entries the host selects on a band around a sample's estimate of the threshold: on
# a 576×1536 layer's 884,736 scores in 6 ms instead of kthvalue's 15-18 ms (SPAP projects 16 times per
# unstructured layer; docs/performance.md); below it kthvalue alone is as fast.
_SAMPLED_SELECTION_FROM = 100_000
_SAMPLE_SIZE = 8192


def _kth_largest_host(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of a 1-D tensor without NaN (``1 ≤ k < x.numel()``), as ``kthvalue``.

    Floyd and Rivest's idea: the sorted values of an evenly strided sample bracket the threshold by two
    values ``lo ≤ hi`` about three standard deviations of the sample's rank either side of its estimate;
    one counting pass and one gather then leave a selection on the entries in ``[lo, hi]`` (a few
    percent of them).  When the bracket misses (a sample unlike the whole), ``kthvalue`` on everything
    gives the same value, so the result never depends on the sample.
    """
    n = x.numel()
    if n < _SAMPLED_SELECTION_FROM:
        return torch.kthvalue(x, n - k + 1).values
    sample = torch.sort(x[:: max(n // _SAMPLE_SIZE, 1)]).values
    s = sample.numel()
    estimate = (n - k + 0.5) / n * s  # the threshold's position in the ascending sample
    margin = 3.0 * math.sqrt(s) + 4.0
    low, high = int(estimate - margin), int(estimate + margin)
    lo = sample[low] if low > 0 else x.new_tensor(-math.inf)
    hi = sample[high] if high < s - 1 else x.new_tensor(math.inf)
    above = int((x > hi).sum())
    band = x[(x >= lo) & (x <= hi)]
    need = k - above  # the threshold is the need-th largest entry of the band, if it lies there
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(x, n - k + 1).values


def keep_largest_per_row(scores: torch.Tensor, n_keep: torch.Tensor | int, *, ties: str = "first") -> torch.Tensor:
    """Boolean mask of the ``n_keep[i]`` largest entries of each row ``i`` of ``scores``.

    Parameters
    ----------
    scores : Tensor of shape ``(rows, n)``
    n_keep : int, or LongTensor of shape ``(rows,)``
    ties : {"first", "last"}, default "first"
        Among equal scores, keep the lower column index first (``"first"``) or the higher (``"last"``).
    """
    if ties == "last":
        return keep_largest_per_row(scores.flip(1), n_keep).flip(1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    if isinstance(n_keep, torch.Tensor):
        return rank < n_keep.to(scores.device)[:, None]
    return rank < n_keep


def keep_largest_in_groups(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` largest entries along the last axis of ``scores`` (groups of ``m``):
    a stable descending sort's choice (ties: lower index; NaN counts as the largest).

    On CUDA, for ``m ≤ 8``, each entry's rank is counted from all ``m²`` comparisons of its group, a few
    elementwise passes: a sort along an axis of 4 took 60% of SPAP's 2:4 solve of an 8B gate_proj there
    (``benchmarks/row_phases.py``).  On the host the sort is the faster of the two.
    """
    if scores.shape[-1] > 8 or not scores.is_cuda:
        top = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :n_keep]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return _keep_by_rank_count(scores, n_keep)


def _keep_by_rank_count(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """:func:`keep_largest_in_groups` by counting each entry's rank in its group (``m²`` comparisons)."""
    m = scores.shape[-1]
    nan = torch.isnan(scores)
    a, b = scores.unsqueeze(-1), scores.unsqueeze(-2)  # a: the entry ranked, b: the others of its group
    a_nan, b_nan = nan.unsqueeze(-1), nan.unsqueeze(-2)
    above = (b > a) | (b_nan & ~a_nan)
    tied = (b == a) | (b_nan & a_nan)
    earlier = torch.ones(m, m, dtype=torch.bool, device=scores.device).tril(-1)  # [i, j]: j before i
    rank = (above | (tied & earlier)).sum(-1)
    return rank < n_keep


def keep_largest_overall(scores: torch.Tensor, n_keep: int, *, min_per_row: int = 0) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` largest entries of ``scores`` ``(rows, n)`` overall, the
    ``min_per_row`` largest of every row among them (ties: lower flat index first)."""
    keep = keep_largest_per_row(scores, min_per_row) if min_per_row else torch.zeros_like(scores, dtype=torch.bool)
    rest = scores.masked_fill(keep, -math.inf).flatten()
    order = torch.sort(rest, descending=True, stable=True).indices[: n_keep - int(keep.sum())]
    keep.view(-1)[order] = True
    return keep


def keep_largest_across(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks of the ``k`` largest entries over all float32 ``tensors`` together (ties: lower index first,
    tensors in order).

    The ``k``-th largest value is found by bisection over the float32 values in their order (at most 33
    counting passes), so no tensor is concatenated or sorted: the memory is one boolean per entry.
    """
    def count_above(key: int) -> int:
        t = torch.tensor(_from_key(key), dtype=torch.float32)
        return sum(int((x > t.to(x.device)).sum()) for x in tensors)

    if k == 0:
        return [torch.zeros_like(x, dtype=torch.bool) for x in tensors]
    lo = _to_key(min(float(x.min()) for x in tensors)) - 1  # count_above(lo) = n >= k
    hi = _to_key(max(float(x.max()) for x in tensors))  # count_above(hi) = 0 < k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_above(mid) >= k:
            lo = mid
        else:
            hi = mid
    threshold = _from_key(hi)  # the k-th largest value: more than it < k <= at least it
    need = k - count_above(hi)
    masks = []
    for x in tensors:
        keep = x > threshold
        if need > 0:
            ties = torch.nonzero((x == threshold).flatten()).flatten()[:need]
            keep.view(-1)[ties] = True
            need -= ties.numel()
        masks.append(keep)
    return masks


def _to_key(value: float) -> int:
    """An int that orders float32 values as their values do (−0.0 and +0.0 get neighbouring keys)."""
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _from_key(key: int) -> float:
    bits = key if key >= 0 else (-(key + 1)) | -0x80000000
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def group_scores(problem: LayerProblem, column_scores: torch.Tensor) -> torch.Tensor:
    """Sum per-column scores, shape ``(d_in,)``, over each group: shape ``(n_groups,)``."""
    s: ColumnGroups = problem.structure  # type: ignore[assignment]
    if s.group_size is not None:
        return column_scores[s.index(column_scores.device)].sum(1)
    return torch.stack([column_scores[list(g)].sum() for g in s.groups])


def row_prune_counts(problem: LayerProblem) -> torch.Tensor:
    """Per-row prune counts that add up exactly to the layer target (for per-row selections)."""
    d_out, _ = problem.shape
    total = problem.n_pruned_target
    base, extra = divmod(total, d_out)
    counts = torch.full((d_out,), base, dtype=torch.long, device=problem.device)
    counts[:extra] += 1
    return counts


def project(problem: LayerProblem, scores: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """Keep mask with the highest scores that satisfies the problem's structure and target exactly.

    Parameters
    ----------
    scores : Tensor
        Shape ``(n_groups,)`` for column structures, ``(d_out, d_in)`` otherwise; larger = keep.
    per_row : bool, default False
        Unstructured only: prune the same count in every row (Wanda's comparison group) instead of
        choosing across the whole layer.
    """
    s = problem.structure
    if isinstance(s, ColumnGroups):
        return keep_largest(scores, problem.n_units - problem.n_pruned_target)
    if isinstance(s, NM):
        d_out, d_in = scores.shape
        return keep_largest_in_groups(scores.reshape(d_out, d_in // s.m, s.m), s.n).reshape(d_out, d_in)
    assert isinstance(s, Unstructured)
    if per_row:
        # Prune the ``counts[i]`` smallest of row i; among equal scores the lower index goes first.
        return keep_largest_per_row(scores, scores.shape[1] - row_prune_counts(problem), ties="last")
    flat = keep_largest(scores.flatten(), problem.n_units - problem.n_pruned_target)
    return flat.reshape(scores.shape)
