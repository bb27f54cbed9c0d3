"""Architecture discovery: blocks and linear layers for every supported family; clear errors otherwise."""

import pytest
import torch
from torch import nn

import lowbit
from conftest import tiny_model
from lowbit.arch import find_blocks, target_linears
from lowbit.errors import LowbitError
from lowbit.layers import QuantLinear

EXPECTED = {
    "llama": ("model.layers", 7),
    "qwen2": ("model.layers", 7),
    "mistral": ("model.layers", 7),
    "gemma": ("model.layers", 7),
    "gemma2": ("model.layers", 7),
    "gemma3_text": ("model.layers", 7),
    "phi3": ("model.layers", 4),
    "gpt2": ("transformer.h", 4),
}


def test_blocks_and_linears(arch: str) -> None:
    model = tiny_model(arch, layers=3)
    prefix, blocks = find_blocks(model)
    assert (prefix, len(blocks)) == (EXPECTED[arch][0], 3)
    targets = target_linears(model)
    assert len(targets) == 3 * EXPECTED[arch][1]
    assert not any("lm_head" in n or "embed" in n for n in targets)


def test_quantize_every_arch_keeps_model_working(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        lowbit.quantize(model, lowbit.QuantConfig(bits=8, group_size=16), progress=False)
        out = model(ids).logits
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * EXPECTED[arch][1]
    # 8-bit is near-lossless: logits move by a small fraction of their spread.
    assert (out - ref).abs().mean() < 0.02 * ref.std()


def test_unknown_architecture_names_what_was_looked_for() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LowbitError, match=r"looked for an nn\.ModuleList"):
        find_blocks(Odd())


def test_group_size_error_suggests_divisor() -> None:
    model = tiny_model("llama")
    with pytest.raises(LowbitError, match=r"does not divide.*--group-size"):
        lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=48), progress=False)
