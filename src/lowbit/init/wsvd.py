"""``wsvd``: activation-aware closed-form LoRA start (lowbit's own; a whitened SVD of the quantization residual).

For a layer with weight ``W``, codes ``Q`` and calibration inputs ``X`` (full-precision path) and ``Xq``
(quantized path), the LoRA delta ``D = s·BA`` of rank r that minimizes ``||X W^T - Xq (Q + D)^T||_F`` is found in
closed form. With ``Gq = Xq^T Xq = L L^T`` and ``C = Xq^T X``, the unconstrained optimum is
``D* = W C^T Gq^{-1} - Q`` and the loss is ``||(D - D*) L||_F^2`` plus a constant, so the best rank-r ``D`` is
``SVD_r(D* L) L^{-1}``. When ``Xq = X`` this is the residual ``W - Q`` fitted where the activations are large,
instead of uniformly as LoftQ does. Only two ``in x in`` Gram matrices per layer group are accumulated, no
activations are stored, and it costs one SVD per layer: seconds, not minutes.

Before the SVD, each group's clipping factor is searched on a grid (option ``wsvd_clip=search``, the
default; ``none`` keeps min-max ranges) minimizing the activation-weighted rounding error, with the diagonal of
``Gq`` as the weights: at 2 bits this alone removes most of the error min-max rounding makes, and it hands
ApiQ-bw's warm start clipping factors close to where its optimization would take them.

Options (:class:`WSVD.Options`): ``wsvd_damp`` (relative ridge on the Gram, default 0.01), ``wsvd_clip``
(``search`` | ``none``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lowbit.config import MethodOptions, option
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.layerwise import layer_input, walk
from lowbit.init.lowrank import damped, whitened_best_rank
from lowbit.layers import QuantLinear, linear_weight, set_module
from lowbit.quant import QuantizedWeight, dequantize_weight, quantize_weight, search_clip


def grams(block: nn.Module, fp_block: nn.Module, name: str, ctx: BlockContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xq^T Xq, Xq^T X)`` for the input of layer ``name`` over all calibration tokens (float64, on the device).

    Window by window, so only one window's inputs of each path exist at a time (all of them would be gigabytes
    at 7B scale: 128 windows of 2048 tokens into an 11008-wide layer are 11.5 GB in float32).
    """
    width = linear_weight(block.get_submodule(name))[0].shape[1]
    gqq = torch.zeros(width, width, dtype=torch.float64, device=ctx.device)
    gqx = torch.zeros_like(gqq)
    for i in range(ctx.xq.shape[0]):
        fp = layer_input(fp_block, name, ctx.window(ctx.x, i), ctx)
        inp = layer_input(block, name, ctx.window(ctx.xq, i), ctx)
        # float32 products per window (several times faster than float64 on CPU), summed in float64
        gqq.add_((inp.t() @ inp).double())
        gqx.add_((inp.t() @ fp).double())
    return gqq, gqx


LayerGrams = tuple[str, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]


def layer_grams(block: nn.Module, ctx: BlockContext) -> Iterator[LayerGrams]:
    """Each linear layer of ``block`` in forward order as ``(name, module, weight, Xq^T Xq, Xq^T X)``.

    The Gram matrices are captured once per group of layers sharing an input; the caller replaces each layer
    before asking for the next, so later groups are captured through the already-quantized earlier layers.
    """
    for group, fp_block in walk(block, ctx):
        gqq, gqx = grams(block, fp_block, group[0], ctx)
        for name in group:
            module = block.get_submodule(name)
            yield name, module, linear_weight(module)[0], gqq, gqx


def wsvd_factors(
    w: torch.Tensor, q: QuantizedWeight, gqq: torch.Tensor, gqx: torch.Tensor, ctx: BlockContext, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` minimizing the layer's output error given codes ``q`` and the Gram matrices (damped by
    ``damp``, the ``wsvd_damp`` option)."""
    g = damped(gqq, damp)
    # D* = W C^T G^{-1} - Q  with C = Xq^T X  (G symmetric, so W C^T G^{-1} = (G^{-1} C W^T)^T)
    target = torch.linalg.solve(g, gqx @ w.double().t()).t() - dequantize_weight(q, ctx.spec).double()
    return whitened_best_rank(target, g, ctx.lora.rank, ctx.lora.scaling, damp=0.0)


# Clipping factors tried by the search: min-max (the largest allowed) down to half the range.
CLIP_GRID = [1.0 - 0.05 * i for i in range(11)]


@dataclass(frozen=True)
class ClipOptions(MethodOptions):
    """The clipping search of the grids ``wsvd`` and ``gptq`` make (and the methods that start from them)."""

    wsvd_clip: Literal["search", "none"] = option(
        "search", "each group's grid: search its activation-weighted clipping, or none (min-max)"
    )


def clip_candidates(mode: str, clip_max: float) -> list[float]:
    """The clipping factors to try (``mode``: the ``wsvd_clip`` option), at most ``clip_max``."""
    return [clip_max] + ([c for c in CLIP_GRID if c < clip_max] if mode == "search" else [])


class WSVD(Initializer):
    name = "wsvd"
    needs_data = True
    needs_lora = True

    @dataclass(frozen=True)
    class Options(ClipOptions):
        wsvd_damp: float = option(0.01, "ridge on the Gram matrices of the wsvd LoRA fit, relative to their diagonal")

        def __post_init__(self) -> None:
            super().__post_init__()
            self.check_at_least(0, "wsvd_damp")

    options: Options

    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]:
        self.fit(block, ctx)
        return {}

    def fit(self, block: nn.Module, ctx: BlockContext, clip_max: float = 1.0) -> dict[str, torch.Tensor]:
        """Replace the block's layers; return each layer's clipping factors ``[out, n_groups]`` (at most
        ``clip_max``, which ApiQ-bw sets to its initial factor so a warm start never widens a range)."""
        candidates = clip_candidates(self.options.wsvd_clip, clip_max)
        clips = {}
        for name, module, w, gqq, gqx in layer_grams(block, ctx):
            clips[name] = factors = search_clip(w, ctx.spec, gqq.diagonal().float(), candidates)
            q = quantize_weight(w, ctx.spec, factors, factors if ctx.spec.has_zeros else None)
            a, b = wsvd_factors(w, q, gqq, gqx, ctx, self.options.wsvd_damp)
            layer = QuantLinear.from_linear(module, ctx.spec, q)
            layer.set_lora(a, b, ctx.lora.alpha, ctx.lora.dropout)
            set_module(block, name, layer)
        return clips
