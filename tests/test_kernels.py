"""The kernel seam: the reference keeps lowbit's numerics, selection picks the right kernel, storage is versioned.

The Triton kernels themselves are compared with the reference in ``tests/triton_cases.py``, which must run in a
process where ``TRITON_INTERPRET=1`` was set before Triton was imported; the test here starts it, so the flag
never reaches any other test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from conftest import tiny_model
from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.kernels import lora, reference, siblings, torch_int4
from lowbit.layers import QuantLinear, quant_layers
from lowbit.quant import QuantSpec, quantize_weight


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> tuple[kernels.Kernel, ...]:
    """The Triton kernels' declarations, allowed on the CPU, as what :func:`kernels.select` chooses from."""
    pytest.importorskip("triton")
    from lowbit.kernels import triton_decode, triton_dequant, triton_gemm, triton_gemv

    modules = (triton_decode, triton_gemm, triton_dequant, triton_gemv)
    found = tuple(dataclasses.replace(m.KERNEL, devices=("cpu",)) for m in modules)
    monkeypatch.setattr(kernels, "_fast_kernels", lambda device: {k.name: k for k in found})
    return found


def _layer(bits: int, group: int, fmt: str = "int", rank: int = 0, in_f: int = 128) -> QuantLinear:
    torch.manual_seed(bits * 1000 + group)
    layer = QuantLinear.from_linear(nn.Linear(in_f, 37), QuantSpec(bits=bits, group_size=group, format=fmt))
    if rank:
        layer.add_lora(rank, 2.0 * rank)
        nn.init.normal_(layer.lora_B, std=0.1)
    return layer


# ----- the reference --------------------------------------------------------------------------------------------
def test_reference_is_the_dense_matmul_bit_for_bit() -> None:
    """CPU numerics are unchanged by the seam: the base product is exactly ``x @ dequant(Q)^T``."""
    layer = _layer(3, 32, rank=4)
    x = torch.randn(2, 5, 128)
    assert torch.equal(reference.matmul(layer, x), F.linear(x, layer.dequantized_weight()))
    lora = layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight()) + layer.bias + lora)
    assert kernels.select(layer, x, training=False) is kernels.REFERENCE


def test_triton_kernels_match_reference_under_interpreter() -> None:
    """Every Triton kernel equals the reference (tests/triton_cases.py, in a process of its own: see there)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(Path(__file__).with_name("triton_cases.py")),
    ]
    proc = subprocess.run(cmd, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# ----- selection --------------------------------------------------------------------------------------------------
def test_select_cpu_is_reference_without_importing_triton_kernels() -> None:
    layer = _layer(4, 64)
    x = torch.randn(1, 128)
    assert kernels.select(layer, x, training=False) is kernels.REFERENCE
    with kernels.pinned("triton-decode"):  # pinned, but it cannot run on the CPU: the reference does
        assert kernels.select(layer, x, training=False) is kernels.REFERENCE


def test_select_by_rows_format_dtype_and_training(fast) -> None:
    decode, gemm, dequant, _ = fast
    layer = _layer(4, 64)
    assert kernels.select(layer, torch.randn(1, 128), training=False) is decode  # gemv: only when pinned
    assert kernels.select(layer, torch.randn(16, 128), training=False) is decode
    assert kernels.select(layer, torch.randn(2, 9, 128), training=False) is gemm  # 18 rows
    assert kernels.select(layer, torch.randn(2, 1024, 128), training=True) is dequant
    assert kernels.select(layer, torch.randn(1, 128).double(), training=False) is kernels.REFERENCE
    assert kernels.select(_layer(4, 16), torch.randn(1, 128), training=False) is kernels.REFERENCE  # g16
    assert kernels.select(_layer(4, 64, fmt="nf"), torch.randn(1, 128), training=False) is decode
    no_backward = dataclasses.replace(decode, has_backward=False)
    kernels_now = {k.name: k for k in (no_backward, gemm)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_fast_kernels", lambda device: kernels_now)
        assert kernels.select(layer, torch.randn(1, 128), training=False) is no_backward
        assert kernels.select(layer, torch.randn(1, 128), training=True) is gemm


def test_select_prefers_tinygemm_for_decoding(fast, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where both run (CUDA), int W2-W4 decoding goes to torch-int4 (tinygemm: 3.3x triton-decode at one row on an
    H100); triton-decode keeps what tinygemm does not take, and training and prefill never reach either."""
    if not kernels._torch_kernels():
        pytest.skip("torch-int4 needs torch 2.6 or later (its CPU int4 ops)")
    decode, gemm, _, _ = fast
    int4 = kernels.kernel("torch-int4")
    monkeypatch.setattr(kernels, "_fast_kernels", lambda device: {k.name: k for k in (*fast, int4)})
    for bits in (2, 3, 4):
        layer = _w4(64, bits=bits)
        for m in (1, 16):
            assert kernels.select(layer, torch.randn(m, 256), training=False) is int4
            assert kernels.select(layer, torch.randn(m, 256).bfloat16(), training=False) is int4
        assert kernels.select(layer, torch.randn(17, 256), training=False) is gemm  # prefill-sized
        assert kernels.select(layer, torch.randn(1, 256), training=True) is decode  # tinygemm has no backward
        assert kernels.select(layer, torch.randn(1, 256).half(), training=False) is decode  # it takes no fp16
    assert kernels.select(_w4(64, out_f=40), torch.randn(1, 256), training=False) is decode  # outputs not in 16s
    assert kernels.select(_w4(64, bits=8), torch.randn(1, 256), training=False) is decode
    assert kernels.select(_layer(4, 64, fmt="nf"), torch.randn(1, 128), training=False) is decode


