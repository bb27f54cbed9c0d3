"""Decoding kernel for W2-W4 layers on PyTorch's own int4 matmul: tinygemm on CUDA, its twin on the CPU.

The reference kernel dequantizes the whole weight on every call, which at one token costs far more than the product
(``bench/cpu_int4.py``, commit d8ba512: 0.7 ms for a 576 -> 1536 layer at one row, 173 ms at Llama-2-7B's
4096 -> 11008). PyTorch ships an int4 matmul that reads 4-bit codes directly -- on CUDA the tinygemm kernel that
gpt-fast and torchao decode with (``torch._weight_int4pack_mm``), on the CPU its twin
(``torch._weight_int4pack_mm_for_cpu``). On the CPU it is 7-39x faster than the reference at one row, 2-8x at 16; at
64 rows it is slower on the small layers (0.8x), so beyond 16 rows (prefill, training) another kernel runs. It is
the decoding kernel on both devices: on an H100 it beats lowbit's Triton decoding kernels, dense bf16 and
bitsandbytes NF4 at one row (``graph-*`` rows of ``bench/gpu.py``; numbers in :mod:`lowbit.kernels`).

Its dequantization is ``(q - 8) * scale + m`` per group, with ``scale`` and ``m`` in bf16. lowbit's ``(q - z) * s``
(symmetric codes: ``z = 2^(bits-1)``) is that with ``m = (8 - z) s`` -- small for 4-bit codes, whose zero point
sits near 8. 2- and 3-bit codes are shifted instead, ``q - z + 8`` (within 1..15, since ``z`` is an integer code),
so that ``m = 0``: a large offset rounded to bf16 would cost up to 2% of the output. The codes are repacked once
into the op's 4-bit layout and kept on the layer -- not in its state dict -- until its buffers change (see
:func:`packed`). The ops are fast only on bf16 activations and bf16 scales (CUDA takes nothing else; on the CPU
float32 activations are 10-29x slower: ``int4pack_fp32_ms`` in ``bench/cpu_int4.py``'s layer rows), so a layer's
outputs differ from the float32 reference by about 0.4% of their largest magnitude.
What that costs a decoder is measured (``stepwise-w4/w3/w2`` rows of ``bench/cpu_int4.py``: the default model,
and at W2 P1's apiq-bw-gptq2 start, reading 256 tokens of PTB and of Bible text one token per call): perplexity
within 0.1% (W4), 0.7% (W3) and 0.4% (W2) of the float32 reference's, the same top-1 prediction for 96.9-99.2% of
tokens; the whole model run under bf16 autocast, as GPU users decode, moves perplexity by 0.2-1.1% and agrees on
92.5-97.7%. So it is the default where it applies; ``--kernel reference`` (``LOWBIT_KERNEL=reference``) gives float32
numerics. The repacked codes take half a byte a weight (as much as W4's packed codes, twice W2's), kept beside the
packed codes until the layer's buffers are moved, loaded or replaced, or :func:`lowbit.kernels.drop_caches` frees
them. :func:`prepare` gives layers that read one tensor one copy between them, concatenated along the outputs, so a
decoding step calls the op once for q/k/v and once for gate/up (:mod:`lowbit.kernels.siblings`).
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import torch

from lowbit import kernels
from lowbit.kernels import Kernel, compute_dtype, input_weight, layer_buffers, made_from, steady_token, versions
from lowbit.kernels.lora import LoraCopy, dropout_active
from lowbit.kernels.siblings import Member, Siblings, shared_input_groups

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

GROUPS = (32, 64, 128, 256)  # the group sizes the op accepts
MAX_M = 16  # beyond this the reference is as fast on the CPU (bench/cpu_int4.py)
CACHE = "_int4pack"  # the layer attribute holding the repacked codes (see packed; lowbit.kernels.drop_caches)
LORA_CACHE = "_int4lora"  # the layer attribute holding its own LoRA copy (a fused group's is the group's)
# What CACHE holds for a CUDA layer whose repacked copy did not fit (see has_room): it decodes on another kernel
# until lowbit.kernels.drop_caches (or a move, a load, new weights) clears it.
NO_ROOM = "no room"
HEADROOM = 0.1  # the share of the GPU's memory a repacked copy must leave free (the KV cache and activations grow)
_warned_no_room = False


def tinygemm_form(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as tinygemm reads it: ``[out, in]`` uint8 codes in 0..15 and ``[groups, out, 2]`` float32
    (scale, offset) pairs, so that ``(q - 8) * scale + offset`` is lowbit's ``(q - z) * s``. Bytes, not int32:
    a 4096 x 11008 layer's codes take 45 MB instead of 180 while they are repacked."""
    q = layer.quantized(torch.uint8)
    s = q.scales.float()
    z = q.zeros
    if z is None:
        z = torch.full(s.shape, 1 << (layer.spec.bits - 1), dtype=torch.uint8, device=s.device)
    codes = q.codes
    if layer.spec.bits < 4:  # shift the codes so that the offset is 0 (see the module docstring); q + 8 - z >= 1
        codes = codes + 8 - z.repeat_interleave(layer.in_features // z.shape[1], dim=1)
        z = torch.full_like(z, 8)
    return codes.contiguous(), torch.stack([s, (8 - z.float()) * s], dim=2).transpose(0, 1).contiguous()


def byte_pairs(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` codes in 0..15 two to a byte, ``[out, in / 2]`` uint8 with the even column in the high nibble:
    the input of the CUDA op's own retiling (``torch._convert_weight_to_int4pack``, torch 2.5 and later)."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()


def inner_k_tiles(in_features: int) -> int:
    """How many 16-wide k-tiles tinygemm's CUDA layout packs together: the most (8, 4 or 2) that ``in_features``
    holds a whole number of (every group size it takes is a multiple of 32, so 2 always fits)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def int4pack(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` uint8 codes in 0..15 in the op's layout for their device: the CUDA op retiles byte pairs
    (:func:`byte_pairs`), the CPU op takes int32 codes."""
    if codes.is_cuda:
        return torch._convert_weight_to_int4pack(byte_pairs(codes), inner_k_tiles(codes.shape[1]))
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)


def packed(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's codes in the op's layout and its bf16 (scale, offset) pairs, made on first use and remade when
    the packed codes, scales or zero points are replaced or changed in place.

    The cache holds the very buffers it was made from, so a replaced buffer is told by identity (its memory cannot
    be reused by a successor while the cache keeps it alive) and an in-place change by the version counter. Writes
    through ``.data`` bypass that counter: after ``layer.scales.data.copy_(...)``, call
    :func:`lowbit.kernels.drop_caches`. ``torch.compile`` cannot read version counters, so inside a compiled
    function only identity is checked; loading a state dict, ``set_weight`` and moving the layer (``.to``) drop the
    cache (``QuantLinear``), so a compiled model follows them too (it recompiles).
    """
    compiling = torch.compiler.is_compiling()
    token = steady_token()  # in a steady block (lowbit.kernels.steady) the buffers are checked at its first call only
    cached = getattr(layer, CACHE, None)
    if isinstance(cached, tuple):
        if token is not None and cached[4] is token:
            return cached[2], cached[3]
        if made_from(layer, cached[0], cached[1], check_versions=not compiling):
            if token is not None:
                layer.__dict__[CACHE] = (*cached[:4], token)
            return cached[2], cached[3]
    buffers = layer_buffers(layer)
    made = None if compiling else versions(buffers)
    codes, scales_and_offsets = tinygemm_form(layer)
    found = (int4pack(codes), scales_and_offsets.to(torch.bfloat16))
    layer.__dict__[CACHE] = (buffers, made, *found, token)  # not a buffer: never in the state dict
    return found


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T`` through the int4 op (bf16 inside) plus the layer's LoRA, returned in ``x``'s compute
    dtype: the layer's share of its siblings' product where :func:`prepare` fused it with them
    (:mod:`lowbit.kernels.siblings`)."""
    cached = getattr(layer, CACHE, None)
    if isinstance(cached, Member):
        y = cached.group.output(layer, cached.index, x)
        if y is not None:
            return y
    codes, scales_and_offsets = packed(layer)
    y = product(x, codes, scales_and_offsets, layer.spec.group_size)
    lora = own_lora(layer, y.dtype)
    if lora is not None:
        y = lora.add(y, x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], layer.out_features)


def product(x: torch.Tensor, codes: torch.Tensor, scales_and_offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """The op on ``x [..., in]`` and a repacked copy: ``[rows, out]`` in ``x``'s compute dtype."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
    return mm(x2, codes, group_size, scales_and_offsets).to(compute_dtype(x))


def fused_product(
    x: torch.Tensor, codes: torch.Tensor, scales_and_offsets: torch.Tensor, lora: LoraCopy, group_size: int
) -> torch.Tensor:
    """A sibling group's product (:func:`product`) with every member's LoRA added: ``[rows, sum of outputs]``."""
    return lora.add(product(x, codes, scales_and_offsets, group_size), x.reshape(-1, x.shape[-1]))


def own_lora(layer: QuantLinear, dtype: torch.dtype) -> LoraCopy | None:
    """The layer's LoRA copy for decoding alone (made on first use), or None for a layer that has no LoRA and never
    had one here."""
    copy = layer.__dict__.get(LORA_CACHE)
    if copy is None and layer.lora_A is not None:
        copy = layer.__dict__[LORA_CACHE] = LoraCopy([layer], dtype)
    return copy


def _fits(layer: QuantLinear) -> bool:
    """Shapes the ops take (group sizes in :data:`GROUPS`, outputs in sixteens) on a device they run on (tinygemm
    needs an Ampere or later GPU), with room for the repacked copy: elsewhere the call falls back instead of
    failing inside the op. The device's properties, unlike ``get_device_capability``, are constants to
    ``torch.compile``: no graph break."""
    device = layer.qweight.device
    if device.type == "cuda" and torch.cuda.get_device_properties(device).major < 8:
        return False
    return (
        layer.spec.group_size in GROUPS and layer.out_features % 16 == 0 and not dropout_active(layer)
        and has_room(layer)
    )  # fmt: skip


def repacked_bytes(layer: QuantLinear) -> int:
    """Bytes of a layer's repacked copy: half a byte a weight and a bf16 (scale, offset) pair per group and row."""
    groups = layer.in_features // layer.spec.group_size
    return layer.out_features * layer.in_features // 2 + groups * layer.out_features * 4


def memory_left(device: torch.device) -> tuple[int, int] | None:
    """(bytes a new tensor can take, the device's total) on a CUDA device -- the driver's free memory plus what
    torch's allocator holds unused -- or None where the copies are not counted (the CPU)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def has_room(layer: QuantLinear) -> bool:
    """Whether the layer's repacked copy exists or fits, leaving :data:`HEADROOM` of the GPU free.

    The copy doubles a W4 layer's memory and triples a W2 one's, and lowbit is chosen to fit large models on small
    GPUs: a layer whose copy would not fit decodes on another kernel (``triton-decode``: 3.3x tinygemm's time on a
    7B layer at one row) rather than running the GPU out of memory, and the first such layer says so. Checked once
    per layer, outside compiled code (a compiled call reads the answer; a copy first made inside compiled code is
    not checked, which is why :func:`prepare` makes them beforehand).
    """
    global _warned_no_room
    cached = getattr(layer, CACHE, None)
    if cached is not None or torch.compiler.is_compiling():
        return cached is not NO_ROOM
    left = memory_left(layer.qweight.device)
    need = repacked_bytes(layer)
    if left is None or need + HEADROOM * left[1] <= left[0]:
        return True
    layer.__dict__[CACHE] = NO_ROOM
    layer.__dict__.pop(kernels.SELECTED, None)  # a choice made in a steady block before the copy was refused
    if not _warned_no_room:
        _warned_no_room = True
        print(f"lowbit: warning: no room on the GPU for the torch-int4 kernel's repacked codes of a "
              f"{layer.out_features}x{layer.in_features} layer ({need / 2**20:.0f} MiB, keeping {HEADROOM:.0%} of "
              "the GPU free); it and any other such layer decode on another kernel, slower (a 1.1B W4 model: 1.36x "
              "the time a token). Free GPU memory to decode every layer on torch-int4",
              file=sys.stderr)  # fmt: skip
    return False


def prepare(model: torch.nn.Module, rows: int = 1, fuse: bool = True) -> tuple[int, int]:
    """Make the repacked copies of ``model``'s layers that will decode ``rows`` rows a step on this kernel now;
    returns (layers given a copy, layers left to another kernel). Steps of more than :data:`MAX_M` rows never read
    a copy: none is made.

    With ``fuse``, layers that read one tensor (q/k/v, gate/up: :mod:`lowbit.kernels.siblings`) get one copy between
    them, on every device, so each step calls the op once per group; a group lasts until a member's cache is dropped
    (:func:`lowbit.kernels.drop_caches`: a move, a load, new weights) and is made again by the next call. Without
    ``fuse`` existing groups are dissolved. The other layers' copies are made here on devices
    whose memory :func:`memory_left` counts (CUDA), layer by layer while they fit, and lazily elsewhere. Made
    lazily, a copy is checked against free memory at the layer's first eager decoding call. Under ``generate``'s
    static cache a prompt longer than :data:`MAX_M` rows is prefilled on another kernel and the first one-row call
    is compiled, where memory cannot be read, so every copy would be made unchecked; made here, eagerly, each layer
    sees the memory its predecessors' copies took.
    """
    from lowbit.layers import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return 0, 0
    dtype = activation_dtype(model)  # an fp16 model never decodes on this kernel: it gets no copies
    lora_dtype = compute_dtype(torch.empty(0, dtype=dtype, device=layers[0].qweight.device))  # under autocast too
    made = refused = 0
    # a compiled model is probed through the module it wraps: the probe's recorders would cost it a graph
    probed = getattr(model, "_orig_mod", model)
    for group in shared_input_groups(probed) if fuse and rows <= MAX_M and dtype in KERNEL.dtypes else ():
        # a PaFi/HiWi adapter on the weight computes its layer without this kernel: it would never take its share
        group = [m for m in group if m.adapter is None or m.adapter.target != "weight"]
        if len(group) < 2:
            continue
        joined = _joined(group)
        if joined is not None:  # from an earlier call: it starts the decoding with no outputs kept (an interrupted
            joined.kept = None  # step may have left some)
        elif _fusable(group, rows, dtype):
            _fuse(group, lora_dtype)
            made += len(group)
    for m in layers if not fuse else ():
        if isinstance(getattr(m, CACHE, None), Member):
            kernels.drop_caches(m)
    for layer in layers:
        cached = getattr(layer, CACHE, None)
        if isinstance(cached, Member):
            continue
        probe = torch.empty(rows, layer.in_features, device=layer.qweight.device, dtype=dtype)
        if not KERNEL.supports(layer, probe, training=False):
            refused += getattr(layer, CACHE, None) is NO_ROOM
            continue
        if memory_left(layer.qweight.device) is not None:
            made += not isinstance(cached, tuple)
            packed(layer)
    if rows <= MAX_M and dtype in KERNEL.dtypes:
        keep_loras(model, lora_dtype)
    return made, refused


def keep_loras(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make the LoRA copy each quantized layer of ``model`` with a LoRA decodes with (its group's, or its own) for
    activations in ``dtype``, or bring it up to date in place, eagerly: a compiled step can tell neither a missing
    nor a changed one (:mod:`lowbit.kernels.lora`)."""
    from lowbit.layers import QuantLinear

    if dtype not in KERNEL.dtypes:  # activations this kernel never takes: it adds no LoRA
        return
    for layer in model.modules():
        if not isinstance(layer, QuantLinear):
            continue
        cached = getattr(layer, CACHE, None)
        lora = cached.group.weights[-1] if isinstance(cached, Member) else own_lora(layer, dtype)  # group's: _fuse
        if lora is not None:
            lora.refresh(dtype)


def _joined(group: list[QuantLinear]) -> Siblings | None:
    """The copy the layers already share, by themselves, made from their current buffers (by an earlier call), or
    None."""
    members = [getattr(m, CACHE, None) for m in group]
    if not all(isinstance(c, Member) for c in members):
        return None
    first = members[0].group
    if len(first.layers) != len(group) or not all(
        c.group is first and first.current(m, c.index) for m, c in zip(group, members, strict=True)
    ):
        return None
    return first


def _fusable(group: list[QuantLinear], rows: int, dtype: torch.dtype) -> bool:
    """Whether this kernel decodes every member at ``rows`` rows of ``dtype`` and one copy of them all fits."""
    first = group[0]
    device = first.qweight.device
    probe = torch.empty(rows, first.in_features, device=device, dtype=dtype)
    if any(
        m.in_features != first.in_features or m.spec != first.spec or m.qweight.device != device
        or not KERNEL.supports(m, probe, training=False)
        for m in group
    ):  # fmt: skip
        return False
    left = memory_left(device)
    if left is None:
        return True
    freed = sum(repacked_bytes(m) for m in group if isinstance(getattr(m, CACHE, None), tuple))  # their own copies
    return sum(map(repacked_bytes, group)) - freed + HEADROOM * left[1] <= left[0]


def _fuse(group: list[QuantLinear], lora_dtype: torch.dtype) -> None:
    """One copy of the members' codes, concatenated along the outputs, and one of their LoRA factors in
    ``lora_dtype`` (:mod:`lowbit.kernels.lora`), that each member reads its share of the product of."""
    for m in group:  # their own copies (or an older group) go first: memory
        kernels.drop_caches(m)
    codes, scales = zip(*(tinygemm_form(m) for m in group), strict=True)
    scales_and_offsets = torch.cat(scales, dim=1).to(torch.bfloat16)
    joined = torch.cat(codes)
    del codes, scales  # the members' own byte codes go before the joined ones are repacked: a lower peak
    weights = (int4pack(joined), scales_and_offsets, LoraCopy(group, lora_dtype))  # the LoRA copy last (prepare)
    Siblings(group, weights, functools.partial(fused_product, group_size=group[0].spec.group_size), CACHE).attach()


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model``'s activations flow in: its input embeddings', else its first float parameter's."""
    weight = input_weight(model)
    return torch.bfloat16 if weight is None else weight.dtype


# The CPU ops arrived in torch 2.6 (the CUDA op's byte-pair input with 2.5); before that the kernel is not offered.
AVAILABLE = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")

KERNEL = Kernel(
    name="torch-int4",
    matmul=matmul,
    formats=("int",),
    bits=(2, 3, 4),
    group_multiple=32,
    devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.bfloat16),
    has_backward=False,
    max_m=MAX_M,
    layer_check=_fits,
    caches=(CACHE, LORA_CACHE),
    adds_lora=True,
)
