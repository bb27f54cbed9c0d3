"""Round-to-nearest (or NormalFloat) codes with QLoRA's adapter start: A Kaiming-uniform, B = 0.

The quantized model plus adapter equals the quantized model: whatever rounding broke stays broken until training
repairs it. This is the baseline every other initializer is measured against.
"""

from __future__ import annotations

from torch import nn

from lowbit.arch import block_linears
from lowbit.init.base import BlockContext, Initializer
from lowbit.layers import QuantLinear, set_module


class QLoRA(Initializer):
    name = "qlora"

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        for name, module in block_linears(block).items():
            layer = QuantLinear.from_linear(module, ctx.spec)
            if ctx.lora is not None:
                layer.add_lora(ctx.lora.rank, ctx.lora.alpha, ctx.lora.dropout, generator=ctx.generator)
            set_module(block, name, layer)
        return {}


class NoAdapter(QLoRA):
    """Plain RTN / NF codes without a LoRA adapter (``--init none``)."""

    name = "none"
    adapter = False
