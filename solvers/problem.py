"""One linear layer's pruning problem, stated as data.

The problem (Hu & Yuan 2025, eq. 1) for a weight ``W`` of shape ``(d_out, d_in)`` with calibration
inputs ``X`` of shape ``(d_in, p)``::

    minimize_{Ŵ}  ½‖ŴX − WX‖²_F = ½ tr((Ŵ − W) H (Ŵ − W)ᵀ),   H = X Xᵀ
    subject to    Ŵ has the given sparsity structure and target.

Only the Gram matrix ``H`` (shape ``(d_in, d_in)``) is needed, so calibration tokens never have to sit
in memory: :class:`GramAccumulator` streams them.  ``H`` is a *sum* over tokens (not a mean), so the
error is in units of "squared output error summed over calibration tokens, halved".

Damping.  A Gram matrix of a wide layer can be singular (dead inputs, fewer tokens than ``d_in``).  The
solvers therefore minimise the same objective with ``H_d = H + δ·mean(diag H)·I`` where
``δ = damp`` (default 0.01, the relative damping of SparseGPT).  :meth:`LayerProblem.objective` uses
``H_d``; :meth:`LayerProblem.error` reports the undamped reconstruction error that users care about.
With ``damp=0`` the two coincide.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from ._linalg import cholesky, inverse_from_cholesky
from .validation import Interval, InvalidArgumentError, NoneOr, Options, check
from .structure import NM, ColumnGroups, Structure, Unstructured, checked_prune_count, prune_count

_CALLER = "LayerProblem"
# Scaled to a unit diagonal, a Gram matrix summed from float32 products has eigenvalues down to about
# -1e-6 from round-off alone (measured on rank-deficient H of width 576 and 1536); an eigenvalue below
# -_PSD_TOLERANCE is a matrix that no X Xᵀ gives.
_PSD_TOLERANCE = 1e-4


class GramAccumulator:
    """Streams calibration inputs into ``H = Σ x xᵀ`` (float64), their sum and their count.

    Parameters
    ----------
    d_in : int
        Input width of the layer.
    device : torch.device or str, optional
        Where ``H`` lives; batches are moved there.  Accumulation is in float64 because a sum over
        millions of tokens loses digits in float32 (the relative error of a float32 sum grows with the
        number of terms; SparseGPT's float32 running mean is adequate for masks but not for the exact
        refit used here).
    product_dtype : torch.float64 (default) or torch.float32
        Precision of each batch's ``XᵀX``.  The running sum is float64 either way; float32 products
        (summing one batch, a few thousand tokens, in float32) are cheaper on CPU, where the float32 GEMM
        rate is about twice the float64 one (``python benchmarks/floors.py`` prints both).

    Examples
    --------
    >>> acc = GramAccumulator(4)
    >>> acc.add_batch(torch.randn(2, 10, 4))   # (batch, seq, d_in): any leading shape
    >>> acc.n_samples
    20
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None, *,
                 product_dtype: torch.dtype = torch.float64, cross: bool = False) -> None:
        check("d_in", d_in, Interval(int, 1, None), "GramAccumulator")
        if product_dtype not in (torch.float32, torch.float64):
            raise InvalidArgumentError(
                f"The 'product_dtype' argument of GramAccumulator must be torch.float32 or torch.float64. Got {product_dtype}."
            )
        self.d_in = d_in
        self.product_dtype = product_dtype
        self.H = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.n_samples = 0
        # With ``cross``: C = Σ x_ref xᵀ, the reference inputs (e.g. the dense model's) against these.
        self.C = torch.zeros(d_in, d_in, dtype=torch.float64, device=device) if cross else None

    def add_batch(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add inputs of shape ``(..., d_in)``; every leading index is one sample (token).  With ``cross``,
        ``reference`` (same shape: the same tokens' reference inputs) adds ``x_ref xᵀ`` to ``C``."""
        if x.shape[-1] != self.d_in:
            raise InvalidArgumentError(
                f"The 'x' argument of GramAccumulator.add_batch must have last dimension {self.d_in}. "
                f"Got shape {tuple(x.shape)} instead."
            )
        if (reference is None) != (self.C is None) or (reference is not None and reference.shape != x.shape):
            raise InvalidArgumentError(
                "The 'reference' argument of GramAccumulator.add_batch must be given, with the shape of 'x', exactly "
                f"when the accumulator was built with cross=True. Got {None if reference is None else tuple(reference.shape)}."
            )
        flat = x.detach().reshape(-1, self.d_in).to(device=self.H.device, dtype=self.product_dtype)
        _add_upper_gram(self.H, flat)
        _add_column_sums(self.sum, flat)
        self.n_samples += flat.shape[0]
        if self.C is not None:
            ref = reference.detach().reshape(-1, self.d_in).to(device=self.H.device, dtype=self.product_dtype)
            self.C += (ref.T @ flat).to(torch.float64)

    @property
    def mean(self) -> torch.Tensor:
        """Mean input, shape ``(d_in,)``."""
        return self.sum / max(self.n_samples, 1)


def _add_column_sums(total: torch.Tensor, X: torch.Tensor, panel_bytes: int = 4 * 2**20) -> None:
    """``total += X.sum(0)`` in float64 for ``X`` of shape (tokens, d), by panels of rows.

    ``sum(dtype=float64)`` of a float32 tensor first makes a float64 copy of all of it (a batch of 8192
    tokens of width 1536: 100 MB, at the moment the prune's resident memory peaks); panels of at most
    ``panel_bytes`` in float64 hold that copy to a few MB.
    """
    rows = max(1, panel_bytes // (8 * max(X.shape[1], 1)))
    for panel in X.split(rows):
        total += panel.sum(0, dtype=torch.float64)


def _add_upper_gram(H: torch.Tensor, X: torch.Tensor, panels: int = 4) -> None:
    """``H += XᵀX`` for ``X`` of shape (tokens, d), computing only the upper triangle.

    torch has no symmetric rank-k update (BLAS ``syrk``); products of row panels with the columns to
    their right do ``(1 + 1/panels)/2`` of the work, and mirror the strictly lower part; the result is
    bit-identical to the full product.  Measured against its GEMM floor by ``python benchmarks/floors.py``
    (figures in ``docs/performance.md``).
    """
    d = X.shape[1]
    edges = [round(i * d / panels) for i in range(panels + 1)] if d >= 256 else [0, d]
    for lo, hi in zip(edges[:-1], edges[1:]):
        P = (X[:, lo:hi].T @ X[:, lo:]).to(H.dtype)  # (hi-lo, d-lo): the diagonal block and right of it
        diag = P[:, : hi - lo]
        diag.copy_(0.5 * (diag + diag.T))  # exactly symmetric, whatever the GEMM's summation order
        H[lo:hi, lo:] += P
        H[hi:, lo:hi] += P[:, hi - lo :].T


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """The pruning problem of one linear layer.

    Parameters
    ----------
    weight : Tensor of shape (d_out, d_in)
        The dense weight ``W``.  Any float dtype; solvers compute in float64 and return this dtype.
    gram : Tensor of shape (d_in, d_in)
        ``H = Σ x xᵀ`` of the calibration inputs, symmetric positive semi-definite.
    structure : ColumnGroups, Unstructured or NM
        What may be pruned.
    sparsity : float in [0, 1), optional
        Fraction of groups (column structures) or of weights (unstructured) to prune.  Exactly one of
        ``sparsity`` and ``n_prune`` for column and unstructured targets; neither for N:M, whose
        sparsity is fixed by the pattern.
    n_prune : int, optional
        Number of groups (or weights) to prune.
    bias : Tensor of shape (d_out,), optional
        Carried along for methods that compensate into it (FLAP); the reconstruction objective is
        bias-free.
    damp : float, default 0.01
        Relative damping ``δ``: the solvers use ``H + δ·mean(diag H)·I``.
    damp_mode : {"mean", "diag"}, default "mean"
        ``"diag"``: a ridge per input instead, ``H + δ·diag(H)`` (each input's own energy; inputs below
        ``1e-6·mean(diag H)`` get that floor, so dead inputs stay invertible).  The penalty
        ``½ Σ_j δ H_jj ‖Ŵ_:,j − W_:,j‖²`` keeps the update small where an input is large.
    input_mean : Tensor of shape (d_in,), optional
        Mean calibration input (from :class:`GramAccumulator`), for methods that need it.
    n_samples : int, optional
        Number of calibration tokens behind ``gram``.  Fewer than ``d_in`` is warned about: ``H`` then
        has rank at most ``n_samples``, the problem is underdetermined and many solutions have error 0.

    Checks.  Besides the shapes and finiteness of every tensor, ``gram`` must be symmetric and positive
    semi-definite up to round-off: scaled to a unit diagonal, its Cholesky factorization with a shift of
    1e-4 must succeed (one factorization of a ``d_in × d_in`` matrix: small next to the solvers that factor
    ``H`` themselves, noticeable next to score methods such as Wanda).  A
    ``sparsity`` that rounds (:func:`solvers.prune_count`) to every unit is refused, as ``n_prune``
    equal to the unit count is; one that rounds to no unit is warned about (``sparsity=0`` is not).
    """

    weight: torch.Tensor
    gram: torch.Tensor
    structure: Structure
    sparsity: Optional[float] = None
    n_prune: Optional[int] = None
    bias: Optional[torch.Tensor] = None
    damp: float = 0.01
    damp_mode: str = "mean"
    input_mean: Optional[torch.Tensor] = None
    n_samples: Optional[int] = None

    def __post_init__(self) -> None:
        W, H = self.weight, self.gram
        if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.is_floating_point():
            raise InvalidArgumentError(
                f"The 'weight' argument of {_CALLER} must be a 2-D float tensor (d_out, d_in). Got {_describe(W)}."
            )
        d_out, d_in = W.shape
        if not isinstance(H, torch.Tensor) or H.shape != (d_in, d_in) or not H.is_floating_point():
            raise InvalidArgumentError(
                f"The 'gram' argument of {_CALLER} must be a float tensor of shape ({d_in}, {d_in}) to match "
                f"weight {tuple(W.shape)}. Got {_describe(H)}."
            )
        if H.device != W.device:
            raise InvalidArgumentError(
                f"The 'gram' argument of {_CALLER} must be on the weight's device {W.device}. Got {H.device}."
            )
        if not torch.isfinite(W).all():
            raise InvalidArgumentError(f"The 'weight' argument of {_CALLER} contains NaN or Inf.")
        if not torch.isfinite(H).all():
            raise InvalidArgumentError(f"The 'gram' argument of {_CALLER} contains NaN or Inf.")
        H64 = H.to(torch.float64)
        scale = H64.abs().max().clamp_min(1e-300)
        if (H64 - H64.T).abs().max() > 1e-6 * scale:
            raise InvalidArgumentError(f"The 'gram' argument of {_CALLER} must be symmetric (H = Σ x xᵀ).")
        if (torch.diagonal(H64) < -1e-9 * scale).any():
            raise InvalidArgumentError(
                f"The 'gram' argument of {_CALLER} has a negative diagonal entry; it must be positive semi-definite."
            )
        if torch.diagonal(H64).sum() <= 0:
            raise InvalidArgumentError(f"The 'gram' argument of {_CALLER} is zero: no calibration input reached it.")
        _check_psd(H64)
        check("damp", self.damp, Interval(float, 0.0, None), _CALLER)
        check("damp_mode", self.damp_mode, Options(("mean", "diag")), _CALLER)
        check("sparsity", self.sparsity, NoneOr(Interval(float, 0.0, 1.0, closed="left")), _CALLER)
        check("n_prune", self.n_prune, NoneOr(Interval(int, 0, None)), _CALLER)
        check("n_samples", self.n_samples, NoneOr(Interval(int, 1, None)), _CALLER)
        if self.n_samples is not None and self.n_samples < d_in:
            warnings.warn(
                f"The 'n_samples' argument of {_CALLER} is {self.n_samples}, fewer than the {d_in} inputs: the Gram "
                f"matrix has rank at most {self.n_samples}, the problem is underdetermined and many solutions have "
                f"error 0; use at least {d_in} calibration tokens.", UserWarning, stacklevel=3)
        if self.bias is not None and (not isinstance(self.bias, torch.Tensor) or self.bias.shape != (d_out,)):
            raise InvalidArgumentError(
                f"The 'bias' argument of {_CALLER} must be a tensor of shape ({d_out},). Got {_describe(self.bias)}."
            )
        if self.input_mean is not None and (
            not isinstance(self.input_mean, torch.Tensor) or self.input_mean.shape != (d_in,)
        ):
            raise InvalidArgumentError(
                f"The 'input_mean' argument of {_CALLER} must be a tensor of shape ({d_in},). "
                f"Got {_describe(self.input_mean)}."
            )
        self._check_structure(d_out, d_in)

    def _check_structure(self, d_out: int, d_in: int) -> None:
        s = self.structure
        both = self.sparsity is not None and self.n_prune is not None
        neither = self.sparsity is None and self.n_prune is None
        if isinstance(s, NM):
            if not neither:
                raise InvalidArgumentError(
                    f"An N:M structure fixes the sparsity; give neither 'sparsity' nor 'n_prune' to {_CALLER}."
                )
            if d_in % s.m:
                raise InvalidArgumentError(
                    f"The 'structure' argument of {_CALLER}: m={s.m} must divide d_in={d_in}."
                )
            return
        if both or neither:
            raise InvalidArgumentError(f"{_CALLER} needs exactly one of 'sparsity' and 'n_prune'.")
        if isinstance(s, ColumnGroups):
            flat = [c for g in s.groups for c in g]
            if min(flat) < 0 or max(flat) >= d_in:
                raise InvalidArgumentError(
                    f"The 'structure' argument of {_CALLER} has column indices outside [0, {d_in})."
                )
            if len(flat) != len(set(flat)):
                raise InvalidArgumentError(f"The 'structure' argument of {_CALLER} has overlapping groups.")
            total = s.n_groups
        elif isinstance(s, Unstructured):
            total = d_out * d_in
        else:
            raise InvalidArgumentError(
                f"The 'structure' argument of {_CALLER} must be a ColumnGroups, Unstructured or NM. Got {s!r}."
            )
        if self.n_prune is not None and self.n_prune >= total:
            raise InvalidArgumentError(
                f"The 'n_prune' argument of {_CALLER} must be below the number of prunable units ({total}). "
                f"Got {self.n_prune}."
            )
        if self.sparsity is not None:
            units = "column groups" if isinstance(s, ColumnGroups) else "weights"
            checked_prune_count(self.sparsity, total, units=units, caller=_CALLER)

    def with_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "LayerProblem":
        """The same problem (Gram matrix, structure, count, damping) for another float ``weight`` of the
        same shape and device, and ``bias``.  The Gram matrix is not checked again and what derives from
        it (``H64``, ``ridge`` and, when already computed, the damped matrix, its factor and inverse) is
        shared, not recomputed: :func:`solvers.solve_in_metric` poses every problem twice."""
        if not isinstance(weight, torch.Tensor) or weight.shape != self.weight.shape or not weight.is_floating_point() \
                or weight.device != self.weight.device:
            raise InvalidArgumentError(f"The 'weight' argument of LayerProblem.with_weight must be a float tensor of the "
                                       f"problem's shape {tuple(self.weight.shape)} on {self.weight.device}. "
                                       f"Got {_describe(weight)}.")
        if not torch.isfinite(weight).all():
            raise InvalidArgumentError("The 'weight' argument of LayerProblem.with_weight contains NaN or Inf.")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.shape[0],)):
            raise InvalidArgumentError(f"The 'bias' argument of LayerProblem.with_weight must be a tensor of shape "
                                       f"({self.shape[0]},). Got {_describe(bias)}.")
        self.H64, self.ridge  # noqa: B018 (computed here once, for both problems)
        new = copy.copy(self)  # a frozen dataclass: its fields and cached values are in __dict__
        shared = ("n_units", "n_pruned_target", "H64", "ridge", "hessian", "hessian_cholesky", "hessian_inverse")
        vars(new).clear()
        vars(new).update({k: v for k, v in vars(self).items() if k in shared or k in self.__dataclass_fields__})
        vars(new).update(weight=weight, bias=bias)
        return new

    # --- sizes -----------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @cached_property
    def n_units(self) -> int:
        """Number of prunable units: groups, or weights for unstructured and N:M."""
        s = self.structure
        return s.n_groups if isinstance(s, ColumnGroups) else self.weight.numel()

    @cached_property
    def n_pruned_target(self) -> int:
        """Exact number of units to prune (groups, or weights)."""
        if isinstance(self.structure, NM):
            return self.weight.numel() // self.structure.m * (self.structure.m - self.structure.n)
        if self.n_prune is not None:
            return self.n_prune
        return prune_count(self.sparsity, self.n_units)

    # --- matrices (float64, cached) ---------------------------------------------------------------

    @cached_property
    def W64(self) -> torch.Tensor:
        """The weight in float64, shape ``(d_out, d_in)``."""
        return self.weight.detach().to(torch.float64)

    @cached_property
    def H64(self) -> torch.Tensor:
        """The undamped Gram matrix in float64, symmetrised."""
        H = self.gram.detach().to(torch.float64)
        return 0.5 * (H + H.T)

    @cached_property
    def ridge(self) -> torch.Tensor:
        """The damping added to the diagonal of ``H``, shape ``(d_in,)``, float64 (see ``damp_mode``)."""
        return damping_ridge(self.H64, self.damp, self.damp_mode)

    @cached_property
    def hessian(self) -> torch.Tensor:
        """The damped Gram matrix ``H + diag(ridge)`` (float64; ``H + δ·mean(diag H)·I`` by default) that
        every solver minimises with."""
        H = self.H64.clone()
        H.diagonal().add_(self.ridge)
        return H

    @cached_property
    def hessian_cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of :attr:`hessian`; raises a clear error when it is singular."""
        return cholesky(self.hessian, what="the damped Gram matrix", hint="raise 'damp'")

    @cached_property
    def hessian_inverse(self) -> torch.Tensor:
        """``(H + δ·mean(diag H)·I)⁻¹`` in float64.

        Computed as ``L⁻ᵀL⁻¹`` by blocks (:func:`solvers._linalg.inverse_from_cholesky`): matrix
        products only, because ``torch.cholesky_inverse`` (LAPACK potri) slows down by up to two orders
        of magnitude when another process shares the cores (the command at the top of
        ``docs/performance.md`` shows it; ``python benchmarks/floors.py`` times this inverse).
        """
        return inverse_from_cholesky(self.hessian_cholesky)

    # --- objective ---------------------------------------------------------------------------------

    def _quad(self, W_hat: torch.Tensor, H: torch.Tensor) -> float:
        if W_hat.shape != self.weight.shape:
            raise InvalidArgumentError(
                f"The 'W_hat' argument must have the weight's shape {self.shape}. Got {tuple(W_hat.shape)}."
            )
        D = W_hat.detach().to(device=H.device, dtype=torch.float64) - self.W64
        return 0.5 * float(((D @ H) * D).sum())

    def error(self, W_hat: torch.Tensor) -> float:
        """Reconstruction error ``½ tr((Ŵ−W) H (Ŵ−W)ᵀ)`` with the undamped ``H``."""
        return self._quad(W_hat, self.H64)

    def objective(self, W_hat: torch.Tensor, *, error: float | None = None) -> float:
        """The solvers' objective ``½ tr((Ŵ−W) H_d (Ŵ−W)ᵀ)`` with the damped ``H_d``.

        Computed as :meth:`error` ``+ ½ Σ_j ridge_j ‖Ŵ_:,j − W_:,j‖²``: the same value as the quadratic
        form with ``H_d``, without a second ``O(d_out·d_in²)`` product.  Pass ``error`` when it is known.
        """
        D = W_hat.detach().to(device=self.device, dtype=torch.float64) - self.W64
        error = self.error(W_hat) if error is None else error
        if self.damp_mode == "mean":  # one shift for every input
            return error + 0.5 * float(self.ridge[0]) * float(D.square().sum())
        return error + 0.5 * float((D.square().sum(0) * self.ridge).sum())

    @cached_property
    def dense_energy(self) -> float:
        """``½ tr(W H Wᵀ)``: the error of pruning everything; the scale of :meth:`relative_error`."""
        return 0.5 * float(((self.W64 @ self.H64) * self.W64).sum())

    def relative_error(self, W_hat: torch.Tensor) -> float:
        """:meth:`error` divided by ``½ tr(W H Wᵀ)``."""
        return self.error(W_hat) / max(self.dense_energy, 1e-300)

    def to_cvxpy(self, **kwargs):
        """The explicit mixed-integer model of this problem; see :func:`solvers.miqp.build_miqp`."""
        from .miqp import build_miqp

        return build_miqp(self, **kwargs)

    def __repr__(self) -> str:
        target = f"sparsity={self.sparsity}" if self.sparsity is not None else f"n_prune={self.n_prune}"
        if isinstance(self.structure, NM):
            target = f"sparsity={self.structure.sparsity:g}"
        mode = "" if self.damp_mode == "mean" else f", damp_mode={self.damp_mode!r}"
        return f"LayerProblem(shape={self.shape}, structure={self.structure!r}, {target}, damp={self.damp}{mode})"


def damping_ridge(H: torch.Tensor, damp: float, damp_mode: str = "mean") -> torch.Tensor:
    """What damping adds to the diagonal of a Gram matrix ``H``, shape ``(d_in,)``, float64:
    ``damp·mean(diag H)`` for every input (``"mean"``), or ``damp·diag(H)`` with the floor
    ``damp·1e-6·mean(diag H)`` so that dead inputs stay invertible (``"diag"``)."""
    diag = H.diagonal().to(torch.float64)
    if damp_mode == "diag":
        return damp * diag.clamp_min(1e-6 * float(diag.mean()))
    return torch.full_like(diag, damp * float(diag.mean()))


def _check_psd(H64: torch.Tensor) -> None:
    """Refuse a symmetric ``H64`` (float64) with an eigenvalue below ``-_PSD_TOLERANCE`` once scaled to a
    unit diagonal (zero diagonal entries are left unscaled): one Cholesky factorization, shifted."""
    scale = torch.diagonal(H64).clamp_min(0).sqrt()
    inv = torch.where(scale > 0, 1 / scale.clamp_min(1e-300), torch.ones_like(scale))
    C = H64 * inv[:, None]
    C.mul_(inv[None, :])
    C.diagonal().add_(_PSD_TOLERANCE)
    _, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise InvalidArgumentError(
            f"The 'gram' argument of {_CALLER} is not positive semi-definite: scaled to a unit diagonal it has an "
            f"eigenvalue below -{_PSD_TOLERANCE:g} (beyond round-off), which no Gram matrix X Xᵀ has."
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:80]
