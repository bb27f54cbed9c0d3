"""The one-call API: ``lowbit.quantize(model, QuantConfig(...), calib=windows)`` quantizes a model in place.

Every linear layer inside the decoder blocks becomes a :class:`~lowbit.layers.QuantLinear` holding packed codes;
embeddings, norms and the LM head stay in full precision. ``init`` chooses how codes and LoRA start are set:
``none`` (no adapter), ``qlora`` (round to nearest, B = 0), ``loftq`` (data-free), ``wsvd``, ``apiq-lw`` and
``apiq-bw`` (these three need calibration windows). See :mod:`lowbit.init`.

:func:`load_model` (any model) and :func:`load` (a lowbit checkpoint) are here too: they sit above both model
loading (:mod:`lowbit.models`) and checkpoint reading (:mod:`lowbit.checkpoint`), so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.arch import target_linears
from lowbit.checkpoint import load_checkpoint
from lowbit.config import QuantConfig
from lowbit.device import place_model
from lowbit.engine import Engine, EngineOptions
from lowbit.errors import LowbitError
from lowbit.init import get_initializer
from lowbit.layers import linear_weight, train_only_adapter
from lowbit.models import is_lowbit_checkpoint, load_pretrained, resolve_model_path


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
    model, tokenizer = load_checkpoint(folder, verify=verify)
    return place_model(model, device), tokenizer


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, object | None]:
    """``lowbit.load_model``: any supported model -- full precision (in ``dtype``) or a lowbit checkpoint -- with
    its tokenizer, on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; None: the CPU, where it is loaded).

    ``path``: a Hugging Face folder, a ``.gguf`` file or a lowbit checkpoint; None: the default model."""
    folder = resolve_model_path(path)
    if is_lowbit_checkpoint(folder):
        model, tokenizer = load_checkpoint(folder)
    else:
        model, tokenizer = load_pretrained(folder, dtype)
    return place_model(model, device), tokenizer


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    calib: torch.Tensor | None = None,
    progress: bool = True,
    engine: EngineOptions | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Quantize every linear layer in the decoder blocks of ``model`` in place and return it, with the LoRA factors
    as its only trainable parameters (as a loaded checkpoint has them, and as PEFT leaves a model).

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
    init = get_initializer(config)
    run = Engine(model, init, config.spec, config.lora, config.seed, config.options, calib, engine)
    model.lowbit_stats = [r.__dict__ for r in run.run()]
    model.lowbit_config = config
    train_only_adapter(model)
    return model
