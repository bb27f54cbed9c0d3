"""Triton building blocks shared by the fused kernels: read packed codes in place and dequantize a weight tile.

The kernels read the checkpoint's bytes as they are (packing version 1, :mod:`lowbit.quant.packing`): code ``i`` of
the flat ``[out, in]`` code matrix starts at bit ``i * bits`` of the little-endian byte stream, so element
``(n, k)`` is at bit ``(n * in + k) * bits``, and zero point ``(n, g)`` at bit ``(n * n_groups + g) * bits`` of
``qzeros``. That holds for every width, 3-bit included (a 3-bit code may straddle two bytes; 2-, 4- and 8-bit
codes never do), and for any shape, so no repacked copy of the weight is ever made. Rows start on a byte boundary
whenever ``in % 8 == 0`` and on a 4-byte word whenever ``in % 32 == 0`` (every group size the kernels accept but
``-1`` guarantees it), though the kernels, indexing bits, need neither.

Everything here is shared by :mod:`triton_decode`, :mod:`triton_gemm` and :mod:`triton_dequant`, with the launch
helpers (a layer as kernel arguments).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from lowbit.kernels import FLOAT_DTYPES, Kernel
from lowbit.quant import normalfloat

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

# Where Triton runs on the CPU (tests: TRITON_INTERPRET=1) autotuning would time every config in the interpreter;
# one small config is used instead.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The ``mode`` argument of the ops: how codes become weights.
INT_ASYMMETRIC, INT_SYMMETRIC, NORMALFLOAT = 0, 1, 2


def constexprs(bits: int, mode: int, in_features: int, n_groups: int, dtype: torch.dtype) -> dict:
    """The compile-time arguments every kernel takes."""
    return {
        "BITS": bits,
        "GROUP": in_features // n_groups,
        "SYMMETRIC": mode == INT_SYMMETRIC,
        "NF": mode == NORMALFLOAT,
        "IEEE": dtype == torch.float32,
        "ALIGNED": in_features % 8 == 0,  # every row of codes starts on a byte
        # every row starts on a 4-byte word (the packed buffers are whole allocations, so word-aligned themselves)
        "WORDS": in_features % 32 == 0,
    }


@triton.jit
def codes_at(ptr, bit, mask, BITS: tl.constexpr):
    """The ``BITS``-bit codes starting at bit offsets ``bit`` from ``ptr`` (a pointer or a pointer tile), as int32."""
    byte = bit >> 3
    shift = (bit & 7).to(tl.int32)
    word = tl.load(ptr + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # the code may continue in the next byte (only then is that byte read: it may lie past the end)
        nxt = tl.load(ptr + byte + 1, mask=mask & (shift > 8 - BITS), other=0).to(tl.int32)
        word = word | (nxt << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def packed_codes(ptr, idx, mask, BITS: tl.constexpr):
    """The ``BITS``-bit codes at flat indices ``idx`` (any shape) of a packed uint8 buffer, as int32."""
    return codes_at(ptr, idx * BITS, mask, BITS)


@triton.jit
def word_codes(qweight, offs_n, k_start, N, K, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` int32 codes of rows ``offs_n``, columns ``k_start + arange(BLOCK_K)``, read as
    32-bit words (``K % 32 == 0`` and ``BLOCK_K % 32 == 0``: every row, and every tile of a row, starts on a word).

    One load brings ``32 // BITS`` codes (2-, 4-, 8-bit) and shifts in registers unpack them, where the byte path
    loads one byte per code. 3-bit codes come in runs of 32 codes in three words; the two codes that straddle a word
    boundary (10 and 21) take their high bits from the next word.
    """
    tl.static_assert(BLOCK_K % 32 == 0, "word reads need tiles of whole words and 3-bit runs")
    row = qweight.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None] * (K // 32 * BITS)
    n_ok = (offs_n < N)[:, None]
    if BITS == 3:
        RUNS: tl.constexpr = BLOCK_K // 32
        run = k_start // 32 + tl.arange(0, RUNS)
        at = row + run[None, :] * 3
        ok = n_ok & (run[None, :] < K // 32)
        w0 = tl.load(at, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w1 = tl.load(at + 1, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        w2 = tl.load(at + 2, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        bit = (tl.arange(0, 32) * 3)[None, None, :]
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        this = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
        nxt = tl.where(word == 0, w1, w2)
        high = tl.where(shift > 29, nxt << (32 - tl.maximum(shift, 1)), 0)  # shift <= 29: no straddle
        codes = (((this >> shift) | high) & 7).to(tl.int32)
    else:
        PER: tl.constexpr = 32 // BITS
        idx = k_start // PER + tl.arange(0, BLOCK_K // PER)
        words = tl.load(row + idx[None, :], mask=n_ok & (idx[None, :] < K // PER), other=0)
        codes = (words[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def weight_tile(
    qweight,
    scales,
    qzeros,
    codebook,
    offs_n,
    offs_k,
    k_start,
    N,
    K,
    n_groups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    NF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    WORDS: tl.constexpr,
):
    """The float32 ``[BLOCK_N, BLOCK_K]`` tile ``dequant(Q)[offs_n, offs_k]`` (``offs_k = k_start + arange``);
    callers that need ``[BLOCK_K, BLOCK_N]`` (``x @ W^T``) transpose it with ``tl.trans``.

    Codes come as 32-bit words where rows start on one (``WORDS``: :func:`word_codes`), else byte by byte
    (``ALIGNED``, ``K % 8 == 0``: 64-bit arithmetic per row, 32-bit per element -- per-element 64-bit indices cost
    so many registers that every tile spilled on sm_90; otherwise flat indices). Scales and zero points are read
    once per row when the tile lies in one group (the group size a multiple of ``BLOCK_K``), once per (row, group)
    when the tile holds whole groups (the tile is viewed as ``[BLOCK_N, groups, GROUP]``), else per element.
    Out-of-range elements are finite and meet zeros or masked stores in every caller.
    """
    n2 = offs_n[:, None]
    k2 = offs_k[None, :]
    mask = (n2 < N) & (k2 < K)
    if WORDS:
        q = word_codes(qweight, offs_n, k_start, N, K, BITS, BLOCK_N, BLOCK_K)
    elif ALIGNED:
        q = codes_at(qweight + n2.to(tl.int64) * ((K // 8) * BITS), k2 * BITS, mask, BITS)
    else:
        q = packed_codes(qweight, n2.to(tl.int64) * K + k2, mask, BITS)
    # One return at the end: Triton compiles the code after a return inside a (constexpr) branch as well.
    if GROUP % BLOCK_K == 0 or not (WORDS and BLOCK_K % GROUP == 0):
        if GROUP % BLOCK_K == 0:
            g_idx = n2 * n_groups + k_start // GROUP
            g_mask = n2 < N
        else:
            g_idx = n2 * n_groups + k2 // GROUP
            g_mask = mask
        w = dequant_codes(q, qzeros, codebook, tl.load(scales + g_idx, mask=g_mask, other=0.0), g_idx, g_mask, BITS,
                          SYMMETRIC, NF)  # fmt: skip
    else:  # whole groups (GROUP divides a power of two: a power of two itself)
        G: tl.constexpr = BLOCK_K // GROUP
        g = k_start // GROUP + tl.arange(0, G)[None, :]
        g_idx = n2 * n_groups + g
        g_mask = (n2 < N) & (g < n_groups)
        s = tl.load(scales + g_idx, mask=g_mask, other=0.0)
        w3 = dequant_codes(tl.reshape(q, (BLOCK_N, G, GROUP)), qzeros, codebook, s[:, :, None], g_idx[:, :, None],
                           g_mask[:, :, None], BITS, SYMMETRIC, NF)  # fmt: skip
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def dequant_codes(q, qzeros, codebook, s, g_idx, g_mask, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                  NF: tl.constexpr):  # fmt: skip
    """Float32 weights of codes ``q`` with scales ``s`` (broadcastable); zero points at ``g_idx`` of ``qzeros``."""
    s = s.to(tl.float32)
    if NF:
        w = tl.load(codebook + q) * s
    elif SYMMETRIC:
        w = (q - (1 << (BITS - 1))).to(tl.float32) * s
    else:
        w = (q - packed_codes(qzeros, g_idx, g_mask, BITS)).to(tl.float32) * s
    return w


def direct(kernel):
    """``launch`` for eager calls outside autograd and ``torch.compile``: ``direct(kernel)[grid](...)`` launches
    at once (the ops pass ``torch.library.wrap_triton`` instead, which ``torch.compile`` can trace)."""
    return kernel


_CODEBOOKS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _codebook(bits: int, device: torch.device) -> torch.Tensor:
    """The NF codebook on ``device``, made once (a host-to-device copy per call would sync and break CUDA graphs).

    Cached in a module global rather than ``functools.cache``, which ``torch.compile`` traces through (it would
    rebuild the codebook on the CPU and copy it to the GPU inside every compiled graph, so CUDA graphs are skipped).
    """
    key = (bits, device)
    found = _CODEBOOKS.get(key)
    if found is None:
        found = _CODEBOOKS[key] = normalfloat.codebook(bits).to(device)
    return found


def layer_args(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``(qweight, scales, qzeros, codebook, bits, mode)``: a layer as op arguments (stand-ins for unused ones)."""
    spec = layer.spec
    if spec.format == "nf":
        codebook = _codebook(spec.bits, layer.scales.device)
        return layer.qweight, layer.scales.contiguous(), layer.qweight, codebook, spec.bits, NORMALFLOAT
    mode = INT_ASYMMETRIC if spec.has_zeros else INT_SYMMETRIC
    qzeros = layer.qzeros if spec.has_zeros else layer.qweight
    scales = layer.scales.contiguous()  # the kernels index it as a row-major [out, n_groups]
    return layer.qweight, scales, qzeros, scales, spec.bits, mode


def triton_kernel(
    name: str,
    matmul: Callable,
    max_m: int | None = None,
    has_backward: bool = True,
    layer_check: Callable[[QuantLinear], bool] | None = None,
) -> Kernel:
    """The :class:`Kernel` declaration of a Triton kernel here: they all read int and NF codes of 2, 3, 4 or 8 bits
    in groups a multiple of 32, on CUDA, in the float dtypes, and differ only in rows, backward and layer shapes."""
    return Kernel(
        name=name,
        matmul=matmul,
        formats=("int", "nf"),
        bits=(2, 3, 4, 8),
        group_multiple=32,
        devices=("cuda",),
        dtypes=FLOAT_DTYPES,
        has_backward=has_backward,
        max_m=max_m,
        layer_check=layer_check,
    )


# Triton's interpreter multiplies bfloat16 operands of tl.dot as their raw 16-bit integers. Products of two 16-bit
# floats are exact in float32, so upcasting first gives the value the GPU's float32-accumulating dot gives.
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b``; ``IEEE`` keeps float32 inputs in float32 (the reference's numerics) instead of TF32."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
