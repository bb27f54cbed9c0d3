"""Dense bit-packing of low-bit integer codes into bytes.

Eight codes of ``bits`` bits each fill exactly ``bits`` bytes, for every width from 1 to 8. Packing works on runs of
eight codes, so 3-bit codes take 3 bits each on disk and in memory (not 4, as a nibble layout would give), and the
same two functions serve every width. Codes are laid out little-endian inside each run: code ``i`` of a run
occupies bits ``bits*i .. bits*i + bits - 1`` of the run's ``bits``-byte little-endian integer.

Equivalently, code ``i`` of the whole flat stream starts at bit ``i * bits`` of the little-endian bytes. That is
what the fused kernels (:mod:`lowbit.kernels`) read in place: a layer's ``[out, in]`` codes are packed flat, so row
``n`` starts at bit ``n * in * bits`` -- on a byte boundary when ``in % 8 == 0`` and on a 4-byte word when
``in % 32 == 0`` -- and the zero points (1/64 of the codes at g64) are read the same way from their own flat
stream. Keeping one layout for disk, memory and kernels means no repacking at load time and no second copy.
Checkpoints record it as ``packing_version`` (:data:`PACKING_VERSION`); a future layout gets a new number.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
# The layout above. Checkpoints written before the version was recorded use it too.
PACKING_VERSION = 1


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that :func:`pack` produces for ``numel`` codes."""
    return (numel + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape) into a flat uint8 tensor of ``packed_numel`` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    runs = flat.view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=1)  # at most 64 bits per run: fits int64 since bits <= 8 -> 64 bits only at 8
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = (words.unsqueeze(1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack`: return the first ``numel`` codes as a flat ``dtype`` tensor.

    This runs on every forward and backward of a QuantLinear, so it is written for speed: each code slot of a
    byte (or of a 3-bit run's 24-bit word) is shifted by a scalar and written straight into a strided view of the
    output. On CPU that is about three times faster than one broadcast shift over all slots, and asking for a float
    ``dtype`` skips the separate uint8-to-float pass that dequantization would otherwise make.
    """
    _check_bits(bits)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits")
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        words = packed
    else:  # a run of eight codes spans ``bits`` bytes: rebuild it as one integer word
        runs = packed.reshape(-1, bits).to(torch.int32 if bits <= 3 else torch.int64)
        words = runs[:, 0].clone()
        for k in range(1, bits):
            words |= runs[:, k] << (8 * k)
    slots = 8 if 8 % bits else 8 // bits
    out = torch.empty(words.numel(), slots, dtype=dtype, device=packed.device)
    for k in range(slots):
        out[:, k] = (words >> (k * bits)) & mask if k else words & mask
    return out.reshape(-1)[:numel]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
