"""Training and prefill kernel pair: fused dequantize + GEMM forward, and backward ``grad_x = grad @ W``.

Both read the packed codes tile by tile and dequantize each tile in registers right before the tensor-core
product, so the full-precision weight exists neither in forward nor between forward and backward: autograd keeps
only references to the layer's packed buffers. Accumulation is float32; the weight tile is rounded to the
activation dtype for the product, as the reference's dense matmul does.

The ops are ``torch.library.triton_op``s, so ``torch.compile`` sees (and can fuse around) the kernels and CUDA
graphs can capture them: the launch path only allocates outputs and launches, with no host synchronization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lowbit.kernels import compute_dtype, triton_dequant
from lowbit.kernels.triton_tiles import (
    INTERPRET,
    constexprs,
    direct,
    layer_args,
    mma,
    triton_kernel,
    weight_tile,
)

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``; one small tile under the interpreter."""
    if INTERPRET:
        tiles = [(16, 16, 64, 1, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


# BLOCK_K divides 64 in every candidate: at g64 (and g32 with BLOCK_K 32) a tile lies in one quantization group.
# Every candidate compiles for sm_90 without register spills at 2, 3 and 4 bits (bf16; checked with ptxas through
# triton.compile for GPUTarget("cuda", 90, 32)): 128-row tiles need 8 warps for that, and 128x256 spilled at any
# warp count. (32, 128) serves prefills of 17-32 rows.
_FORWARD_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                  (128, 128, 32, 8, 4), (32, 128, 64, 4, 4)]  # fmt: skip
# grad_x: BLOCK_K is the output tile's width (a group of input columns), BLOCK_N the reduction over outputs.
_GRAD_TILES = [(128, 64, 64, 8, 4), (128, 32, 64, 8, 4), (64, 64, 64, 8, 4), (128, 32, 64, 4, 4),
               (64, 32, 64, 4, 4), (128, 64, 32, 4, 4)]  # fmt: skip


@triton.jit
def _swizzle(pid, num_a, num_b, GROUP_M: tl.constexpr):
    """Tile ``(a, b)`` of program ``pid``, walking ``GROUP_M`` rows of tiles at a time so they share L2."""
    width = GROUP_M * num_b
    first = (pid // width) * GROUP_M
    size = tl.minimum(num_a - first, GROUP_M)
    return first + (pid % width) % size, (pid % width) // size


# Autotuning is keyed on ``M_BUCKET`` (rows rounded up to a power of two, see :func:`m_bucket`) as well as the
# layer's shape: the best tile at 17 rows is not the best at 1024, and without it the first call's M would fix the
# tile for every later one. M itself, n_groups and the bucket are not specialized on (one compiled kernel per tile,
# not one per divisibility class of the row count: compilation is most of a short GPU session).
_NO_SPECIALIZE = ["M", "n_groups", "M_BUCKET"]


@triton.autotune(configs=_configs(_FORWARD_TILES), key=["M_BUCKET", "N", "K", "BITS"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _forward_kernel(
    x, qweight, scales, qzeros, codebook, y, M, N, K, n_groups, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, NF: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``y [M, N] = x [M, K] @ dequant(Q)^T``."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(
            x + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        w = weight_tile(qweight, scales, qzeros, codebook, offs_n, offs_k, k_start, N, K, n_groups,
                        BITS, GROUP, SYMMETRIC, NF, BLOCK_N, BLOCK_K, ALIGNED, WORDS)  # fmt: skip
        acc = mma(a, tl.trans(w.to(a.dtype)), acc, IEEE)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_GRAD_TILES), key=["M_BUCKET", "N", "K", "BITS"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _grad_x_kernel(
    g, qweight, scales, qzeros, codebook, dx, M, N, K, n_groups, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, NF: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``dx [M, K] = g [M, N] @ dequant(Q)``: tiles of dx, reducing over the output features."""
    pid_m, pid_k = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = pid_k * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        a = tl.load(
            g + offs_m[:, None].to(tl.int64) * N + offs_n[None, :],
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
            other=0.0,
        )
        w = weight_tile(qweight, scales, qzeros, codebook, offs_n, offs_k, k_start, N, K, n_groups,
                        BITS, GROUP, SYMMETRIC, NF, BLOCK_N, BLOCK_K, ALIGNED, WORDS)  # fmt: skip
        acc = mma(a, w.to(a.dtype), acc, IEEE)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], acc.to(dx.dtype.element_ty), mask=mask)


def m_bucket(m: int) -> int:
    """``m`` rounded up to a power of two in [16, 1024]: the row count the GEMM kernels' autotuning is keyed on."""
    bucket = 16
    while bucket < m and bucket < 1024:
        bucket *= 2
    return bucket


def _qgemm(launch: Callable, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
           codebook: torch.Tensor, bits: int, mode: int) -> torch.Tensor:  # fmt: skip
    m, k = x.shape
    n, n_groups = scales.shape
    y = x.new_empty(m, n)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(_forward_kernel)[grid](x, qweight, scales, qzeros, codebook, y, m, n, k, n_groups, m_bucket(m),
                                  **constexprs(bits, mode, k, n_groups, x.dtype))  # fmt: skip
    return y


def forward_op(name: str, impl: Callable) -> Callable:
    """``impl`` (``launch, x, qweight, scales, qzeros, codebook, bits, mode -> x @ dequant(Q)^T`` in ``x``'s
    dtype, ``x`` contiguous) registered as the ``torch.library`` op ``lowbit::<name>``, launching through
    ``wrap_triton``: what ``torch.compile`` and autograd call (:func:`apply`). Every forward kernel shares this
    signature; torch.library wants one registered op per kernel."""

    def op(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, codebook: torch.Tensor,
        bits: int, mode: int,
    ) -> torch.Tensor:  # fmt: skip
        return impl(wrap_triton, x, qweight, scales, qzeros, codebook, bits, mode)

    return triton_op(f"lowbit::{name}", mutates_args=())(op)


qgemm = forward_op("qgemm", _qgemm)  # x [M, K]


@triton_op("lowbit::qgemm_grad_x", mutates_args=())
def qgemm_grad_x(
    grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, codebook: torch.Tensor,
    in_features: int, bits: int, mode: int,
) -> torch.Tensor:  # fmt: skip
    """``grad [M, N] @ dequant(Q)`` as ``[M, in_features]`` in ``grad``'s dtype (``grad`` contiguous)."""
    m, n = grad.shape
    n_groups = scales.shape[1]
    dx = grad.new_empty(m, in_features)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(in_features, meta["BLOCK_K"]),)

    wrap_triton(_grad_x_kernel)[grid](grad, qweight, scales, qzeros, codebook, dx, m, n, in_features, n_groups,
                                      m_bucket(m),
                                      **constexprs(bits, mode, in_features, n_groups, grad.dtype))  # fmt: skip
    return dx


def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    """Keep references to the packed buffers (not a weight) for the backward of both forward ops."""
    x, qweight, scales, qzeros, codebook, bits, mode = inputs
    ctx.save_for_backward(qweight, scales, qzeros, codebook)
    ctx.in_features, ctx.bits, ctx.mode = x.shape[1], bits, mode


def backward(ctx, grad: torch.Tensor) -> tuple:
    """``grad_x = grad @ dequant(Q)``, computed by :func:`qgemm_grad_x`; the buffers get no gradient."""
    grad_x = None
    if ctx.needs_input_grad[0]:
        qweight, scales, qzeros, codebook = ctx.saved_tensors
        if grad.dtype == torch.float32:  # see ``matmul``: float32 dequantizes once and multiplies with cuBLAS
            weight = triton_dequant.dequantize(
                qweight, scales, qzeros, codebook, ctx.in_features, ctx.bits, ctx.mode, torch.float32
            )
            return grad @ weight, None, None, None, None, None, None
        grad_x = qgemm_grad_x(grad.contiguous(), qweight, scales, qzeros, codebook, ctx.in_features, ctx.bits, ctx.mode)
    return grad_x, None, None, None, None, None, None


qgemm.register_autograd(backward, setup_context=setup_context)


def apply(op, impl: Callable, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Run forward op ``op`` (body ``impl``) on ``x [..., in]`` in the dtype ``F.linear`` would use (autocast's,
    inside autocast).

    Eager calls that need no gradient run the body directly (``launch`` = :func:`direct`): the custom-op
    dispatcher costs tens of microseconds a call, as much as the whole kernel at decode. ``torch.compile`` and
    autograd go through the op, which they need.
    """
    x2 = x.reshape(-1, layer.in_features).to(compute_dtype(x)).contiguous()
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x2.requires_grad):
        y = op(x2, *layer_args(layer))
    else:
        y = impl(direct, x2, *layer_args(layer))
    return y.reshape(*x.shape[:-1], layer.out_features)


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T`` through the fused GEMM (bf16 / fp16).

    Float32 goes to :mod:`triton_dequant` (one dequantization kernel, then cuBLAS, exactly the reference's
    numerics): an IEEE float32 ``tl.dot`` runs on the CUDA cores and, at these tiles, spills about 10 KB of
    registers per thread on sm_90 -- far slower than dequantizing once.
    """
    if compute_dtype(x) == torch.float32:
        return triton_dequant.matmul(layer, x)
    return apply(qgemm, _qgemm, layer, x)


# Beyond 1024 rows, dequantizing once for cuBLAS (triton-dequant) should win; bench/gpu.py measures both.
KERNEL = triton_kernel("triton-gemm", matmul, max_m=1024)
