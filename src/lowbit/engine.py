"""The calibration engine: runs a model block by block and hands each block to an initializer.

It carries two activation streams over the calibration windows: ``x``, produced by the full-precision earlier
blocks, and ``xq``, produced by the already-quantized earlier blocks (with their LoRA). Block ``i`` is
initialized from ``(x_i, xq_i, y_i = block_fp(x_i))``; then ``x_{i+1} = y_i`` and ``xq_{i+1} = block_q(xq_i)``.
Feeding each block the inputs the quantized model will really give it is what keeps error from piling up with
depth.

The engine holds only the current block in full precision: blocks are fetched with ``load_block`` just before
their turn, moved to the compute device (``EngineOptions.device``; a CUDA GPU or the CPU), initialized there, moved
back to where they came from and handed to ``finish_block`` (which may write them out and free them) -- so one
block's weights are on the GPU at a time, whatever the model's size. The activation streams live on the device
when they fit its budget, otherwise in host memory or memory-mapped files (:mod:`lowbit.device` decides), and
initializers read them one window (or one batch of windows) at a time through ``BlockContext.window``, which copies
to the device; they can be stored in float16/bfloat16, so peak memory does not grow with depth. Where they live
changes no result: the same operations run on the same values. The keyword arguments a model passes to each block
(rotary tables, masks; they differ per block on Gemma 2/3) are captured once by running the model with the blocks
replaced by recorders -- no architecture-specific code -- and moved to the device.

The last ``holdout_windows`` calibration windows (an option, default 0) are carried in the streams but hidden from
the initializer: the per-block ``mse`` / ``rel_error`` are then measured on them, and ``train_mse`` /
``train_rel_error`` on the windows the initializer fitted, so a method that learns its calibration text shows it.
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

from lowbit import kernels
from lowbit.arch import find_blocks
from lowbit.config import Calibration, LoraSpec
from lowbit.device import (
    DEVICE,
    HOST,
    SPILL,
    default_budget,
    exact_float32,
    prepare_deterministic,
    resolve_device,
    stream_placement,
)
from lowbit.errors import LowbitError
from lowbit.init import BlockContext, Initializer
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


def to_device(value, device: torch.device):
    """``value`` with every tensor inside (nested tuples, lists, dicts) moved to ``device``; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def tensors_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer that is not on the meta device (None: none is)."""
    for t in [*module.parameters(), *module.buffers()]:
        if not t.is_meta:
            return t.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids must be: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


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


# The activation streams alive at once while a block is initialized: x, xq and the block's outputs y.
STREAMS = 3


class Activations:
    """``[n, seq, hidden]`` activations stored as float32, float16 or bfloat16: on ``device`` (RAM on the CPU, GPU
    memory on CUDA), in host memory (``pin``: page-locked, for fast copies to a GPU) or in a memory-mapped file.
    Values written are converted on their own device first, so a GPU sends the smaller stored dtype over the bus."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        path: Path | None = None,
        device: torch.device | str = "cpu",
        pin: bool = False,
    ) -> None:
        self.path = path
        if path is None:
            self.data = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
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
    # Memory-map activations to files here when they do not fit the device budget (on the CPU: always, unless
    # ``act_budget`` lets them stay in RAM) instead of keeping them in host RAM.
    spill_dir: Path | None = None
    progress: bool = True
    # Where blocks are initialized: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch.device; None: where the
    # model's blocks already are (the CPU for blocks streamed from disk).
    device: str | torch.device | None = None
    # Bytes of device memory the activation streams may take; None: ``lowbit.device.default_budget``.
    act_budget: int | None = None


@dataclass
class BlockResult:
    index: int
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0


