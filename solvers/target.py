"""The error-correcting target: fit the dense model's outputs from the pruned model's inputs.

A layer of a model whose earlier blocks are already pruned sees inputs ``X̂`` (d_in × p) instead of the
dense model's ``X``.  Fitting the layer's own outputs on them, ``min ‖(Ŵ − W) X̂‖²``, keeps the errors of
earlier blocks; fitting the dense outputs, ``min ‖Ŵ X̂ − W X‖²``, corrects them.  With ``Ĥ = X̂ X̂ᵀ``,
``C = X X̂ᵀ`` and the solvers' ridge ``δ' = damp · mean(diag Ĥ)`` toward ``W``::

    ½‖Ŵ X̂ − W X‖² + ½ δ'‖Ŵ − W‖²  =  ½ tr((Ŵ − W*) Ĥ_d (Ŵ − W*)ᵀ) + const,
    W* = W (C + δ' I) Ĥ_d⁻¹,   Ĥ_d = Ĥ + δ' I,

so the corrected problem is the ordinary :class:`~solvers.LayerProblem` of ``W*`` on ``Ĥ`` with the same
``damp``, and every solver runs on it unchanged.  When ``X̂ = X``, ``W* = W``.  A target ``W X + E`` with
a token-wise correction ``E`` (d_out × p) adds ``D = E X̂ᵀ``: ``W* = (W (C + δ' I) + D) Ĥ_d⁻¹``.  Derivation:
``docs/method.md``, "The error-correcting target".
"""

from __future__ import annotations

import torch

from ._linalg import cholesky
from .problem import damping_ridge
from .validation import Interval, InvalidArgumentError, Options, check


def corrected_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01,
                     damp_mode: str = "mean", offset: torch.Tensor | None = None) -> torch.Tensor:
    """``W* = (W (C + δ'I) + D)(Ĥ + δ'I)⁻¹`` with ``δ' = damp · mean(diag Ĥ)``, in float64 (a Cholesky solve).

    With ``damp_mode="diag"`` the ridge is per input, ``Λ = damp · diag(Ĥ)`` (the layer problem's
    ``ridge``), and ``W* = (W (C + Λ) + D)(Ĥ + Λ)⁻¹``: the derivation is the same with ``δ'I`` replaced by
    ``Λ``.

    Parameters
    ----------
    W : Tensor of shape (d_out, d_in)
        The dense layer's weight.
    H : Tensor of shape (d_in, d_in)
        ``Ĥ = X̂ X̂ᵀ``, the Gram matrix of the inputs the pruned model gives the layer.
    C : Tensor of shape (d_in, d_in)
        ``X X̂ᵀ``: the dense model's inputs against the pruned model's, token by token
        (:class:`~solvers.GramAccumulator` with ``cross=True``).
    damp : float >= 0
        The relative damping the layer problem uses (``LayerProblem.damp``).
    damp_mode : {"mean", "diag"}
        As ``LayerProblem.damp_mode``.
    offset : Tensor of shape (d_out, d_in), optional
        ``D = E X̂ᵀ`` for a target ``W X + E`` (``E``: d_out × p, a correction added to the dense
        outputs token by token, e.g. the residual stream's error ``R − R̂`` in a block-output target);
        ``D = 0`` when not given.

    Returns
    -------
    Tensor of shape (d_out, d_in), float64, on ``H``'s device.
    """
    check("damp", damp, Interval(float, 0, None), "corrected_weight")
    check("damp_mode", damp_mode, Options(("mean", "diag")), "corrected_weight")
    d_out, d_in = W.shape
    for name, M in (("H", H), ("C", C)):
        if not isinstance(M, torch.Tensor) or M.shape != (d_in, d_in):
            raise InvalidArgumentError(f"The {name!r} argument of corrected_weight must be a tensor of shape "
                                       f"({d_in}, {d_in}). Got {getattr(M, 'shape', type(M).__name__)}.")
    if offset is not None and (not isinstance(offset, torch.Tensor) or offset.shape != (d_out, d_in)):
        raise InvalidArgumentError(f"The 'offset' argument of corrected_weight must be a tensor of shape ({d_out}, {d_in}). "
                                   f"Got {getattr(offset, 'shape', type(offset).__name__)}.")
    H64 = H.to(torch.float64)
    ridge = torch.diag(damping_ridge(H64, damp, damp_mode))  # as LayerProblem.ridge
    L = cholesky(H64 + ridge, what="the damped Gram matrix of the pruned inputs")
    rhs = W.to(device=H64.device, dtype=torch.float64) @ (C.to(torch.float64) + ridge)
    if offset is not None:
        rhs = rhs + offset.to(device=H64.device, dtype=torch.float64)
    rhs = rhs.T
    return torch.cholesky_solve(rhs, L).T  # Ĥ_d symmetric: W* = rhsᵀ Ĥ_d⁻¹
