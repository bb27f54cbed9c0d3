"""The kernel seam: which implementation computes a QuantLinear's ``x @ dequant(Q)^T``.

A kernel is a :class:`Kernel`: a function ``matmul(layer, x)`` plus one declaration of what it supports (formats,
bits, group sizes, devices, activation dtypes, rows ``M``, whether it has a backward). :func:`select` picks, per
call, the first kernel in :data:`PREFERENCE` whose declaration covers the call; :mod:`lowbit.kernels.reference`
(dequantize with torch ops, then one matmul) covers everything and is the fallback, so NormalFloat at odd group
sizes, odd shapes, training on the CPU and anything new always run.

The kernels, in the order they are preferred (the Triton ones are imported only when a CUDA tensor is seen, so
CPU-only installs never import Triton):

- ``torch-int4`` (CPU and CUDA, int W2-W4, M <= 16, forward): PyTorch's own int4 matmul (tinygemm on CUDA), the
  decoding kernel on both devices; it adds the layer's LoRA itself, from a copy of the factors kept ready for
  decoding (:mod:`lowbit.kernels.lora`). On an H100 (``bench/gpu.py`` graph rows, commit cd0db78) a Llama-2-7B layer at
  one row takes 15.0 us on it against 49.7 us on ``triton-decode``, 34.9 us dense bf16 and 23.6 us bitsandbytes
  NF4 (52.9 against 74.2 us at 16 rows), and a 1.1B W4 model decodes at 237.8 tokens/s on it against 174.9 on
  ``triton-decode``. It reads W2/W3 codes as shifted 4-bit ones, so it keeps a repacked copy, half a byte a
  weight, beside the packed codes (on a GPU only where it fits; :func:`drop_caches`); layers that read one tensor
  (q/k/v, gate/up) share one copy and one call per step once :func:`prepare_decoding` has fused them
  (:mod:`lowbit.kernels.siblings`). It computes in bf16
  (decoding perplexity within 0.7% of the float32 reference's, top-1 the same for 96.9-99.2% of tokens -- more
  often than running the model in bf16 does; ``bench/cpu_int4.py``) and needs no Triton;
- ``triton-decode`` (M <= 16): fused dequantize + GEMV / small GEMM with split-K, for what tinygemm does not take
  (NormalFloat, W8, fp16 activations, group sizes other than 32-256, outputs not in sixteens, GPUs before Ampere,
  layers whose repacked copy does not fit);
- ``triton-gemm`` (M <= 1024): fused dequantize + GEMM forward and ``grad_x`` backward, for prefill and small
  training batches;
- ``triton-dequant`` (any M): one-kernel dequantization into a transient weight, then cuBLAS (forward and
  backward), for large training batches, where the matmul is compute-bound;
- ``triton-gemv`` (M = 1, forward): a GEMV laid out for bandwidth, run only where pinned: 28.9 us on the layer
  above, slower than tinygemm.

The M limits of the Triton kernels are first guesses. They read the checkpoint's packed bytes in place (packing
version 1, see :mod:`lowbit.quant.packing`): nothing is repacked or kept beside the packed codes.

Pinning: ``with kernels.pinned("reference"):`` or ``LOWBIT_KERNEL=reference`` in the environment makes every call
use that kernel wherever it supports the call (the reference elsewhere); the tests use it to get the reference
numerics on any device, and the calibration engine pins ``triton-dequant`` (in float32 the reference's numerics,
with no sum whose order an autotuned tile sets). Pin-only kernels (:data:`PIN_ONLY`) run nowhere else. Under
``torch.compile`` the pin is read when a function is traced.

Steady blocks: an eager call checks that the kernels' state is current (the selection, each copy's source buffers
and LoRA factors, by identity and version counter), which at one row costs about as much Python as the product
itself. Decoding repeats the same calls token after token with nothing changing, so ``with kernels.steady():``
(``generate``, ``translate`` and :func:`lowbit.decode.greedy` decode inside one) checks each layer's state at its
first call in the block and trusts it after (:func:`steady_token`), as a compiled step trusts what it was traced
with.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import reference

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

ENV_VAR = "LOWBIT_KERNEL"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Kernel:
    """A matmul implementation and what it supports; ``None`` in a field means "any"."""

    name: str
    matmul: Callable[[QuantLinear, torch.Tensor], torch.Tensor]  # x [..., in] -> x @ dequant(Q)^T [..., out]
    # (plus the LoRA where ``adds_lora``)
    formats: tuple[str, ...] | None = None
    bits: tuple[int, ...] | None = None
    group_multiple: int | None = None  # group sizes: multiples of this, or -1 (one group per row)
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    has_backward: bool = True
    max_m: int | None = None  # rows of x (all leading dimensions together)
    layer_check: Callable[[QuantLinear], bool] | None = None  # shape limits the fields above cannot say
    caches: tuple[str, ...] = ()  # the layer attributes where the kernel keeps state made from a layer (drop_caches)
    adds_lora: bool = False  # ``matmul`` also adds the layer's LoRA, ``s B A x`` (the layer then does not)

    def supports(self, layer: QuantLinear, x: torch.Tensor, training: bool) -> bool:
        """Whether this kernel computes ``layer(x)`` (``training``: in grad mode, where autograd may differentiate
        the call, so kernels without a backward -- the decoding ones -- are left out)."""
        if training and not self.has_backward:  # the cheap refusals first: a training call asks every kernel
            return False
        spec = layer.spec
        m = x.numel() // max(x.shape[-1], 1)
        return (
            m > 0
            and (self.max_m is None or m <= self.max_m)
            and (self.formats is None or spec.format in self.formats)
            and (self.bits is None or spec.bits in self.bits)
            and (self.group_multiple is None or spec.group_size == -1 or spec.group_size % self.group_multiple == 0)
            and (self.devices is None or x.device.type in self.devices)
            and (self.dtypes is None or compute_dtype(x) in self.dtypes)
            and (self.layer_check is None or self.layer_check(layer))  # last: it may measure free memory
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes ``x`` in: the autocast dtype inside autocast, else ``x``'s own.

    Autocast leaves float64 (and non-float) inputs alone, so those keep their dtype (and get the reference).
    """
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


