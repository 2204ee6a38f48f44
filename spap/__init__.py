"""spap: layer-wise pruning of Hugging Face language models by solving each layer's problem.

>>> import spap
>>> model, tokenizer = spap.load_model("smollm2")                                  # doctest: +SKIP
>>> calib = spap.data.random_windows(spap.data.c4_documents(0, 500), tokenizer, n=64, seqlen=1024)  # doctest: +SKIP
>>> model, report = spap.prune_layerwise(model, calib, sparsity=0.3)               # doctest: +SKIP
"""

from . import checkpoint, data, eval
from .adapters import ADAPTERS, get_adapter
from .leap import LeapReport, leap_prune
from .models import load_model, save_model
from .pipeline import prune_layerwise
from .report import PruneReport

__all__ = ["prune_layerwise", "leap_prune", "LeapReport", "load_model", "save_model", "data", "eval", "get_adapter",
           "ADAPTERS", "PruneReport"]
