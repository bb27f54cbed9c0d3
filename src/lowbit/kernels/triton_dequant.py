"""Large-M kernel: a fused Triton dequantization into a transient weight, then the cuBLAS matmul.

At a few thousand rows (training) the matmul is compute-bound and cuBLAS is hard to beat, while a fused GEMM
dequantizes every weight tile once per row-tile of x (16 times at M = 2048 with 128-row tiles). Dequantizing the
weight once per call (reading 2-4 bits and writing 16 bits per weight: tens of microseconds at 7B layer sizes) and
handing it to cuBLAS costs one transient weight-sized buffer per matmul -- the strategy bitsandbytes uses. As in
the reference, backward dequantizes again instead of keeping the weight alive between forward and backward;
unlike the reference, the dequantization is one kernel instead of a chain of torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.kernels import compute_dtype
from lowbit.kernels.reference import DequantMatmul
from lowbit.kernels.triton_tiles import INTERPRET, constexprs, direct, layer_args, triton_kernel, weight_tile

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

# (BLOCK_N, BLOCK_K, warps): spill-free on sm_90 at 2-4 bits (64x64 needs 8 warps for that).
_TILES = [(16, 64, 1)] if INTERPRET else [(32, 128, 4), (16, 256, 4), (64, 64, 8), (64, 128, 8)]


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in _TILES],
    key=["N", "K", "BITS"],
)
@triton.jit(do_not_specialize=["n_groups"])
def _dequant_kernel(
    qweight, scales, qzeros, codebook, w, N, K, n_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, NF: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr,
    WORDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``w [N, K] = dequant(Q)`` in ``w``'s dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    tile = weight_tile(qweight, scales, qzeros, codebook, offs_n, offs_k, k_start, N, K, n_groups,
                       BITS, GROUP, SYMMETRIC, NF, BLOCK_N, BLOCK_K, ALIGNED, WORDS)  # fmt: skip
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(w + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], tile.to(w.dtype.element_ty), mask=mask)


def _dequantize(
    launch: Callable, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, codebook: torch.Tensor,
    in_features: int, bits: int, mode: int, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    n, n_groups = scales.shape
    w = scales.new_empty(n, in_features, dtype=dtype)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(in_features, meta["BLOCK_K"]))

    launch(_dequant_kernel)[grid](qweight, scales, qzeros, codebook, w, n, in_features, n_groups,
                                  **constexprs(bits, mode, in_features, n_groups, dtype))  # fmt: skip
    return w


@triton_op("lowbit::dequantize", mutates_args=())
def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, codebook: torch.Tensor, in_features: int,
    bits: int, mode: int, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The ``[out, in_features]`` weight ``dequant(Q)`` in ``dtype``."""
    return _dequantize(wrap_triton, qweight, scales, qzeros, codebook, in_features, bits, mode, dtype)


def _weight(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in ``dtype`` (no gradient flows to the packed buffers, so eager calls skip the op)."""
    qweight, scales, qzeros, codebook, bits, mode = layer_args(layer)
    args = (qweight, scales, qzeros, codebook, layer.in_features, bits, mode, dtype)
    return dequantize(*args) if torch.compiler.is_compiling() else _dequantize(direct, *args)


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T``: the reference's autograd function with the one-kernel dequantization."""
    return DequantMatmul.apply(x.to(compute_dtype(x)), functools.partial(_weight, layer))


KERNEL = triton_kernel("triton-dequant", matmul)
