"""Choosing a block's mask by the model's own loss (``prune_layerwise(candidates=...)``).

A layer problem ranks masks by how well the pruned output linear reproduces the block's own outputs;
several solvers reach masks of nearly the same error, and the model may prefer one the error does not.
With candidates, every candidate method solves the same :class:`solvers.LayerProblem`; each solution is
written into a copy of the block, exactly as the pipeline writes its own (:func:`write_units`), and the
rest of the network (the copy, every later block, still dense, with its own captured call arguments,
then the final norm and the language-model head, :meth:`spap.adapters.Adapter.logits`) runs from the
block's input on the first ``select_windows`` calibration sequences.  The candidate whose next-token
cross-entropy on those sequences is lowest is kept; ties go to the earlier candidate, the main method
first.

Cost for block ``i`` of ``L``, with ``K`` candidates and ``w`` windows: ``K`` solves, ``K`` copies of the
block held at once, and ``K·(L − i)`` block passes and ``K`` head passes on the ``w`` sequences, which
over a run is ``K·L(L + 1)/2`` block passes on ``w`` sequences (the pipeline itself runs about ``L``
to ``2L`` block passes on every calibration sequence).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import solvers

from .adapters import Adapter, LinearView
from .capture import capture_block_inputs, run_block
from .checks import InvalidArgumentError
from .units import PruneStructure, UnitKind


def check_candidates(candidates: Sequence[str] | None, method: str, structure: PruneStructure,
                     caller: str = "prune_layerwise") -> tuple[str, ...]:
    """The methods a block's mask is chosen from: ``()`` when ``candidates`` is None, else ``method``
    followed by the other candidates in the order given.

    ``candidates`` is already a non-empty sequence of distinct strings (the argument table checks it);
    this refuses, naming 'candidates', a name that is not a registered solver or cannot solve column
    groups, and a row structure (unstructured, N:M), whose masks are not chosen by loss.
    """
    if candidates is None:
        return ()
    if structure.rows is not None:
        raise InvalidArgumentError(f"The 'candidates' argument of {caller} chooses among masks of MLP channels and "
                                   f"key-value groups; structure {structure.text!r} prunes weights of rows, for which "
                                   "choosing by loss is not implemented. Use candidates=None.")
    known = solvers.available_methods()
    for name in candidates:
        if name not in known:
            raise InvalidArgumentError(f"The 'candidates' argument of {caller} holds {name!r}, which is not a "
                                       f"registered solver; registered: {', '.join(map(repr, known))}.")
        try:
            solvers.check_method(name, None, solvers.channels(1))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"The 'candidates' argument of {caller} holds {name!r}: {e}") from None
    return (method, *[c for c in candidates if c != method])


@dataclass
class Windows:
    """The calibration sequences a selection runs.

    ``rows[w] = (b, k)``: window group ``w`` is the first ``k`` sequences of calibration batch ``b``;
    ``ids[w]`` their token ids ``(k, seq)``; ``kwargs[j][w]`` the call arguments of block ``j`` for them
    (captured for this batch shape, so no argument is sliced by guessing its batch dimension).
    """

    rows: list[tuple[int, int]]
    ids: list[torch.Tensor]
    kwargs: list[list[dict]]


def capture_windows(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], n: int,
                    device: torch.device, offload: torch.device) -> Windows:
    """The first ``n`` calibration sequences (all of them when there are fewer) and every block's call
    arguments for them.  Runs the embeddings only; the caller puts the modules outside the blocks on
    ``device``."""
    rows, left = [], n
    for b, batch in enumerate(batches):
        if left == 0:
            break
        k = min(left, batch.shape[0])
        rows.append((b, k))
        left -= k
    ids = [batches[b][:k] for b, k in rows]
    _, kwargs = capture_block_inputs(model, blocks, ids, device, offload)
    return Windows(rows, ids, kwargs)


class TailScorer:
    """Scores versions of block ``index`` by the loss of the network from that block on.

    Build it before the block's first pass: it copies the block's inputs on the windows (the rows
    ``hidden[b][:k]``), since the MLP shortcut overwrites ``hidden`` during that pass.
    """

    def __init__(self, adapter: Adapter, index: int, windows: Windows, hidden: list[torch.Tensor],
                 device: torch.device) -> None:
        self.adapter, self.index, self.windows, self.device = adapter, index, windows, device
        self.inputs = [hidden[b][:k].clone() for b, k in windows.rows]

    def losses(self, versions: Sequence[nn.Module]) -> list[float]:
        """Mean next-token cross-entropy on the windows (labels: their own ids) with block ``index``
        replaced by each of ``versions`` (modules on the compute device)."""
        kw = self.windows.kwargs
        with torch.no_grad():
            streams = [[run_block(v, x, kw[self.index][w], self.device) for w, x in enumerate(self.inputs)]
                       for v in versions]
            blocks = self.adapter.blocks()
            for j in range(self.index + 1, len(blocks)):
                # every version's stream through block j while it is on the device: one move per block
                with on_device([blocks[j]], self.device):
                    streams = [[run_block(blocks[j], h, kw[j][w], self.device) for w, h in enumerate(stream)]
                               for stream in streams]
            with on_device(self.adapter.head(), self.device):
                return [self._loss(stream) for stream in streams]

    def _loss(self, stream: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for h, ids in zip(stream, self.windows.ids):
            for r in range(h.shape[0]):  # one sequence at a time: its logits are (seq, vocab)
                logits = self.adapter.logits(h[r:r + 1])[0, :-1].float()
                labels = ids[r, 1:].to(logits.device)
                total += float(F.cross_entropy(logits, labels, reduction="sum"))
                count += labels.numel()
        return total / count


def write_units(kind: UnitKind, block: nn.Module, solution: solvers.Solution) -> torch.Tensor:
    """Write a column-group ``solution`` into ``block`` as the pipeline keeps it: the output linear's
    weight and bias (``ValueError`` when the solution has a bias and the linear none), then only the
    kept units (:meth:`UnitKind.keep`).  Returns the kept units'
    indices ``(n_kept,)`` on the solution's device."""
    view = LinearView(kind.output_linear(block))
    if solution.bias is not None and view.bias is None:  # never drop a compensation silently
        raise ValueError(f"The {solution.method!r} solution carries a bias for the {kind.name} output linear, which has "
                         "none; give it one first (spap.bias.add_biases, as prune_layerwise does).")
    view.set_weight(solution.weight)
    if solution.bias is not None:
        view.bias.copy_(solution.bias.to(view.bias.dtype))
    idx = torch.nonzero(solution.keep).flatten()
    kind.keep(block, idx)
    return idx


