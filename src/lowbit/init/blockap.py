"""``blockap``: EfficientQAT's Block-AP (Chen et al., 2024): train a block's weights *and* its grid, then freeze.

ApiQ learns only the clipping of round-to-nearest and the LoRA over fixed weights; at 2 bits the rounding itself
is most of a block's error, and GPTQ (which rounds for the outputs) already beats what learned clipping reaches.
Block-AP goes further: every linear layer of the block gets a trainable copy of its weight and trainable
per-group scales and zero points, the weight is fake-quantized with straight-through rounding
(``(clamp(round(W/s) + round(z)) - round(z)) * s``, scales rounded to their float16 storage as in
:mod:`lowbit.quant.uniform`), and all of them are trained jointly with AdamW to minimize
``MSE(block_q(Xq), block_fp(X))`` on the engine's streams. The codes are then frozen -- exactly the values the
training forward computed -- and the LoRA starts from the whitened SVD of what the codes leave (``wsvd``'s
closed form, layer by layer on the quantized path), so the adapter begins where the trained block is weakest.

``warm_start=gptq`` starts the weights and the grid from GPTQ's codes (:func:`lowbit.init.gptq.gptq_codes`: its
weight is the dequantized GPTQ weight, so the untrained start rounds to exactly GPTQ's codes); ``none`` starts
from the full-precision weight on min-max grids, as the paper does.

Learning rates: the paper uses 2e-5 for weights and 1e-4 for scales/zeros at W2 on Llama-2 7B (4,096 windows of
2,048 tokens, 2 epochs, batch 2: ~4,000 steps per block). Here a block gets ``epochs`` x 32 windows, about 30 times
fewer steps, on a 135M model whose weights are ~3x larger in magnitude, so the defaults are 5x the paper's
(``weight_lr=1e-4``, ``qparam_lr=5e-4``, ``epochs=2``, ``weight_decay=0``, ``batch=1``); they are a starting
point, not tuned. Integer formats only: NormalFloat has no zero point or uniform step to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.arch import block_linears
from lowbit.config import option
from lowbit.errors import LowbitError
from lowbit.init.base import BlockContext, BlockTrainOptions, Initializer, block_loss, train_block
from lowbit.init.gptq import GPTQ, gptq_codes
from lowbit.init.wsvd import WSVD, layer_grams, wsvd_factors
from lowbit.layers import QuantLinear, linear_weight, set_module
from lowbit.quant import QuantizedWeight, QuantSpec, dequantize_weight, quantize_weight
from lowbit.quant.uniform import group_view, round_ste, storage_precision


class BlockAPLinear(nn.Module):
    """A linear layer with a trainable weight, scales and zero points under straight-through fake quantization."""

    def __init__(self, module: nn.Module, spec: QuantSpec, start: QuantizedWeight | None = None) -> None:
        super().__init__()
        weight, _ = linear_weight(module)
        self.spec = spec
        self.qmax = (1 << spec.bits) - 1
        if start is None:
            start = quantize_weight(weight, spec)  # min-max grid
            self.weight = nn.Parameter(weight.detach().clone())
        else:
            self.weight = nn.Parameter(dequantize_weight(start, spec).to(weight.device))
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float().clone())
        self.scale = nn.Parameter(start.scales.float().to(weight.device))
        # symmetric grids have the fixed middle code as zero point: nothing to learn
        self.zero = None if start.zeros is None else nn.Parameter(start.zeros.float().to(weight.device))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored-precision scales and integer zero points ``[out, n_groups, 1]`` (straight-through)."""
        scale = storage_precision(self.scale).unsqueeze(-1)
        if self.zero is None:
            return scale, torch.full_like(scale, float(1 << (self.spec.bits - 1)))
        return scale, torch.clamp(round_ste(self.zero), 0, self.qmax).unsqueeze(-1)

    def fake_weight(self) -> torch.Tensor:
        scale, zero = self.grid()
        codes = torch.clamp(round_ste(group_view(self.weight, self.spec.group_size) / scale) + zero, 0, self.qmax)
        return ((codes - zero) * scale).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def qparams(self) -> list[nn.Parameter]:
        return [p for p in (self.scale, self.zero) if p is not None]

    @torch.no_grad()
    def frozen(self) -> QuantizedWeight:
        """The codes, float16 scales and zero points whose dequantization is exactly :meth:`fake_weight`."""
        scale, zero = self.grid()
        codes = torch.clamp(torch.round(group_view(self.weight, self.spec.group_size) / scale) + zero, 0, self.qmax)
        zeros = None if self.zero is None else zero.squeeze(-1).to(torch.uint8)
        return QuantizedWeight(codes.reshape(self.weight.shape).to(torch.uint8), scale.squeeze(-1).half(), zeros)


