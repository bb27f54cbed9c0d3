"""ApiQ block-wise (Liao et al., 2024): learn clipping and LoRA of a whole block so its outputs match.

All linear layers of the block become :class:`FakeQuantLinear` and are trained jointly with AdamW (one group for
the clipping logits, one for the LoRA factors) to minimize ``MSE(block_fp(X), block_q(Xq))`` -- optionally plus
``MSE(block_fp(Xq), block_q(Xq))`` -- over the calibration windows, then packed.

The published recipe is the default (options ``epochs=20 clip_lr=5e-3 lora_lr=5e-4 weight_decay=0.1 batch=1
clip_init=4.0``, CLI flags ``--epochs`` etc.) with A Kaiming-uniform and B = 0 (``warm_start=none``).
``warm_start=wsvd`` starts A, B from lowbit's closed-form activation-aware solution instead, which begins
near where the published recipe ends up, so far fewer epochs are needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.fakequant import FakeQuantLinear
from lowbit.init.wsvd import WSVD
from lowbit.layers import QuantLinear, set_module
from lowbit.models import block_linears
from lowbit.quant.uniform import clip_factors

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

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        epochs = option(ctx, "epochs", PUBLISHED["epochs"])
        batch = option(ctx, "batch", PUBLISHED["batch"])
        clip_init = option(ctx, "clip_init", PUBLISHED["clip_init"])
        second = bool(option(ctx, "second_loss", 0))
        yq = None
        if second:  # the full-precision block's outputs on the quantized inputs, before any layer is replaced
            with torch.no_grad():
                yq = torch.cat([ctx.forward(block, ctx.window(ctx.xq, i)) for i in range(ctx.xq.shape[0])])
        originals = block_linears(block)
        clips = None
        if ctx.options.get("warm_start", "none") == "wsvd":
            if ctx.lora is None:
                raise LowbitError(f"init {self.name} has no adapter, so warm_start wsvd does not apply: drop it")
            clips = WSVD().fit(block, ctx, clip_max=float(clip_factors(torch.tensor(clip_init))))
        fakes = to_fake(block, ctx, clip_init, originals, clips)
        clip_params = [p for f in fakes.values() for p in f.clip_parameters()]
        lora_params = [p for f in fakes.values() for p in f.lora_parameters()]
        opt = optimizer(ctx, clip_params, lora_params)
        n = ctx.xq.shape[0]
        with torch.no_grad():
            start = mean_loss(block, ctx, second, yq, batch)
        for epoch in range(epochs):
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
            ctx.report({"epoch": epoch + 1, "loss": total / n})
        with torch.no_grad():
            end = mean_loss(block, ctx, second, yq, batch)
        for name, fake in fakes.items():
            set_module(block, name, fake.to_quant())
        return {"loss_start": start, "loss": end}


def mean_loss(block: nn.Module, ctx: BlockContext, second: bool, yq, batch: int) -> float:
    n = ctx.xq.shape[0]
    return (
        sum(
            block_loss(block, ctx, torch.arange(s, min(s + batch, n)), second, yq).item() * min(batch, n - s)
            for s in range(0, n, batch)
        )
        / n
    )
