"""Global pruning methods: each decides across the whole model instead of one layer at a time.

- :func:`gisp`: global iterative structured pruning (first-order loss scores, nested sub-networks);
- :func:`ddp_prune`: deterministic differentiable gates on MLP channels and KV groups;
- :func:`leap_prune`: learned unstructured masks, started from Wanda's.

They share the units (:mod:`spap.units`), calibration (:mod:`spap.capture`) and argument checks
(:mod:`spap.checks`) with the layer-wise pipeline.
"""

from .ddp import DDPReport, ddp_prune
from .gisp import GispResult, GispStep, gisp
from .leap import LeapReport, leap_prune

__all__ = ["gisp", "GispResult", "GispStep", "ddp_prune", "DDPReport", "leap_prune", "LeapReport"]
