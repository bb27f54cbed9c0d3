"""One-row kernel (``M == 1``) built for bandwidth: a GEMV that never reshapes a tile or reduces inside its loop.

``triton-decode`` dequantizes a ``[BLOCK_N, BLOCK_K]`` weight tile per step (codes unpacked along a third axis,
then reshaped) and reduces it against ``x`` at once; its compiled code moves every tile through shared memory and
reduces across threads every step, and on an H200 it took 48 us where reading the W4 weight takes about 5. Here a
program keeps one ``[BLOCK_N, BLOCK_W]`` layout throughout: it loads ``BLOCK_W`` 32-bit words per row (or 3-word
runs of 32 codes at 3 bits), and for each code position ``j`` inside a word -- a compile-time loop, so shifts and
word choices are constants -- multiplies the unpacked codes by the matching ``x`` elements into a float32
accumulator of the same layout. All codes of a word share a group (groups are multiples of 32 codes), so scales and
zero points enter once per word: ``sum_j (q_j - z) s x_j = s (sum_j q_j x_j - z sum_j x_j)``. One cross-thread
sum at the end gives the output; no split of the reduction, so no float32 scratch, ``sum`` or cast kernels.

Forward only (one-row training steps take another kernel); rows must start on a 32-bit word (``in % 32 == 0``).
Not preferred by :func:`lowbit.kernels.select`: on an H100 (``bench/gpu.py`` ``*-gemv`` rows, commit cd0db78) it
beats ``triton-decode`` at one row (28.9 against 49.7 us, W4 4096 -> 11008) but not ``torch-int4`` (15.0), which
decodes instead; pin it with ``LOWBIT_KERNEL=triton-gemv``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_gemm import apply, forward_op
from lowbit.kernels.triton_tiles import INTERPRET, constexprs, packed_codes, triton_kernel

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

# (BLOCK_N, BLOCK_W, warps): rows and words (3-bit: runs) per program step.
_TILES = [(4, 16, 1)] if INTERPRET else [(8, 64, 4), (4, 64, 2), (16, 32, 4), (4, 128, 4), (8, 128, 8), (16, 64, 8)]


@triton.jit
def _code(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr):
    """Code ``J`` of a word (``w0``; 2, 4, 8 bits) or of a 3-word run of 32 3-bit codes (``w0, w1, w2``)."""
    if BITS == 3:
        BIT: tl.constexpr = 3 * J
        SHIFT: tl.constexpr = BIT % 32
        if BIT // 32 == 0:
            lo = w0
            hi = w1
        elif BIT // 32 == 1:
            lo = w1
            hi = w2
        else:
            lo = w2
            hi = w2
        q = lo >> SHIFT
        if SHIFT > 29:  # the code continues in the next word
            q = q | (hi << (32 - SHIFT))
        q = q & 7
    else:
        q = (w0 >> (J * BITS)) & ((1 << BITS) - 1)
    return q


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=nw) for n, w, nw in _TILES],
    key=["N", "K", "BITS"],
)
@triton.jit(do_not_specialize=["n_groups"])
def _gemv_kernel(
    x, qweight, scales, qzeros, codebook, y, N, K, n_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, NF: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """``y [N] = dequant(Q) @ x [K]`` (``K % 32 == 0``)."""
    CODES: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per unit: a word, or a 3-word run at 3 bits
    UNIT: tl.constexpr = 3 if BITS == 3 else 1  # words per unit
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    row = qweight.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None] * (K // 32 * BITS)
    units = K // CODES
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for u_start in range(0, units, BLOCK_W):
        u = u_start + tl.arange(0, BLOCK_W)
        u_ok = u < units
        ok = n_ok[:, None] & u_ok[None, :]
        at = row + (u * UNIT)[None, :]
        w0 = tl.load(at, mask=ok, other=0).to(tl.uint32, bitcast=True)
        w1 = w0
        w2 = w0
        if BITS == 3:
            w1 = tl.load(at + 1, mask=ok, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(at + 2, mask=ok, other=0).to(tl.uint32, bitcast=True)
        g_idx = offs_n[:, None] * n_groups + ((u * CODES) // GROUP)[None, :]
        s = tl.load(scales + g_idx, mask=ok, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for j in tl.static_range(CODES):
            xj = tl.load(x + u * CODES + j, mask=u_ok, other=0.0).to(tl.float32)
            q = _code(w0, w1, w2, j, BITS)
            if NF:  # noqa: SIM108 -- a constexpr branch: only one side is compiled
                val = tl.load(codebook + q.to(tl.int32))
            else:
                val = q.to(tl.float32)
            dot += val * xj[None, :]
            x_sum += xj
        if NF:
            acc += s * dot
        elif SYMMETRIC:
            acc += s * (dot - (1 << (BITS - 1)) * x_sum[None, :])
        else:
            z = packed_codes(qzeros, g_idx, ok, BITS).to(tl.float32)
            acc += s * (dot - z * x_sum[None, :])
    tl.store(y + offs_n, tl.sum(acc, axis=1).to(y.dtype.element_ty), mask=n_ok)


def _qgemv1(launch: Callable, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            codebook: torch.Tensor, bits: int, mode: int) -> torch.Tensor:  # fmt: skip
    k = x.shape[1]
    n, n_groups = scales.shape
    y = x.new_empty(1, n)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    launch(_gemv_kernel)[grid](x, qweight, scales, qzeros, codebook, y, n, k, n_groups,
                               **constexprs(bits, mode, k, n_groups, x.dtype))  # fmt: skip
    return y


qgemv1 = forward_op("qgemv1", _qgemv1)  # x [1, K], K % 32 == 0


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T`` for one row of ``x``."""
    return apply(qgemv1, _qgemv1, layer, x)


# One row, forward only, and rows that start on a 32-bit word.
KERNEL = triton_kernel("triton-gemv", matmul, max_m=1, has_backward=False,
                       layer_check=lambda layer: layer.in_features % 32 == 0)  # fmt: skip
