"""``gptq``: adapter-free codes rounded for the block's outputs, not the weights (GPTQ with static groups).

Per layer group in forward order (so later layers see the already-quantized earlier ones), the Gram matrices of
the group's inputs are accumulated as in ``wsvd``: ``Gq = Xq^T Xq`` on the quantized path and ``C = Xq^T X``
against the full-precision path. The layer's target is the weight that best maps the quantized path's inputs
onto the full-precision outputs, ``T^T = W^T + Gq^{-1} (C - Gq) W^T`` (exactly ``W`` while no error has crept
into the inputs); since ``||X W^T - Xq Q^T||^2 = ||Xq (T - Q)^T||^2`` + a constant, GPTQ rounding of ``T`` with
Hessian ``Gq`` minimizes the layer's output error against the full-precision block. Each layer's grid comes
first, from the same activation-weighted clipping search ``wsvd`` uses.

Its main use is ``lowbit export --requantize``: a fine-tuned ``dequant(Q) + s·BA`` lies on the old grid plus a
small delta, so plain rounding onto the merged weights' new (shifted) grid adds a second full rounding error and
drops the delta, leaving a model worse than the untrained start; GPTQ keeps what the delta does to the outputs.

Options (:class:`GPTQ.Options`): ``gptq_damp`` (relative ridge on the Gram, default 0.01), ``gptq_act_order``
(default on), and ``wsvd_clip`` (``search`` | ``none``) for the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.config import option
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.lowrank import damped
from lowbit.init.wsvd import ClipOptions, clip_candidates, layer_grams
from lowbit.layers import QuantLinear, set_module
from lowbit.quant import QuantizedWeight, quantize_weight, search_clip
from lowbit.quant.gptq import gptq_quantize


def drift_corrected(w: torch.Tensor, gqq: torch.Tensor, gqx: torch.Tensor, damp: float) -> torch.Tensor:
    """``T`` with ``T^T = W^T + Gq^{-1} (C - Gq) W^T``: the full-precision outputs as a map of the quantized inputs."""
    correction = torch.linalg.solve(damped(gqq, damp), (gqx - gqq) @ w.double().t()).t()
    return (w.double() + correction).float()


class GPTQ(Initializer):
    name = "gptq"
    needs_data = True
    adapter = False

    @dataclass(frozen=True)
    class Options(ClipOptions):
        gptq_damp: float = option(0.01, "ridge on the Gram matrices of GPTQ rounding, relative to their diagonal")
        gptq_act_order: bool = option(True, "GPTQ rounds the columns in order of decreasing activation energy")

        def __post_init__(self) -> None:
            super().__post_init__()
            self.check_at_least(0, "gptq_damp")

    options: Options

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        for name, module, w, gqq, gqx in layer_grams(block, ctx):
            codes = gptq_codes(w, gqq, gqx, ctx, self.options)
            set_module(block, name, QuantLinear.from_linear(module, ctx.spec, codes))
        return {}


def gptq_codes(
    w: torch.Tensor, gqq: torch.Tensor, gqx: torch.Tensor, ctx: BlockContext, options: GPTQ.Options
) -> QuantizedWeight:
    """One layer's codes: the drift-corrected target, its clipping-searched grid, then GPTQ rounding."""
    damp = options.gptq_damp
    target = drift_corrected(w, gqq, gqx, damp)
    factors = search_clip(target, ctx.spec, gqq.diagonal().float(), clip_candidates(options.wsvd_clip, 1.0))
    grid = quantize_weight(target, ctx.spec, factors, factors if ctx.spec.has_zeros else None)
    return gptq_quantize(target, ctx.spec, gqq, grid, damp=damp, act_order=options.gptq_act_order)
