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


def top_singular(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular triplets ``(u [out, r], s [r], vh [r, in])`` of ``m``, in float64.

    From the eigendecomposition of the smaller Gram matrix (``m^T m`` or ``m m^T``) rather than a full SVD: a LoRA
    start needs only r of the min(out, in) triplets, and a full float64 SVD of a 11008 x 4096 matrix takes seconds
    on a GPU (the largest cost of an ApiQ block at 7B scale), where the Gram product and a 4096-wide ``eigh`` take a
    fraction of that. Squaring the matrix squares its condition number, which costs precision only in the small
    singular values that are thrown away; the top ones agree with the SVD to float64 rounding. A zero singular value
    gets zero vectors (its triplet contributes nothing).
    """
    m = m.double()
    wide = m.shape[0] < m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    values, vectors = torch.linalg.eigh(gram)  # ascending
    k = min(rank, values.numel())
    top = vectors[:, -k:].flip(1)  # [min(out, in), k], largest first
    s = values[-k:].flip(0).clamp(min=0).sqrt()
    other = (top.T @ m if wide else m @ top) / torch.where(s > 0, s, 1.0).unsqueeze(1 if wide else 0)
    other = torch.where(s.unsqueeze(1 if wide else 0) > 0, other, 0.0)
    return (top, s, other) if wide else (other, s, top.T)


def best_rank(m: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the best rank-``rank`` approximation of ``m`` in the Frobenius norm (truncated SVD)."""
    u, s, vh = top_singular(m, rank)
    a, b = split_factors(u, s, vh, scaling)
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
    u, s, vh = top_singular(target.double() @ chol, rank)
    # vh L^{-1}: solve L^T z^T = vh^T  ->  z = vh L^{-1}
    vh_unwhite = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)
    a, b = split_factors(u, s, vh_unwhite, scaling)
    return a.float(), b.float()
