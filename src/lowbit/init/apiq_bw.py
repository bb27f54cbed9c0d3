"""ApiQ block-wise (Liao et al., 2024): learn clipping and LoRA of a whole block so its outputs match.

All linear layers of the block become :class:`FakeQuantLinear` and are trained jointly with AdamW (one group for
the clipping logits, one for the LoRA factors) to minimize ``MSE(block_fp(X), block_q(Xq))`` -- optionally plus
``MSE(block_fp(Xq), block_q(Xq))`` -- over the calibration windows, then packed.

The published recipe is the default (options ``epochs=20 clip_lr=5e-3 lora_lr=5e-4 weight_decay=0.1 batch=1
clip_init=4.0``, CLI flags ``--epochs`` etc.) with A Kaiming-uniform and B = 0 (``warm_start=none``).
``warm_start=wsvd`` starts A, B from lowbit's closed-form activation-aware solution instead, which begins
near where the published recipe ends up, so far fewer epochs are needed.

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

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.fakequant import FakeQuantLinear
from lowbit.init.gptq import gptq_codes
from lowbit.init.wsvd import WSVD, layer_grams, wsvd_factors
from lowbit.layers import QuantLinear, quant_layers, set_module
from lowbit.models import block_linears
from lowbit.quant.uniform import clip_factors

WARM_STARTS = ("none", "wsvd", "gptq")
PUBLISHED = {"epochs": 20, "clip_lr": 5e-3, "lora_lr": 5e-4, "weight_decay": 0.1, "batch": 1, "clip_init": 4.0}


def option(ctx: BlockContext, key: str, default):
    return type(default)(ctx.options.get(key, default))


def optimizer(ctx: BlockContext, clip_params: list, lora_params: list) -> torch.optim.AdamW:
    """ApiQ's AdamW: one group for the clipping logits, one for the LoRA factors, shared weight decay."""
    groups = [
        {"params": clip_params, "lr": option(ctx, "clip_lr", PUBLISHED["clip_lr"])},
        {"params": lora_params, "lr": option(ctx, "lora_lr", PUBLISHED["lora_lr"])},
    ]
    weight_decay = option(ctx, "weight_decay", PUBLISHED["weight_decay"])
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)


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


def gptq_start(block: nn.Module, ctx: BlockContext) -> list[nn.Parameter]:
    """Replace each layer, in forward order, by its GPTQ codes with the wsvd LoRA; return the LoRA factors."""
    for name, module, w, gqq, gqx in layer_grams(block, ctx):
        q = gptq_codes(w, gqq, gqx, ctx)
        layer = QuantLinear.from_linear(module, ctx.spec, q)
        layer.set_lora(*wsvd_factors(w, q, gqq, gqx, ctx), ctx.lora.alpha, ctx.lora.dropout)
        set_module(block, name, layer)
    return [p for m in quant_layers(block).values() for p in (m.lora_A, m.lora_B)]


def block_loss(block: nn.Module, ctx: BlockContext, idx: torch.Tensor, second: bool, yq: torch.Tensor | None):
    out = ctx.forward(block, ctx.window(ctx.xq, idx))
    loss = F.mse_loss(out, ctx.window(ctx.y, idx))
    if second:
        loss = loss + F.mse_loss(out, ctx.window(yq, idx))
    return loss


class ApiQBlockwise(Initializer):
    name = "apiq-bw"
    needs_data = True
    needs_lora = True

    @classmethod
    def check_options(cls, options: dict) -> None:
        if options.get("warm_start", "none") not in WARM_STARTS:
            raise LowbitError(f"warm_start={options['warm_start']!r} is not known: use {', '.join(WARM_STARTS)}")

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        batch = option(ctx, "batch", PUBLISHED["batch"])
        clip_init = option(ctx, "clip_init", PUBLISHED["clip_init"])
        second = bool(option(ctx, "second_loss", 0))
        yq = None
        if second:  # the full-precision block's outputs on the quantized inputs, before any layer is replaced
            with torch.no_grad():
                yq = torch.cat([ctx.forward(block, ctx.window(ctx.xq, i)) for i in range(ctx.xq.shape[0])])
        warm = ctx.options.get("warm_start", "none")
        if warm == "gptq":  # fixed GPTQ codes with the wsvd LoRA; only the LoRA factors are trained
            fakes, clip_params, lora_params = {}, [], gptq_start(block, ctx)
        else:
            originals = block_linears(block)
            clips = None
            if warm == "wsvd":
                clips = WSVD().fit(block, ctx, clip_max=float(clip_factors(torch.tensor(clip_init))))
            fakes = to_fake(block, ctx, clip_init, originals, clips)
            clip_params = [p for f in fakes.values() for p in f.clip_parameters()]
            lora_params = [p for f in fakes.values() for p in f.lora_parameters()]
        opt = optimizer(ctx, clip_params, lora_params)
        n = ctx.xq.shape[0]
        epoch_losses = []
        for epoch in range(option(ctx, "epochs", PUBLISHED["epochs"])):
            order = torch.randperm(n, generator=ctx.generator)
            total = 0.0
            for s in range(0, n, batch):
                loss = block_loss(block, ctx, order[s : s + batch], second, yq)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"apiq-bw loss became {loss.item()} in epoch {epoch + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(order[s : s + batch])
            epoch_losses.append(total / n)
            ctx.report({"epoch": epoch + 1, "loss": total / n})
        for name, fake in fakes.items():
            set_module(block, name, fake.to_quant())
        # The final block-output MSE is not recomputed here: the engine measures it (``mse``) on the same
        # windows while it runs the finished block to make the next block's inputs.
        return {"epoch_losses": epoch_losses}