def test_pinning(fast, monkeypatch: pytest.MonkeyPatch) -> None:
    decode, gemm, _, gemv = fast
    layer = _layer(4, 64)
    x = torch.randn(1, 128)
    with kernels.pinned("triton-gemv"):  # one row, forward, rows on 32-bit words: the reference elsewhere
        assert kernels.select(layer, x, training=False) is gemv
        assert kernels.select(layer, torch.randn(2, 128), training=False) is kernels.REFERENCE
        assert kernels.select(layer, x, training=True) is kernels.REFERENCE
        assert kernels.select(_layer(4, -1, in_f=100), torch.randn(1, 100), training=False) is kernels.REFERENCE
    with kernels.pinned("reference"):
        assert kernels.select(layer, x, training=False) is kernels.REFERENCE
    with kernels.pinned("triton-gemm"):
        assert kernels.select(layer, x, training=False) is gemm
        with kernels.pinned("reference"):  # nests, and restores the outer pin
            assert kernels.select(layer, x, training=False) is kernels.REFERENCE
        assert kernels.select(layer, x, training=False) is gemm
        assert kernels.select(_layer(4, 16), x, training=False) is kernels.REFERENCE  # unsupported: fallback
    assert kernels.select(layer, x, training=False) is decode
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.select(layer, x, training=False) is kernels.REFERENCE
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(LowbitError, match="LOWBIT_KERNEL='fastest' names no kernel"):
        kernels.select(layer, x, training=False)
    with pytest.raises(LowbitError, match="unknown kernel"), kernels.pinned("fastest"):
        pass
    with pytest.raises(LowbitError, match="unknown kernel 'fastest'; choose one of torch-int4, triton-decode"):
        kernels.kernel("fastest")
    assert kernels.kernel("reference") is kernels.REFERENCE


