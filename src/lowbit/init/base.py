"""The one small interface every initializer implements, and the per-block context the engine hands it.

An initializer turns one decoder block's ``nn.Linear`` layers into :class:`~lowbit.layers.QuantLinear` layers
(packed codes + LoRA start). Data-free methods (``qlora``, ``loftq``) look only at the weights; data-driven ones
(``apiq-lw``, ``apiq-bw``, ``wsvd``) also get the block's calibration activations: ``x`` (inputs produced by the
full-precision earlier blocks), ``xq`` (inputs produced by the already-quantized earlier blocks) and ``y``
(the full-precision block's outputs on ``x``). Feeding the quantized path its own inputs is what stops error from
piling up with depth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lowbit.config import LoraSpec, MethodOptions
from lowbit.quant import QuantSpec


@dataclass
class BlockContext:
    """What an initializer may use for block ``index``.

    ``forward(block, h)`` runs a block on hidden states ``h`` ``[batch, seq, hidden]`` with the keyword arguments
    the model passes to this block (rotary tables, masks), captured once by the engine. ``x``, ``xq`` and ``y``
    are ``[n_windows, seq, hidden]`` (None for data-free methods), possibly float16 or bfloat16, and possibly in
    host memory or memory-mapped files rather than on ``device``: read them through :meth:`window`.

    ``device`` is where the block is and where every tensor an initializer makes must be (a CUDA GPU or the CPU).
    ``generator`` is a seeded CPU generator: draw random numbers on the CPU with it and move the result, so a seed
    gives the same start on every device.
    """

    index: int
    spec: QuantSpec
    lora: LoraSpec | None
    generator: torch.Generator
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    x: torch.Tensor | None = None
    xq: torch.Tensor | None = None
    y: torch.Tensor | None = None
    report: Callable[[dict], None] = field(default=lambda stats: None)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def window(self, t: torch.Tensor, i: int | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Window(s) ``i`` of an activation stream as a float batch on ``device``: streams kept off the device
        cross the bus one window (or one batch of windows, for a tensor ``i``) at a time, in their stored dtype."""
        w = t[i.to(t.device) if isinstance(i, torch.Tensor) else i]
        w = w.unsqueeze(0) if w.dim() == 2 else w
        return w.to(self.device, non_blocking=True).to(dtype)


class Initializer(ABC):
    """Quantizes one block in place and sets its LoRA start; returns statistics (losses) for the summary.

    A method with options declares them as a nested frozen dataclass ``Options`` (a
    :class:`~lowbit.config.MethodOptions`), checked when it is made; the initializer is built with one, so
    ``init_block`` reads typed fields (``self.options.epochs``), not string keys.
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    needs_lora: ClassVar[bool] = False  # sets the LoRA start itself, so a rank > 0 adapter is required
    adapter: ClassVar[bool] = True  # False: the result has no LoRA adapter at all (``none``, ``gptq``)
    Options: ClassVar[type[MethodOptions]] = MethodOptions  # no options

    def __init__(self, options: MethodOptions | None = None) -> None:
        if options is not None and not isinstance(options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__qualname__}, not {type(options).__qualname__}")
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def init_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, float]: ...
