"""solvers: one linear layer's pruning problem and the methods that solve it.

The mathematics only: tensors in, tensors out; nothing here knows about ``torch.nn`` or transformers.

>>> import torch, solvers
>>> W, X = torch.randn(8, 16), torch.randn(16, 200)
>>> problem = solvers.LayerProblem(W, X @ X.T, solvers.channels(16), sparsity=0.25)
>>> solution = solvers.solve(problem, method="spap")
>>> int((~solution.keep).sum())
4
"""

from .problem import GramAccumulator, LayerProblem
from .registry import SolverSpec, available_methods, check_method, get_solver, register, solve
from .solution import Solution
from .structure import NM, ColumnGroups, Structure, Unstructured, channels, column_groups, heads, parse_structure, prune_count, checked_prune_count
from .validation import InvalidArgumentError
from .refit import refit, refit_columns, refit_rows, refit_rows_below
from .target import corrected_weight
from .metric import OutputMetric, solve_in_metric
from .allocation import choose_counts, outlier_sparsities, removal_costs, round_to_budget, row_removal_costs

# Importing a solver module registers it.
from . import scores as _scores  # noqa: F401,E402
from . import penalty as _penalty  # noqa: F401,E402
from . import exact as _exact  # noqa: F401,E402
from . import obs as _obs  # noqa: F401,E402
from . import sparsegpt as _sparsegpt  # noqa: F401,E402
from . import admm as _admm  # noqa: F401,E402

__all__ = [
    "LayerProblem",
    "GramAccumulator",
    "Solution",
    "solve",
    "register",
    "get_solver",
    "available_methods",
    "check_method",
    "SolverSpec",
    "ColumnGroups",
    "Unstructured",
    "NM",
    "Structure",
    "channels",
    "heads",
    "column_groups",
    "parse_structure",
    "prune_count",
    "checked_prune_count",
    "refit",
    "refit_columns",
    "refit_rows",
    "refit_rows_below",
    "corrected_weight",
    "OutputMetric",
    "solve_in_metric",
    "removal_costs",
    "row_removal_costs",
    "choose_counts",
    "outlier_sparsities",
    "round_to_budget",
    "InvalidArgumentError",
]
