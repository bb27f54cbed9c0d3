"""Where lowbit computes (``--device auto|cpu|cuda|cuda:N``) and where calibration keeps its activation streams.

One helper, :func:`resolve_device`, turns what a user wrote into a ``torch.device`` (``auto``: the current CUDA
GPU when there is one, else the CPU) and names the fix in one line when the machine cannot do what was asked, so
every command and API function reads ``--device`` the same way.

Calibration carries three activation streams (``x``, ``xq``, ``y``; ``[windows, seq, hidden]`` each) from block to
block. :func:`stream_placement` is the pure decision of where they live: on the compute device when all three fit
its budget, otherwise in host memory (pinned on CUDA, so the window-by-window copies run at full bus speed) or in
memory-mapped files when spilling was asked for. :func:`default_budget` supplies the budget: on CUDA a share of
the free memory, the rest being left for the block's working set (weights, Gram matrices, ApiQ's autograd
activations); on the CPU device and host memory are the same RAM, so the budget is unbounded unless spilling was
asked for, which keeps the CPU results and memory exactly what they were before devices existed.

:func:`deterministic_backward` makes a block's training steps sum in a fixed order on CUDA, so that calibration
resumed after a kill gives the uninterrupted run's tensors bit for bit there too.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator

import torch

from lowbit.errors import LowbitError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# Share of the free CUDA memory the activation streams may take by default; the rest is the block's working set.
DEVICE_SHARE = 0.5
GIB = 2**30

DEVICE = "device"  # the streams live on the compute device (on the CPU: ordinary RAM)
HOST = "host"  # in host RAM (pinned when the device is CUDA), moved to the device window by window
SPILL = "spill"  # in memory-mapped files, moved to the device window by window
PLACEMENTS = (DEVICE, HOST, SPILL)

# Devices whose training backward runs under torch's deterministic mode (the CPU's kernels sum in a fixed order
# already, so its results stay exactly what they were).
DETERMINISTIC_DEVICE_TYPES = ("cuda",)
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for a ``--device`` value; raises LowbitError when this machine cannot provide it."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, colon, index = name.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise LowbitError(f"unknown device {device!r}: use --device {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise LowbitError(f"--device {device} asks for a GPU but {why}: use --device cpu (or auto)")
    count = torch.cuda.device_count()
    number = int(index) if index else torch.cuda.current_device()
    if number >= count:
        raise LowbitError(f"--device {device}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}: "
                          f"use --device cuda:0 ... cuda:{count - 1} (or auto)")  # fmt: skip
    return torch.device("cuda", number)


def parse_budget(gib: float | None) -> int | None:
    """Bytes for an ``--act-budget`` given in GiB (None: automatic); a negative budget is a user mistake."""
    if gib is None:
        return None
    if gib < 0 or not math.isfinite(gib):
        raise LowbitError(f"--act-budget {gib} GiB is not a memory size: give a number of GiB >= 0, or leave it out")
    return int(gib * GIB)


def default_budget(device: torch.device, spill: bool) -> float:
    """Bytes of ``device`` memory the activation streams may take when the user set no budget.

    CUDA: :data:`DEVICE_SHARE` of the memory free right now. CPU: unbounded (RAM is both places), or 0 with
    ``spill``, whose point on the CPU is to keep the streams out of RAM.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return DEVICE_SHARE * free
    return 0.0 if spill else math.inf


def stream_placement(stream_bytes: int, budget: float, spill: bool) -> str:
    """Where calibration's activation streams live: ``device`` when ``stream_bytes`` (all of them together) fit
    ``budget``, else ``spill`` (memory-mapped files) when spilling was asked for, else ``host``."""
    if stream_bytes <= budget:
        return DEVICE
    return SPILL if spill else HOST


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products in full float32 (no TF32 or bf16 passes) inside, whatever the caller chose.

    Calibration accumulates Gram matrices and fits block outputs: precision-critical math that a benchmark or a
    notebook switching on TF32 for speed (``torch.set_float32_matmul_precision("high")``) must not degrade.
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


PRECISIONS = ("auto", "fp32", "bf16")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` (:data:`PRECISIONS`) computes in bf16 on ``device``: ``auto`` does on a CUDA GPU with
    bf16 units (Ampere or later; torch emulates bf16 on older ones, slowly), as PEFT + bitsandbytes users run, and
    keeps float32 on the CPU, where lowbit's results are exact."""
    if precision not in PRECISIONS:
        raise LowbitError(f"unknown precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.get_device_properties(device).major >= 8
    return precision == "bf16"


@contextlib.contextmanager
def inference_precision(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """Run ``model`` for inference in ``precision`` inside: in bf16 its float32 parameters (embeddings, head,
    norms, LoRA factors; the packed weights are buffers and stay as they are) are bf16 -- half their memory and no
    cast per call -- and everything runs under bf16 autocast, as P4's decoding rows run (there the LoRA factors
    stay float32 and autocast casts them per call); the float32 parameters come back on exit. In float32 nothing
    changes."""
    device = next(itertools.chain((p.device for p in model.parameters()), (b.device for b in model.buffers())),
                  torch.device("cpu"))  # fmt: skip
    if not uses_bf16(precision, device):
        yield
        return
    originals = {p: p.data for p in model.parameters() if p.dtype == torch.float32}
    try:
        for p, data in originals.items():
            p.data = data.to(torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        for p, data in originals.items():
            p.data = data


def place_model(model: torch.nn.Module, device: str | torch.device | None) -> torch.nn.Module:
    """``model`` moved (in place) to the device ``device`` names; None leaves it where it is."""
    return model if device is None else model.to(resolve_device(device))


def prepare_deterministic(device: torch.device) -> None:
    """Let :func:`deterministic_backward` run cuBLAS on ``device``: torch's deterministic mode refuses every cuBLAS
    product unless ``CUBLAS_WORKSPACE_CONFIG`` names a fixed workspace, and torch reads that variable once, at the
    process's first CUDA matrix product. The CLI calls this as soon as ``--device`` names a GPU, the engine again
    before calibrating (for API callers); child processes inherit it. A value already set is kept: one other than
    ``:4096:8`` or ``:16:8``, like a process that multiplied on CUDA before this, makes torch refuse the mode, and
    calibration goes on without it and warns (see there). The fixed workspace may move cuBLAS results by the last
    bits against a process without it."""
    if device.type in DETERMINISTIC_DEVICE_TYPES:
        os.environ.setdefault(CUBLAS_ENV, ":4096:8")


@contextlib.contextmanager
def deterministic_backward(device: torch.device) -> Iterator[None]:
    """Torch's deterministic algorithms (strict) inside on CUDA, whatever the caller chose; nothing elsewhere.

    Why: a calibration resumed after a kill must give the uninterrupted run's tensors bit for bit, and two runs of
    one command the same tensors. In a Llama-style block's training step on CUDA one kernel sums in no fixed order:
    the backward of float32 memory-efficient attention (what SDPA picks for float32), which splits long key ranges
    (2048-token windows: several splits, by PyTorch's heuristic) and adds the parts' gradients with atomics; in
    deterministic mode it keeps one split (read from PyTorch's source, not yet observed on a GPU). Where torch
    refuses (an op with no deterministic kernel), a RuntimeError that says so is raised inside:
    :func:`lowbit.init.base.train_block` then goes on without this mode, and warns. Uninitialized allocations
    (``torch.empty``) stay unfilled, as outside (the mode would fill each with NaN, at a cost).

    The flags are the process's, not the thread's: another thread's CUDA work during the scope runs in this mode.
    """
    if device.type not in DETERMINISTIC_DEVICE_TYPES:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = fill and before[0]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
