"""The one-call API: ``lowbit.quantize(model, QuantConfig(...))`` quantizes a model in place.

Every linear layer inside the decoder blocks becomes a :class:`~lowbit.layers.QuantLinear` holding packed codes;
embeddings, norms and the LM head stay in full precision. ``init`` chooses how the LoRA start is set:
``none`` (no adapter, plain round-to-nearest or NormalFloat) or ``qlora`` (QLoRA's start: A random, B = 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.layers import QuantLinear, linear_weight, set_module
from lowbit.models import target_linears
from lowbit.quant import QuantSpec

INITS = ("none", "qlora")


@dataclass
class QuantConfig:
    """What to quantize to and how to start the adapter. Validated on construction."""

    bits: int = 4
    group_size: int = 64
    format: str = "int"
    symmetric: bool = False
    init: str = "qlora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    seed: int = 0
    # Extra per-method options, recorded in the checkpoint (initializers added later read theirs from here).
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            _ = self.spec  # QuantSpec validates bits, format and group size
        except ValueError as exc:
            raise LowbitError(f"{exc}: choose --bits 2, 3, 4 or 8 (nf: 2, 3, 4) and a positive --group-size") from exc
        if self.init not in INITS:
            raise LowbitError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.init != "none" and self.rank <= 0:
            raise LowbitError(f"LoRA rank must be positive for init {self.init!r}, got {self.rank}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.format, self.symmetric)

    @property
    def method(self) -> str:
        """Name of the weight rounding: ``rtn`` (integer round-to-nearest) or ``nf`` (NormalFloat)."""
        return "nf" if self.format == "nf" else "rtn"

    def to_dict(self) -> dict:
        return asdict(self)


def check_shapes(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The layers to quantize; raise LowbitError naming the first whose width the group size does not divide."""
    layers = target_linears(model)
    if not layers:
        raise LowbitError("the model has no linear layers left to quantize (is it already quantized?)")
    for name, module in layers.items():
        in_features = linear_weight(module)[0].shape[1]
        try:
            config.spec.groups(in_features)
        except ValueError as exc:
            divisors = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
            hint = f"use --group-size {divisors[0]}" if divisors else "use --group-size -1 (one group per row)"
            raise LowbitError(f"layer {name}: {exc}; {hint}") from exc
    return layers


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig | None = None, progress: bool = True) -> nn.Module:
    """Quantize every linear layer in the decoder blocks of ``model`` in place and return it.

    Layers are replaced one at a time, so the full-precision weight of each is freed as soon as it is packed.
    """
    config = config or QuantConfig()
    layers = check_shapes(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    for name, module in tqdm(layers.items(), desc=f"quantize {config.spec.name}", disable=not progress, leave=False):
        layer = QuantLinear.from_linear(module, config.spec)
        if config.init == "qlora":
            layer.add_lora(config.rank, config.alpha, config.dropout, generator=generator)
        set_module(model, name, layer)
    model.lowbit_config = config
    return model
