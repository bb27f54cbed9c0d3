"""lowbit's integer codes re-laid out in the block formats that serving runtimes read. Tensor math only.

lowbit stores ``w = (q - z) * s`` per group of input columns, with fp16 ``s``. Three llama.cpp types hold that grid
with nothing re-rounded but one fp16 product, one block of 32 weights at a time (a lowbit group of 64 is two blocks
with the same scale):

- ``Q4_1``, asymmetric 4-bit: ``w = d*q + m`` with ``d = s`` and ``m = -s*z`` (``m`` rounded to fp16: the only
  difference, at most half an fp16 step of ``s*z``);
- ``Q4_0``, symmetric 4-bit: ``w = d*(q - 8)``, lowbit's symmetric zero point is 8, so ``d = s`` exactly;
- ``Q8_0``, symmetric 8-bit: ``w = d*q`` with signed ``q = code - 128``, exactly.

GPTQ (``checkpoint_format: gptq_v2``: zero points stored as they are, not minus one) packs codes into int32 words
along a dimension as one little-endian bit stream: value ``k`` of a row occupies bits ``bits*k`` onward, so 2-, 4-
and 8-bit codes sit whole inside a word and 3-bit codes straddle words (GPTQModel's ten-and-a-bit per word layout
is exactly that stream). :func:`lowbit.quant.packing.pack` writes the same stream into bytes, so the words are its
bytes read four at a time.
"""

from __future__ import annotations

import torch

from lowbit.quant.packing import pack, packed_numel, unpack

BLOCK = 32  # weights per block of llama.cpp's Q4_0, Q4_1 and Q8_0
# llama.cpp type name -> (lowbit bits, symmetric) of the grid it holds exactly
GGUF_GRIDS = {"q4_1": (4, False), "q4_0": (4, True), "q8_0": (8, True)}


def _per_block(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """Repeat a per-group ``[out, groups]`` tensor per block of 32: ``[out, in / 32]``."""
    group = in_features // t.shape[1]
    if group % BLOCK:
        raise ValueError(f"group size {group} is not a multiple of {BLOCK}, the block of llama.cpp's Q4/Q8 types")
    return t.repeat_interleave(group // BLOCK, dim=1)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[out, n]`` values as fp16, viewed as ``[out, n, 2]`` little-endian bytes."""
    return t.to(torch.float16).contiguous().view(torch.uint8).view(*t.shape, 2)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[out, nb, 32]`` 4-bit codes as llama.cpp packs them: byte ``j`` holds code ``j`` low and ``j + 16`` high."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def gguf_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, qtype: str) -> torch.Tensor:
    """The ``[out, in / 32 * block_bytes]`` uint8 rows of a llama.cpp ``qtype`` holding ``(codes - z) * scales``.

    ``codes`` is ``[out, in]`` uint8, ``scales`` ``[out, groups]`` fp16, ``zeros`` ``[out, groups]`` (None for a
    symmetric grid); the grid must be the one ``qtype`` holds (:data:`GGUF_GRIDS`).
    """
    symmetric = GGUF_GRIDS[qtype][1]
    if symmetric != (zeros is None):
        raise ValueError(f"{qtype} holds a {'symmetric' if symmetric else 'asymmetric'} grid")
    out, in_features = codes.shape
    d = _per_block(scales.float(), in_features)
    q = codes.reshape(out, in_features // BLOCK, BLOCK)
    if qtype == "q4_1":
        m = -d * _per_block(zeros.float(), in_features)
        parts = [_fp16_bytes(d), _fp16_bytes(m), _nibbles(q)]
    elif qtype == "q4_0":
        parts = [_fp16_bytes(d), _nibbles(q)]
    else:  # q8_0: signed codes around lowbit's symmetric zero point 128
        parts = [_fp16_bytes(d), (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)]
    return torch.cat(parts, dim=-1).reshape(out, -1)


def gptq_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of ``[rows, n]`` codes as one little-endian bit stream of int32 words: ``[rows, n*bits/32]``."""
    rows, n = codes.shape
    if n * bits % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    return pack(codes, bits)[: rows * n * bits // 8].view(rows, n * bits // 8).view(torch.int32)


def gptq_unwords(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`gptq_words`: ``[rows, n*bits/32]`` int32 words back to ``[rows, n]`` uint8 codes."""
    rows, n_words = words.shape
    n = n_words * 32 // bits
    stream = words.contiguous().view(torch.uint8).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(packed_numel(rows * n, bits) - stream.numel())])
    return unpack(stream, bits, rows * n).view(rows, n)


def gptq_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """GPTQ's ``qweight [in*bits/32, out]``, ``qzeros [groups, out*bits/32]``, fp16 ``scales [groups, out]`` and
    ``g_idx [in]`` for ``w = (codes - zeros) * scales`` (``desc_act: false``: groups are consecutive columns)."""
    in_features = codes.shape[1]
    groups = scales.shape[1]
    return {
        "qweight": gptq_words(codes, bits).t().contiguous(),
        "qzeros": gptq_words(zeros.t().contiguous(), bits),
        "scales": scales.to(torch.float16).t().contiguous(),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // (in_features // groups),
    }
