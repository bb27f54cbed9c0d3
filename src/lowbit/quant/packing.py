"""Dense bit-packing of low-bit integer codes into bytes.

Eight codes of ``bits`` bits each fill exactly ``bits`` bytes, for every width from 1 to 8. Packing works on runs of
eight codes, so 3-bit codes take 3 bits each on disk and in memory (not 4, as a nibble layout would give), and the
same two functions serve every width. Codes are laid out little-endian inside each run: code ``i`` of a run
occupies bits ``bits*i .. bits*i + bits - 1`` of the run's ``bits``-byte little-endian integer.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


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


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: return the first ``numel`` codes as a flat uint8 tensor.

    This runs on every forward and backward of a QuantLinear, so it avoids int64 work where it can: widths that
    divide 8 unpack byte by byte in uint8, and 3-bit runs fit a 24-bit int32 word.
    """
    _check_bits(bits)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits")
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel]
    dtype = torch.int32 if bits <= 3 else torch.int64
    runs = packed.reshape(-1, bits).to(dtype)
    words = runs[:, 0].clone()
    for k in range(1, bits):
        words |= runs[:, k] << (8 * k)
    shifts = torch.arange(8, device=packed.device, dtype=dtype) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
