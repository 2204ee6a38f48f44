"""spap: layer-wise pruning of Hugging Face language models by solving each layer's problem.

>>> import spap
>>> model, tokenizer = spap.load_model("smollm2")                                  # doctest: +SKIP
>>> calib = spap.data.random_windows(spap.data.c4_documents(0, 500), tokenizer, n=64, seqlen=1024)  # doctest: +SKIP
>>> model, report = spap.prune_layerwise(model, calib, sparsity=0.3)               # doctest: +SKIP
>>> model, report = spap.prune_layerwise(model, calib, 0.5, allocation="knapsack")  # doctest: +SKIP

Global, iterative (GISP), non-uniform widths; differentiable gates (DDP):

>>> result = spap.gisp(model, calib, sparsities=[0.2, 0.3, 0.5], structure="mlp")  # doctest: +SKIP
>>> spap.save_pruned(result.materialize(model, 0.3), tokenizer, "pruned-30/")      # doctest: +SKIP
>>> model30, tokenizer = spap.load_pruned("pruned-30/")                           # doctest: +SKIP
>>> model, report = spap.ddp_prune(model, calib[:16, :128], sparsity=0.3)         # doctest: +SKIP
"""

from . import allocation, checkpoint, data, eval, units
from .adapters import ADAPTERS, get_adapter
from .global_methods import DDPReport, GispResult, GispStep, LeapReport, ddp_prune, gisp, leap_prune
from .models import layer_widths, load_model, load_pruned, save_model, save_pruned
from .pipeline import forward_seconds, prune_layerwise
from .report import PruneReport

__all__ = ["prune_layerwise", "forward_seconds", "gisp", "GispResult", "GispStep", "ddp_prune", "DDPReport", "leap_prune", "LeapReport",
           "load_model", "save_model", "save_pruned", "load_pruned", "layer_widths", "data", "eval", "get_adapter", "ADAPTERS", "PruneReport", "units",
           "allocation"]
