"""The one small interface every initializer implements, and the per-block context the engine hands it.

An initializer turns one decoder block's ``nn.Linear`` layers into :class:`~lowbit.layers.QuantLinear` layers
(packed codes + LoRA start). Data-free methods (``qlora``, ``loftq``) look only at the weights; data-driven ones
(``apiq-lw``, ``apiq-bw``, ``wsvd``) also get the block's calibration activations: ``x`` (inputs produced by the
full-precision earlier blocks), ``xq`` (inputs produced by the already-quantized earlier blocks) and ``y``
(the full-precision block's outputs on ``x``). Feeding the quantized path its own inputs is what stops error from
piling up with depth.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import LoraSpec, MethodOptions, option
from lowbit.device import DETERMINISTIC_DEVICE_TYPES, deterministic_backward
from lowbit.errors import LowbitError
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

    def first(self, n: int) -> BlockContext:
        """This context with only the first ``n`` windows of each activation stream (views, nothing is copied)."""
        cut = lambda t: None if t is None else t[:n]  # noqa: E731
        return replace(self, x=cut(self.x), xq=cut(self.xq), y=cut(self.y))


def block_loss(block: nn.Module, ctx: BlockContext, idx: torch.Tensor, yq: torch.Tensor | None = None) -> torch.Tensor:
    """ApiQ's block objective on windows ``idx``: ``MSE(block(Xq), Y)``, the quantized block on its own inputs against
    the full-precision block's outputs, plus ``MSE(block(Xq), Yq)`` when ``yq`` (the full-precision block's outputs
    on the quantized inputs) is given."""
    out = ctx.forward(block, ctx.window(ctx.xq, idx))
    loss = F.mse_loss(out, ctx.window(ctx.y, idx))
    if yq is not None:
        loss = loss + F.mse_loss(out, ctx.window(yq, idx))
    return loss


@dataclass(frozen=True)
class BlockTrainOptions(MethodOptions):
    """The options of :func:`train_block`, shared by the block-wise trained initializers."""

    batch: int = option(1, "windows per step")
    val_windows: int = option(
        0,
        "calibration windows held back from the steps: each block keeps its parameters from the epoch (0: the "
        "start) with the lowest loss on them (0: keep the last epoch)",
    )
    patience: int = option(
        0,
        "with --val-windows: stop a block's training after this many epochs without a lower validation loss "
        "(0: train every epoch)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_at_least(1, "batch")
        self.check_at_least(0, "val_windows")
        self.check_at_least(0, "patience")
        if self.patience and not self.val_windows:
            raise LowbitError(f"--patience {self.patience} needs validation windows to watch: add --val-windows "
                              "(e.g. --val-windows 4) or drop --patience")  # fmt: skip

    def fitting(self, ctx: BlockContext) -> BlockContext:
        """``ctx`` without the validation windows: what a method may fit to (its start and its training steps), so
        the validation loss stays a measure on windows it never saw."""
        n = ctx.xq.shape[0] - self.val_windows
        if n < 1:
            raise LowbitError(f"--val-windows {self.val_windows} leaves no calibration window to train on "
                              f"({ctx.xq.shape[0]} given): lower --val-windows or give more "
                              "--calib-windows")  # fmt: skip
        return ctx.first(n)


def train_block(
    ctx: BlockContext,
    opt: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    epochs: int,
    options: BlockTrainOptions,
    method: str,
) -> dict[str, list[float] | int | bool]:
    """The block-wise training loop the trained initializers share (``apiq-bw``, ``blockap``): ``epochs`` passes
    over the calibration windows in an order drawn from ``ctx.generator``, one ``opt`` step per ``options.batch``
    windows on ``loss_of(window indices)``. Returns each epoch's mean loss (``epoch_losses``, also reported to ``ctx``
    as each epoch ends), and with validation windows their loss before training and after each epoch
    (``val_losses``) and the epoch kept (``best_epoch``). A loss that is not finite stops the block with the
    method's name and the epoch (the engine adds the block). On CUDA each backward runs in torch's deterministic mode
    (:func:`lowbit.device.deterministic_backward`), so that a resumed or repeated run gives the same tensors; where
    torch refuses (an op without a deterministic kernel, or cuBLAS's check when the process multiplied on CUDA before
    ``CUBLAS_WORKSPACE_CONFIG`` was set), the step is redone outside that mode, this method's later steps skip the
    attempt, one warning says so, and the result's ``deterministic`` is False.

    Why validation windows: a block trained on a few dozen windows learns them -- its error on text it never saw
    rises above the untrained start's while its training loss still falls -- so with ``options.val_windows`` the
    last windows are held back from the steps (and from the start: see :meth:`BlockTrainOptions.fitting`) and the
    block keeps the parameters of the epoch (0: the start) where their loss was lowest. With ``options.patience``
    the block also stops after that many epochs without a new lowest loss: more epochs than the first blocks need
    can then be given without paying for them on every block.
    """
    val = options.val_windows
    n = options.fitting(ctx).xq.shape[0]
    params = [p for group in opt.param_groups for p in group["params"]]
    held = torch.arange(n, n + val)

    def held_loss() -> float:
        with torch.no_grad():
            return loss_of(held).item()

    def step(idx: torch.Tensor, epoch: int) -> float:
        """One optimizer step on windows ``idx``; returns their loss. The backward runs in deterministic mode
        (CUDA) unless this method's was refused before in this process; a refusal redoes the step outside it."""
        loss = loss_of(idx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method} loss became {loss.item()} in epoch {epoch + 1}")
        value = loss.item()
        opt.zero_grad(set_to_none=True)
        if method not in _REFUSED:
            try:
                with deterministic_backward(ctx.device):
                    loss.backward()
                return value
            except RuntimeError as exc:
                if "deterministic" not in str(exc):
                    raise
                refuse(method, ctx.index, str(exc))
            # out of the except block, whose exception (and the graph its traceback holds) is gone: the failed
            # pass's graph goes before the forward runs again, and the gradients it may have written with it
            del loss
            opt.zero_grad(set_to_none=True)
            loss = loss_of(idx)
        loss.backward()
        return value

    val_losses = [held_loss()] if val else []
    best = [p.detach().clone() for p in params] if val else []
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=ctx.generator)
        total = 0.0
        for s in range(0, n, options.batch):
            idx = order[s : s + options.batch]
            total += step(idx, epoch) * len(idx)
            opt.step()
        losses.append(total / n)
        stats = {"epoch": epoch + 1, "loss": total / n}
        if val:
            val_losses.append(held_loss())
            stats["val_loss"] = val_losses[-1]
            if val_losses[-1] < min(val_losses[:-1]):
                best = [p.detach().clone() for p in params]
        ctx.report(stats)
        if options.patience and epoch + 1 - val_losses.index(min(val_losses)) >= options.patience:
            break
    result: dict[str, list[float] | int | bool] = {"epoch_losses": losses}
    if ctx.device.type in DETERMINISTIC_DEVICE_TYPES:
        result["deterministic"] = method not in _REFUSED
    if val:
        with torch.no_grad():
            for p, kept in zip(params, best, strict=True):
                p.copy_(kept)
        result.update(val_losses=val_losses, best_epoch=val_losses.index(min(val_losses)))
    return result


# Methods whose training backward was refused in deterministic mode in this process: their later steps and blocks
# skip the attempt (the refusal is the process's: cuBLAS's check is read once, an op lacks a kernel for good).
_REFUSED: set[str] = set()


def refuse(method: str, block: int, why: str) -> None:
    """Record that ``method``'s backward has no deterministic run here, and say so once (torch's first line)."""
    if method not in _REFUSED:
        _REFUSED.add(method)
        print(f"lowbit: warning: {method} block {block}: torch refused deterministic mode here "
              f"({why.strip().splitlines()[0][:300]}); its training steps go on without it from here on, so a "
              "resumed or repeated run may differ in the last bits", file=sys.stderr)  # fmt: skip


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
