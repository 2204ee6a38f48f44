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


# Matrices up to this size go to LAPACK in one call; larger ones are split in 2×2 blocks.
_BLOCK = 256


def lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L`` (n, n), lower-triangular, by recursive 2×2 blocks:
    ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]``.

    A triangular solve against the identity does ``n³/2`` multiply-adds, most of them on the zeros of
    the identity's columns; the blocks do about ``n³/3``, all as matrix products.
    """
    n = L.shape[0]
    if n <= _BLOCK:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    A_inv, C_inv = lower_inverse(L[:h, :h]), lower_inverse(L[h:, h:])
    out = torch.zeros_like(L)
    out[:h, :h] = A_inv
    out[h:, h:] = C_inv
    out[h:, :h] = -C_inv @ (L[h:, :h] @ A_inv)
    return out


def _lower_gram(M: torch.Tensor) -> torch.Tensor:
    """``Mᵀ M`` of a lower-triangular ``M``, by recursive 2×2 blocks (the zero block is skipped and the
    symmetric result's upper block is a copy): about ``n³/3`` multiply-adds against ``n³`` for one product."""
    n = M.shape[0]
    if n <= _BLOCK:
        return M.T @ M
    h = n // 2
    A, B, C = M[:h, :h], M[h:, :h], M[h:, h:]
    out = torch.empty_like(M)
    out[:h, :h] = _lower_gram(A) + B.T @ B
    out[h:, :h] = C.T @ B
    out[:h, h:] = out[h:, :h].T
    out[h:, h:] = _lower_gram(C)
    return out


def inverse_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹`` from the lower Cholesky factor ``L`` (n, n), symmetrised.

    Matrix products only (:func:`lower_inverse`, then ``L⁻ᵀL⁻¹`` by blocks, skipping the zero triangle):
    fewer flops than a triangular solve against the identity followed by one full product.  LAPACK's
    ``potri`` (``torch.cholesky_inverse``) is avoided because it is erratic when the cores are shared.
    Measured by ``python benchmarks/floors.py``; figures in ``docs/performance.md``.
    """
    return symmetrize_(_lower_gram(lower_inverse(L)))


def symmetrize_(A: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``A ← (A + Aᵀ)/2`` in place, one pair of ``block×block`` tiles at a time.

    ``0.5 * (A + A.T)`` allocates two more ``n×n`` matrices (3.3 GB at n = 14336 in float64: a Llama-3-8B
    down_proj's ``H⁻¹``); the tiles need two ``block²`` temporaries.
    """
    n = A.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper, lower = A[i:i + block, j:j + block], A[j:j + block, i:i + block]
            mean = 0.5 * (upper + lower.T)
            upper.copy_(mean)
            lower.copy_(mean.T)
    return A
