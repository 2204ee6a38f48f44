"""Small float64 linear-algebra helpers shared by the solvers.

Factorizations run in float64: the refit solves ``H_KK x = b`` with condition numbers that reach 1e8 on
real layers, where float32 Cholesky loses most digits.
"""

from __future__ import annotations

import torch


class SingularGramError(ValueError):
    """A Gram (sub)matrix is not positive definite; the message says what to change."""


def cholesky(A: torch.Tensor, *, what: str = "matrix", hint: str = "raise 'damp'") -> torch.Tensor:
    """Lower Cholesky factor of a (batch of) symmetric positive-definite matrix, with a clear error."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        raise SingularGramError(
            f"Cholesky factorization of {what} failed: it is not positive definite. "
            f"To fix: {hint}, or use more calibration tokens."
        )
    return L


def spd_solve(A: torch.Tensor, B: torch.Tensor, *, what: str = "matrix") -> torch.Tensor:
    """Solve ``A X = B`` for symmetric positive-definite ``A`` (batched), through Cholesky."""
    return torch.cholesky_solve(B, cholesky(A, what=what))


def spd_inverse(A: torch.Tensor, *, what: str = "matrix") -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix (batched), symmetrised."""
    if A.shape[-1] == 1:  # scalars (channels in the swap search): skip the LAPACK call overhead
        if not bool((A > 0).all()):
            raise SingularGramError(f"{what} is not positive definite. To fix: raise 'damp', or use more calibration tokens.")
        return 1.0 / A
    inv = torch.cholesky_inverse(cholesky(A, what=what))
    return 0.5 * (inv + inv.transpose(-1, -2))
