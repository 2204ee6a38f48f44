"""What a pruning run cost and what it changed: per-layer records and totals."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LayerRecord:
    """One solved layer problem: ``block``, ``target`` (``"mlp"``, ``"heads"`` or a linear's name),
    ``kept``/``total`` units, relative reconstruction error and solver seconds.

    ``selection`` is None unless the mask was chosen by the model's loss (``prune_layerwise(candidates=...)``,
    :mod:`spap.selection`); it then holds ``"method"`` (the candidate kept, whose solution the other fields
    describe, except ``seconds``, the solves of every candidate), and per candidate ``"loss"`` (next-token
    cross-entropy on the selection windows), ``"relative_error"`` and ``"seconds"``, and ``"score_seconds"``
    (the forward passes that scored them).
    """

    block: int
    target: str
    structure: str
    kept: int
    total: int
    relative_error: float
    seconds: float
    selection: dict[str, Any] | None = None

    @classmethod
    def from_solution(cls, block: int, target: str, solution, problem) -> "LayerRecord":
        return cls(block, target, repr(problem.structure), int(solution.keep.sum()), int(solution.keep.numel()),
                   float(solution.relative_error), float(solution.stats["seconds"]))


@dataclass
class PruneReport:
    """Returned by :func:`spap.prune_layerwise`.  ``seconds`` is wall time of the whole run,
    ``block_seconds`` of each block pruned by this call (capture, solves, shrinking and propagation) and
    ``metric_seconds`` of the backward passes behind the output metric (0 without one); memory in bytes.
    ``allocation`` is None for a uniform prune; with an allocation rule (``prune_layerwise(allocation=...)``)
    it holds each block's fraction (``"sparsity"``) and pruned units per kind (``"mlp"``, ``"heads"``), and
    ``allocation_seconds`` the time the rule took (its pass over the dense model and its costs).

    ``stage_seconds`` splits ``seconds`` by stage, summed over blocks: ``"metric"`` (as above),
    ``"allocation"``, ``"inputs"`` (the embeddings pass that captures the first block's inputs),
    ``"forward"`` (each block's pass over the calibration set that records its layers' inputs),
    ``"gram"`` (the Gram products inside that pass), ``"solve"`` (building, solving and writing back the
    problems; ``solver_seconds`` is the solvers' own share), ``"propagate"`` (the pruned blocks' outputs
    for the next block) and ``"checkpoint"``; what no stage holds (moving blocks between devices) is the
    rest of ``seconds``.  Compare the total with :func:`spap.forward_seconds`, one plain forward pass of the
    same calibration set through the blocks."""

    settings: dict[str, Any]
    params_before: int
    params_after: int = 0
    seconds: float = 0.0
    peak_memory: dict[str, int] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    metric_seconds: float = 0.0
    allocation: dict[str, list] | None = None
    allocation_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def solver_seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["solver_seconds"] = self.solver_seconds
        return d

    def to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    def summary(self) -> str:
        """A table of the layers (aggregated per target) and the totals."""
        groups = {t: [r for r in self.layers if r.target == t] for t in dict.fromkeys(r.target for r in self.layers)}
        kept_texts = {}
        for target, rs in groups.items():
            kept = sorted({r.kept for r in rs})
            kept_texts[target] = f"{kept[0]}/{rs[0].total}" if len(kept) == 1 else f"{kept[0]}-{kept[-1]}/{rs[0].total}"
        width = max([14] + [len(t) + 2 for t in kept_texts.values()])  # per-block targets give ranges
        lines = [f"{'target':<12}{'layers':>7}{'kept/total':>{width}}{'mean rel.err':>14}{'max rel.err':>13}{'solver s':>10}"]
        for target, rs in groups.items():
            lines.append(
                f"{target:<12}{len(rs):>7}{kept_texts[target]:>{width}}"
                f"{sum(r.relative_error for r in rs) / len(rs):>14.5f}{max(r.relative_error for r in rs):>13.5f}"
                f"{sum(r.seconds for r in rs):>10.1f}"
            )
        chosen = [r.selection["method"] for r in self.layers if r.selection is not None]
        if chosen:
            counts = {m: chosen.count(m) for m in dict.fromkeys(chosen)}
            lines.append("chosen by loss: " + ", ".join(f"{m} {n}" for m, n in counts.items())
                         + f" (of {len(chosen)} problems)")
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({1 - self.params_after / self.params_before:.1%} fewer); "
            f"time {self.seconds:.1f} s (solver {self.solver_seconds:.1f} s"
            + (f", output metric {self.metric_seconds:.1f} s" if self.metric_seconds else "")
            + (f", allocation {self.allocation_seconds:.1f} s" if self.allocation is not None else "") + "); "
            + peak_memory_text(self.peak_memory)
        )
        if self.stage_seconds:
            rest = self.seconds - sum(self.stage_seconds.values())
            lines.append("time by stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items() if v)
                         + f", other {rest:.1f} s")
        return "\n".join(lines)


def peak_memory_text(peak: dict[str, int]) -> str:
    """``{"rss": bytes, "cuda": bytes}`` -> ``"peak rss 2.46 GiB, peak cuda ..."`` for summaries."""
    return ", ".join(f"peak {k} {v / 2**30:.2f} GiB" for k, v in peak.items())


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def peak_memory(device: torch.device | None = None) -> dict[str, int]:
    """Peak resident memory of this process (and peak CUDA memory when on CUDA), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss": rss if sys.platform == "darwin" else rss * 1024}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda"] = torch.cuda.max_memory_allocated(device)
    return out
