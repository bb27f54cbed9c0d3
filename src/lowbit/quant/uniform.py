"""Group-wise uniform (integer) quantization of weight matrices.

Weights ``W`` of shape ``[out, in]`` are split into groups of ``group_size`` consecutive input columns; each group
gets its own scale (and, when asymmetric, zero point). The range of each group can be shrunk by *clipping factors*
in (0, 1] -- the learnable weight clipping of OmniQuant, which ApiQ learns jointly with the LoRA start. Callers pass
the factors as tensors of shape ``[out, n_groups]`` (or None for no clipping); :func:`clip_factors` maps the
unconstrained logits that an optimizer trains to factors through a sigmoid.

Two entry points share one code path so that what calibration optimizes is exactly what gets stored:

- :func:`fake_quantize` returns the dequantized weight and is differentiable: rounding uses a straight-through
  estimator, so gradients reach the weight and the clipping factors.
- :func:`quantize` returns the integer codes, the fp16 scales and the zero points that :mod:`lowbit.quant.packing`
  stores; :func:`dequantize` turns them back into a weight.

Scales are rounded to float16 in both paths (the storage format), so ``dequantize(*quantize(w))`` equals
``fake_quantize(w)`` bit for bit.
"""

from __future__ import annotations

import torch

# Smallest scale kept: representable in float16 (as a subnormal) and far below any real weight's step size.
MIN_SCALE = 2.0**-20


def clip_factors(logits: torch.Tensor) -> torch.Tensor:
    """Map unconstrained clipping logits to factors in (0, 1) (OmniQuant's sigmoid parametrization)."""
    return torch.sigmoid(logits)


def check_group_size(in_features: int, group_size: int) -> int:
    """Resolve ``group_size`` (-1 means one group per row) and check it divides ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {in_features}")
    return group_size


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def storage_precision(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (how they are stored), passing gradients straight through."""
    stored = scale.clamp(min=MIN_SCALE).to(torch.float16).to(scale.dtype)
    return scale + (stored - scale).detach()


def _scale_zero(
    groups: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_hi: torch.Tensor | None,
    clip_lo: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and (float, already rounded) zero point, both of shape ``[out, n_groups, 1]``."""
    qmax = (1 << bits) - 1
    if symmetric:
        amax = groups.abs().amax(dim=-1, keepdim=True)
        if clip_hi is not None:
            amax = amax * clip_hi.unsqueeze(-1)
        half = 1 << (bits - 1)
        scale = storage_precision(amax / max(half - 1, 1))
        zero = torch.full_like(scale, float(half))
        return scale, zero
    xmax = groups.amax(dim=-1, keepdim=True)
    xmin = groups.amin(dim=-1, keepdim=True)
    if clip_hi is not None:
        xmax = xmax * clip_hi.unsqueeze(-1)
    if clip_lo is not None:
        xmin = xmin * clip_lo.unsqueeze(-1)
    scale = storage_precision((xmax - xmin) / qmax)
    zero = torch.clamp(round_ste(-xmin / scale), 0, qmax)
    return scale, zero


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, n_groups, group_size]``."""
    out, in_features = w.shape
    g = check_group_size(in_features, group_size)
    return w.reshape(out, in_features // g, g)


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_hi: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``w``; differentiable in ``w`` and the clipping factors (straight-through)."""
    groups = group_view(w, group_size)
    scale, zero = _scale_zero(groups, bits, symmetric, clip_hi, clip_lo)
    q = torch.clamp(round_ste(groups / scale) + zero, 0, (1 << bits) - 1)
    return ((q - zero) * scale).reshape(w.shape)


@torch.no_grad()
def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_hi: torch.Tensor | None = None,
    clip_lo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``(codes uint8 [out, in], scales fp16 [out, n_groups], zeros uint8 [out, n_groups] or None)``.

    Zeros are None for symmetric quantization, whose zero point is the fixed code ``2**(bits-1)``.
    """
    groups = group_view(w.float(), group_size)
    scale, zero = _scale_zero(groups, bits, symmetric, clip_hi, clip_lo)
    codes = torch.clamp(torch.round(groups / scale) + zero, 0, (1 << bits) - 1)
    zeros = None if symmetric else zero.squeeze(-1).to(torch.uint8)
    return codes.reshape(w.shape).to(torch.uint8), scale.squeeze(-1).to(torch.float16), zeros


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> torch.Tensor:
    """Rebuild the weight from codes ``[out, in]``, scales and zeros ``[out, n_groups]``.

    This runs twice per layer per training step (forward and backward), so it works in place on one weight-sized
    tensor: on CPU that halves its cost against out-of-place ``(q - z) * s``, with the same operations in the same
    order, hence bit-identical values. ``overwrite=True`` says ``codes`` is already a scratch tensor in ``dtype``
    (QuantLinear unpacks straight into it), so even the one copy is skipped.
    """
    out, in_features = codes.shape
    n_groups = scales.shape[1]
    groups = codes.reshape(out, n_groups, in_features // n_groups)
    if not (overwrite and codes.dtype == dtype):
        groups = groups.to(dtype, copy=True)
    if zeros is None:
        groups.sub_(float(1 << (bits - 1)))
    else:
        groups.sub_(zeros.to(dtype).unsqueeze(-1))
    return groups.mul_(scales.to(dtype).unsqueeze(-1)).reshape(out, in_features)
