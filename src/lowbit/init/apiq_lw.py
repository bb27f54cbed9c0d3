"""ApiQ layer-wise (Liao et al., 2024): per linear layer, in forward order, learn clipping and LoRA so that
``Xq (Q(W) + s·AB)^T`` matches ``X W^T``, where ``Xq`` comes through the layers already initialized.

The optimizer of ``apiq-bw`` and its options (:class:`~lowbit.init.apiq_bw.ApiQOptions`: ``epochs``,
``clip_lr``, ``lora_lr``, ``weight_decay``, ``clip_init``); each calibration window is one batch. Needs the
layer's inputs in memory: two ``[tokens, in]`` matrices per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.init.apiq_bw import ApiQOptions, optimizer
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.fakequant import FakeQuantLinear
from lowbit.init.layerwise import layer_input, walk
from lowbit.layers import set_module


def stacked_inputs(block: nn.Module, name: str, stream: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """The input of layer ``name`` for every window of ``stream``: ``[n_windows, tokens, in]``."""
    return torch.stack([layer_input(block, name, ctx.window(stream, i), ctx) for i in range(stream.shape[0])])


class ApiQLayerwise(Initializer):
    name = "apiq-lw"
    needs_data = True
    needs_lora = True
    Options = ApiQOptions
    options: ApiQOptions

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        epochs, clip_init = self.options.epochs, self.options.clip_init
        worst = 0.0
        for group, fp_block in walk(block, ctx):
            x = stacked_inputs(fp_block, group[0], ctx.x, ctx)
            xq = stacked_inputs(block, group[0], ctx.xq, ctx)
            for name in group:
                module = block.get_submodule(name)
                with torch.no_grad():
                    target = module(x)
                fake = FakeQuantLinear(module, ctx.spec, ctx.lora, ctx.generator, clip_init)
                opt = optimizer(self.options, fake.clip_parameters(), fake.lora_parameters())
                for epoch in range(epochs):
                    total = 0.0
                    for i in torch.randperm(x.shape[0], generator=ctx.generator).tolist():
                        loss = F.mse_loss(fake(xq[i]), target[i])
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"apiq-lw loss became {loss.item()} in layer {name}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total += loss.item()
                    ctx.report({"layer": name, "epoch": epoch + 1, "loss": total / x.shape[0]})
                with torch.no_grad():
                    rel = ((fake(xq) - target).norm() / target.norm()).item()
                worst = max(worst, rel)
                set_module(block, name, fake.to_quant())
        return {"worst_layer_rel_error": worst}
