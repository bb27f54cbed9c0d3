"""Bit-packing round-trips exactly for every width and odd shapes, and is dense (3-bit takes 3 bits)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant.packing import pack, packed_numel, unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(min_value=1, max_value=8),
    rows=st.integers(min_value=1, max_value=37),
    cols=st.integers(min_value=1, max_value=29),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_pack_roundtrip_random_codes(bits: int, rows: int, cols: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(codes.numel(), bits)
    assert torch.equal(unpack(packed, bits, codes.numel()).view(rows, cols), codes)
    # The training path unpacks straight into float: same codes, no uint8 pass.
    assert torch.equal(unpack(packed, bits, codes.numel(), torch.float32).view(rows, cols), codes.float())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_is_dense(bits: int) -> None:
    codes = torch.zeros(64 * 576, dtype=torch.uint8)
    assert pack(codes, bits).numel() * 8 == bits * codes.numel()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes(bits: int) -> None:
    codes = torch.tensor([0, (1 << bits) - 1] * 13, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, codes.numel()), codes)


def test_known_layout() -> None:
    # 3-bit codes 0..7 little-endian in one 24-bit word: 0b111110101100011010001000 = 0xFAC688
    packed = pack(torch.arange(8, dtype=torch.uint8), 3)
    assert packed.tolist() == [0x88, 0xC6, 0xFA]


def test_rejects_out_of_range_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="lie in"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(5, dtype=torch.uint8), 3, 8)