def test_calibration_pins_the_kernel_without_tile_dependent_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every quantized-layer call during calibration runs pinned to triton-dequant (the reference on the CPU), so
    a resumed run cannot round differently from an uninterrupted one; outside calibration nothing is pinned."""
    from lowbit.engine import CALIBRATION_KERNEL

    seen = []
    real = kernels.select
    monkeypatch.setattr(kernels, "select", lambda *a: seen.append(kernels.pinned_name()) or real(*a))
    model = tiny_model("llama")
    calib = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    config = lowbit.QuantConfig(bits=2, group_size=32, init="apiq-bw", rank=4, options={"epochs": 1})
    lowbit.quantize(model, config, calib=calib, progress=False)
    assert CALIBRATION_KERNEL == "triton-dequant" and seen and set(seen) == {CALIBRATION_KERNEL}
    seen.clear()
    with torch.no_grad():
        model(calib[:1])
    assert seen and set(seen) == {None}


# ----- torch-int4 (CPU) -------------------------------------------------------------------------------------------
def _w4(group: int, out_f: int = 48, symmetric: bool = False, seed: int = 0, bits: int = 4) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(256, out_f), QuantSpec(bits=bits, group_size=group, symmetric=symmetric))


needs_int4 = pytest.mark.skipif(
    not kernels._torch_kernels(), reason="torch-int4 needs torch 2.6 or later (its CPU int4 ops)"
)


@needs_int4
def test_torch_int4_matches_reference_and_declares_its_limits() -> None:
    """PyTorch's int4 op on the layer's own codes (2- and 3-bit ones inside its 4-bit range): the reference's
    output to bf16 rounding, in the compute dtype; only int W2-W4 at decode sizes, group sizes it takes, outputs in
    sixteens, no backward."""
    k = kernels.kernel("torch-int4")
    cases = [(4, 32, False, torch.float32, 1), (4, 64, True, torch.bfloat16, 5), (4, 128, False, torch.float32, 16),
             (4, 256, False, torch.bfloat16, 3), (3, 64, True, torch.float32, 2), (3, 32, False, torch.bfloat16, 1),
             (2, 64, False, torch.float32, 4), (2, 128, True, torch.float32, 1)]  # fmt: skip
    for bits, group, symmetric, dtype, m in cases:
        layer = _w4(group, symmetric=symmetric, seed=group, bits=bits)
        x = torch.randn(m, 256).to(dtype)
        assert k.supports(layer, x, training=False)
        ours, ref = k.matmul(layer, x), reference.matmul(layer, x)
        assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape
        assert (ours.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    layer = _w4(64)
    assert not k.supports(layer, torch.randn(17, 256), training=False)  # prefill-sized: the reference is as fast
    assert not k.supports(layer, torch.randn(0, 256), training=False)
    assert not k.supports(layer, torch.randn(1, 256), training=True)  # no backward
    assert not k.supports(layer, torch.randn(1, 256).double(), training=False)
    assert not k.supports(_w4(64, out_f=40), torch.randn(1, 256), training=False)  # outputs not in sixteens
    assert not k.supports(_w4(-1), torch.randn(1, 256), training=False)  # a 256-wide group is fine, -1 is not
    assert not k.supports(_w4(64, bits=8), torch.randn(1, 256), training=False)
    assert not k.supports(_layer(4, 64, fmt="nf"), torch.randn(1, 128), training=False)


@needs_int4
def test_torch_int4_decodes_by_default_and_repacks_when_the_weights_change(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, other, third = (_w4(64, out_f=32, seed=s) for s in (1, 2, 3))
    x = torch.randn(1, 256)

    def close(y: torch.Tensor, source: QuantLinear) -> bool:  # y against source's codes and layer's own bias
        ref = reference.matmul(source, x) + layer.bias
        return bool((y - ref).abs().max() <= 2e-2 * ref.abs().max())

    assert kernels.select(layer, x, training=False).name == "torch-int4"  # the CPU's decoding kernel
    with kernels.pinned("reference"):
        assert kernels.select(layer, x, training=False) is kernels.REFERENCE
    assert kernels.select(layer, torch.randn(17, 256), training=False) is kernels.REFERENCE  # prefill-sized
    chosen = []
    real_select = kernels.select
    monkeypatch.setattr(kernels, "select", lambda *a: chosen.append(real_select(*a).name) or real_select(*a))
    layer(x)  # grad mode, although x needs no gradient (a first block's input in training): training numerics
    with torch.no_grad():
        layer(x)
    assert chosen == ["reference", "torch-int4"]
    monkeypatch.undo()
    with torch.no_grad():
        assert close(layer(x), layer) and not close(layer(x), other)
        for name, buffer in other.named_buffers():  # in place: only the buffers' version counters tell
            getattr(layer, name).copy_(buffer)
        assert close(layer(x), other)
        layer.set_weight(third.quantized())  # new buffers, twice before the next call
        layer.set_weight(third.quantized())
        assert close(layer(x), third) and not close(layer(x), other)
    assert not any("int4" in name for name in layer.state_dict())  # the repacked copy is never saved
    assert torch_int4.CACHE in layer.__dict__
    layer.to(torch.device("cpu"))  # new buffers on a move: the copy made from the old ones goes (and its memory)
    assert torch_int4.CACHE not in layer.__dict__
    with torch.no_grad():
        layer(x)
    kernels.drop_caches(nn.Sequential(layer))
    assert torch_int4.CACHE not in layer.__dict__


@needs_int4
def test_torch_int4_leaves_a_layer_whose_copy_does_not_fit_to_another_kernel(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a GPU the repacked copy doubles a W4 layer's memory and triples a W2 one's: a layer whose copy would not
    leave HEADROOM of the device free decodes on the next kernel instead, one warning says so, and a move or a load
    (drop_caches) asks again; a layer that has its copy is never asked."""
    small, large = _w4(64, out_f=32, seed=1), _w4(64, out_f=64, seed=2, bits=2)
    need = torch_int4.repacked_bytes(small)
    assert need == 32 * 256 // 2 + (256 // 64) * 32 * 4  # half a byte a weight + a bf16 pair per group and row
    total = 100 * need
    left = {"bytes": need + int(torch_int4.HEADROOM * total)}  # exactly the small layer's copy and the headroom
    monkeypatch.setattr(torch_int4, "memory_left", lambda device: (left["bytes"], total))
    monkeypatch.setattr(torch_int4, "_warned_no_room", False)
    x = torch.randn(1, 256)
    assert kernels.select(small, x, training=False).name == "torch-int4"
    with torch.no_grad():
        small(x)  # makes the copy: from here on its memory is never asked about
    monkeypatch.setattr(torch_int4, "memory_left", lambda device: pytest.fail("asked again"))
    assert kernels.select(small, x, training=False).name == "torch-int4"
    monkeypatch.setattr(torch_int4, "memory_left", lambda device: (left["bytes"], total))
    assert kernels.select(large, x, training=False) is kernels.REFERENCE  # 2x the bytes: no room
    assert kernels.select(large, x, training=False) is kernels.REFERENCE
    with kernels.pinned("torch-int4"):  # a pin cannot force it either
        assert kernels.select(large, x, training=False) is kernels.REFERENCE
    with torch.no_grad():
        assert torch.equal(large(x), reference.matmul(large, x) + large.bias)
    err = capsys.readouterr().err
    assert err.count("lowbit: warning: no room on the GPU") == 1 and "64x256 layer" in err, err
    kernels.drop_caches(nn.Sequential(large))  # as a move or a load does: asked again, and now it fits
    left["bytes"] = total
    assert kernels.select(large, x, training=False).name == "torch-int4"


@needs_int4
def test_prepare_decoding_makes_the_copies_that_fit_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """Made up front (as generate and translate do before a compiled decoding step), each layer's copy is weighed
    against the memory its predecessors' copies left: the first two fit, the third decodes elsewhere. Nothing is
    made where memory is not counted (the CPU) or where a pin keeps torch-int4 from running."""
    layers = nn.Sequential(*(_w4(64, out_f=32, seed=s) for s in range(3)))
    need = torch_int4.repacked_bytes(layers[0])
    total = 100 * need
    start = 2 * need + int(torch_int4.HEADROOM * total)

    def left(device: torch.device) -> tuple[int, int]:
        copies = sum(isinstance(getattr(m, torch_int4.CACHE, None), tuple) for m in layers)
        return start - copies * need, total

    assert kernels.prepare_decoding(layers) == (0, 0)  # the CPU: copies are made lazily, as before
    assert not any(torch_int4.CACHE in m.__dict__ for m in layers)
    monkeypatch.setattr(torch_int4, "memory_left", left)
    monkeypatch.setattr(torch_int4, "_warned_no_room", True)  # the warning is tested above
    with kernels.pinned("reference"):
        assert kernels.prepare_decoding(layers) == (0, 0)
    assert kernels.prepare_decoding(layers, rows=4 * 8) == (0, 0)  # batch 4 x 8 beams: no copy would be read
    fp16 = nn.Module()  # a model whose activations are fp16 (its embeddings say so): tinygemm never takes them
    fp16.layers, fp16.embed = layers, nn.Embedding(8, 256, dtype=torch.float16)
    fp16.get_input_embeddings = lambda: fp16.embed
    assert kernels.prepare_decoding(fp16) == (0, 0)
    assert kernels.prepare_decoding(layers, rows=16) == (2, 1)
    assert kernels.prepare_decoding(layers) == (0, 1)  # made once
    x = torch.randn(1, 256)
    assert [kernels.select(m, x, training=False).name for m in layers] == ["torch-int4", "torch-int4", "reference"]


