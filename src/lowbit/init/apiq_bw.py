"""ApiQ block-wise (Liao et al., 2024): learn clipping and LoRA of a whole block so its outputs match.

All linear layers of the block become :class:`FakeQuantLinear` and are trained jointly with AdamW (one group for
the clipping logits, one for the LoRA factors) to minimize ``MSE(block_fp(X), block_q(Xq))`` -- optionally plus
``MSE(block_fp(Xq), block_q(Xq))`` -- over the calibration windows, then packed.

The published recipe is the default (options ``epochs=20 clip_lr=5e-3 lora_lr=5e-4 weight_decay=0.1 batch=1
clip_init=4.0``, CLI flags ``--epochs`` etc.) with A Kaiming-uniform and B = 0 (``warm_start=none``).
``warm_start=wsvd`` starts A, B from lowbit's closed-form activation-aware solution instead, which begins
near where the published recipe ends up, so far fewer epochs are needed; ``max_epochs`` lets the few blocks
that are still improving fast after ``epochs`` go on (:class:`EpochSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

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

PUBLISHED = {"epochs": 20, "clip_lr": 5e-3, "lora_lr": 5e-4, "weight_decay": 0.1, "batch": 1, "clip_init": 4.0}


def option(ctx: BlockContext | dict, key: str, default):
    options = ctx if isinstance(ctx, dict) else ctx.options
    return type(default)(options.get(key, default))


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


@dataclass
class EpochSchedule:
    """How many epochs a block trains: ``epochs``, or more for the blocks that still improve fast.

    With ``max_epochs > epochs`` (options ``max_epochs``, ``extend_tol``, default 0.05) a block keeps training
    past ``epochs``, up to ``max_epochs``, while its last epoch lowered the mean loss by more than ``extend_tol``
    (relative), and an epoch whose loss rose halves both learning rates and tries again. Why: from the ``wsvd``
    start most blocks are near their optimum after a few epochs, but a few (the block of the default model that
    creates its largest activations) start far off and oscillate; a fixed epoch count spends too much on the
    first and too little on the second. ``max_epochs = epochs`` (the default) is the published fixed count.
    """

    epochs: int
    max_epochs: int
    extend_tol: float = 0.05

    def __post_init__(self) -> None:
        if self.max_epochs < self.epochs or not 0 <= self.extend_tol < 1:
            raise LowbitError(f"max_epochs={self.max_epochs} must be at least epochs={self.epochs} and "
                              f"extend_tol={self.extend_tol} in [0, 1)")  # fmt: skip

    def after(self, losses: list[float]) -> str:
        """``continue``, ``backoff`` (halve the learning rates, then continue) or ``stop`` after an epoch."""
        done = len(losses)
        if done >= self.max_epochs:
            return "stop"
        if self.max_epochs == self.epochs or done < 2:
            return "continue" if done < self.epochs else "stop"
        best = min(losses[:-1])
        if losses[-1] > best:
            return "backoff"
        return "continue" if done < self.epochs or losses[-1] < (1 - self.extend_tol) * best else "stop"


def epoch_schedule(options: dict) -> EpochSchedule:
    epochs = option(options, "epochs", PUBLISHED["epochs"])
    return EpochSchedule(epochs, option(options, "max_epochs", epochs), option(options, "extend_tol", 0.05))


class ApiQBlockwise(Initializer):
    name = "apiq-bw"
    needs_data = True
    needs_lora = True

    @classmethod
    def check_options(cls, options: dict) -> None:
        epoch_schedule(options)

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        batch = option(ctx, "batch", PUBLISHED["batch"])
        clip_init = option(ctx, "clip_init", PUBLISHED["clip_init"])
        second = bool(option(ctx, "second_loss", 0))
        yq = None
        if second:  # the full-precision block's outputs on the quantized inputs, before any layer is replaced
            with torch.no_grad():
                yq = torch.cat([ctx.forward(block, ctx.window(ctx.xq, i)) for i in range(ctx.xq.shape[0])])
        originals = block_linears(block)
        clips = None
        warm = ctx.options.get("warm_start", "none")
        if warm == "gptq":  # fixed GPTQ codes with the wsvd LoRA; only the LoRA factors are trained
            for name, module, w, gqq, gqx in layer_grams(block, ctx):
                q = gptq_codes(w, gqq, gqx, ctx)
                layer = QuantLinear.from_linear(module, ctx.spec, q)
                layer.set_lora(*wsvd_factors(w, q, gqq, gqx, ctx), ctx.lora.alpha, ctx.lora.dropout)
                set_module(block, name, layer)
            fakes = {}
            clip_params = []
            lora_params = [p for m in quant_layers(block).values() for p in (m.lora_A, m.lora_B)]
        else:
            if warm == "wsvd":
                clips = WSVD().fit(block, ctx, clip_max=float(clip_factors(torch.tensor(clip_init))))
            fakes = to_fake(block, ctx, clip_init, originals, clips)
            clip_params = [p for f in fakes.values() for p in f.clip_parameters()]
            lora_params = [p for f in fakes.values() for p in f.lora_parameters()]
        opt = optimizer(ctx, clip_params, lora_params)
        n = ctx.xq.shape[0]
        schedule = epoch_schedule(ctx.options)
        epoch_losses = []
        for epoch in range(schedule.max_epochs):
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
            step = schedule.after(epoch_losses)
            if step == "stop":
                break
            if step == "backoff":
                for group in opt.param_groups:
                    group["lr"] /= 2
        for name, fake in fakes.items():
            set_module(block, name, fake.to_quant())
        # The final block-output MSE is not recomputed here: the engine measures it (``mse``) on the same
        # windows while it runs the finished block to make the next block's inputs.
        return {"epoch_losses": epoch_losses}
