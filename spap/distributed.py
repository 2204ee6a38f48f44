"""Data-parallel pruning over the ranks of a ``torch.distributed`` process group.

Each rank holds the whole model and its own shard of the calibration sequences.  What the layer problems
need from the data is a sum over tokens (the Gram matrices ``H``, the input sums, the cross terms ``C`` of
the dense target, the output-gradient Gram matrices ``G``), so summing each rank's share with
``all_reduce`` gives every rank the problem a single process poses on all shards together (equal to
round-off: float64 sums in another order).  Each problem is then solved on one rank (problem ``j`` of
block ``i`` on rank ``(i + j) mod world``) and its solution broadcast, so every rank writes the same
weights; the activations never leave their rank.

A failure on one rank must not leave the others waiting in a collective: every step that may fail runs
inside :func:`step`, which, at its end, agrees with every rank on whether any failed.  The failed rank
re-raises its own error, the others raise :class:`RankFailed` naming it.  Inside a step there are no
collectives, so a rank that fails half-way through still reaches the agreement.

The backend's device is CUDA for NCCL and the host for gloo; tensors are moved there for the collectives
and back (float64 throughout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Raised on every rank whose own work succeeded when another rank failed."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group.

    Attributes
    ----------
    rank, world : int
        This rank and the number of ranks.
    device : torch.device
        Where the backend's collectives take tensors (CUDA for NCCL, the host otherwise).
    offset : int
        Global index of this rank's first calibration sequence (ranks hold consecutive shards in rank order).
    sequences : tuple of int
        Calibration sequences held by each rank.
    tokens : tuple of int
        Calibration tokens held by each rank.
    """

    rank: int
    world: int
    device: torch.device
    offset: int
    sequences: tuple[int, ...]
    tokens: tuple[int, ...]

    def owner(self, job: int, block: int = 0) -> int:
        """The rank that solves the ``job``-th problem of block ``block``: rotated by the block, so that a
        prune with one problem per block (MLP channels) spreads its solves over the ranks too."""
        return (block + job) % self.world


def active() -> bool:
    """True when a process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks(n_sequences: int, n_tokens: int) -> Ranks | None:
    """This rank's :class:`Ranks` (a collective: every rank calls it), or None without a process group of
    more than one rank.  ``n_sequences`` and ``n_tokens`` count the calibration this rank holds."""
    if not active():
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = torch.zeros(2, world, dtype=torch.int64, device=device)
    counts[0, rank], counts[1, rank] = n_sequences, n_tokens
    dist.all_reduce(counts)
    sequences, tokens = (tuple(int(c) for c in row) for row in counts.tolist())
    return Ranks(rank, world, device, sum(sequences[:rank]), sequences, tokens)


def shard(n: int, world: int, rank: int) -> slice:
    """The consecutive slice of ``n`` items that ``rank`` of ``world`` holds (the first ``n mod world``
    ranks hold one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def agree(r: Ranks, error: BaseException | None, where: str) -> None:
    """Tell every rank whether this one failed ``where``; raise if any did.  The rank that failed re-raises
    ``error``; the others raise :class:`RankFailed` naming the first rank that failed and its error."""
    failed = torch.zeros(r.world, dtype=torch.int64, device=r.device)
    failed[r.rank] = error is not None
    dist.all_reduce(failed)
    if not failed.any():
        return
    first = int(failed.nonzero()[0])
    messages: list[str | None] = [None] * r.world
    text = None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip()
    dist.all_gather_object(messages, text)
    if error is not None:
        raise error
    raise RankFailed(f"rank {first} of {r.world} failed while {where}: {messages[first]}; rank {r.rank} stopped too.")


@contextlib.contextmanager
def step(r: Ranks | None, where: str) -> Iterator[None]:
    """Run the body, then agree with every rank on whether any failed (see :func:`agree`).  Without a
    process group (``r`` None) it only runs the body.  The body must run no collective."""
    if r is None:
        yield
        return
    try:
        yield
    except BaseException as error:
        agree(r, error, where)
        raise
    agree(r, None, where)


def all_reduce_sum(r: Ranks, tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (moved to the backend's device and back)."""
    for t in tensors:
        if t.device == r.device:
            dist.all_reduce(t)
        else:
            on = t.to(r.device)
            dist.all_reduce(on)
            t.copy_(on)


def reduce_accumulators(r: Ranks, accumulators: Sequence) -> None:
    """Sum :class:`solvers.GramAccumulator` statistics (``H``, ``sum``, ``C``, ``n_samples``) over the ranks,
    in place: afterwards each holds what one accumulator fed every rank's tokens would hold."""
    tensors = []
    for acc in accumulators:
        tensors += [acc.H, acc.sum] + ([] if acc.C is None else [acc.C])
    all_reduce_sum(r, tensors)
    counts = torch.tensor([acc.n_samples for acc in accumulators], dtype=torch.int64, device=r.device)
    if len(accumulators):
        dist.all_reduce(counts)
    for acc, n in zip(accumulators, counts.tolist()):
        acc.n_samples = int(n)


def broadcast(r: Ranks, obj, src: int):
    """``obj`` from rank ``src`` on every rank (pickled; tensors arrive on the host)."""
    box = [_to_host(obj) if r.rank == src else None]  # the sender's copy too: every rank gets the same
    dist.broadcast_object_list(box, src=src, device=r.device if r.device.type == "cuda" else None)
    return box[0]


def to_device(obj, device: torch.device):
    """A copy of ``obj`` with its tensors (see :func:`broadcast`) on ``device``."""
    return _map_tensors(obj, lambda t: t.to(device))


def _to_host(obj):
    return _map_tensors(obj, lambda t: t.detach().cpu())


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to its tensors: the object itself, the items of lists, tuples and dicts,
    and the fields of a dataclass (one level; a :class:`solvers.Solution`'s weight, mask and bias)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), torch.Tensor)})
    return obj
