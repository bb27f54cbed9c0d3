"""The reference kernel: dequantize the whole weight with torch ops, then one dense matmul.

It runs on every device and for every format, so it is the kernel on the CPU, the fallback for whatever a fast
kernel does not support, and the oracle the fast kernels are tested against. Its numerics are the ones lowbit has
always had (CPU results are bit-identical to the layer before the kernel seam existed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear


class DequantMatmul(torch.autograd.Function):
    """``x @ dequant()^T`` that re-dequantizes in backward instead of keeping the weight alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequant: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
        ctx.dequant = dequant
        ctx.dtype = x.dtype
        return F.linear(x, dequant(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        # Under autocast the forward ran in a lower precision than ``x``: multiply in the gradient's dtype and hand
        # back a gradient in the input's dtype, as autograd expects.
        return (grad @ ctx.dequant(grad.dtype)).to(ctx.dtype), None


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T`` for ``x [..., in]`` (no bias, no LoRA)."""
    return DequantMatmul.apply(x, layer.dequantized_weight)
