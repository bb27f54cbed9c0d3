"""ApiQ block-wise (Liao et al., 2024): learn clipping and LoRA of a whole block so its outputs match.

All linear layers of the block become :class:`FakeQuantLinear` and are trained jointly with AdamW (one group for
the clipping logits, one for the LoRA factors) to minimize ``MSE(block_fp(X), block_q(Xq))`` -- optionally plus
``MSE(block_fp(Xq), block_q(Xq))`` -- over the calibration windows, then packed.

The published recipe is the default (options ``epochs=20 clip_lr=5e-3 lora_lr=5e-4 weight_decay=0.1 batch=1
clip_init=4.0`` of :class:`ApiQBlockwise.Options`, CLI flags ``--epochs`` etc.) with A Kaiming-uniform and B = 0
(``warm_start=none``). ``warm_start=wsvd`` starts A, B from lowbit's closed-form activation-aware solution
instead, which begins near where the published recipe ends up, so far fewer epochs are needed.

``warm_start=gptq`` goes further: each layer's codes come from GPTQ rounding of its drift-corrected target on the
clipping-searched grid (:func:`lowbit.init.gptq.gptq_codes`) and its LoRA from ``wsvd`` on those codes, layer
after layer on the block's quantized-path inputs; then ApiQ-bw's objective trains the LoRA factors alone, over
the fixed codes. Why: at 2 bits the rounding itself is where most of the block's error comes from, and GPTQ,
which rounds for the layer's outputs, removes far more of it than learned clipping of round-to-nearest can (on
the default model the untrained start is already below the published recipe's trained block losses). The
clipping is not learned here (the grid is searched, as in ``wsvd``), and the steps are cheaper: no fake
quantization and no weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lowbit.arch import block_linears
from lowbit.config import MethodOptions, option
from lowbit.init.base import BlockContext, BlockTrainOptions, Initializer, block_loss, train_block
from lowbit.init.fakequant import FakeQuantLinear
from lowbit.init.gptq import GPTQ, gptq_codes
from lowbit.init.wsvd import WSVD, layer_grams, wsvd_factors
from lowbit.layers import QuantLinear, quant_layers, set_module
from lowbit.quant.uniform import clip_factors


@dataclass(frozen=True)
class ApiQOptions(MethodOptions):
    """ApiQ's optimizer, shared by ``apiq-lw`` and ``apiq-bw``; the defaults are the published recipe."""

    epochs: int = option(20, "epochs per block (apiq-bw) or layer (apiq-lw)")
    clip_lr: float = option(5e-3, "clipping learning rate")
    lora_lr: float = option(5e-4, "LoRA learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay")
    clip_init: float = option(4.0, "initial clipping logit")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_at_least(0, "epochs", "clip_lr", "lora_lr", "weight_decay")


def optimizer(options: ApiQOptions, clip_params: list, lora_params: list) -> torch.optim.AdamW:
    """ApiQ's AdamW: one group for the clipping logits, one for the LoRA factors, shared weight decay."""
    groups = [
        {"params": clip_params, "lr": options.clip_lr},
        {"params": lora_params, "lr": options.lora_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=options.weight_decay)


def to_fake(
    block: nn.Module,
    ctx: BlockContext,
    clip_init: float,
    originals: dict[str, nn.Module],
    clips: dict[str, torch.Tensor] | None = None,
) -> dict[str, FakeQuantLinear]:
    """Swap each layer for a FakeQuantLinear over its original weight, keeping the clipping factors and LoRA
    factors of a warm start."""
    fakes = {}
    for name, source in originals.items():
        current = block.get_submodule(name)
        fake = FakeQuantLinear(source, ctx.spec, ctx.lora, ctx.generator, clip_init)
        if clips is not None:
            logits = torch.logit(clips[name])
            for p in fake.clip_parameters():
                p.data.copy_(logits)
        if isinstance(current, QuantLinear) and current.lora_A is not None and fake.lora_A is not None:
            fake.lora_A.data.copy_(current.lora_A)
            fake.lora_B.data.copy_(current.lora_B)
        set_module(block, name, fake)
        fakes[name] = fake
    return fakes


def gptq_start(block: nn.Module, ctx: BlockContext, options: ApiQBlockwise.Options) -> list[nn.Parameter]:
    """Replace each layer, in forward order, by its GPTQ codes with the wsvd LoRA; return the LoRA factors."""
    for name, module, w, gqq, gqx in layer_grams(block, ctx):
        q = gptq_codes(w, gqq, gqx, ctx, options)
        layer = QuantLinear.from_linear(module, ctx.spec, q)
        layer.set_lora(*wsvd_factors(w, q, gqq, gqx, ctx, options.wsvd_damp), ctx.lora.alpha, ctx.lora.dropout)
        set_module(block, name, layer)
    return [p for m in quant_layers(block).values() for p in (m.lora_A, m.lora_B)]


class ApiQBlockwise(Initializer):
    name = "apiq-bw"
    needs_data = True
    needs_lora = True

    @dataclass(frozen=True)
    class Options(ApiQOptions, BlockTrainOptions, GPTQ.Options, WSVD.Options):
        """ApiQ's optimizer and training loop, its start, and the options of the ``gptq`` and ``wsvd`` starts."""

        warm_start: Literal["none", "wsvd", "gptq"] = option(
            "none", "start: none (B = 0), wsvd, or gptq (fixed GPTQ codes + wsvd LoRA; LoRA trained)"
        )
        second_loss: bool = option(False, "add MSE(block_fp(Xq), block_q(Xq)) to the loss")

    options: Options

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        opts = self.options
        clip_init, second = opts.clip_init, opts.second_loss
        yq = None
        if second:  # the full-precision block's outputs on the quantized inputs, before any layer is replaced
            with torch.no_grad():
                yq = torch.cat([ctx.forward(block, ctx.window(ctx.xq, i)) for i in range(ctx.xq.shape[0])])
        fit = opts.fitting(ctx)  # the start never sees the validation windows either
        if opts.warm_start == "gptq":  # fixed GPTQ codes with the wsvd LoRA; only the LoRA factors are trained
            fakes, clip_params, lora_params = {}, [], gptq_start(block, fit, opts)
        else:
            originals = block_linears(block)
            clips = None
            if opts.warm_start == "wsvd":
                clips = WSVD(opts).fit(block, fit, clip_max=float(clip_factors(torch.tensor(clip_init))))
            fakes = to_fake(block, ctx, clip_init, originals, clips)
            clip_params = [p for f in fakes.values() for p in f.clip_parameters()]
            lora_params = [p for f in fakes.values() for p in f.lora_parameters()]
        opt = optimizer(opts, clip_params, lora_params)
        loss_of = lambda idx: block_loss(block, ctx, idx, yq)  # noqa: E731 (yq: the second loss's target, if any)
        stats = train_block(ctx, opt, loss_of, opts.epochs, opts, self.name)
        for name, fake in fakes.items():
            set_module(block, name, fake.to_quant())
        # The final block-output MSE is not recomputed here: the engine measures it (``mse``) on the same
        # windows while it runs the finished block to make the next block's inputs.
        return stats
