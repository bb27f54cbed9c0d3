"""Serving exports (GGUF for llama.cpp, GPTQ for transformers/GPTQModel/vLLM, merged in a chosen dtype), checked by
the readers of those formats -- gguf-py and transformers' GGUF loader -- and against GPTQModel's documented layouts,
and plain transformers' refusal of a lowbit checkpoint."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lowbit
import lowbit.models
from conftest import VOCAB, on_q8_0_grid, save_tiny, tiny_model
from lowbit.calibrate import calibrate
from lowbit.checkpoint import load_checkpoint
from lowbit.cli import main
from lowbit.engine import EngineOptions
from lowbit.export import export_merged, export_requantized
from lowbit.export_gguf import export_gguf
from lowbit.export_gptq import export_gptq
from lowbit.layers import quant_layers, to_dense
from lowbit.quant import QuantSpec, dequantize_weight, quantize_weight
from lowbit.quant.serving import (
    Q8_0_STEP,
    gguf_blocks,
    gptq_tensors,
    gptq_unwords,
    gptq_words,
    q8_0_dequantize,
    q8_0_exact,
    q8_0_quantize,
)

CALIB = torch.randint(3, 120, (8, 64), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(3, 120, (2, 48), generator=torch.Generator().manual_seed(1))


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer with the tiny models' 128 ids (GGUF stores GPT-2 style BPE vocabularies)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *letters, "Ġ"])}
    merges = []
    for a in letters:
        for b in "aeiou":
            if len(vocab) < VOCAB:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def checkpoint(tmp_path: Path, bits: int = 4, init: str = "qlora", arch: str = "llama", **kw) -> Path:
    """A tiny lowbit checkpoint (W``bits``g32) with a BPE tokenizer; ``wsvd`` gives an adapter with B != 0."""
    folder = save_tiny(tmp_path / f"fp-{arch}", arch)
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.save_pretrained(folder)
    config = lowbit.QuantConfig(bits=bits, group_size=kw.pop("group_size", 32), init=init, rank=4, **kw)
    out = tmp_path / f"q-{arch}-{bits}-{init}"
    calibrate(folder, config, out, CALIB if init != "qlora" else None, tokenizer, engine=EngineOptions(progress=False))
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----- block layouts against their readers ----------------------------------------------------------------------------
@pytest.mark.parametrize(("qtype", "bits", "symmetric"), [("q4_1", 4, False), ("q4_0", 4, True), ("q8_0", 8, True)])
def test_gguf_blocks_dequantize_with_gguf_py_to_lowbits_weights(qtype: str, bits: int, symmetric: bool) -> None:
    """gguf-py's dequantizer (the one transformers' GGUF loader uses) gives back lowbit's weights: exactly for the
    symmetric types, and within half an fp16 step of ``s*z`` for Q4_1's fp16 minimum."""
    import gguf

    spec = QuantSpec(bits, 64, "int", symmetric)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, spec)
    ref = dequantize_weight(q, spec)
    raw = gguf_blocks(q.codes, q.scales, q.zeros, qtype).numpy()
    got = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype.upper()]))
    assert got.shape == ref.shape
    if symmetric:
        assert torch.equal(got, ref)
    else:
        m = (q.scales.float() * q.zeros.float()).repeat_interleave(64, dim=1)
        bound = (m.abs() * 2.0**-11).clamp(min=2.0**-24)  # half an fp16 step of m
        assert ((got - ref).abs() <= bound + 1e-7).all()
        assert (got - ref).abs().max() > 0  # the rounding of m is real: the bound above is what is tested


def test_gguf_blocks_refuse_groups_that_are_not_whole_blocks() -> None:
    q = quantize_weight(torch.randn(4, 48), QuantSpec(4, 16))
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_blocks(q.codes, q.scales, q.zeros, "q4_1")


