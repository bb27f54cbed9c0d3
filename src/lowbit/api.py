"""The one-call API: ``lowbit.quantize(model, QuantConfig(...), calib=windows)`` quantizes a model in place.

Every linear layer inside the decoder blocks becomes a :class:`~lowbit.layers.QuantLinear` holding packed codes;
embeddings, norms and the LM head stay in full precision. ``init`` chooses how codes and LoRA start are set:
``none`` (no adapter), ``qlora`` (round to nearest, B = 0), ``loftq`` (data-free), ``wsvd``, ``apiq-lw`` and
``apiq-bw`` (these three need calibration windows). See :mod:`lowbit.init`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.device import place_model
from lowbit.engine import Engine, EngineOptions
from lowbit.errors import LowbitError
from lowbit.init import INITIALIZERS, LoraSpec, get_initializer
from lowbit.layers import linear_weight
from lowbit.models import target_linears
from lowbit.quant import QuantSpec

INITS = tuple(INITIALIZERS)


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
        if INITIALIZERS[self.init].adapter and self.rank <= 0:
            raise LowbitError(f"LoRA rank must be positive for init {self.init!r}, got {self.rank}")
        INITIALIZERS[self.init].check_options(self.options)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.format, self.symmetric)

    @property
    def method(self) -> str:
        """Name of the weight rounding: ``rtn`` (integer round-to-nearest) or ``nf`` (NormalFloat)."""
        return "nf" if self.format == "nf" else "rtn"

    @property
    def lora(self) -> LoraSpec | None:
        return LoraSpec(self.rank, self.alpha, self.dropout) if INITIALIZERS[self.init].adapter else None

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


def load(
    folder: str | Path, device: str | torch.device | None = None, verify: bool | None = None
) -> tuple[nn.Module, object | None]:
    """``lowbit.load``: a lowbit checkpoint (eval mode) and its tokenizer, on ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``; None: the CPU). ``verify``: see :func:`lowbit.checkpoint.load_checkpoint`."""
    from lowbit.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(folder, verify=verify)
    return place_model(model, device), tokenizer


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    calib: torch.Tensor | None = None,
    progress: bool = True,
    engine: EngineOptions | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Quantize every linear layer in the decoder blocks of ``model`` in place and return it.

    ``calib`` holds calibration token windows ``[n, seq]`` for the data-driven initializers; with
    ``config.options["holdout_windows"] = k`` its last ``k`` windows are held out from the method, and the
    per-block error in ``model.lowbit_stats`` is measured on them (``train_*``: on the others). Blocks are done one
    at a time, so the full-precision weights of each block are freed as soon as it is packed.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; it overrides ``engine.device``) is where each block is
    initialized: a block elsewhere is moved there for its turn and back afterwards, so a CPU model can be
    calibrated on a GPU one block at a time. None: where the blocks are (a model on CUDA is calibrated there).
    """
    config = config or QuantConfig()
    check_shapes(model, config)
    engine = engine or EngineOptions(progress=progress)
    if device is not None:
        engine = dataclasses.replace(engine, device=device)
    init = get_initializer(config.init)
    run = Engine(model, init, config.spec, config.lora, config.seed, config.options, calib, engine)
    model.lowbit_stats = [r.__dict__ for r in run.run()]
    model.lowbit_config = config
    return model