def test_torch_int4_layouts() -> None:
    """The CUDA op's input: two codes a byte, the even column in the high nibble (torch's own int4 tests and
    gpt-fast build it so); k-tiles grouped as deep as the width allows (the op takes 2, 4 or 8)."""
    codes = torch.randint(0, 16, (8, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pairs = torch_int4.byte_pairs(codes)
    assert pairs.dtype == torch.uint8 and pairs.shape == (8, 48) and pairs.is_contiguous()
    assert torch.equal(pairs >> 4, codes[:, ::2]) and torch.equal(pairs & 15, codes[:, 1::2])
    assert [torch_int4.inner_k_tiles(k) for k in (4096, 11008, 576, 96, 32)] == [8, 8, 4, 2, 2]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs an Ampere+ GPU"
)
def test_torch_int4_on_cuda_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """tinygemm on lowbit's codes, checked where CI cannot: W2-W4 at widths that take 2, 4 and 8 k-tiles, each
    within 2e-2 of the reference -- the check ``bench/gpu_smoke.py`` runs on a GPU machine, called from here."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_smoke import int4_agreement

    result = int4_agreement("cuda")
    assert result["code"] == 0 and len(result["max_rel_err"]) == 9, result


@needs_int4
def test_torch_int4_under_torch_compile_packs_once_and_follows_new_weights() -> None:
    """Compiled (as ``generate --static-cache`` compiles the decoding step), the kernel traces without a graph
    break, gives the eager outputs, and after its first call the graph reads the cached repacked codes instead of
    repacking on every call; replacing a layer's weights recompiles onto the new codes."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    layers = nn.Sequential(*(_w4(64, out_f=256, seed=b, bits=b) for b in (4, 3, 2)))
    x = torch.randn(1, 256)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layers, backend="aot_eager")
    with torch.no_grad(), kernels.pinned("torch-int4"):
        eager = layers(x)
        kernels.drop_caches(layers)  # start cold: the first compiled call makes the caches
        assert torch.equal(compiled(x), eager) and torch.equal(compiled(x), eager)
        with profile() as prof:
            assert torch.equal(compiled(x), eager)
        ran = {e.key for e in prof.key_averages()}
        assert "aten::_weight_int4pack_mm_for_cpu" in ran and "aten::_convert_weight_to_int4pack_for_cpu" not in ran
        assert not counters["graph_break"]
        replacement = _w4(64, out_f=256, seed=9)
        layers[0].set_weight(replacement.quantized())
        expected = layers(x)
        assert not torch.equal(expected, eager) and torch.equal(compiled(x), expected)
        # Loading copies into the same buffers (only their version counters change, which compiled code cannot
        # read): the layer drops its cache, so the compiled model follows the new codes too.
        # (The expected output comes from a twin: an eager call here would itself notice the change and repack.)
        twin = copy.deepcopy(layers)
        new_state = _w4(64, out_f=256, seed=10, bits=3).state_dict()
        for model in (layers, twin):
            model[1].load_state_dict(new_state)
        reloaded = twin(x)
        assert not torch.equal(reloaded, expected) and torch.equal(compiled(x), reloaded)
    torch._dynamo.reset()


def test_torch_int4_is_offered_on_cuda_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """tinygemm needs no Triton: where Triton cannot be imported, CUDA still has torch-int4 (and only it)."""
    monkeypatch.setattr(kernels, "_gpu_table", None)
    monkeypatch.setitem(sys.modules, "lowbit.kernels.triton_decode", None)  # importing it now raises ImportError
    monkeypatch.delattr(kernels, "triton_decode", raising=False)
    assert set(kernels._fast_kernels("cuda")) == set(kernels._torch_kernels())
    assert all("cuda" in k.devices for k in kernels._torch_kernels().values())


def test_an_unavailable_kernel_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_torch_table", {})  # as on torch before 2.6, where neither table holds it
    monkeypatch.setattr(kernels, "_gpu_table", {})
    with pytest.raises(LowbitError, match=r"kernel 'torch-int4' needs torch 2\.6 or later"):
        kernels.kernel("torch-int4")


