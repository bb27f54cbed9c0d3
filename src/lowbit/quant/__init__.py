"""Tensor-level quantization: formats, codes and bit-packing. No model or file handling lives here.

:class:`QuantSpec` names a weight format (integer or NormalFloat, bits, group size, symmetry); the functions below
dispatch on it so that layers and initializers never branch on the format themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant import normalfloat, uniform
from lowbit.quant.packing import pack, packed_numel, unpack

FORMATS = ("int", "nf")
INT_BITS = (2, 3, 4, 8)
NF_BITS = (2, 3, 4)


@dataclass(frozen=True)
class QuantSpec:
    """A weight format: ``int`` (uniform affine) or ``nf`` (NormalFloat), bits, group size along the input."""

    bits: int = 4
    group_size: int = 64
    format: str = "int"
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        allowed = INT_BITS if self.format == "int" else NF_BITS
        if self.bits not in allowed:
            raise ValueError(f"{self.format} format supports bits {allowed}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group size must be positive or -1 (one group per row), got {self.group_size}")

    @property
    def has_zeros(self) -> bool:
        """Whether per-group zero points are stored (asymmetric integer format only)."""
        return self.format == "int" and not self.symmetric

    @property
    def name(self) -> str:
        """Short name as used in tables: ``W4g64``, ``NF4g64``; ``g-1`` is one group per row."""
        prefix = "W" if self.format == "int" else "NF"
        return f"{prefix}{self.bits}g{self.group_size}"

    def groups(self, in_features: int) -> int:
        """Number of groups per output row (raises ValueError when the group size does not divide)."""
        return in_features // uniform.check_group_size(in_features, self.group_size)


@dataclass
class QuantizedWeight:
    """Unpacked codes ``[out, in]``, fp16 scales ``[out, n_groups]`` and optional zeros ``[out, n_groups]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


def quantize_weight(
    w: torch.Tensor,
    spec: QuantSpec,
    clip_hi: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a ``[out, in]`` weight; clipping factors are ``[out, n_groups]`` tensors in (0, 1] or None."""
    if spec.format == "nf":
        codes, scales = normalfloat.quantize(w, spec.bits, spec.group_size, clip_hi)
        return QuantizedWeight(codes, scales, None)
    return QuantizedWeight(*uniform.quantize(w, spec.bits, spec.group_size, spec.symmetric, clip_hi, clip_lo))


def dequantize_weight(
    q: QuantizedWeight, spec: QuantSpec, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> torch.Tensor:
    """Rebuild the ``[out, in]`` weight of ``q`` in ``dtype``; ``overwrite`` lets it reuse ``q.codes`` as scratch."""
    if spec.format == "nf":
        return normalfloat.dequantize(q.codes, q.scales, spec.bits, dtype)
    return uniform.dequantize(q.codes, q.scales, q.zeros, spec.bits, dtype, overwrite)


def fake_quantize_weight(
    w: torch.Tensor,
    spec: QuantSpec,
    clip_hi: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable quantize-dequantize; equals ``dequantize_weight(quantize_weight(w))`` in value."""
    if spec.format == "nf":
        return normalfloat.fake_quantize(w, spec.bits, spec.group_size, clip_hi)
    return uniform.fake_quantize(w, spec.bits, spec.group_size, spec.symmetric, clip_hi, clip_lo)


def search_clip(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor, candidates: list[float]) -> torch.Tensor:
    """Per-group clipping factor ``[out, n_groups]`` from ``candidates`` minimizing the weighted squared error.

    ``importance`` (``[in]``, e.g. the mean squared input activation of each column) weights the error, so a group
    is clipped where its outliers matter little to the layer's output (AWQ-style search, with the diagonal of the
    Gram matrix standing in for the activations). At 2 bits the best factor is often far below 1: min-max
    rounding spends most of the grid on a few outliers. Both ends of asymmetric grids share the factor.
    """
    rows, groups = w.shape[0], spec.groups(w.shape[1])
    weight = importance.to(w.dtype).expand_as(w)
    best = torch.full((rows, groups), float(candidates[0]), device=w.device)
    best_err = torch.full((rows, groups), float("inf"), device=w.device)
    for c in candidates:
        factors = torch.full((rows, groups), float(c), device=w.device)
        q = fake_quantize_weight(w, spec, factors, factors if spec.has_zeros else None)
        err = ((q - w).square() * weight).view(rows, groups, -1).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, factors, best)
    return best


__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "dequantize_weight",
    "fake_quantize_weight",
    "pack",
    "packed_numel",
    "quantize_weight",
    "search_clip",
    "unpack",
]
