"""Decode kernel (M <= 16 rows): fused dequantize + GEMV / small GEMM with split-K.

At decode the weights are read once per token and the layer is bound by memory bandwidth, so the kernel reads the
packed codes straight from the checkpoint layout (2, 3 or 4 bits a weight, no repacked copy), dequantizes in
registers and accumulates in float32. One row (``M == 1``) is a GEMV on the CUDA cores (broadcast multiply and
reduce over the tile); 2 to 16 rows use one 16-row tensor-core tile. The reduction dimension is split over
``split_k(K)`` programs so that even a 4096-wide layer keeps every SM busy; the partial sums go to a small float32
buffer that one torch ``sum`` reduces (deterministic, unlike atomics, and capturable by CUDA graphs); with one
split the kernel writes the output itself.

The backward (for the rare training step with <= 16 rows) is the GEMM pair's ``grad_x`` kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_gemm import apply, backward, forward_op, setup_context
from lowbit.kernels.triton_tiles import INTERPRET, constexprs, mma, triton_kernel, weight_tile

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

MAX_M = 16

# (BLOCK_N, BLOCK_K, warps, stages). Checked with ptxas for sm_90 (triton.compile for GPUTarget("cuda", 90, 32)) at
# BLOCK_M 1 and 16 with 3-bit bf16 codes, the heaviest: none spills more than a few dozen bytes (2-warp tiles,
# 4-warp 128x64 and 64/128x256 tiles spilled hundreds and were dropped).
_TILES = [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 256, 8, 3), (16, 256, 4, 4), (128, 64, 8, 4)]
if INTERPRET:
    _TILES = [(16, 64, 1, 1)]


def split_k(in_features: int) -> int:
    """How many programs share one output tile's reduction: about 512 input features each, at most 8."""
    return max(1, min(8, in_features // 512))


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in _TILES],
    key=["N", "K", "BITS", "BLOCK_M", "SPLIT_K"],
)
# SPLIT_K is a runtime argument (one compiled kernel serves every split count) and M, n_groups are not specialized
# on: each specialization is another compilation per autotuning config, and compile time is scarce on a GPU.
@triton.jit(do_not_specialize=["M", "n_groups", "SPLIT_K"])
def _decode_kernel(
    x, qweight, scales, qzeros, codebook, partial, M, N, K, n_groups, SPLIT_K,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, NF: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``partial[s] [M, N] = x[:, chunk s] @ dequant(Q)[:, chunk s]^T`` for ``s < SPLIT_K`` (``[M, N]``: one)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_s * per_split, tl.minimum((pid_s + 1) * per_split, k_blocks)):
        k_start = kb * BLOCK_K
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(x + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)  # fmt: skip
        if BLOCK_M == 1:
            # GEMV: [1, BLOCK_K] * [BLOCK_N, BLOCK_K], reduced over k, in float32 throughout. The tile is [n, k] so
            # that k -- the direction the packed codes run in memory -- is the fast one across a warp's threads
            # (coalesced loads of the packed codes, not one row per thread).
            w = weight_tile(qweight, scales, qzeros, codebook, offs_n, offs_k, k_start, N, K,
                            n_groups, BITS, GROUP, SYMMETRIC, NF, BLOCK_N, BLOCK_K, ALIGNED, WORDS)  # fmt: skip
            acc += tl.sum(w * a.to(tl.float32), axis=1)[None, :]
        else:
            w = weight_tile(qweight, scales, qzeros, codebook, offs_n, offs_k, k_start, N, K,
                            n_groups, BITS, GROUP, SYMMETRIC, NF, BLOCK_N, BLOCK_K, ALIGNED, WORDS)  # fmt: skip
            acc = mma(a, tl.trans(w.to(a.dtype)), acc, IEEE)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = partial + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(partial.dtype.element_ty), mask=mask)


def _qgemv(launch: Callable, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
           codebook: torch.Tensor, bits: int, mode: int) -> torch.Tensor:  # fmt: skip
    m, k = x.shape
    n, n_groups = scales.shape
    splits = split_k(k)
    # One split writes the output directly (no view of a scratch buffer is returned); several write float32
    # partial sums, reduced here.
    partial = x.new_empty(splits, m, n, dtype=torch.float32) if splits > 1 else x.new_empty(m, n)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), splits)

    launch(_decode_kernel)[grid](x, qweight, scales, qzeros, codebook, partial, m, n, k, n_groups, splits,
                                 BLOCK_M=1 if m == 1 else MAX_M,
                                 **constexprs(bits, mode, k, n_groups, x.dtype))  # fmt: skip
    return partial.sum(0).to(x.dtype) if splits > 1 else partial


qgemv = forward_op("qgemv", _qgemv)  # x [M, K], M <= 16


qgemv.register_autograd(backward, setup_context=setup_context)


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T`` through the decode kernel (at most 16 rows)."""
    return apply(qgemv, _qgemv, layer, x)


KERNEL = triton_kernel("triton-decode", matmul, max_m=MAX_M)
