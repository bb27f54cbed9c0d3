"""Triton kernels against the reference, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``).

``triton.jit`` decides when a kernel -- or Triton's own library function -- is defined whether it is compiled or
interpreted, so the flag must be set before anything imports Triton; other test modules import it (peft does), so
this file runs in a fresh process of its own, started by ``tests/test_kernels.py`` (the name keeps pytest from
collecting it with the rest). Shapes are tiny (the interpreter runs every program in Python); full-size
comparisons are in ``bench/gpu.py``.

    TRITON_INTERPRET=1 python -m pytest tests/triton_cases.py      # by hand
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from lowbit import kernels
from lowbit.kernels import reference
from lowbit.layers import QuantLinear
from lowbit.quant import QuantSpec

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/test_kernels.py does)", allow_module_level=True)
pytest.importorskip("triton")
from lowbit.kernels import triton_decode, triton_dequant, triton_gemm, triton_gemv

# The kernels declare CUDA only; here they run on CPU tensors.
DECODE = dataclasses.replace(triton_decode.KERNEL, devices=("cpu",))
GEMM = dataclasses.replace(triton_gemm.KERNEL, devices=("cpu",))
DEQUANT = dataclasses.replace(triton_dequant.KERNEL, devices=("cpu",))
GEMV = dataclasses.replace(triton_gemv.KERNEL, devices=("cpu",))
# Float32 kernels accumulate in another order than the dense matmul; 16-bit ones also round the weight tile (and
# the reference rounds scales to the activation dtype first): a few units in the last place of the output.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _layer(bits: int, group: int, symmetric: bool = False, fmt: str = "int", in_f: int = 128, out_f: int = 37,
           rank: int = 0) -> QuantLinear:  # fmt: skip
    torch.manual_seed(bits * 1000 + group + in_f)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=symmetric, format=fmt)
    layer = QuantLinear.from_linear(nn.Linear(in_f, out_f), spec)
    if rank:
        layer.add_lora(rank, 2.0 * rank)
        nn.init.normal_(layer.lora_B, std=0.1)
    return layer


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = ref.float().abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(scale, 1.0), f"max error {err:.3g} at output scale {scale:.3g}"


# Every (bits, group) pair; symmetry, dtype and row count rotate through the cases so each is covered by several.
CASES = [(b, g) for b in (2, 3, 4) for g in (32, 64, 128, -1)]


@pytest.mark.parametrize(("bits", "group"), CASES)
def test_forward_matches_reference(bits: int, group: int) -> None:
    i = CASES.index((bits, group))
    symmetric = i % 2 == 1
    layer = _layer(bits, group, symmetric)
    for kernel, m, dtype in ((DECODE, 1, torch.float32), (DECODE, 7, torch.bfloat16),
                             ((GEMM, DEQUANT)[i % 2], 17, (torch.bfloat16, torch.float32)[i // 2 % 2])):  # fmt: skip
        x = torch.randn(m, 128).to(dtype)
        _close(kernel.matmul(layer, x), reference.matmul(layer, x), dtype)


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "dtype"),
    [
        (2, 32, False, torch.float32),
        (3, 64, True, torch.bfloat16),
        (4, 128, False, torch.bfloat16),
        (3, -1, False, torch.float32),
    ],
)
def test_grad_x_matches_reference(bits: int, group: int, symmetric: bool, dtype) -> None:
    layer = _layer(bits, group, symmetric)
    for kernel, shape in ((GEMM, (3, 6)), (DECODE, (5,)), (DEQUANT, (2, 3))):
        x = torch.randn(*shape, 128).to(dtype).requires_grad_()
        grad = torch.randn(*shape, 37).to(dtype)
        kernel.matmul(layer, x).backward(grad)
        ours, x.grad = x.grad, None
        reference.matmul(layer, x).backward(grad)
        _close(ours, x.grad, dtype)


def test_odd_shapes_and_formats() -> None:
    """Input widths that no tile divides, 8-bit codes, NormalFloat codebooks, float16, a split-K reduction
    (1024 inputs: two splits) and a group size that neither divides nor is divided by the tile (96: per-element
    scales beside word-read codes) all match."""
    for layer, dtype in ((_layer(3, -1, in_f=100, out_f=19), torch.float32),
                         (_layer(3, 96, in_f=192, out_f=11), torch.bfloat16),
                         (_layer(2, 96, in_f=192, out_f=11, symmetric=True), torch.float32),
                         (_layer(8, 32, in_f=96, out_f=5), torch.float16),
                         (_layer(4, 64, fmt="nf"), torch.bfloat16),
                         (_layer(3, 32, fmt="nf", in_f=96), torch.float32),
                         (_layer(4, 128, in_f=1024, out_f=8), torch.bfloat16)):  # fmt: skip
        for kernel, m in ((DECODE, 3), (GEMM, 18), (DEQUANT, 2)):
            x = torch.randn(m, layer.in_features).to(dtype)
            _close(kernel.matmul(layer, x), reference.matmul(layer, x), dtype)


def test_layer_forward_backward_with_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through QuantLinear: output and every gradient (x, LoRA A and B) match the reference path."""
    monkeypatch.setattr(kernels, "_fast_kernels", lambda device: {k.name: k for k in (DECODE, GEMM, DEQUANT)})
    layer = _layer(3, 64, rank=4)
    results = {}
    for pin in ("triton-gemm", "triton-dequant", "reference"):
        x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(1)).requires_grad_()
        layer.zero_grad(set_to_none=True)
        with kernels.pinned(pin):
            assert kernels.select(layer, x, training=True).name == pin
            y = layer(x)
        y.pow(2).sum().backward()
        results[pin] = (y, x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for pin in ("triton-gemm", "triton-dequant"):
        for ours, ref in zip(results[pin], results["reference"], strict=True):
            _close(ours, ref, torch.float32)


def test_autocast_computes_in_the_autocast_dtype() -> None:
    layer = _layer(4, 64)
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = GEMM.matmul(layer, x), reference.matmul(layer, x)
    assert ours.dtype == torch.bfloat16
    _close(ours, ref, torch.bfloat16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_matches_reference(bits: int) -> None:
    """The one-row GEMV: every width, group sizes from 32 to a whole row, symmetric or not, NormalFloat, each
    activation dtype, and widths whose last step is partial (160 = 5 words of 4-bit codes past a 16-word step)."""
    cases = [(32, False, "int", torch.float32, 128), (64, True, "int", torch.bfloat16, 128),
             (-1, False, "int", torch.float16, 160), (32, False, "int", torch.bfloat16, 544)]  # fmt: skip
    if bits in (2, 3, 4):
        cases.append((64, False, "nf", torch.bfloat16, 128))
    for group, symmetric, fmt, dtype, in_f in cases:
        layer = _layer(bits, group, symmetric, fmt, in_f=in_f, out_f=13)
        x = torch.randn(1, in_f).to(dtype)
        assert GEMV.supports(layer, x, training=False)
        _close(GEMV.matmul(layer, x), reference.matmul(layer, x), dtype)
    unaligned = _layer(bits, -1, in_f=100, out_f=5)
    assert not GEMV.supports(unaligned, torch.randn(1, 100), training=False)
    assert not GEMV.supports(_layer(bits, 32), torch.randn(2, 128), training=False)  # one row only
