"""Low-rank factorizations shared by the LoRA initializers (pure tensor math).

A LoRA delta is ``scaling * B @ A`` with ``A [r, in]`` and ``B [out, r]``. Given a target delta in factored
SVD form, the factors are split evenly (``sqrt(S)`` on each side) so A and B start at the same scale, which is
what gradient-based refinement (ApiQ) and later fine-tuning train best from.
"""

from __future__ import annotations

import torch


def damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``gram`` plus ``damp`` times its mean diagonal on the diagonal: a ridge, so that directions the
    calibration data never excites stay well-conditioned when the Gram matrix is solved or factored."""
    ridge = damp * gram.diagonal().mean().clamp(min=1e-12)
    return gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def split_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling * B @ A == u @ diag(s) @ vh``; u ``[out, r]``, s ``[r]``, vh ``[r, in]``."""
    root = (s / scaling).clamp(min=0).sqrt()
    return root.unsqueeze(1) * vh, u * root.unsqueeze(0)


def best_rank(m: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the best rank-``rank`` approximation of ``m`` in the Frobenius norm (truncated SVD)."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    a, b = split_factors(u[:, :rank], s[:rank], vh[:rank], scaling)
    return a.float(), b.float()


def whitened_best_rank(
    target: torch.Tensor, gram: torch.Tensor, rank: int, scaling: float, damp: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors minimizing ``||X (target - scaling B A)^T||_F`` where ``gram = X^T X``.

    With ``gram = L L^T`` (Cholesky), ``||X M^T||_F = ||M L||_F``, so the best rank-r delta is
    ``SVD_r(target L) L^{-1}``; ``gram`` is :func:`damped` by ``damp`` first.
    """
    g = damped(gram.double(), damp)
    chol = torch.linalg.cholesky(g)
    u, s, vh = torch.linalg.svd(target.double() @ chol, full_matrices=False)
    # vh L^{-1}: solve L^T z^T = vh^T  ->  z = vh L^{-1}
    vh_unwhite = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)
    a, b = split_factors(u[:, :rank], s[:rank], vh_unwhite, scaling)
    return a.float(), b.float()
