"""NormalFloat (NF4, NF3, NF2) block quantization, as in QLoRA.

An NF-k codebook holds 2**k values placed at quantiles of a standard normal, rescaled to [-1, 1], with an exact
zero; weights are divided by the absolute maximum of their block (here: a group of consecutive input columns,
like the integer format) and mapped to the nearest code. The construction follows bitsandbytes'
``create_normal_map``: ``2**(k-1)`` positive and ``2**(k-1) - 1`` negative quantiles plus zero, so for k = 4 it
reproduces the NF4 table of the QLoRA paper.

Block absmax values are stored in float16 (0.25 bits per weight at block 64); bitsandbytes' double quantization
of the absmax is not used, which costs 0.127 bits per weight and keeps the format exact and simple.
Like the uniform quantizer, an optional clipping factor scales each block's absmax down.
"""

from __future__ import annotations

import functools

import torch

from lowbit.quant.uniform import MIN_SCALE, group_view

# bitsandbytes' offset: the outermost quantile, chosen so the codebook's extremes are not at +-infinity.
_OFFSET = 0.9677083


@functools.cache
def codebook(bits: int) -> torch.Tensor:
    """Sorted NF codebook of ``2**bits`` float32 values in [-1, 1] containing 0."""
    if bits not in (2, 3, 4):
        raise ValueError(f"NormalFloat supports 2, 3 or 4 bits, got {bits}")
    half = 1 << (bits - 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    values = values / values.abs().max()
    return values.sort().values.to(torch.float32)


def _absmax(groups: torch.Tensor, clip: torch.Tensor | None) -> torch.Tensor:
    amax = groups.abs().amax(dim=-1, keepdim=True)
    if clip is not None:
        amax = amax * clip.unsqueeze(-1)
    stored = amax.clamp(min=MIN_SCALE).to(torch.float16).to(amax.dtype)
    return amax + (stored - amax).detach()


def nearest(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry (ties go to the smaller value)."""
    mids = (cb[1:] + cb[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.dtype))


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """NF quantize-dequantize, differentiable in ``w`` and ``clip`` (straight-through on the code choice)."""
    groups = group_view(w, group_size)
    amax = _absmax(groups, clip)
    cb = codebook(bits).to(w.device, w.dtype)
    x = torch.clamp(groups / amax, -1.0, 1.0)
    q = cb[nearest(x.detach(), cb)]
    x_q = x + (q - x).detach()
    return (x_q * amax).reshape(w.shape)


@torch.no_grad()
def quantize(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(codes uint8 [out, in], absmax fp16 [out, n_groups])``."""
    groups = group_view(w.float(), group_size)
    amax = _absmax(groups, clip)
    x = torch.clamp(groups / amax, -1.0, 1.0)
    codes = nearest(x, codebook(bits).to(w.device))
    return codes.reshape(w.shape).to(torch.uint8), amax.squeeze(-1).to(torch.float16)


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild the weight from codes ``[out, in]`` and block absmax ``[out, n_groups]``."""
    out, in_features = codes.shape
    n_groups = absmax.shape[1]
    cb = codebook(bits).to(codes.device, dtype)
    values = cb[codes.long()].reshape(out, n_groups, in_features // n_groups)
    return (values * absmax.to(dtype).unsqueeze(-1)).reshape(out, in_features)