REFERENCE = Kernel("reference", reference.matmul)
# Fast kernels in order of preference (the first that supports a call runs it); the reference comes last.
PREFERENCE = ("torch-int4", "triton-decode", "triton-gemm", "triton-dequant", "reference")
# Kernels that run only where pinned: measured no faster than the one preferred for the same calls.
PIN_ONLY = ("triton-gemv",)
NAMES = PREFERENCE + PIN_ONLY

_pinned: str | None = None  # set by ``pinned``
# ``token``: this thread's current ``steady`` block's token (absent outside one); per thread, so that a block on
# one thread never lets another thread's calls skip their checks
_steady = threading.local()
SELECTED = "_kernel_choice"  # the layer attribute holding its kernel within a steady block (see select)
_gpu_table: dict[str, Kernel] | None = None  # filled by ``_gpu_kernels`` on first use
_torch_table: dict[str, Kernel] | None = None  # filled by ``_torch_kernels`` on first use


def _gpu_kernels() -> dict[str, Kernel]:
    """The kernels that may run on CUDA, by name: the Triton ones (none where Triton cannot be imported) and those
    on torch's own ops.

    Cached in a module global rather than ``functools.cache``, which ``torch.compile`` would trace through.
    """
    global _gpu_table
    if _gpu_table is None:
        try:
            from lowbit.kernels import triton_decode, triton_dequant, triton_gemm, triton_gemv
        except ImportError:
            found = ()
        else:
            found = (triton_decode.KERNEL, triton_gemm.KERNEL, triton_dequant.KERNEL, triton_gemv.KERNEL)
        _gpu_table = {k.name: k for k in found} | _torch_kernels()
    return _gpu_table


def _torch_kernels() -> dict[str, Kernel]:
    """The kernels on torch's own ops other than the reference, by name (torch-int4 where this torch has its ops:
    2.6 and later); they run on the CPU and, where they declare it, on CUDA."""
    global _torch_table
    if _torch_table is None:
        from lowbit.kernels import torch_int4

        _torch_table = {torch_int4.KERNEL.name: torch_int4.KERNEL} if torch_int4.AVAILABLE else {}
    return _torch_table


