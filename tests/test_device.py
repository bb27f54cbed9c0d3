"""``--device``: device resolution and its one-line errors, where calibration keeps its activation streams (the
budget decision is a pure function), and that the CPU results do not depend on either (bit for bit). CI has no
GPU: CUDA is simulated where only the decision is under test."""

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from conftest import save_tiny, tiny_model, tiny_text, tiny_tokenizer
from lowbit.calibrate import calibrate
from lowbit.cli import build_parser, main
from lowbit.device import (
    DEVICE,
    DEVICE_SHARE,
    GIB,
    HOST,
    SPILL,
    default_budget,
    parse_budget,
    resolve_device,
    stream_placement,
)
from lowbit.engine import STREAMS, Engine, EngineOptions, to_device
from lowbit.errors import LowbitError
from lowbit.finetune import TrainConfig, finetune, frozen_to
from lowbit.init import BlockContext, get_initializer
from lowbit.quant import QuantSpec

CALIB = torch.randint(3, 120, (6, 32), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")


def fake_gpus(monkeypatch, count: int, free: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))


# ----- resolution ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["auto", "AUTO", None, "cpu", CPU])
def test_without_cuda_auto_and_cpu_resolve_to_the_cpu(value, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(value) == CPU


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_one_line_error_naming_the_fix(value, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LowbitError, match=r"asks for a GPU but .*: use --device cpu") as info:
        resolve_device(value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["gpu", "tpu", "cuda:x", "cuda:", "cuda0", "mps"])
def test_unknown_devices_are_refused(value) -> None:
    with pytest.raises(LowbitError, match=r"unknown device .*use --device auto, cpu, cuda or cuda:N"):
        resolve_device(value)


def test_with_gpus_auto_is_cuda_and_an_index_past_the_last_gpu_is_refused(monkeypatch) -> None:
    fake_gpus(monkeypatch, count=2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU
    with pytest.raises(LowbitError, match=r"--device cuda:5: this machine has 2 CUDA GPU\(s\), numbered 0 to 1"):
        resolve_device("cuda:5")


# ----- where the activation streams live ----------------------------------------------------------------------------
def test_stream_placement_is_the_budget_then_spill_or_host() -> None:
    assert stream_placement(100, 100, spill=False) == DEVICE
    assert stream_placement(101, 100, spill=False) == HOST
    assert stream_placement(101, 100, spill=True) == SPILL
    assert stream_placement(10**12, math.inf, spill=True) == DEVICE
    assert stream_placement(1, 0, spill=False) == HOST


def test_default_budget(monkeypatch) -> None:
    assert default_budget(CPU, spill=False) == math.inf  # RAM is both places: the CPU keeps what it always did
    assert default_budget(CPU, spill=True) == 0  # --spill on the CPU: out of RAM, as before
    fake_gpus(monkeypatch, count=1, free=40 * GIB)
    assert default_budget(torch.device("cuda", 0), spill=False) == DEVICE_SHARE * 40 * GIB


def test_parse_budget() -> None:
    assert parse_budget(None) is None
    assert parse_budget(0) == 0
    assert parse_budget(1.5) == 3 * GIB // 2
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(LowbitError, match="--act-budget"):
            parse_budget(bad)


def test_to_device_moves_nested_tensors_and_keeps_the_rest() -> None:
    value = {"a": (torch.ones(2), [torch.zeros(1), 3]), "b": None, "c": "text"}
    moved = to_device(value, CPU)
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert torch.equal(moved["a"][0], torch.ones(2)) and moved["a"][1][1] == 3 and moved["b"] is None


def test_window_reads_one_window_or_a_batch_as_float_on_the_device() -> None:
    ctx = BlockContext(0, QuantSpec(), None, torch.Generator(), device=CPU)
    stream = torch.randn(5, 4, 8).to(torch.bfloat16)
    one = ctx.window(stream, 2)
    assert one.shape == (1, 4, 8) and one.dtype == torch.float32 and one.device == CPU
    assert torch.equal(one[0], stream[2].float())
    batch = ctx.window(stream, torch.tensor([4, 0]))
    assert batch.shape == (2, 4, 8) and torch.equal(batch, stream[[4, 0]].float())


# ----- the CPU results do not depend on the device flag or on where the streams live -------------------------------
def _run_engine(init: str, options: dict, engine: EngineOptions) -> tuple[dict, Engine]:
    model = tiny_model("llama")
    config = lowbit.QuantConfig(bits=2, group_size=32, init=init, rank=4, options=options)
    run = Engine(model, get_initializer(config), config.spec, config.lora, config.seed, config.options, CALIB, engine)
    run.run()
    return {k: v.clone() for k, v in model.state_dict().items()}, run


def _bytes(tensors: dict) -> dict:
    return {
        k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in tensors.items()
    }


@pytest.mark.parametrize(
    ("init", "options"),
    [("gptq", {}), ("apiq-bw", {"warm_start": "gptq", "epochs": 1}), ("apiq-bw", {"epochs": 1, "batch": 2})],
)
def test_host_and_spilled_streams_and_device_cpu_equal_the_default_bit_for_bit(init, options, tmp_path) -> None:
    reference, run = _run_engine(init, options, EngineOptions(progress=False))
    assert run.placement == DEVICE and run.device == CPU
    variants = {
        DEVICE: EngineOptions(progress=False, device="cpu"),
        HOST: EngineOptions(progress=False, act_budget=0),
        SPILL: EngineOptions(progress=False, act_budget=0, spill_dir=tmp_path / "spill", device="cpu"),
    }
    for where, engine in variants.items():
        got, run = _run_engine(init, options, engine)
        assert run.placement == where
        assert _bytes(got) == _bytes(reference), where


def test_the_budget_counts_all_three_streams(tmp_path) -> None:
    stream = CALIB.shape[0] * CALIB.shape[1] * 64 * 2  # windows x tokens x hidden x float16 bytes
    fits = EngineOptions(progress=False, act_dtype=torch.float16, act_budget=STREAMS * stream)
    short = EngineOptions(progress=False, act_dtype=torch.float16, act_budget=STREAMS * stream - 1)
    assert _run_engine("gptq", {}, fits)[1].placement == DEVICE
    assert _run_engine("gptq", {}, short)[1].placement == HOST


def test_api_device_cpu_equals_the_default_and_cuda_is_refused_here(monkeypatch) -> None:
    calib = CALIB[:2]
    a = lowbit.quantize(tiny_model("llama"), lowbit.QuantConfig(bits=2, group_size=32, init="gptq"), calib, False)
    b = lowbit.quantize(tiny_model("llama"), lowbit.QuantConfig(bits=2, group_size=32, init="gptq"), calib, False,
                        device="cpu")  # fmt: skip
    assert _bytes(a.state_dict()) == _bytes(b.state_dict())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LowbitError, match="asks for a GPU"):
        lowbit.quantize(tiny_model("llama"), lowbit.QuantConfig(bits=2, group_size=32), device="cuda")


def test_streaming_calibration_with_a_tiny_budget_writes_the_same_checkpoint(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "fp")
    config = lowbit.QuantConfig(
        bits=2, group_size=32, init="apiq-bw", rank=4, options={"warm_start": "gptq", "epochs": 1}
    )
    calibrate(folder, config, tmp_path / "a", CALIB, tiny_tokenizer(), engine=EngineOptions(progress=False))
    engine = EngineOptions(progress=False, act_budget=0, act_dtype=torch.float32, device="cpu")
    calibrate(folder, config, tmp_path / "b", CALIB, tiny_tokenizer(), engine=engine, spill=True)
    for name in ("model-block-00000.safetensors", "model-block-00001.safetensors", "adapter_model.safetensors"):
        assert _bytes(load_file(tmp_path / "a" / name)) == _bytes(load_file(tmp_path / "b" / name)), name


# ----- the command line ---------------------------------------------------------------------------------------------
COMMANDS = {
    "quantize": ["quantize", "m", "--out", "o"],
    "finetune": ["finetune", "c", "--out", "o"],
    "export": ["export", "c", "--requantize", "o"],
    "eval": ["eval", "m"],
    "translate": ["translate", "m", "--input", "i.txt"],
    "adapt": ["adapt", "--out", "o"],
    "report": ["report", "c"],
    "generate": ["generate", "m", "hello"],
}


def test_every_computing_command_takes_device() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    computing = set(sub.choices) - {"info", "cache"}  # they only read configs and list files
    assert computing == set(COMMANDS)
    for name, argv in COMMANDS.items():
        args = build_parser().parse_args([*argv, "--device", "cpu"])
        assert args.device == "cpu", name
        assert build_parser().parse_args(argv).device == "auto", name
    for name in ("quantize", "export"):
        assert build_parser().parse_args([*COMMANDS[name], "--act-budget", "2.5"]).act_budget == 2.5


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_device_cuda_without_a_gpu_exits_2_with_one_line(name, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main([*COMMANDS[name], "--device", "cuda"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lowbit: error: --device cuda asks for a GPU"), err


def test_cli_device_cpu_and_act_budget_give_the_default_checkpoint(tmp_path: Path, capsys) -> None:
    folder = save_tiny(tmp_path / "fp")
    text = tmp_path / "t.txt"
    text.write_text(tiny_text(1500))
    common = ["quantize", folder, "--bits", "2", "--group-size", "32", "--init", "gptq", "--calib", text,
              "--calib-windows", "4", "--calib-seqlen", "32", "--json"]  # fmt: skip
    assert main([str(a) for a in [*common, "--out", tmp_path / "a"]]) == 0
    extra = ["--device", "cpu", "--act-budget", "0", "--spill", "--out", tmp_path / "b"]
    assert main([str(a) for a in [*common, *extra]]) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "b").glob("model-*.safetensors")) and shards
    for name in shards:  # the tensors; file metadata may name the run
        assert _bytes(load_file(tmp_path / "a" / name)) == _bytes(load_file(tmp_path / "b" / name)), name
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "b"), "--ppl", str(text), "--seqlen", "32", "--device", "cpu", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["ppl"] > 1


# ----- fine-tuning memory --------------------------------------------------------------------------------------------
def test_frozen_to_keeps_trainable_factors_ties_and_buffers() -> None:
    model = tiny_model("llama")
    model.requires_grad_(False)
    trained = model.model.layers[0].mlp.up_proj.weight
    trained.requires_grad_(True)
    buffers = {k: v.dtype for k, v in model.named_buffers()}
    originals = frozen_to(model, torch.bfloat16, CPU)
    assert trained.dtype == torch.float32 and "model.layers.0.mlp.up_proj.weight" not in originals
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert all(v.dtype == torch.float32 for v in originals.values()) and "model.norm.weight" in originals
    assert torch.equal(originals["model.norm.weight"].bfloat16(), model.model.norm.weight)
    assert {k: v.dtype for k, v in model.named_buffers()} == buffers


def test_bf16_lora_factors_train_and_save_as_float32(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "fp")
    ckpt = tmp_path / "q"
    calibrate(folder, lowbit.QuantConfig(bits=4, group_size=32, rank=4), ckpt, None, tiny_tokenizer(),
              engine=EngineOptions(progress=False))  # fmt: skip
    data = tmp_path / "d.txt"
    data.write_text(tiny_text(3000, seed=3))
    config = TrainConfig(data=str(data), seqlen=32, samples=8, batch_size=4, lr=3e-3, lora_dtype="bf16")
    result = finetune(ckpt, tmp_path / "ft", config, progress=False, device="cpu")
    assert math.isfinite(result["final_loss"])
    model, _ = lowbit.load(tmp_path / "ft", device="cpu")
    start, _ = lowbit.load(ckpt)
    layer, before = model.model.layers[0].self_attn.q_proj, start.model.layers[0].self_attn.q_proj
    assert layer.lora_B.dtype == torch.float32 and not torch.equal(layer.lora_B, before.lora_B)  # it trained
    assert torch.equal(layer.lora_B, layer.lora_B.bfloat16().float())  # values are bf16's
    with pytest.raises(LowbitError, match="--lora-dtype"):
        TrainConfig(lora_dtype="fp16")


def test_calibration_runs_in_full_float32_and_restores_the_callers_choice(monkeypatch) -> None:
    seen = []
    original = Engine._init_block

    def spy(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_init_block", spy)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a caller that wants TF32 for its own work
    try:
        _run_engine("gptq", {}, EngineOptions(progress=False))
        assert seen == ["highest", "highest"] and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ----- deterministic training backward (CUDA; exercised here by declaring the CPU one of its devices) ---------------
class _NoDeterministicKernel(torch.autograd.Function):
    """Identity whose backward is an op without a deterministic kernel, as torch reports one in that mode."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from torch._prims_common import alert_not_deterministic

        alert_not_deterministic("a test op")  # raises in strict deterministic mode, does nothing outside it
        return grad


def _train(alerting: bool) -> tuple[list[float], list[torch.Tensor], dict]:
    """A block-training loop on two parameters: ``first``'s gradient is written before ``second``'s backward runs
    the op (with ``alerting``) that deterministic mode refuses, so a fallback that kept it would train differently.
    SGD, not Adam: Adam's step would not see a doubled gradient."""
    from lowbit.init.base import BlockTrainOptions, train_block

    g = torch.Generator().manual_seed(0)
    xq = torch.randn(6, 4, 8, generator=g)
    ctx = BlockContext(0, QuantSpec(), None, torch.Generator().manual_seed(1), xq=xq, device=CPU)
    first, second = (torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(2))
    target = torch.randn(8, 8, generator=g)
    opt = torch.optim.SGD([first, second], lr=0.05)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        w = first + (_NoDeterministicKernel.apply(second) if alerting else second)
        return ((xq[idx] @ w - xq[idx] @ target) ** 2).mean()

    stats = train_block(ctx, opt, loss_of, 2, BlockTrainOptions(batch=2), "test-method")
    return stats["epoch_losses"], [first.detach().clone(), second.detach().clone()], stats


def test_deterministic_backward_is_strict_inside_and_restores_the_callers_mode(monkeypatch) -> None:
    from lowbit.device import deterministic_backward

    fill = torch.utils.deterministic.fill_uninitialized_memory
    with deterministic_backward(CPU):  # the CPU is not one of its devices: nothing changes
        assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr("lowbit.device.DETERMINISTIC_DEVICE_TYPES", ("cpu",))
    for enabled, warn_only in ((False, False), (True, True)):
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        try:
            with deterministic_backward(CPU):
                assert torch.are_deterministic_algorithms_enabled()
                assert not torch.is_deterministic_algorithms_warn_only_enabled()
                assert torch.utils.deterministic.fill_uninitialized_memory is (fill and enabled)  # as outside
            assert torch.are_deterministic_algorithms_enabled() is enabled
            assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
            assert torch.utils.deterministic.fill_uninitialized_memory is fill
        finally:
            torch.use_deterministic_algorithms(False)


def test_prepare_deterministic_sets_the_cublas_workspace_for_cuda_only_and_keeps_a_users_value(monkeypatch) -> None:
    from lowbit.device import CUBLAS_ENV, prepare_deterministic

    monkeypatch.setenv(CUBLAS_ENV, "x")  # monkeypatch restores the variable as it was, set or not
    monkeypatch.delenv(CUBLAS_ENV)
    prepare_deterministic(CPU)
    assert CUBLAS_ENV not in os.environ
    prepare_deterministic(torch.device("cuda", 0))  # only the type is read: no GPU needed
    assert os.environ[CUBLAS_ENV] == ":4096:8"
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    prepare_deterministic(torch.device("cuda", 0))
    assert os.environ[CUBLAS_ENV] == ":16:8"


def test_train_block_leaves_deterministic_mode_once_an_op_has_no_kernel_and_trains_the_same(monkeypatch, capsys):
    import lowbit.init.base as base
    from lowbit.device import deterministic_backward

    entered = []

    def counting(device):
        entered.append(device)
        return deterministic_backward(device)

    monkeypatch.setattr(base, "deterministic_backward", counting)
    losses, weights, stats = _train(alerting=False)
    assert "deterministic" not in stats  # the CPU is not one of its devices
    assert _train(alerting=True)[0] == losses  # outside the mode the op is an identity
    monkeypatch.setattr("lowbit.device.DETERMINISTIC_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr("lowbit.init.base.DETERMINISTIC_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(base, "_REFUSED", set())
    capsys.readouterr()
    entered.clear()
    got = _train(alerting=False)  # every step in deterministic mode
    assert got[0] == losses and all(map(torch.equal, got[1], weights)) and got[2]["deterministic"]
    assert capsys.readouterr().err == "" and len(entered) == 6  # 2 epochs x 3 steps
    entered.clear()
    for _ in range(2):  # the first backward is refused and its step redone; later steps and runs skip the attempt
        got = _train(alerting=True)
        assert got[0] == losses and all(map(torch.equal, got[1], weights)) and got[2]["deterministic"] is False
    assert len(entered) == 1
    err = capsys.readouterr().err
    assert err.count("lowbit: warning: test-method block 0") == 1 and "a test op" in err
    assert not torch.are_deterministic_algorithms_enabled()


def test_apiq_bw_in_deterministic_mode_equals_the_default_bit_for_bit(monkeypatch, capsys) -> None:
    """A real block's backward (attention, norms, LoRA, the quantizer's straight-through steps) has a deterministic
    kernel for every op on the CPU, and the mode changes no bit there."""
    from lowbit.device import CUBLAS_ENV, deterministic_backward

    options = {"warm_start": "gptq", "epochs": 1}
    reference, _ = _run_engine("apiq-bw", options, EngineOptions(progress=False))
    monkeypatch.setenv(CUBLAS_ENV, ":4096:8")  # the engine would set it for a "cpu" that is now one of the devices
    monkeypatch.setattr("lowbit.device.DETERMINISTIC_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr("lowbit.init.base._REFUSED", set())  # a refusal here stays out of later tests
    strict = []

    def spy(device):
        with deterministic_backward(device):
            strict.append(torch.are_deterministic_algorithms_enabled())
            yield

    monkeypatch.setattr("lowbit.init.base.deterministic_backward", contextlib.contextmanager(spy))
    got, _ = _run_engine("apiq-bw", options, EngineOptions(progress=False))
    assert strict and all(strict)  # every training backward ran in the mode
    assert _bytes(got) == _bytes(reference)
    assert "warning" not in capsys.readouterr().err
