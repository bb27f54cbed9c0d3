"""LoftQ (Li et al., 2023): alternate ``Q = quant(W - s·AB)`` and ``s·AB = SVD_r(W - dequant(Q))``, data-free.

One iteration is RTN followed by the best rank-r fit of the rounding residual; more iterations let the codes
absorb what the low-rank part cannot. Works for every format (int at any bit width, NF) because it only calls the
tensor quantizers. The option ``loftq_iters`` sets N (default 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.arch import block_linears
from lowbit.config import MethodOptions, option
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.lowrank import best_rank
from lowbit.layers import QuantLinear, linear_weight, set_module
from lowbit.quant import dequantize_weight, quantize_weight


def loftq_layer(w: torch.Tensor, ctx: BlockContext, iters: int):
    """Codes and LoRA factors for one weight ``[out, in]``; returns ``(QuantizedWeight, A, B)``."""
    scaling = ctx.lora.scaling
    residual_target = w
    for _ in range(iters):
        q = quantize_weight(residual_target, ctx.spec)
        a, b = best_rank(w - dequantize_weight(q, ctx.spec), ctx.lora.rank, scaling)
        residual_target = w - scaling * (b @ a)
    return q, a, b


class LoftQ(Initializer):
    name = "loftq"
    needs_lora = True

    @dataclass(frozen=True)
    class Options(MethodOptions):
        loftq_iters: int = option(5, "iterations (rounding, then SVD of the residual)")

        def __post_init__(self) -> None:
            super().__post_init__()
            self.check_at_least(1, "loftq_iters")  # one rounding at least

    options: Options

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        errors = []
        for name, module in block_linears(block).items():
            w, _ = linear_weight(module)
            q, a, b = loftq_layer(w, ctx, self.options.loftq_iters)
            layer = QuantLinear.from_linear(module, ctx.spec, q)
            layer.set_lora(a, b, ctx.lora.alpha, ctx.lora.dropout)
            errors.append(((layer.dequantized_weight() + layer.lora_delta() - w).norm() / w.norm()).item())
            set_module(block, name, layer)
        return {"weight_error": max(errors)}
