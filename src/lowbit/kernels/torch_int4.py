"""CPU decoding kernel for W4 layers: PyTorch's own int4 matmul (``torch._weight_int4pack_mm_for_cpu``).

The reference kernel dequantizes the whole weight on every call, which at one token costs far more than the product
(``bench/cpu_int4.py``: 0.8-1 ms for a 576 -> 1536 layer, 203 ms at Llama-2-7B's 4096 -> 11008). PyTorch ships a
CPU int4 matmul, the twin of the CUDA tinygemm kernel gpt-fast and torchao use, that reads 4-bit codes directly:
10-56x faster at one row, 2-7x at 16, slower from about 64 rows (prefill, training: the reference runs there).

Its dequantization is ``(q - 8) * scale + m`` per group; lowbit's ``(q - z) * s`` is that with ``m = (8 - z) s``
(symmetric codes: ``m = 0``), so the layer's own codes serve, repacked once into the op's layout and kept on the
layer -- not in its state dict -- until its buffers change (their version counters say when). The op's fast path
takes bf16 activations and bf16 scales, so outputs differ from the float32 reference by about 0.4% of their
largest magnitude; that is why the kernel runs only where pinned (``--kernel torch-int4``, ``LOWBIT_KERNEL``).
The repacked codes take as much memory as the packed ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.kernels import Kernel, compute_dtype

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

GROUPS = (32, 64, 128, 256)  # the group sizes the op accepts
MAX_M = 16  # beyond this the reference is as fast (bench/cpu_int4.py)
_INNER_K_TILES = 8


def _packed(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's codes in the op's layout and its ``[groups, out, 2]`` bf16 scales and offsets, made on first use
    and remade when the packed codes, scales or zero points change (in place or replaced)."""
    buffers = [layer.qweight, layer.scales] + ([layer.qzeros] if layer.spec.has_zeros else [])
    key = tuple((t.data_ptr(), t._version) for t in buffers)
    cached = layer.__dict__.get("_int4pack")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    q = layer.quantized(torch.int32)
    s = q.scales.float()
    z = q.zeros.float() if q.zeros is not None else torch.full_like(s, 8.0)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.contiguous(), _INNER_K_TILES)
    scales_and_offsets = torch.stack([s, (8 - z) * s], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
    layer.__dict__["_int4pack"] = (key, packed, scales_and_offsets)  # a plain attribute: never saved or moved
    return packed, scales_and_offsets


def matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(Q)^T`` through the int4 op (bf16 inside), returned in ``x``'s compute dtype."""
    packed, scales_and_offsets = _packed(layer)
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, layer.spec.group_size, scales_and_offsets)
    return y.to(compute_dtype(x)).reshape(*x.shape[:-1], layer.out_features)


KERNEL = Kernel(
    name="torch-int4",
    matmul=matmul,
    formats=("int",),
    bits=(4,),
    group_multiple=32,
    devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16),
    has_backward=False,
    max_m=MAX_M,
    layer_check=lambda layer: layer.spec.group_size in GROUPS and layer.out_features % 16 == 0,
)
