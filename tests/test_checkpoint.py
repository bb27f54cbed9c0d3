"""Checkpoints: save -> load is bit-exact for every architecture, the adapter loads with PEFT, sizes are small."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from conftest import tiny_model, tiny_tokenizer
from lowbit.layers import quant_layers, to_dense


def _quantized(arch: str, bits: int = 3, fmt: str = "int", init: str = "qlora"):
    model = tiny_model(arch)
    lowbit.quantize(model, lowbit.QuantConfig(bits=bits, group_size=16, format=fmt, init=init, rank=4), progress=False)
    # A trained-looking adapter: B != 0, so the test sees whether the adapter is saved and applied.
    g = torch.Generator().manual_seed(3)
    for layer in quant_layers(model).values():
        if layer.lora_B is not None:
            layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.05
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def test_save_load_bit_identical(arch: str, tmp_path: Path) -> None:
    model = _quantized(arch)
    with torch.no_grad():
        ref = model(_ids()).logits
    lowbit.save(model, tmp_path / "ckpt", tiny_tokenizer())
    loaded, tok = lowbit.load(tmp_path / "ckpt")
    assert tok is not None
    with torch.no_grad():
        out = loaded(_ids()).logits
    assert torch.equal(out, ref)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["format"]) == ("lowbit", 3, 16, "int")
    assert {"lowbit_version", "torch_version", "transformers_version"} <= qc.keys()
    # Only LoRA factors are trainable after loading.
    trainable = {n.rsplit(".", 1)[-1] for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_adapter_loads_with_peft(arch: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model = _quantized(arch)
    with torch.no_grad():
        ref = model(_ids()).logits
    lowbit.save(model, tmp_path / "ckpt")
    base, _ = lowbit.load(tmp_path / "ckpt")
    peft_model = PeftModel.from_pretrained(to_dense(base), tmp_path / "ckpt")
    with torch.no_grad():
        out = peft_model(_ids()).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt,bits", [("int", 2), ("int", 4), ("int", 8), ("nf", 4), ("nf", 2)])
def test_formats_roundtrip_without_adapter(fmt: str, bits: int, tmp_path: Path) -> None:
    model = _quantized("llama", bits, fmt, init="none")
    with torch.no_grad():
        ref = model(_ids()).logits
    lowbit.save(model, tmp_path / "c")
    assert not (tmp_path / "c" / "adapter_config.json").exists()
    loaded, tok = lowbit.load(tmp_path / "c")
    assert tok is None
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, ref)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bits_per_weight(bits: int, tmp_path: Path) -> None:
    model = tiny_model("llama")
    lowbit.quantize(model, lowbit.QuantConfig(bits=bits, group_size=64), progress=False)
    lowbit.save(model, tmp_path / "c")
    info = lowbit.info(tmp_path / "c")
    # bits + 16-bit scale and b-bit zero per 64 weights
    assert info["bits_per_weight"] == pytest.approx(bits + (16 + bits) / 64)
    assert info["bits_per_weight"] <= bits + 0.5
    assert info["quantized_params"] == sum(m.in_features * m.out_features for m in quant_layers(model).values())


def test_tied_embeddings_stored_once(tmp_path: Path) -> None:
    model = _quantized("llama")  # tie_word_embeddings=True
    lowbit.save(model, tmp_path / "c")
    from safetensors import safe_open

    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded, _ = lowbit.load(tmp_path / "c")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_loaded_model_trains(tmp_path: Path) -> None:
    model = _quantized("mistral")
    lowbit.save(model, tmp_path / "c")
    loaded, _ = lowbit.load(tmp_path / "c")
    loaded.train()
    params = [p for p in loaded.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = _ids()
    losses = []
    for _ in range(3):
        loss = loaded(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(isinstance(b, torch.Tensor) and not b.requires_grad for b in loaded.buffers())
    assert not any(isinstance(m, nn.Linear) and "layers" in n for n, m in loaded.named_modules())
