"""lowbit's integer codes re-laid out in the block formats that serving runtimes read. Tensor math only.

lowbit stores ``w = (q - z) * s`` per group of input columns, with fp16 ``s``. Three llama.cpp types hold that grid
with nothing re-rounded but one fp16 product, one block of 32 weights at a time (a lowbit group of 64 is two blocks
with the same scale):

- ``Q4_1``, asymmetric 4-bit: ``w = d*q + m`` with ``d = s`` and ``m = -s*z`` (``m`` rounded to fp16: the only
  difference, at most half an fp16 step of ``s*z``);
- ``Q4_0``, symmetric 4-bit: ``w = d*(q - 8)``, lowbit's symmetric zero point is 8, so ``d = s`` exactly;
- ``Q8_0``, symmetric 8-bit: ``w = d*q`` with signed ``q = code - 128``, exactly.

``Q8_0`` is also how float tensors outside the blocks are stored when that is lossless (:func:`q8_0_quantize`,
:func:`q8_0_exact`): the embeddings of a model converted from a GGUF file with ``Q8_0`` embeddings, in a
checkpoint and in a GGUF export.

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
Q8_0_STEP = 1 << 18  # values per step of q8_0_exact (measured: 2x faster than whole 28M-value passes)


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


def q8_0_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``Q8_0`` of a finite float ``[..., n]`` tensor (``n`` a multiple of 32): int8 codes ``[..., n]``
    in [-127, 127] and fp16 scales ``[..., n / 32]``, ``w ~ scale * code`` per block of 32.

    The rounding is ggml's ``quantize_row_q8_0`` step for step (``d = amax / 127``, codes ``round(w * (1 / d))``
    with ties away from zero, ``d`` stored in fp16), as gguf-py writes it, so a GGUF file gets the same bytes.
    """
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    x = blocks * torch.where(d == 0, 0.0, 1 / d)
    a = x.abs()
    floored = a.floor()
    q = a.sub_(floored).mul_(2).floor_().add_(floored).mul_(x.sign_())  # gguf-py's np_roundf, in place
    return q.to(torch.int8).reshape(w.shape), d.squeeze(-1).to(torch.float16)


def q8_0_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 values of ``Q8_0`` codes and scales (:func:`q8_0_quantize`): ``float32(scale) * code``, which is
    exact in float32 (an 11-bit fp16 significand times a 7-bit code), as llama.cpp and gguf-py compute it."""
    blocks = codes.float().reshape(*scales.shape, BLOCK)
    return (blocks * scales.float().unsqueeze(-1)).reshape(codes.shape)


def q8_0_exact(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``Q8_0`` codes and scales of ``w`` when they give back every value (as float32) bit for bit, else None.

    Bits, not values: a value comparison would take ``-0.0`` for the ``+0.0`` that ``Q8_0`` gives back. Rows are
    checked in cache-sized steps, which is faster than whole-tensor passes and rejects a tensor that is off the
    grid (the embeddings of a bf16 model, say) at its first step.
    """
    rows = w.reshape(-1, w.shape[-1])
    codes, scales = [], []
    for part in rows.split(max(1, Q8_0_STEP // w.shape[-1])):
        c, s = q8_0_quantize(part)
        if not torch.equal(q8_0_dequantize(c, s).view(torch.int32), part.float().view(torch.int32)):
            return None
        codes.append(c)
        scales.append(s)
    return torch.cat(codes).reshape(w.shape), torch.cat(scales).reshape(*w.shape[:-1], -1)


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