def gptq_starts(block: nn.Module, ctx: BlockContext, options: GPTQ.Options) -> dict[str, QuantizedWeight]:
    """GPTQ codes of every layer, computed layer after layer on the quantized path (the layers are replaced by
    their adapter-free QuantLinear as it goes; the caller puts the originals back)."""
    starts = {}
    for name, module, w, gqq, gqx in layer_grams(block, ctx):
        starts[name] = gptq_codes(w, gqq, gqx, ctx, options)
        set_module(block, name, QuantLinear.from_linear(module, ctx.spec, starts[name]))
    return starts


class BlockAP(Initializer):
    name = "blockap"
    needs_data = True
    needs_lora = True

    @dataclass(frozen=True)
    class Options(BlockTrainOptions, GPTQ.Options, WSVD.Options):
        """Block-AP's training, its start, and the options of the ``gptq`` start and the ``wsvd`` LoRA."""

        epochs: int = option(2, "epochs per block")
        weight_lr: float = option(1e-4, "weight learning rate")
        qparam_lr: float = option(5e-4, "scale/zero-point learning rate")
        weight_decay: float = option(0.0, "AdamW weight decay")
        warm_start: Literal["none", "gptq"] = option(
            "none", "start: none (min-max grid) or gptq (weights and grid from GPTQ codes)"
        )

        def __post_init__(self) -> None:
            super().__post_init__()
            self.check_at_least(0, "epochs", "weight_lr", "qparam_lr", "weight_decay")

    options: Options

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        if ctx.spec.format != "int":
            raise LowbitError(f"init blockap learns uniform grids: use --format int, not {ctx.spec.format}")
        originals = block_linears(block)
        fit = self.options.fitting(ctx)  # neither the start nor the LoRA sees the validation windows
        starts = gptq_starts(block, fit, self.options) if self.options.warm_start == "gptq" else {}
        fakes = {name: BlockAPLinear(m, ctx.spec, starts.get(name)) for name, m in originals.items()}
        for name, fake in fakes.items():
            set_module(block, name, fake)
        stats = self.train(block, fakes, ctx)
        codes = {name: fake.frozen() for name, fake in fakes.items()}
        for name, module in originals.items():  # wsvd below measures the residual against the original weights
            set_module(block, name, module)
        for name, module, w, gqq, gqx in layer_grams(block, fit):
            layer = QuantLinear.from_linear(module, ctx.spec, codes[name])
            factors = wsvd_factors(w, codes[name], gqq, gqx, ctx, self.options.wsvd_damp)
            layer.set_lora(*factors, ctx.lora.alpha, ctx.lora.dropout)
            set_module(block, name, layer)
        return stats

    def train(self, block: nn.Module, fakes: dict[str, BlockAPLinear], ctx: BlockContext) -> dict:
        """AdamW on weights (one group) and scales/zero points (another) against the block's fp outputs."""
        opts = self.options
        groups = [
            {"params": [f.weight for f in fakes.values()], "lr": opts.weight_lr},
            {"params": [p for f in fakes.values() for p in f.qparams()], "lr": opts.qparam_lr},
        ]
        opt = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
        return train_block(ctx, opt, lambda idx: block_loss(block, ctx, idx), opts.epochs, opts, self.name)