# ----- storage ----------------------------------------------------------------------------------------------------
def test_packing_version_recorded_and_old_checkpoints_load(tmp_path: Path) -> None:
    model = tiny_model("llama")
    lowbit.quantize(model, lowbit.QuantConfig(bits=3, group_size=32, init="qlora", rank=4), progress=False)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.save(model, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["quantization_config"]["packing_version"] == 1
    del config["quantization_config"]["packing_version"]  # as written before the version was recorded
    config_path.write_text(json.dumps(config))
    loaded, _ = lowbit.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert all(m.qweight.dtype == torch.uint8 for m in quant_layers(loaded).values())
    config["quantization_config"]["packing_version"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="layout version 2"):
        lowbit.load(tmp_path / "ckpt")


def _op_calls(fn, op: str = "aten::_weight_int4pack_mm_for_cpu") -> int:
    """How many times ``fn`` runs ``op`` (by default the CPU int4 op)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == op)


def _members(model: nn.Module) -> dict[str, tuple[object, int]]:
    """Each fused layer's (group, index), by name."""
    found = {}
    for name, m in quant_layers(model).items():
        cached = m.__dict__.get(torch_int4.CACHE)
        if isinstance(cached, siblings.Member):
            found[name] = (cached.group, cached.index)
    return found


@needs_int4
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3", "gpt2"])
def test_prepare_decoding_fuses_the_layers_that_read_one_tensor(arch: str) -> None:
    """The probe finds q/k/v and gate/up as siblings in every block of the Llama-like models and none in those whose
    projections are fused already (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn); decoding then calls the op
    once per group -- 4 times a block instead of 7 -- with the unfused outputs bit for bit, and keeps no activation
    once the step is done."""
    model = tiny_model(arch)
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    ids = torch.randint(3, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unfused = model(ids).logits
        calls_unfused = _op_calls(lambda: model(ids))
        made, refused = kernels.prepare_decoding(model)
        groups = {}
        for name, (group, index) in _members(model).items():
            block, _, layer = name.rpartition(".")
            groups.setdefault((block.rsplit(".", 2)[-2], id(group)), {})[index] = layer
        fused = model(ids).logits
        calls_fused = _op_calls(lambda: model(ids))
    kept = {id(g): g for g, _ in _members(model).values()}.values()
    assert torch.equal(fused, unfused)
    assert all(g.kept is None for g in kept)
    if arch in ("phi3", "gpt2"):
        assert (made, refused, groups) == (0, 0, {}) and calls_fused == calls_unfused == 2 * 4
        return
    assert refused == 0 and made == 2 * 5
    expected = 2 * [["gate_proj", "up_proj"]] + 2 * [["k_proj", "q_proj", "v_proj"]]  # two blocks
    assert sorted(sorted(g.values()) for g in groups.values()) == expected
    assert all(g[0] in ("q_proj", "gate_proj") for g in groups.values())  # in call order
    assert (calls_unfused, calls_fused) == (2 * 7, 2 * 4)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # an interrupted step: q_proj's siblings never take their outputs
        q(torch.randn(1, 1, q.in_features))
    interrupted = q.__dict__[torch_int4.CACHE].group
    assert interrupted.kept is not None
    assert kernels.prepare_decoding(model) == (0, 0)  # made once
    assert interrupted.kept is None  # the next decoding starts with nothing kept


def _own(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's product on a copy made from its current buffers alone."""
    codes, scales_and_offsets = torch_int4.tinygemm_form(layer)
    y = torch_int4.product(x, torch_int4.int4pack(codes), scales_and_offsets.bfloat16(), layer.spec.group_size)
    return y.reshape(*x.shape[:-1], layer.out_features)


@needs_int4
def test_fused_layers_follow_new_weights_and_inputs_changed_in_place() -> None:
    """A member given new weights (replaced or changed in place, before or after its siblings' product was made)
    dissolves its group: every member decodes on its own copy of its current weights. A member called with another
    tensor, or with the one its siblings saw changed in place since, gets a new product rather than a kept one."""
    model = tiny_model("llama")
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    attn = model.model.layers[0].self_attn
    names = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kernels.prepare_decoding(model)
        group = attn.q_proj.__dict__[torch_int4.CACHE].group
        assert [m.__dict__[torch_int4.CACHE].group for m in (attn.k_proj, attn.v_proj)] == [group, group]
        assert torch.equal(attn.q_proj(x), _own(attn.q_proj, x))
        y = x.clone()
        assert torch.equal(attn.k_proj(y), _own(attn.k_proj, y))  # another tensor: a new product
        y.mul_(2)  # in place after its product was made: v_proj must not get the kept one
        assert torch.equal(attn.v_proj(y), _own(attn.v_proj, y)) and not torch.equal(y, x)
        attn.k_proj(y), attn.q_proj(y)  # the rest taken: nothing kept
        assert group.kept is None
        # new weights for one member: the whole group goes, each member follows its own weights
        attn.k_proj.set_weight(quantize_weight(torch.randn(32, 64), attn.k_proj.spec))
        assert not any(isinstance(getattr(attn, n).__dict__.get(torch_int4.CACHE), siblings.Member) for n in names)
        assert all(torch.equal(getattr(attn, n)(x), _own(getattr(attn, n), x)) for n in names)
        # in place, through the buffers' version counters: the group sees it at its next product
        assert kernels.prepare_decoding(model)[0] == 3
        attn.v_proj.scales.mul_(2)
        assert all(torch.equal(getattr(attn, n)(x), _own(getattr(attn, n), x)) for n in names)
        assert not isinstance(attn.v_proj.__dict__.get(torch_int4.CACHE), siblings.Member)
        # ... also while its output is kept: q_proj made k_proj's from the old scales, k_proj gets its own
        assert kernels.prepare_decoding(model)[0] == 3
        attn.q_proj(x)
        attn.k_proj.scales.mul_(2)
        assert torch.equal(attn.k_proj(x), _own(attn.k_proj, x))


@needs_int4
def test_fused_decoding_compiles_into_one_graph() -> None:
    """Compiled whole (as ``generate --static-cache`` compiles the step), the fused model with its LoRA traces without
    a graph break, gives the eager logits, calls the op once per group, and leaves no activation kept after a step
    (under CUDA graphs a kept output would be overwritten by the next replay)."""
    from torch._dynamo.utils import counters

    model = _with_trained_lora(tiny_model("qwen2"), bits=3, group_size=32)
    ids = torch.tensor([[5]])
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        kernels.prepare_decoding(model)
        eager = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(ids).logits, eager) and torch.equal(compiled(ids).logits, eager)
        assert _op_calls(lambda: compiled(ids)) == 2 * 4
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1  # three steps, no recompile
    assert all(g.kept is None for g, _ in _members(model).values())
    torch._dynamo.reset()


def _with_trained_lora(model: nn.Module, bits: int = 4, group_size: int = 64) -> nn.Module:
    """``model`` quantized with a r8 LoRA on every linear whose ``B`` is not zero (as after fine-tuning)."""
    lowbit.quantize(model, lowbit.QuantConfig(bits=bits, group_size=group_size, init="qlora", rank=8), progress=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in quant_layers(model).values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=gen))
    return model


@needs_int4
def test_decoding_adds_the_lora_from_kept_copies_one_product_pair_per_group() -> None:
    """At one row torch-int4 adds each layer's LoRA itself: every layer's output is its int4 product plus
    ``s B A x``, alone and fused with its siblings, where the LoRA of a group is one ``addmm`` (4 a block instead
    of 7). The copies follow the factors: an optimizer step shows at the next eager call, and ``prepare_decoding``
    brings them up to date in place (the addresses a compiled step reads). A layer in training mode with an active
    LoRA dropout is left to a kernel that applies it; a factor given new storage through ``.data`` is seen; copies
    made in inference mode are refreshed outside it; a copied model gets no copies."""
    model = _with_trained_lora(tiny_model("llama"))
    layers = quant_layers(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[7]])

    def expected(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        lora = layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)
        return _own(layer, x) + lora

    with torch.no_grad():
        for layer in layers.values():  # alone
            x = torch.randn(1, 1, layer.in_features, generator=gen)
            torch.testing.assert_close(layer(x), expected(layer, x), rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 1, 64, generator=gen)
        unfused = _op_calls(lambda: model(ids), "aten::addmm")
        logits = model(ids).logits
        kernels.prepare_decoding(model)
        attn = model.model.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # fused
            layer = getattr(attn, name)
            torch.testing.assert_close(layer(x), expected(layer, x), rtol=1e-5, atol=1e-5)
        assert (unfused, _op_calls(lambda: model(ids), "aten::addmm")) == (2 * 7, 2 * 4)
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
        copy_of_q = attn.q_proj.__dict__[torch_int4.CACHE].group.weights[-1]
        sb = copy_of_q.sb
    # an optimizer step on the LoRA (in place): the next eager call decodes with the new factors
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            layer = getattr(attn, name)
            torch.testing.assert_close(layer(x), expected(layer, x), rtol=1e-5, atol=1e-5)
        attn.k_proj.lora_B.mul_(2)
        kernels.prepare_decoding(model)  # up to date in place
        assert copy_of_q.sb is sb and copy_of_q.current(
            [attn.q_proj, attn.k_proj, attn.v_proj], check_versions=True
        )  # fmt: skip
        torch.testing.assert_close(attn.k_proj(x), expected(attn.k_proj, x), rtol=1e-5, atol=1e-5)
        attn.q_proj(x), attn.v_proj(x)  # the step's other outputs taken: the group stays whole
    attn.v_proj.lora_B.data = 2 * attn.v_proj.lora_B.data  # new storage, the same parameter and version counter
    with torch.no_grad():
        step = torch.randn(1, 1, 64, generator=gen)
        outputs = [getattr(attn, n)(step) for n in ("q_proj", "k_proj", "v_proj")]
        assert isinstance(attn.v_proj.__dict__[torch_int4.CACHE], siblings.Member)
        torch.testing.assert_close(outputs[2], expected(attn.v_proj, step), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # copies made inside an inference-mode block are brought up to date outside one
        kernels.drop_caches(model)
        kernels.prepare_decoding(model)
        model(ids)
    with torch.no_grad():
        attn.k_proj.lora_B.mul_(3)
        attn.o_proj.lora_A.mul_(3)
        kernels.prepare_decoding(model)
        for layer in (attn.k_proj, attn.o_proj):
            torch.testing.assert_close(layer(x), expected(layer, x), rtol=1e-5, atol=1e-5)
    dropping = QuantLinear.from_linear(nn.Linear(64, 32), QuantSpec(bits=4, group_size=64))
    dropping.add_lora(4, 8.0, dropout=0.1)
    one = torch.randn(1, 64)
    assert kernels.select(dropping.train(), one, training=False).name != "torch-int4"
    assert kernels.select(dropping.eval(), one, training=False).name == "torch-int4"
    clone = copy.deepcopy(model)
    states = [(m.__dict__.get(torch_int4.LORA_CACHE), m.__dict__.get(torch_int4.CACHE))
              for m in quant_layers(clone).values()]  # fmt: skip
    assert not any(lora or isinstance(cached, siblings.Member) for lora, cached in states)
    q = clone.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B.zero_()  # the clone decodes with its own factors, not the original's
        torch.testing.assert_close(q(x), _own(q, x), rtol=1e-5, atol=1e-5)


class _SharedBlock(nn.Module):
    """``b`` and ``d`` read ``h``; ``a`` reads ``h`` and then ``2h``; ``e`` reads ``h`` after it changed in place. A
    "moe" block instead calls ``b`` and ``d`` on different tensors, as blocks of another kind would."""

    def __init__(self, moe: bool = False) -> None:
        super().__init__()
        self.moe = moe
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(64, 64, bias=False) for _ in range(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.moe:
            return self.b(h) + self.d(h[:, :1] * 3)
        h = h.clone()
        out = self.a(h) + self.b(h) + self.c(self.a(2 * h)) + self.d(h)
        h.mul_(2)
        return out + self.e(h)


class _SharedModel(nn.Module):
    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken
        self.embed = nn.Embedding(16, 64)
        self.blocks = nn.ModuleList(_SharedBlock(moe=i == 1) for i in range(3))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        if self.broken:
            raise RuntimeError("this model cannot run")
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return h


@needs_int4
def test_siblings_are_the_layers_that_read_one_unchanged_tensor(capsys: pytest.CaptureFixture[str]) -> None:
    """Groups come from what each block's layers read, not from names or from the first block: ``a`` reads two
    tensors and ``e`` reads ``h`` after it changed in place, so only ``b`` and ``d`` are fused, and only in the
    blocks where they read one tensor; outputs stay the unfused ones at one row and at two. A model the probe cannot
    run decodes unfused and says why once."""
    torch.manual_seed(0)
    model = _SharedModel()
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    ids = torch.tensor([[3, 4]])
    with torch.no_grad():
        unfused = model(ids[:, :1])
        assert kernels.prepare_decoding(model) == (2 * 2, 0)
        assert sorted(_members(model)) == ["blocks.0.b", "blocks.0.d", "blocks.2.b", "blocks.2.d"]
        assert torch.equal(model(ids[:, :1]), unfused)
        assert _op_calls(lambda: model(ids[:, :1])) == 2 * 5 + 2  # per dense block a twice, c, b with d, e
        twin = copy.deepcopy(model)  # a copy is unfused: its layers make their own copies
        assert _members(model) and not _members(twin)
        assert torch.equal(model(ids), twin(ids))  # two rows a step
        assert kernels.prepare_decoding(model, fuse=False) == (0, 0) and not _members(model)
        broken = _SharedModel(broken=True)
        lowbit.quantize(broken, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
        assert kernels.prepare_decoding(broken) == (0, 0) and not _members(broken)
        assert kernels.prepare_decoding(broken) == (0, 0)
    err = capsys.readouterr().err
    assert err.count("decoding without fused sibling layers") == 1 and "this model cannot run" in err


@needs_int4
def test_fused_groups_skip_weight_adapters_keep_no_cycle_and_pickle() -> None:
    """A HiWi adapter on q and v computes those layers without the kernel, so only gate/up are fused in the
    attention's stead (a member that never took its share would keep its siblings' outputs); a fused model is freed
    without the cycle collector (the group holds its layers weakly) and pickles, unfused."""
    import gc
    import pickle
    import weakref

    from lowbit.adapters import HiWi

    model = tiny_model("llama", layers=1)
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    attn = model.model.layers[0].self_attn
    attn.q_proj.adapter, attn.v_proj.adapter = HiWi(64, 4), HiWi(64, 4)
    ids = torch.tensor([[5]])
    with torch.no_grad():
        kernels.prepare_decoding(model)
        assert sorted(n.rsplit(".", 1)[-1] for n in _members(model)) == ["gate_proj", "up_proj"]
        model(ids)
    assert all(g.kept is None for g, _ in _members(model).values())
    restored = pickle.loads(pickle.dumps(model))
    assert not _members(restored)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
    ref = weakref.ref(model.model.layers[0].mlp.gate_proj)
    gc.disable()
    try:
        del model, attn, restored
        assert ref() is None
    finally:
        gc.enable()


@needs_int4
def test_probe_puts_back_a_layers_own_forward_and_runs_under_inference_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe swaps every quantized layer's forward for a recorder: a forward a layer already had as its own
    attribute (a user's wrapper, accelerate's hooks) is put back and still runs; inside ``torch.inference_mode``
    (whose tensors have no version counters) the probe still finds the groups; a compiled model is probed through
    the module it wraps, without compiling anything; steps too large for the kernel are not probed at all."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", layers=1)
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    wrapped = q.forward

    def wrapper(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape)
        return wrapped(x)

    q.forward = wrapper
    monkeypatch.setattr(torch_int4, "shared_input_groups", lambda m: pytest.fail("probed for 32 rows"))
    assert kernels.prepare_decoding(model, rows=32) == (0, 0)
    monkeypatch.undo()
    ids = torch.tensor([[5]])
    with torch.inference_mode():
        assert kernels.prepare_decoding(model) == (5, 0)
        model(ids)
    assert q.__dict__["forward"] is wrapper and seen == [(1, 1, 64)]  # put back, and not called by the probe
    kernels.drop_caches(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    assert kernels.prepare_decoding(compiled) == (5, 0) and not counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


@needs_int4
def test_a_member_that_stops_taking_its_share_dissolves_its_group() -> None:
    """An adapter put on k_proj's weight after the fusing computes k_proj without the kernel: at the next step its
    kept output is found untaken and the group dissolves, so q and v decode alone instead of computing k's share every
    step; outputs stay right throughout. A group whose member changed in place is made again by the next prepare,
    and a prepare starts with no outputs kept (an interrupted step leaves some)."""
    from lowbit.adapters import HiWi

    model = tiny_model("llama", layers=1)
    lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=64), progress=False)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        kernels.prepare_decoding(model)
        group = attn.q_proj.__dict__[torch_int4.CACHE].group
        attn.q_proj(x)  # an interrupted step: k and v never took theirs
        assert group.kept is not None
        assert kernels.prepare_decoding(model) == (0, 0) and group.kept is None  # the same group, nothing kept
        attn.v_proj.scales.mul_(2)  # in place, before any call: the next prepare makes the group again
        assert kernels.prepare_decoding(model) == (3, 0)
        group = attn.q_proj.__dict__[torch_int4.CACHE].group
        attn.k_proj.adapter = HiWi(64, 4)
        for step in range(2):
            y = x + step
            assert torch.equal(attn.q_proj(y), _own(attn.q_proj, y))
            attn.k_proj(y)
            assert torch.equal(attn.v_proj(y), _own(attn.v_proj, y))
        assert group.kept is None and not isinstance(attn.q_proj.__dict__.get(torch_int4.CACHE), siblings.Member)


@needs_int4
def test_a_steady_block_checks_each_layers_state_once_and_the_next_block_sees_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside ``kernels.steady()`` decoding gives what checked calls give, each layer's kernel is chosen once per
    input shape and grad mode (a 17-row prompt on the reference, one-row steps on torch-int4, a grad-mode call on a
    kernel with a backward), and each layer's selection, copy and LoRA copy is checked at its first call in the
    block only. A change made between two blocks -- an optimizer-like step on the LoRA factors of a fused layer and
    of one with its own copy, new scales in place for each -- shows in the next block's first call."""
    model = _with_trained_lora(tiny_model("llama")).eval()
    calls = {"supports": 0, "refresh": 0, "current": 0, "made_from": 0}

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(kernels.Kernel, "supports", counted("supports", kernels.Kernel.supports))
    monkeypatch.setattr(siblings.Siblings, "current", counted("current", siblings.Siblings.current))
    monkeypatch.setattr(torch_int4, "made_from", counted("made_from", torch_int4.made_from))
    monkeypatch.setattr(lora.LoraCopy, "refresh", counted("refresh", lora.LoraCopy.refresh))
    step, prompt = torch.tensor([[7]]), torch.arange(3, 20).unsqueeze(0)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        kernels.prepare_decoding(model)
        assert isinstance(attn.k_proj.__dict__[torch_int4.CACHE], siblings.Member)
        checked = model(step).logits, model(prompt).logits
        assert isinstance(attn.o_proj.__dict__[torch_int4.CACHE], tuple)  # its own copy (made at its first call)
        with kernels.steady():
            first = model(step).logits
            once = dict(calls)
            for _ in range(3):
                assert torch.equal(model(step).logits, first)
            assert calls == once  # nothing checked again after each layer's first call
            assert torch.equal(first, checked[0])
            assert torch.equal(model(prompt).logits, checked[1])  # the prompt's rows: the reference, not a kept pick
            assert torch.equal(model(step).logits, first)
            with torch.enable_grad():
                assert model(step).logits.requires_grad  # grad mode: a kernel with a backward
    with torch.no_grad():
        for layer in (attn.k_proj, attn.o_proj):  # fused, own copy
            layer.lora_B.add_(0.5)  # in place, as an optimizer step
        with kernels.steady():
            lora_changed = model(step).logits
        assert not torch.equal(lora_changed, first)
        assert torch.equal(lora_changed, model(step).logits)  # what a checked call gives after the change
        for layer in (model.model.layers[0].mlp.gate_proj, model.model.layers[1].mlp.down_proj):  # fused, own copy
            layer.scales.mul_(1.5)
        with kernels.steady():
            changed = model(step).logits
        assert not torch.equal(changed, lora_changed)
        assert torch.equal(changed, model(step).logits)


def test_steady_blocks_nest_and_belong_to_their_thread() -> None:
    """A block inside a block has its own token and gives the outer one back; another thread's calls are outside
    every block of this one (they check as ever)."""
    import threading

    seen: list[object | None] = []
    assert kernels.steady_token() is None
    with kernels.steady():
        outer = kernels.steady_token()
        with kernels.steady():
            assert kernels.steady_token() not in (None, outer)
        assert kernels.steady_token() is outer
        worker = threading.Thread(target=lambda: seen.append(kernels.steady_token()))
        worker.start()
        worker.join()
    assert outer is not None and seen == [None] and kernels.steady_token() is None


@needs_int4
def test_a_steady_choice_goes_with_what_it_counted_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel kept for a layer in a steady block is chosen again when what it was chosen with goes in the block --
    the GPU room for the layer's copy (as ``prepare_decoding`` weighs it for the next batch), or the sibling group
    whose copy it would have read -- and copies and pickles of the model carry no kept choice."""
    import pickle

    layer = _w4(64, out_f=64, seed=2, bits=2)
    total = 100 * torch_int4.repacked_bytes(layer)
    left = {"bytes": total}
    monkeypatch.setattr(torch_int4, "memory_left", lambda device: (left["bytes"], total))
    monkeypatch.setattr(torch_int4, "_warned_no_room", True)
    x = torch.randn(1, 256)
    with kernels.steady():
        assert kernels.select(layer, x, training=False).name == "torch-int4"  # room, no copy made yet
        left["bytes"] = 0
        assert not torch_int4.has_room(layer)
        assert kernels.select(layer, x, training=False) is kernels.REFERENCE
    monkeypatch.undo()
    model = _with_trained_lora(tiny_model("llama")).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad(), kernels.steady():
        kernels.prepare_decoding(model)
        model(torch.tensor([[7]]))
        assert isinstance(attn.k_proj.__dict__.get(kernels.SELECTED), kernels.Selection)
        assert copy.deepcopy(attn.k_proj).__dict__.get(kernels.SELECTED) is None
        assert pickle.loads(pickle.dumps(attn.k_proj)).__dict__.get(kernels.SELECTED) is None
        attn.k_proj.__dict__[torch_int4.CACHE].group.release()
        assert not any(kernels.SELECTED in m.__dict__ for m in (attn.q_proj, attn.k_proj, attn.v_proj))
