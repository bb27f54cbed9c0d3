"""``FakeQuantLinear``: the trainable stand-in for a QuantLinear while ApiQ optimizes a block.

It keeps the full-precision weight (frozen), learnable clipping logits per group (OmniQuant's learnable weight
clipping: factors ``sigmoid(logit)`` shrink each group's max and min) and the LoRA factors. Its forward is
``x fake_quant(W; clip)^T + b + s x A^T B^T`` -- exactly the value the packed layer will compute, because the
tensor quantizers' differentiable path equals the stored codes bit for bit. :meth:`to_quant` packs the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import LoraSpec
from lowbit.layers import QuantLinear, linear_weight
from lowbit.quant import QuantSpec, fake_quantize_weight, quantize_weight
from lowbit.quant.uniform import clip_factors


class FakeQuantLinear(nn.Module):
    def __init__(
        self,
        module: nn.Module,
        spec: QuantSpec,
        lora: LoraSpec | None,
        generator: torch.Generator | None = None,
        clip_logit: float = 4.0,
    ) -> None:
        super().__init__()
        weight, self.fan_in_fan_out = linear_weight(module)
        self.spec, self.lora = spec, lora
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float().clone())
        groups = spec.groups(self.in_features)
        self.clip_hi = nn.Parameter(torch.full((self.out_features, groups), float(clip_logit), device=weight.device))
        # The lower bound has its own factor only for asymmetric integers (NF and symmetric grids use absmax).
        self.clip_lo = nn.Parameter(torch.full_like(self.clip_hi, float(clip_logit))) if spec.has_zeros else None
        self.lora_A = self.lora_B = None
        if lora is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            # drawn on the CPU with the (CPU) generator, so the start is the same on every device
            a = torch.empty(lora.rank, self.in_features).uniform_(-bound, bound, generator=generator)
            self.lora_A = nn.Parameter(a.to(weight.device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora.rank, device=weight.device))

    def clips(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo = clip_factors(self.clip_lo) if self.clip_lo is not None else None
        return clip_factors(self.clip_hi), lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize_weight(self.weight, self.spec, *self.clips())
        y = F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.lora is None:
            return y
        return y + self.lora.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.clip_hi, self.clip_lo) if p is not None]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [] if self.lora is None else [self.lora_A, self.lora_B]

    @torch.no_grad()
    def to_quant(self) -> QuantLinear:
        """The packed layer with the learned clipping and LoRA factors."""
        layer = QuantLinear(
            self.in_features, self.out_features, self.spec, bias=self.bias is not None,
            fan_in_fan_out=self.fan_in_fan_out, device=self.weight.device,
        )  # fmt: skip
        layer.set_weight(quantize_weight(self.weight, self.spec, *self.clips()))
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        if self.lora is not None:
            layer.set_lora(self.lora_A, self.lora_B, self.lora.alpha, self.lora.dropout)
        return layer