def test_q8_0_math_gives_gguf_pys_bytes_and_detects_exactly_the_lossless_tensors() -> None:
    """The one Q8_0 quantizer (checkpoint storage and GGUF embeddings) rounds as ggml/gguf-py does, so GGUF files
    keep their bytes, and calls a tensor lossless only when every bit comes back, in every step of its rows."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 96, generator=g) * torch.logspace(-4, 3, 96)  # blocks of very different ranges
    for w in (torch.randn(40, 256, generator=g), spread, torch.zeros(2, 64)):
        codes, scales = q8_0_quantize(w)
        assert (codes.dtype, scales.dtype, scales.shape) == (torch.int8, torch.float16, (w.shape[0], w.shape[1] // 32))
        blocks = gguf_blocks((codes.to(torch.int16) + 128).to(torch.uint8), scales, None, "q8_0").numpy()
        assert np.array_equal(blocks, gguf.quants.quantize(w.numpy(), q8))
        assert torch.equal(q8_0_dequantize(codes, scales), torch.from_numpy(gguf.quants.dequantize(blocks, q8)))
        assert (q8_0_exact(w) is None) == bool((w != 0).any())
    w = torch.randn(3 * Q8_0_STEP // 64, 64, generator=g)  # three steps of q8_0_exact
    on_grid = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8))
    exact = q8_0_exact(on_grid)
    assert exact is not None and all(torch.equal(a, b) for a, b in zip(exact, q8_0_quantize(on_grid), strict=True))
    on_grid[-1, 3] = torch.nextafter(on_grid[-1, 3], torch.tensor(1.0))  # one ulp off, in the last step
    negative_zero = torch.zeros(1, 32)
    negative_zero[0, 5] = -0.0  # equal in value to the +0.0 that Q8_0 gives back, not in bits
    assert q8_0_exact(on_grid) is None and q8_0_exact(negative_zero) is None


def _autogptq_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's original packing loop (rows of ``codes [n, cols]`` into int32 words along n), written out
    independently of lowbit's bit stream: 3-bit values straddle words at values 10 and 21 of every 32."""
    c = codes.to(torch.int64)
    n, cols = c.shape
    words = torch.zeros(n * bits // 32, cols, dtype=torch.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        for r in range(words.shape[0]):
            for j in range(per):
                words[r] |= c[r * per + j] << (bits * j)
    else:
        i = row = 0
        while row < words.shape[0]:
            for j in range(i, i + 10):
                words[row] |= c[j] << (3 * (j - i))
            i += 10
            words[row] |= c[i] << 30
            row += 1
            words[row] |= (c[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                words[row] |= c[j] << (3 * (j - i) + 1)
            i += 10
            words[row] |= c[i] << 31
            row += 1
            words[row] |= (c[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                words[row] |= c[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return (words & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_words_are_autogptqs_packing(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (64, 96), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = gptq_words(codes.t().contiguous(), bits).t()  # along the input dimension, as qweight is packed
    assert torch.equal(words, _autogptq_pack(codes, bits))
    assert torch.equal(gptq_unwords(words.t().contiguous(), bits), codes.t())


def _gptqmodel_dequantize(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """``[out, in]`` weight from GPTQ tensors the way GPTQModel's torch kernel reads them (2/4/8: shifts by
    ``wf``; 3: its three-word table), with v2 zero points (stored as they are)."""
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"].long()
    maxq = (1 << bits) - 1
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32)
        zeros = (qzeros.unsqueeze(2) >> wf.view(1, 1, -1)) & maxq
        weight = (qweight.unsqueeze(1) >> wf.view(1, -1, 1)) & maxq
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).view(1, 3, 12)  # fmt: skip
        z = qzeros.view(qzeros.shape[0], -1, 3, 1).expand(-1, -1, -1, 12) >> wf.unsqueeze(0)
        z[:, :, 0, 10] = (z[:, :, 0, 10] & 0x3) | ((z[:, :, 1, 0] << 2) & 0x4)
        z[:, :, 1, 11] = (z[:, :, 1, 11] & 0x1) | ((z[:, :, 2, 0] << 1) & 0x6)
        z = z & 0x7
        zeros = torch.cat([z[:, :, 0, :11], z[:, :, 1, 1:12], z[:, :, 2, 1:11]], dim=2)
        w = qweight.view(qweight.shape[0] // 3, 3, 1, -1).expand(-1, -1, 12, -1) >> wf.unsqueeze(-1)
        w = w & 0x7
        w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
        w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
        w = w & 0x7
        weight = torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1)
    weight = weight.reshape(-1, weight.shape[-1]).float()
    zeros = zeros.reshape(scales.shape).float()
    return (scales[g_idx] * (weight - zeros[g_idx])).t()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensors_dequantize_like_gptqmodel_to_lowbits_weights(bits: int) -> None:
    spec = QuantSpec(bits, 64)
    q = quantize_weight(torch.randn(96, 192, generator=torch.Generator().manual_seed(bits)), spec)
    t = gptq_tensors(q.codes, q.scales, q.zeros, bits)
    assert t["qweight"].shape == (192 * bits // 32, 96) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (3, 96 * bits // 32) and t["scales"].dtype == torch.float16
    assert torch.equal(t["g_idx"], torch.arange(192, dtype=torch.int32) // 64)
    assert torch.equal(_gptqmodel_dequantize(t, bits), dequantize_weight(q, spec))


# ----- GGUF files, read by transformers' GGUF loader -----------------------------------------------------------------
def test_gguf_export_loads_in_transformers_with_lowbits_weights_and_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoint(tmp_path)
    result = export_gguf(ckpt, tmp_path / "out" / "m.gguf", progress=False)
    assert result["type"] == "q4_1" and not result["requantized"]  # a QLoRA start (B = 0) is not re-quantized
    assert result["tensor_types"] == {"Q4_1": 14, "F16": 1, "F32": 5}  # random embeddings: not on a Q8_0 grid
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    model, tokenizer = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = model(HELD_OUT).logits
    dense = to_dense(model).state_dict()
    got = loaded.state_dict()
    for name, layer_weight in dense.items():
        step = 2.0**-11 * 8  # Q4_1's fp16 minimum: half an fp16 step of |s*z| <= |w| range; weights here are < 1
        assert (got[name] - layer_weight).abs().max() <= (step if "layers" in name and "norm" not in name else 1e-3)
    with torch.no_grad():
        assert relative(loaded(HELD_OUT).logits, ref) < 1e-2
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="m.gguf")
    text = "hello world ba"
    assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids


def test_gguf_export_of_an_adapter_checkpoint_requantizes_and_keeps_the_adapters_effect(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(tmp_path, bits=2, init="wsvd")  # W2 with an adapter that moves the outputs
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = model(HELD_OUT).logits
        for layer in quant_layers(model).values():
            layer.lora_B.zero_()
        no_adapter = relative(model(HELD_OUT).logits, ref)
    with pytest.raises(lowbit.LowbitError, match="needs calibration windows"):
        export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    result = export_gguf(ckpt, tmp_path / "m.gguf", calib=CALIB, progress=False)
    assert result["requantized"] and result["type"] == "q4_1"
    assert not any(p.name.startswith(".m.gguf") for p in tmp_path.iterdir())  # work folders removed
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative(loaded(HELD_OUT).logits, ref) < no_adapter


def test_gguf_export_of_nf4_requantizes_onto_q4_1_activation_aware(tmp_path: Path) -> None:
    """NF4 has no llama.cpp type: it goes to Q4_1 by GPTQ, closer to the NF4 model than rounding onto that grid."""
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(tmp_path, bits=4, init="none", format="nf")
    result = export_gguf(ckpt, tmp_path / "m.gguf", calib=CALIB, progress=False)
    assert result["requantized"] and result["type"] == "q4_1" and result["tensor_types"]["Q4_1"] == 14
    model, _ = load_checkpoint(ckpt)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    export_requantized(ckpt, tmp_path / "rtn", lowbit.QuantConfig(bits=4, group_size=32, init="none"), None,
                       progress=False)  # fmt: skip
    rounded, _ = load_checkpoint(tmp_path / "rtn")
    with torch.no_grad():
        ref = model(HELD_OUT).logits
        assert relative(loaded(HELD_OUT).logits, ref) < relative(rounded(HELD_OUT).logits, ref)


@pytest.mark.parametrize(("bits", "symmetric", "qtype"), [(8, True, "q8_0"), (4, True, "q4_0")])
def test_gguf_export_writes_symmetric_grids_exactly(tmp_path: Path, bits: int, symmetric: bool, qtype: str) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(tmp_path, bits=bits, init="none", symmetric=symmetric, group_size=64)
    result = export_gguf(ckpt, tmp_path / "m.gguf", embeddings="q8_0", progress=False)
    assert result["type"] == qtype and result["tensor_types"]["Q8_0"] >= 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    model, _ = load_checkpoint(ckpt)
    for name, layer in quant_layers(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.dequantized_weight())


def test_gguf_export_copies_the_tokenizer_of_the_gguf_the_model_came_from(tmp_path: Path) -> None:
    """A model converted from a GGUF file (the default model) keeps that file's tokenizer metadata -- its
    llama.cpp pre-tokenizer name included, which lowbit cannot derive -- through quantization and fine-tuning."""
    import gguf

    first = checkpoint(tmp_path)
    export_gguf(first, tmp_path / "src" / "model.gguf", progress=False)
    source = lowbit.models.resolve_model_path(tmp_path / "src" / "model.gguf")  # converted, as the default model is
    tokenizer = lowbit.models.load_tokenizer(source)
    config = lowbit.QuantConfig(bits=4, group_size=32, init="qlora", rank=4)
    calibrate(source, config, tmp_path / "q", None, tokenizer, engine=EngineOptions(progress=False))
    finetuned = tmp_path / "ft"
    shutil.copytree(tmp_path / "q", finetuned)
    config = json.loads((finetuned / "config.json").read_text())
    config["quantization_config"]["source"] = None  # as a fine-tuned checkpoint: only training.json names its base
    (finetuned / "config.json").write_text(json.dumps(config))
    (finetuned / "training.json").write_text(json.dumps({"base": str(tmp_path / "q")}))
    result = export_gguf(finetuned, tmp_path / "m.gguf", progress=False)
    assert result["tokenizer"] == f"copied from {(tmp_path / 'src' / 'model.gguf').resolve()}"
    field = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"]
    assert field.contents() == "default"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"arch": "qwen2"}, "supports the llama architecture, not qwen2"),
        ({"arch": "llama", "qtype": "q2_k"}, "GGUF type 'q2_k' is not supported"),
        ({"arch": "llama", "embeddings": "q6_k"}, "embeddings type 'q6_k' is not supported"),
    ],
)
def test_gguf_export_refuses_what_it_does_not_write(tmp_path: Path, kw: dict, match: str) -> None:
    ckpt = checkpoint(tmp_path, arch=kw.pop("arch"))
    with pytest.raises(lowbit.LowbitError, match=match):
        export_gguf(ckpt, tmp_path / "m.gguf", progress=False, **kw)
    assert not (tmp_path / "m.gguf").exists()


# ----- GPTQ folders --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_export_holds_lowbits_weights(tmp_path: Path, bits: int) -> None:
    ckpt = checkpoint(tmp_path, bits=bits, init="none", group_size=64)
    result = export_gptq(ckpt, tmp_path / "g", progress=False)
    assert result["bits"] == bits and not result["requantized"]
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "llama"
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["checkpoint_format"]) == ("gptq", bits, 64, "gptq_v2")
    assert qc["desc_act"] is False and qc["sym"] is False
    tensors = load_file(tmp_path / "g" / "model.safetensors")
    model, _ = load_checkpoint(ckpt)
    for name, layer in quant_layers(model).items():
        parts = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(_gptqmodel_dequantize(parts, bits), layer.dequantized_weight())
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" not in tensors  # tied to the embeddings
    assert (tmp_path / "g" / "tokenizer.json").is_file()


def test_gptq_export_of_an_adapter_checkpoint_requantizes(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path, bits=2, init="wsvd")
    result = export_gptq(ckpt, tmp_path / "g", bits=4, calib=CALIB, progress=False)
    assert result["requantized"] and result["group_size"] == 64
    tensors = load_file(tmp_path / "g" / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128 * 4 // 32, 64)


def test_exports_of_a_checkpoint_with_q8_0_embeddings_get_their_float_values(tmp_path: Path) -> None:
    """The checkpoint stores the embeddings as Q8_0 codes; every export reads them back as the float32 values."""
    import gguf

    model = tiny_model("llama")
    on_q8_0_grid(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    folder = tmp_path / "fp"
    model.save_pretrained(folder)
    tiny_bpe_tokenizer().save_pretrained(folder)
    ckpt = tmp_path / "q"
    calibrate(folder, lowbit.QuantConfig(bits=4, group_size=32, init="none"), ckpt, None, tiny_bpe_tokenizer(),
              engine=EngineOptions(progress=False))  # fmt: skip
    assert "model.embed_tokens.weight.q8_codes" in load_file(ckpt / "model-base.safetensors")

    result = export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    assert result["tensor_types"] == {"Q4_1": 14, "Q8_0": 1, "F32": 5}  # auto: lossless, so Q8_0
    tensor = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "token_embd.weight")
    assert np.array_equal(np.asarray(tensor.data), gguf.quants.quantize(embed.numpy(), gguf.GGMLQuantizationType.Q8_0))
    export_merged(ckpt, tmp_path / "merged")
    assert torch.equal(load_file(tmp_path / "merged" / "model.safetensors")["model.embed_tokens.weight"], embed)
    export_gptq(ckpt, tmp_path / "gptq", progress=False)
    assert torch.equal(load_file(tmp_path / "gptq" / "model.safetensors")["model.embed_tokens.weight"], embed.half())


# ----- merged dtype and plain transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "expected"), [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_merged_export_dtype(tmp_path: Path, dtype: str | None, expected: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(tmp_path, init="wsvd")
    export_merged(ckpt, tmp_path / "m", dtype=dtype)
    assert all(t.dtype == expected for t in load_file(tmp_path / "m" / "model.safetensors").values())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        assert relative(plain(HELD_OUT).logits, model(HELD_OUT).logits) < (1e-4 if dtype is None else 2e-2)


def test_plain_transformers_refuses_a_lowbit_checkpoint(tmp_path: Path) -> None:
    """Before: from_pretrained skipped the unknown quant_method and loaded random weights for every layer."""
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(tmp_path)
    with pytest.raises(ValueError, match="model type `lowbit`"):
        AutoModelForCausalLM.from_pretrained(ckpt)
    model, tokenizer = load_checkpoint(ckpt)  # lowbit itself still loads it
    assert model.config.model_type == "llama" and tokenizer is not None


def test_checkpoints_without_the_marker_still_load(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = config["quantization_config"].pop("model_type")  # as written before the marker
    (ckpt / "config.json").write_text(json.dumps(config))
    model, _ = load_checkpoint(ckpt)
    assert model.config.model_type == "llama"


# ----- command line --------------------------------------------------------------------------------------------------
def test_cli_export_gguf_and_gptq_json(tmp_path: Path, capsys) -> None:
    ckpt = checkpoint(tmp_path)
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "m.gguf"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "gguf" and result["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert main(["export", str(ckpt), "--gptq", str(tmp_path / "g"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "gptq"
    assert main(["export", str(ckpt), "--merged", str(tmp_path / "m"), "--dtype", "float16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float16"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--gguf", "{p}/a.gguf", "--gptq", "{p}/g"], "exactly one of --merged"),
        (["--gguf", "{p}/a.gguf", "--dtype", "float16"], "--dtype applies to --merged only"),
        (["--gptq", "{p}/g", "--bits", "5"], "GPTQ export supports bits 2, 3, 4, 8, not 5"),
        (["--gguf", "{ckpt}/inside.gguf"], "is inside the input"),
        (["--gguf", "{p}"], "is a folder"),
    ],
)
def test_cli_export_bad_input(tmp_path: Path, capsys, args: list, match: str) -> None:
    ckpt = checkpoint(tmp_path)
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["export", str(ckpt), *[a.format(p=tmp_path, ckpt=ckpt) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lowbit: error:") and match in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