def write_expert_units(kind, block: nn.Module, solutions: Sequence[solvers.Solution]) -> torch.Tensor:
    """Write one column-group solution per expert (``solutions[e]`` for expert ``e`` of
    :class:`spap.units.ExpertChannels` ``kind``) into ``block``: every expert's down projection, then only
    the kept channels of every expert (rows of both halves of ``gate_up_proj``, columns of ``down_proj``).
    Every solution must keep as many channels (the parameters stay rectangular; ``ValueError``
    otherwise) and carry no bias (experts have none).  Returns the kept channels ``(experts, kept)``."""
    kept = [torch.nonzero(sol.keep).flatten() for sol in solutions]
    if len({k.numel() for k in kept}) > 1 or any(sol.bias is not None for sol in solutions):
        raise ValueError("The expert solutions must keep as many channels each and carry no bias; got "
                         f"{[k.numel() for k in kept]} channels kept.")
    experts = kind.experts(block)
    for e, sol in enumerate(solutions):
        experts.set_down(e, sol.weight)
    idx = torch.stack(kept)
    kind.keep(block, idx)
    return idx


def choose(problem: solvers.LayerProblem, block: nn.Module, kind: UnitKind, methods: Sequence[str], method: str,
           method_options: dict, scorer: TailScorer,
           solve: Callable[..., solvers.Solution] = solvers.solve) -> tuple[solvers.Solution, dict]:
    """Solve ``problem`` with every one of ``methods`` (``method_options`` go to ``method`` only, the
    others run at their defaults), score each solution written into a copy of ``block``, and return the
    solution with the lowest loss and the record of the choice (see :class:`spap.report.LayerRecord`).
    ``solve(problem, method, **options)`` solves one (the pipeline passes one that keeps its output metric)."""
    solutions = {m: solve(problem, m, **(method_options if m == method else {})) for m in methods}
    start = time.perf_counter()
    versions = []
    for solution in solutions.values():
        version = copy.deepcopy(block)
        write_units(kind, version, solution)
        versions.append(version)
    losses = scorer.losses(versions)
    del versions
    # NaN counts as Inf, so it never wins over a finite loss; among equal losses the earlier candidate does
    best = min(range(len(losses)), key=lambda c: losses[c] if math.isfinite(losses[c]) else math.inf)
    names = list(solutions)
    record = {"method": names[best], "loss": dict(zip(names, losses)),
              "relative_error": {m: float(s.relative_error) for m, s in solutions.items()},
              "seconds": {m: float(s.stats["seconds"]) for m, s in solutions.items()},
              "score_seconds": time.perf_counter() - start}
    return solutions[names[best]], record


@contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the block and back where each was (a module without tensors
    stays); tied weights (the head and the embeddings) move together and come back together."""
    homes = []
    for m in modules:
        first = next(iter([*m.parameters(), *m.buffers()]), None)
        homes.append(None if first is None else first.device)
        if first is not None:
            m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            if home is not None:
                m.to(home)
