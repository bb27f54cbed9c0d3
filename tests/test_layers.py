"""QuantLinear: packed storage only, forward/backward equal a dense layer with the dequantized weight."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from lowbit import kernels
from lowbit.layers import QuantLinear, dense_module, quant_layers, to_dense
from lowbit.quant import QuantSpec, dequantize_weight, fake_quantize_weight


def _layer(spec: QuantSpec, bias: bool = True, rank: int = 4) -> tuple[nn.Linear, QuantLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    q = QuantLinear.from_linear(lin, spec)
    if rank:
        q.add_lora(rank, 8.0, generator=torch.Generator().manual_seed(0))
        nn.init.normal_(q.lora_B, std=0.1)
    return lin, q


@pytest.mark.parametrize(
    "spec", [QuantSpec(2, 16), QuantSpec(3, 32), QuantSpec(4, 64), QuantSpec(4, 16, "nf")], ids=lambda s: s.name
)
def test_forward_backward_match_dense(spec: QuantSpec) -> None:
    lin, q = _layer(spec)
    w = fake_quantize_weight(lin.weight.detach(), spec)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    ref = x @ (w + q.lora_delta()).t() + lin.bias
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (ref * g).sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-5)
    # Only LoRA factors train: the packed base has no gradient, the bias is frozen.
    assert q.lora_A.grad is not None and q.lora_B.grad is not None
    assert not q.bias.requires_grad
    assert all(b.dtype in (torch.uint8, torch.float16) for b in q.buffers())


@pytest.mark.parametrize("spec", [QuantSpec(2, 16), QuantSpec(3, 32), QuantSpec(4, 16, "nf")], ids=lambda s: s.name)
def test_fast_dequant_is_bit_identical(spec: QuantSpec) -> None:
    """The in-place float unpack path gives exactly the weight of the reference uint8 path."""
    _, q = _layer(spec, rank=0)
    reference = dequantize_weight(q.quantized(), spec)
    assert torch.equal(q.dequantized_weight(), reference)
    assert q.quantized().codes.dtype == torch.uint8  # the public default stays integer codes


def test_holds_no_full_precision_weight() -> None:
    _, q = _layer(QuantSpec(3, 64), rank=0)
    names = {n for n, _ in q.named_parameters()} | {n for n, _ in q.named_buffers()}
    assert names == {"qweight", "scales", "qzeros", "bias"}
    stored_bits = 8 * sum(b.numel() * b.element_size() for b in q.buffers())
    assert stored_bits / (64 * 48) <= 3.5


def test_lora_start_is_identity() -> None:
    _, q = _layer(QuantSpec(4, 64), rank=0)
    x = torch.randn(2, 64)
    before = q(x)
    q.add_lora(8, 16.0)
    assert torch.equal(q(x), before)  # B = 0


def test_dense_module_and_merge() -> None:
    """The dense module reproduces the quantized layer in its reference numerics (float32; on the CPU a W4 layer
    decodes on torch-int4 by default, with bf16 inside)."""
    _, q = _layer(QuantSpec(4, 32))
    x = torch.randn(4, 64)
    merged = dense_module(q, merge_lora=True)
    with kernels.pinned("reference"):
        assert torch.allclose(merged(x), q(x), atol=1e-5)
    base = dense_module(q)
    assert torch.allclose(base(x), x @ q.dequantized_weight().t() + q.bias, atol=1e-6)


def test_gpt2_conv1d_roundtrip() -> None:
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    spec = QuantSpec(8, 16)
    q = QuantLinear.from_linear(conv, spec)
    assert q.fan_in_fan_out and (q.in_features, q.out_features) == (64, 192)
    x = torch.randn(2, 64)
    assert torch.allclose(q(x), conv(x), atol=0.05)  # 8-bit: close to the original
    dense = dense_module(q)
    assert type(dense).__name__ == "Conv1D" and torch.allclose(dense(x), q(x), atol=1e-5)


def test_to_dense_replaces_all() -> None:
    import lowbit

    model = tiny_model("qwen2")
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=32), progress=False)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad(), kernels.pinned("reference"):  # the numerics a merge reproduces (see above)
        ref = model(ids).logits
        to_dense(model, merge_lora=True)
        assert not quant_layers(model)
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantize_leaves_only_the_lora_trainable(arch: str) -> None:
    """Like PEFT's get_peft_model: an optimizer over ``model.parameters()`` must not train the embeddings, head or
    norms of a quantized model (it once did, so P4's lowbit rows trained 11x the peers' parameters)."""
    import lowbit

    model = lowbit.quantize(tiny_model(arch), lowbit.QuantConfig(bits=4, group_size=32, rank=4), progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert lora and trainable == lora


@pytest.mark.skipif(not kernels._torch_kernels(), reason="torch-int4 needs torch 2.6 or later (its CPU int4 ops)")
@pytest.mark.parametrize("init", ["qlora", "apiq-bw"])
def test_quantized_layers_keep_the_models_mode(init: str) -> None:
    """Layers built by quantization take the mode of the layers they replace: in an eval model a LoRA dropout stays
    off, so inference repeats itself and decodes on torch-int4 (a new layer starts in training mode, and once
    dropped activations at inference -- and, in calibration, the next block's inputs); a training model's layers
    train."""
    import lowbit

    config = lowbit.QuantConfig(bits=4, group_size=32, rank=4, dropout=0.5, init=init,
                                options={"epochs": 1} if init == "apiq-bw" else {})  # fmt: skip
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model = lowbit.quantize(tiny_model("llama").eval(), config, calib=calib, progress=False)
    layers = quant_layers(model).values()
    assert layers and not any(m.training for m in layers)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in layers:
            nn.init.normal_(m.lora_B, std=0.1)  # a LoRA that changes the output, so dropout would show
        assert torch.equal(model(ids).logits, model(ids).logits)
        assert {kernels.select(m, ids.new_zeros(1, m.in_features, dtype=torch.float32), False).name
                for m in layers} == {"torch-int4"}  # fmt: skip
    training = lowbit.quantize(tiny_model("llama").train(), config, calib=calib, progress=False)
    assert all(m.training for m in quant_layers(training).values())
