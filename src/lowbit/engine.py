"""The calibration engine: runs a model block by block and hands each block to an initializer.

It carries two activation streams over the calibration windows: ``x``, produced by the full-precision earlier
blocks, and ``xq``, produced by the already-quantized earlier blocks (with their LoRA). Block ``i`` is
initialized from ``(x_i, xq_i, y_i = block_fp(x_i))``; then ``x_{i+1} = y_i`` and ``xq_{i+1} = block_q(xq_i)``.
Feeding each block the inputs the quantized model will really give it is what keeps error from piling up with
depth.

The engine holds only the current block in full precision: blocks are fetched with ``load_block`` just before
their turn and handed to ``finish_block`` (which may write them out and free them) right after. Activations can
be kept in float16 and/or memory-mapped files, so peak memory does not grow with depth. The keyword arguments a
model passes to each block (rotary tables, masks; they differ per block on Gemma 2/3) are captured once by
running the model with the blocks replaced by recorders -- no architecture-specific code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.init import BlockContext, Initializer, LoraSpec
from lowbit.models import find_blocks
from lowbit.quant import QuantSpec


class _Stop(Exception):
    """Ends a model forward once the recorders have what they need."""


@dataclass
class BlockCall:
    """Positional (after the hidden states) and keyword arguments the model passes to one block."""

    args: tuple
    kwargs: dict


def run_block(block: nn.Module, call: BlockCall, h: torch.Tensor) -> torch.Tensor:
    out = block(h, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _record(blocks: nn.ModuleList, model: nn.Module, ids: torch.Tensor, stop_at: int) -> tuple[list, torch.Tensor]:
    """Run ``model`` on ``ids`` with blocks ``0..stop_at`` replaced by identity recorders; stop after ``stop_at``."""
    calls: list[BlockCall] = []
    first: list[torch.Tensor] = []

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                first.append(hidden_states.detach())
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
            calls.append(BlockCall(tuple(args), kwargs))
            if index == stop_at:
                raise _Stop
            return hidden_states

        return forward

    for i in range(stop_at + 1):
        blocks[i].forward = recorder(i)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for i in range(stop_at + 1):
            del blocks[i].forward
    return calls, first[0]


class Activations:
    """``[n, seq, hidden]`` activations in RAM or in a memory-mapped file, stored as float32 or float16."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None = None) -> None:
        self.path = path
        if path is None:
            self.data = torch.empty(shape, dtype=dtype)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)

    def __getitem__(self, i):
        return self.data[i]

    def __setitem__(self, i, value: torch.Tensor) -> None:
        self.data[i] = value.to(self.data.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


@dataclass
class EngineOptions:
    act_dtype: torch.dtype = torch.float32
    spill_dir: Path | None = None  # memory-map activations to files here instead of keeping them in RAM
    progress: bool = True


@dataclass
class BlockResult:
    index: int
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0


class Engine:
    """Quantize/initialize every block of ``model`` in order with ``initializer``."""

    def __init__(
        self,
        model: nn.Module,
        initializer: Initializer,
        spec: QuantSpec,
        lora: LoraSpec | None,
        seed: int,
        options: dict,
        calib: torch.Tensor | None = None,
        engine: EngineOptions | None = None,
    ) -> None:
        self.model, self.initializer, self.spec, self.lora = model, initializer, spec, lora
        self.seed, self.options, self.calib = seed, options, calib
        self.opts = engine or EngineOptions()
        self.prefix, self.blocks = find_blocks(model)
        if initializer.needs_data and calib is None:
            raise LowbitError(f"init {initializer.name} needs calibration windows (--calib)")
        if initializer.needs_lora and lora is None:
            raise LowbitError(f"init {initializer.name} sets the LoRA start: give it an adapter (--rank > 0)")
        self.calls: list[BlockCall] = []

    # ----- activations ----------------------------------------------------------------------------------------
    def stream(self, name: str, shape: tuple[int, ...]) -> Activations:
        """A new activation stream with the engine's storage dtype, in RAM or spilled to ``spill_dir``."""
        path = None if self.opts.spill_dir is None else Path(self.opts.spill_dir) / f"{name}.bin"
        return Activations(shape, self.opts.act_dtype, path)

    def capture_calls(self) -> torch.Tensor:
        """Record the arguments the model passes to each block; returns the block-0 input of window 0."""
        assert self.calib is not None
        self.calls, h0 = _record(self.blocks, self.model, self.calib[:1], len(self.blocks) - 1)
        return h0

    def prepare(self) -> tuple[Activations, Activations]:
        """Capture per-block call arguments and the block-0 inputs of every calibration window."""
        h0 = self.capture_calls()
        shape = (self.calib.shape[0], *h0.shape[1:])
        x = self.stream("x", shape)
        for i in range(self.calib.shape[0]):
            _, h = _record(self.blocks, self.model, self.calib[i : i + 1], 0)
            x[i] = h[0]
        xq = self.stream("xq", shape)
        xq.data.copy_(x.data)
        return x, xq

    # ----- main loop --------------------------------------------------------------------------------------------
    def run(
        self,
        load_block: Callable[[int, nn.Module], None] | None = None,
        finish_block: Callable[[int, nn.Module, BlockResult, Activations | None, Activations | None], None]
        | None = None,
        start: int = 0,
        streams: tuple[Activations, Activations] | None = None,
    ) -> list[BlockResult]:
        """Initialize blocks ``start..`` in order; ``streams`` resumes with saved ``(x, xq)`` at block ``start``."""
        x = xq = None
        if self.initializer.needs_data:
            if streams is not None:
                x, xq = streams
                self.capture_calls()
            else:
                x, xq = self.prepare()
        results = []
        bar = tqdm(range(start, len(self.blocks)), desc=f"{self.initializer.name} {self.spec.name}",
                   disable=not self.opts.progress, initial=start, total=len(self.blocks), unit="block")  # fmt: skip
        for i in bar:
            t0 = time.perf_counter()
            block = self.blocks[i]
            if load_block is not None:
                load_block(i, block)
            stats = self._init_block(i, block, x, xq, bar)
            result = BlockResult(i, stats, time.perf_counter() - t0)
            results.append(result)
            if finish_block is not None:
                finish_block(i, block, result, x, xq)
        bar.close()
        return results

    def _init_block(self, i: int, block: nn.Module, x, xq, bar) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ctx = BlockContext(i, self.spec, self.lora, generator, self.options)

        def report(stats: dict) -> None:
            bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in stats.items()}, refresh=True)

        ctx.report = report
        bad = first_nonfinite(block)
        if bad is not None:  # a damaged input: say so, rather than blame the initializer for what it was given
            raise LowbitError(f"block {i}: the input model's {self.prefix}.{i}.{bad} contains NaN or inf; the model "
                              "file is damaged: re-export or re-download it")  # fmt: skip
        y = None
        if x is not None:
            call = self.calls[i]
            ctx.forward = lambda blk, h: run_block(blk, call, h)
            y = self.stream("y", tuple(x.shape))
            with torch.no_grad():
                for w in range(x.shape[0]):
                    y[w] = ctx.forward(block, x[w : w + 1].float())[0]
            ctx.x, ctx.xq, ctx.y = x.data, xq.data, y.data
        try:
            stats = self.initializer.init_block(block, ctx)
        except FloatingPointError as exc:
            bad = first_nonfinite(block)
            where = f", first non-finite tensor {self.prefix}.{i}.{bad}" if bad is not None else ""
            raise LowbitError(f"block {i} ({self.prefix}.{i}){where}: {exc}; lower the learning rates") from exc
        bad = first_nonfinite(block)
        if bad is not None:
            raise LowbitError(f"{self.prefix}.{i}.{bad} contains NaN or inf; the block's initialization diverged")
        if x is not None:
            with torch.no_grad():
                for w in range(xq.shape[0]):
                    out = ctx.forward(block, xq[w : w + 1].float())[0]
                    if not torch.isfinite(out).all():
                        raise LowbitError(f"block {i} ({self.prefix}.{i}) produced NaN/inf activations on window {w}")
                    xq[w] = out
                x.data.copy_(y.data)
                num = sum(float((xq[w].float() - x[w].float()).pow(2).sum()) for w in range(x.shape[0]))
                den = sum(float(x[w].float().pow(2).sum()) for w in range(x.shape[0]))
                stats = {**stats, "mse": num / x.data.numel(), "rel_error": math.sqrt(num / max(den, 1e-30))}
            del y
        return stats


def first_nonfinite(block: nn.Module) -> str | None:
    """Name of the block's first floating-point parameter or buffer holding NaN or inf, or None."""
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None
