"""Checkpoints: save -> load is bit-exact for every architecture, the adapter loads with PEFT, sizes are small."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from conftest import on_q8_0_grid, tiny_model, tiny_tokenizer
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


# ----- lossless Q8_0 storage of the tensors outside the blocks (issue 17 item 12) ----------------------------------
def _stored(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for p in folder.glob("model*.safetensors") for k, v in load_file(p).items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach().contiguous().view(torch.int32), b.detach().contiguous().view(torch.int32))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied embeddings; untied head
def test_tensors_on_a_q8_0_grid_are_stored_as_int8_and_load_bit_exact(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(arch)
    names = on_q8_0_grid(model)
    assert len(names) == (1 if arch == "llama" else 2)
    lowbit.quantize(model, lowbit.QuantConfig(bits=3, group_size=16, rank=4), progress=False)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    with torch.no_grad():
        ref = model(_ids()).logits
    lowbit.save(model, tmp_path / "c")
    stored = _stored(tmp_path / "c")
    for name in names:
        assert name not in stored
        assert stored[name + ".q8_codes"].dtype == torch.int8 and stored[name + ".q8_codes"].shape == values[name].shape
        assert stored[name + ".q8_scales"].dtype == torch.float16
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["q8_0_tensors"] == sorted(names)
    assert lowbit.info(tmp_path / "c")["q8_0_tensors"] == sorted(names)

    loaded, _ = lowbit.load(tmp_path / "c")
    got = dict(loaded.named_parameters())
    assert all(got[n].dtype == torch.float32 and _same_bits(got[n], values[n]) for n in names)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, ref)
    if arch == "llama":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # Saved again (as finetune does with a loaded checkpoint), it stays Q8_0; and it is smaller than float32.
    lowbit.save(loaded, tmp_path / "again")
    assert _stored(tmp_path / "again").keys() == stored.keys()
    monkeypatch.setattr("lowbit.checkpoint.q8_0_exact", lambda _: None)  # the storage before this change
    lowbit.save(model, tmp_path / "f32")
    saved = sum(values[n].numel() * (4 - 1 - 2 / 32) for n in names)  # float32 -> int8 code + fp16 scale per 32
    f32, q8 = (lowbit.info(tmp_path / d)["checkpoint_bytes"] for d in ("f32", "c"))
    assert f32 - q8 == pytest.approx(saved, abs=1024)  # headers and config differ by a few hundred bytes


def test_tensors_off_the_q8_0_grid_are_stored_as_before(tmp_path: Path) -> None:
    model = tiny_model("llama")
    on_q8_0_grid(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 7] = torch.nextafter(
            model.model.embed_tokens.weight[5, 7], torch.tensor(1.0)
        )
    lowbit.quantize(model, lowbit.QuantConfig(bits=3, group_size=16, rank=4), progress=False)
    random = tiny_model("qwen2")  # random values, untied head
    lowbit.quantize(random, lowbit.QuantConfig(bits=3, group_size=16, rank=4), progress=False)
    for m, folder in ((model, tmp_path / "one-ulp-off"), (random, tmp_path / "random")):
        lowbit.save(m, folder)
        stored = _stored(folder)
        assert not any(k.endswith((".q8_codes", ".q8_scales")) for k in stored)
        assert stored["model.embed_tokens.weight"].dtype == torch.float32
        assert "q8_0_tensors" not in json.loads((folder / "config.json").read_text())["quantization_config"]
        loaded, _ = lowbit.load(folder)
        assert _same_bits(loaded.model.embed_tokens.weight, m.model.embed_tokens.weight)


def test_checkpoint_with_float32_embeddings_from_before_q8_0_storage_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llama")
    on_q8_0_grid(model)
    lowbit.quantize(model, lowbit.QuantConfig(bits=3, group_size=16, rank=4), progress=False)
    with monkeypatch.context() as m:
        m.setattr("lowbit.checkpoint.q8_0_exact", lambda _: None)  # write the old format
        lowbit.save(model, tmp_path / "old")
    assert _stored(tmp_path / "old")["model.embed_tokens.weight"].dtype == torch.float32
    loaded, _ = lowbit.load(tmp_path / "old")
    assert _same_bits(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)
    lowbit.save(loaded, tmp_path / "new")  # saved again by this version: now Q8_0
    assert "model.embed_tokens.weight.q8_codes" in _stored(tmp_path / "new")


def test_streaming_quantization_stores_q8_0_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command line's path (streaming calibration writes the tensors outside the blocks in its own shard)."""
    from lowbit.cli import main

    src = tmp_path / "src"
    model = tiny_model("llama")
    on_q8_0_grid(model)
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "3", "--group-size", "32", "--out", str(out)]) == 0
    assert _stored(out)["model.embed_tokens.weight.q8_codes"].dtype == torch.int8
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "stored as Q8_0 (lossless: the values lie on its grid): model.embed_tokens.weight" in capsys.readouterr().out
    loaded, _ = lowbit.load(out)
    assert _same_bits(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_config_listing_q8_0_tensors_the_files_lack_is_an_error(tmp_path: Path) -> None:
    lowbit.save(_quantized("llama"), tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["q8_0_tensors"] = ["model.embed_tokens.weight"]
    path.write_text(json.dumps(config))
    with pytest.raises(lowbit.LowbitError, match=r"lists model.embed_tokens.weight as stored in Q8_0 .* re-create"):
        lowbit.load(tmp_path / "c")