class Engine:
    """Quantize/initialize every block of ``model`` in order with ``initializer`` (made with its options).

    ``options`` is the config's recorded options dict, read here for the calibration record
    (:class:`~lowbit.config.Calibration`: how many windows are held out).
    """

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
        self.seed, self.calib = seed, calib
        self.opts = engine or EngineOptions()
        self.prefix, self.blocks = find_blocks(model)
        if initializer.needs_data and calib is None:
            raise LowbitError(f"init {initializer.name} needs calibration windows (--calib)")
        if initializer.needs_lora and lora is None:
            raise LowbitError(f"init {initializer.name} sets the LoRA start: give it an adapter (--rank > 0)")
        self.holdout = holdout_windows(options, calib) if initializer.needs_data else 0
        self.calls: list[BlockCall] = []
        if self.opts.device is not None:
            self.device = resolve_device(self.opts.device)
        else:
            self.device = tensors_device(self.blocks) or torch.device("cpu")
        prepare_deterministic(self.device)
        spill = self.opts.spill_dir is not None
        self.budget = self.opts.act_budget if self.opts.act_budget is not None else default_budget(self.device, spill)
        self.placement: str | None = None  # where the streams live, decided by the first one made

    # ----- activations ----------------------------------------------------------------------------------------
    def stream(self, name: str, shape: tuple[int, ...]) -> Activations:
        """A new activation stream with the engine's storage dtype, where :func:`lowbit.device.stream_placement`
        puts the engine's streams: on the device, in (pinned) host memory or spilled to ``spill_dir``."""
        if self.placement is None:
            nbytes = STREAMS * math.prod(shape) * self.opts.act_dtype.itemsize
            self.placement = stream_placement(nbytes, self.budget, self.opts.spill_dir is not None)
        if self.placement == SPILL:
            return Activations(shape, self.opts.act_dtype, Path(self.opts.spill_dir) / f"{name}.bin")
        if self.placement == HOST:
            return Activations(shape, self.opts.act_dtype, pin=self.device.type == "cuda")
        assert self.placement == DEVICE
        return Activations(shape, self.opts.act_dtype, device=self.device)

    def capture_calls(self) -> torch.Tensor:
        """Record the arguments the model passes to each block (moved to the device); returns the block-0 input
        of window 0."""
        assert self.calib is not None
        calls, h0 = _record(self.blocks, self.model, self.calib[:1].to(input_device(self.model)), len(self.blocks) - 1)
        self.calls = [BlockCall(to_device(c.args, self.device), to_device(c.kwargs, self.device)) for c in calls]
        return h0

    def prepare(self) -> tuple[Activations, Activations]:
        """Capture per-block call arguments and the block-0 inputs of every calibration window."""
        h0 = self.capture_calls()
        shape = (self.calib.shape[0], *h0.shape[1:])
        x = self.stream("x", shape)
        for i in range(self.calib.shape[0]):
            _, h = _record(self.blocks, self.model, self.calib[i : i + 1].to(input_device(self.model)), 0)
            x[i] = h[0]
        xq = self.stream("xq", shape)
        xq.data.copy_(x.data)
        return x, xq

    # ----- main loop --------------------------------------------------------------------------------------------
    @exact_float32()
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
            home = tensors_device(block) or self.device
            block.to(self.device)
            # Quantized layers run on the kernel whose numerics do not depend on autotuning: triton-dequant
            # dequantizes element by element (no reduction whose order a tile choice could change) and hands the
            # weight to the dense matmul, as the reference does (the reference itself where Triton is absent, and
            # on the CPU). A resumed run, in another process with its own autotuning, then equals an uninterrupted
            # one bit for bit on CUDA too.
            with kernels.pinned(CALIBRATION_KERNEL):
                stats = self._init_block(i, block, x, xq, bar)
            block.to(home)  # back to the CPU for saving, or to the caller's model device
            result = BlockResult(i, stats, time.perf_counter() - t0)
            results.append(result)
            if finish_block is not None:
                finish_block(i, block, result, x, xq)
        bar.close()
        return results

    def _init_block(self, i: int, block: nn.Module, x, xq, bar) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ctx = BlockContext(i, self.spec, self.lora, generator, device=self.device)

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
                    y[w] = ctx.forward(block, ctx.window(x.data, w))[0]
            train = x.shape[0] - self.holdout  # the initializer never sees the held-out windows
            ctx.x, ctx.xq, ctx.y = x.data[:train], xq.data[:train], y.data[:train]
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
                    out = ctx.forward(block, ctx.window(xq.data, w))[0]
                    if not torch.isfinite(out).all():
                        raise LowbitError(f"block {i} ({self.prefix}.{i}) produced NaN/inf activations on window {w}")
                    xq[w] = out
                x.data.copy_(y.data)
                train = x.shape[0] - self.holdout
                if self.holdout:
                    fit = stream_error(ctx, x.data, xq.data, range(train))
                    stats = {**stats, "train_mse": fit[0], "train_rel_error": fit[1]}
                mse, rel_error = stream_error(ctx, x.data, xq.data, range(train if self.holdout else 0, x.shape[0]))
                stats = {**stats, "mse": mse, "rel_error": rel_error}
            del y
        return stats


CALIBRATION_KERNEL = "triton-dequant"


def holdout_windows(options: dict, calib: torch.Tensor | None) -> int:
    """How many of the last calibration windows are held out (option ``holdout_windows`` of
    :class:`~lowbit.config.Calibration`, default 0).

    Held-out windows run through both streams like the others but are hidden from the initializer, so the block
    error the engine reports on them shows what a method does off the text it was fitted to (ApiQ-bw's LoRA can
    learn its few calibration windows: its error on them says little about other text). The training windows
    come first, so a sampler that draws ``n + holdout`` windows from one permutation trains on exactly the
    ``n`` windows it would have drawn without holdout.
    """
    holdout = Calibration.from_record(options).holdout_windows
    if holdout and (calib is None or calib.shape[0] <= holdout):
        have = 0 if calib is None else calib.shape[0]
        raise LowbitError(f"{holdout} held-out windows need at least {holdout + 1} calibration windows, got "
                          f"{have}: lower --holdout-windows or give more windows")  # fmt: skip
    return holdout


def stream_error(ctx: BlockContext, x: torch.Tensor, xq: torch.Tensor, windows: range) -> tuple[float, float]:
    """``(mse, relative error)`` of the quantized stream ``xq`` against ``x`` over ``windows``."""
    num = den = 0.0
    for w in windows:
        ref = ctx.window(x, w)[0]
        num += float((ctx.window(xq, w)[0] - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / (len(windows) * x[0].numel()), math.sqrt(num / max(den, 1e-30))


def first_nonfinite(block: nn.Module) -> str | None:
    """Name of the block's first floating-point parameter or buffer holding NaN or inf, or None."""
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None