def kernel(name: str) -> Kernel:
    """The kernel called ``name`` (one of :data:`NAMES`); a clear error for unknown or unavailable ones."""
    if name not in NAMES:
        raise LowbitError(f"unknown kernel {name!r}; choose one of {', '.join(NAMES)}")
    if name == REFERENCE.name:
        return REFERENCE
    found = _torch_kernels().get(name) or _gpu_kernels().get(name)
    if found is None:
        needs = "torch 2.6 or later" if name == "torch-int4" else "Triton, which cannot be imported here"
        raise LowbitError(f"kernel {name!r} needs {needs}; install it")
    return found


@contextmanager
def pinned(name: str) -> Iterator[None]:
    """Use kernel ``name`` wherever it supports a call (the reference elsewhere) inside the ``with`` block."""
    global _pinned
    if name not in NAMES:
        raise LowbitError(f"unknown kernel {name!r}; choose one of {', '.join(NAMES)}")
    previous, _pinned = _pinned, name
    try:
        yield
    finally:
        _pinned = previous


def pinned_name() -> str | None:
    """The pinned kernel's name (``pinned`` first, then ``$LOWBIT_KERNEL``), or None."""
    name = _pinned or os.environ.get(ENV_VAR) or None
    if name is not None and name not in NAMES:
        raise LowbitError(f"{ENV_VAR}={name!r} names no kernel; choose one of {', '.join(NAMES)}")
    return name


def select(layer: QuantLinear, x: torch.Tensor, training: bool) -> Kernel:
    """The kernel that computes ``layer``'s base product for input ``x`` (``training``: grad mode is on); in a
    :func:`steady` block chosen once per input shape, dtype and grad mode."""
    token = steady_token()
    if token is not None:
        key = (token, x.shape[:-1], x.dtype, training)
        memo = layer.__dict__.get(SELECTED)
        if memo is not None and memo.key == key:
            return memo.kernel
    chosen = REFERENCE
    name = pinned_name()
    fast = _fast_kernels(x.device.type)
    for candidate in (name,) if name else PREFERENCE:
        found = fast.get(candidate)
        if found is not None and found.supports(layer, x, training):
            chosen = found
            break
    if token is not None:
        layer.__dict__[SELECTED] = Selection(key, chosen)  # not a buffer: never in the state dict
    return chosen


@contextmanager
def steady() -> Iterator[None]:
    """A block of eager calls that change nothing the kernels read: inside it each layer's kernel state -- its
    selection, its copies' source buffers and LoRA factors -- is checked at the layer's first call and trusted after.

    Decoding is such a block: a one-row step is mostly Python, and these checks were 10-23% of one on the CPU in two
    runs (the default model at W4 with a LoRA: ``bench/cpu_int4.py``'s ``steady-w4`` row). Inside one, the model's
    packed buffers, LoRA factors and scalings, dropout modes, devices, the kernel pin and the autocast state must not
    change (the grad mode and the input's shape and dtype may: they are part of what a selection is kept for); a
    change made between two blocks is seen by the next, which checks everything again. Compiled code ignores the
    block (it checks identity only, as ever)."""
    previous = getattr(_steady, "token", None)
    _steady.token = object()
    try:
        yield
    finally:
        _steady.token = previous


def steady_token() -> object | None:
    """The current :func:`steady` block's token -- what a kernel's state records when it was last checked, so that
    it is checked once a block -- or None outside one and while compiling (``torch.compile`` folds this away rather
    than guarding on the global)."""
    return None if torch.compiler.is_compiling() else getattr(_steady, "token", None)


def prepare_decoding(model: torch.nn.Module, rows: int = 1, fuse: bool = True) -> tuple[int, int]:
    """Before decoding ``rows`` rows a step (batch x beams): make the kernels' per-layer copies (torch-int4's repacked
    codes) now -- on a GPU while they fit, rather than inside a compiled decoding step -- and, with ``fuse``, one
    copy for each set of layers that read one tensor (:mod:`lowbit.kernels.siblings`); (layers given a copy, layers
    left to another kernel). A no-op where a pin keeps torch-int4 from running or for steps too large for it."""
    pin = pinned_name()
    int4 = _torch_kernels().get("torch-int4")
    if int4 is None or pin not in (None, int4.name):
        return 0, 0
    from lowbit.kernels import torch_int4

    return torch_int4.prepare(model, rows, fuse)


def keep_lora_copies(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Before decoding with activations in ``dtype``: make the LoRA copies torch-int4 adds the layers' LoRA from, or
    bring them up to date with the factors, in place (:mod:`lowbit.kernels.lora`; a compiled step can check their
    identity only). :func:`prepare_decoding` and :func:`lowbit.decode.greedy` call it; a no-op where a pin keeps
    torch-int4 from running."""
    pin = pinned_name()
    if "torch-int4" not in _torch_kernels() or pin not in (None, "torch-int4"):
        return
    from lowbit.kernels import torch_int4

    torch_int4.keep_loras(model, dtype)


def drop_caches(module: torch.nn.Module) -> None:
    """Forget what kernels keep beside the quantized layers' buffers in ``module`` (torch-int4's repacked codes and
    LoRA copies), freeing that memory; the next call that needs it makes it again. ``QuantLinear`` calls this itself
    when its buffers are replaced, loaded or moved; call it after writing them or the LoRA factors through ``.data``
    (which version counters do not see)."""
    names = [SELECTED, *(name for k in (*_torch_kernels().values(), *(_gpu_table or {}).values()) for name in k.caches)]
    for layer in module.modules():
        for name in names:
            cached = layer.__dict__.pop(name, None)
            release = getattr(cached, "release", None)
            if release is not None:  # a copy shared with sibling layers: it goes for all of them
                release()


def input_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """What a model's activations start from, which tells their dtype and device: its input embeddings' weight,
    else its first float parameter (None for a model with neither)."""
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without embeddings
        weight = None
    if weight is None:
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return weight


def _absent() -> None:
    """What a pickled :class:`LayerState` loads as: nothing (the kernel makes its state again when it needs it)."""
    return None


class LayerState:
    """Base of what a kernel keeps on a layer beside its buffers (a copy made from them, a place in a group).

    Copies and pickles of a model carry none of it: the state points at the original layers, weakly, and the kernel
    makes it again for the copy."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return _absent, ()


class Selection(LayerState):
    """A layer's kernel as :func:`select` chose it in a steady block, for the ``key`` of that block's calls (a
    copied or pickled model has none: a kernel's declaration need not pickle)."""

    __slots__ = ("kernel", "key")

    def __init__(self, key: tuple, kernel: Kernel) -> None:
        self.key = key
        self.kernel = kernel


def layer_buffers(layer: QuantLinear) -> tuple[torch.Tensor | None, ...]:
    """The buffers a kernel's copy of ``layer`` is made from: packed codes, scales, zero points (None without)."""
    return layer.qweight, layer.scales, layer.qzeros if layer.spec.has_zeros else None


def version_of(tensor: torch.Tensor | None) -> int | None:
    """The tensor's in-place-change counter (None for a missing tensor and for an inference-mode tensor, which has
    none): with its identity, what tells a kernel's copy or kept output that its source changed."""
    return None if tensor is None or tensor.is_inference() else tensor._version


def versions(tensors: tuple[torch.Tensor | None, ...]) -> tuple[int | None, ...]:
    """The tensors' :func:`version_of` counters."""
    return tuple(map(version_of, tensors))


def made_from(layer: QuantLinear, buffers: tuple, made: tuple | None, check_versions: bool = True) -> bool:
    """Whether ``layer`` still has the ``buffers`` a kernel's copy was made from (by identity) and, with
    ``check_versions``, their contents then (``made``: their :func:`versions`). Compiled code checks identity only:
    it cannot read version counters."""
    now = layer_buffers(layer)
    same = all(a is b for a, b in zip(now, buffers, strict=True))
    return same and (not check_versions or versions(now) == made)


def _fast_kernels(device_type: str) -> dict[str, Kernel]:
    """The kernels other than the reference that may run on ``device_type`` (Triton is imported for CUDA only)."""
    if device_type == "cuda":
        return _gpu_kernels()
    return _torch_kernels() if device_type == "cpu" else {}


__all__ = [
    "ENV_VAR",
    "FLOAT_DTYPES",
    "NAMES",
    "PIN_ONLY",
    "PREFERENCE",
    "REFERENCE",
    "SELECTED",
    "Kernel",
    "LayerState",
    "Selection",
    "compute_dtype",
    "drop_caches",
    "input_weight",
    "keep_lora_copies",
    "kernel",
    "layer_buffers",
    "made_from",
    "pinned",
    "prepare_decoding",
    "select",
    "steady",
    "steady_token",
    "version_of",
    "versions",
]
