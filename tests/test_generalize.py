"""Held-out per-block error in the calibration engine, and the Block-AP initializer (issue 18), on tiny models."""

import json
from pathlib import Path

import pytest
import torch

import lowbit
from conftest import save_tiny, tiny_model, tiny_text, tiny_tokenizer
from lowbit.calibrate import calibrate
from lowbit.data import sample_windows, windows
from lowbit.engine import EngineOptions
from lowbit.errors import LowbitError
from lowbit.init.blockap import BlockAPLinear
from lowbit.layers import QuantLinear, quant_layers
from lowbit.quant import QuantSpec, dequantize_weight

CALIB = torch.randint(3, 120, (10, 48), generator=torch.Generator().manual_seed(0))
TRAIN, HOLDOUT = 6, 4


def quantized(arch: str, init: str, calib: torch.Tensor, bits: int = 2, **options):
    model = tiny_model(arch)
    config = lowbit.QuantConfig(bits=bits, group_size=32, init=init, rank=4, options=options)
    return lowbit.quantize(model, config, calib=calib, progress=False)


def stats(model) -> list[dict]:
    return [block["stats"] for block in model.lowbit_stats]


def first_block_error(model, arch: str, ids: torch.Tensor) -> float:
    """Relative error of block 0's outputs against the full-precision model's (both get the same inputs)."""
    with torch.no_grad():
        hq = model(ids, output_hidden_states=True).hidden_states[1]
        hf = tiny_model(arch)(ids, output_hidden_states=True).hidden_states[1]
    return ((hq - hf).norm() / hf.norm()).item()


def test_holdout_windows_extend_todays_sample_and_are_disjoint() -> None:
    all_windows = windows(torch.arange(5000), 50)
    today = sample_windows(all_windows, 32, seed=0)
    drawn = sample_windows(all_windows, 32 + 8, seed=0)
    assert torch.equal(drawn[:32], today)  # the training windows are exactly the ones drawn without holdout
    train = {tuple(w.tolist()) for w in drawn[:32]}
    held = {tuple(w.tolist()) for w in drawn[32:]}
    assert len(held) == 8 and not train & held


def test_initializer_never_sees_held_out_windows() -> None:
    """Training on the first windows with the rest held out gives the same block as calibrating on the first
    windows alone; only the reported error moves to the held-out ones."""
    plain = quantized("llama", "apiq-bw", CALIB[:TRAIN], epochs=2, warm_start="wsvd")
    held = quantized("llama", "apiq-bw", CALIB, epochs=2, warm_start="wsvd", holdout_windows=HOLDOUT)
    for a, b in zip(plain.state_dict().values(), held.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for p, h in zip(stats(plain), stats(held), strict=True):
        assert h["train_mse"] == p["mse"] and h["train_rel_error"] == p["rel_error"]
        assert h["mse"] != p["mse"]
        assert "train_mse" not in p


def test_held_out_error_is_measured_on_held_out_windows() -> None:
    """Block 0 sees the same inputs on both paths, so its held-out error is that of the model's first hidden state
    on the held-out windows; an adapter trained hard on 2 windows fits them better than unseen ones."""
    calib = CALIB[: 2 + HOLDOUT]
    model = quantized("llama", "apiq-bw", calib, epochs=30, lora_lr=1e-2, weight_decay=0.0, holdout_windows=HOLDOUT)
    block0 = stats(model)[0]
    assert block0["rel_error"] == pytest.approx(first_block_error(model, "llama", calib[2:]), rel=1e-4)
    assert block0["train_rel_error"] < block0["rel_error"]  # the overfitting the held-out windows expose


@pytest.mark.parametrize("init,options", [("apiq-bw", {"lora_lr": 1e-3, "weight_decay": 0.0}),
                                          ("blockap", {"weight_lr": 1e-3, "qparam_lr": 1e-3})])  # fmt: skip
def test_validation_windows_keep_the_epoch_with_the_lowest_validation_loss(init: str, options: dict) -> None:
    """Trained long on 2 windows, a block's loss on 4 validation windows it never sees turns up; the block keeps
    the parameters of the epoch where it was lowest: exactly the block that training on the 2 windows alone for
    that many epochs gives (block 0, whose inputs do not depend on the epochs chosen before it) -- so neither the
    start nor the steps used the validation windows."""
    calib = CALIB[:6]
    model = quantized("llama", init, calib, epochs=12, val_windows=4, **options)
    block0 = stats(model)[0]
    val, best = block0["val_losses"], block0["best_epoch"]
    assert len(val) == 13 and len(block0["epoch_losses"]) == 12 and val[best] == min(val)
    assert 0 < best < 12, val  # this setting overfits: the last epoch is not the best
    stopped = quantized("llama", init, calib[:2], epochs=best, **options)
    kept = {k: v for k, v in model.state_dict().items() if ".layers.0." in k}
    assert kept and all(torch.equal(v, stopped.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(LowbitError, match="--val-windows 6 leaves no calibration window to train on"):
        quantized("llama", init, calib, epochs=1, val_windows=6)


def test_patience_stops_a_block_after_epochs_without_a_lower_validation_loss() -> None:
    """The stopped run is the full run cut short: the same validation losses up to the stop, which comes
    ``patience`` epochs after the lowest one so far, and the parameters of that epoch."""
    options = {"lora_lr": 1e-3, "weight_decay": 0.0}
    full = stats(quantized("llama", "apiq-bw", CALIB[:6], epochs=12, val_windows=4, **options))[0]
    model = quantized("llama", "apiq-bw", CALIB[:6], epochs=12, val_windows=4, patience=2, **options)
    block0 = stats(model)[0]
    val, best = block0["val_losses"], block0["best_epoch"]
    assert len(val) < 13, "this setting overfits, so the block stops early"
    assert val == full["val_losses"][: len(val)] and len(val) - 1 == best + 2 and val[best] == min(val)
    stopped = quantized("llama", "apiq-bw", CALIB[:2], epochs=best, **options)
    kept = {k: v for k, v in model.state_dict().items() if ".layers.0." in k}
    assert kept and all(torch.equal(v, stopped.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(LowbitError, match="--patience 2 needs validation windows to watch"):
        lowbit.QuantConfig(bits=2, init="apiq-bw", options={"patience": 2})


@pytest.mark.parametrize("init", ["apiq-bw", "blockap"])
def test_a_gptq_start_never_sees_the_validation_windows(init: str) -> None:
    with_val = quantized("llama", init, CALIB[:6], epochs=0, warm_start="gptq", val_windows=4)
    alone = quantized("llama", init, CALIB[:2], epochs=0, warm_start="gptq")
    assert stats(with_val)[0]["best_epoch"] == 0
    for (k, a), b in zip(with_val.state_dict().items(), alone.state_dict().values(), strict=True):
        if ".layers.0." in k:
            assert torch.equal(a, b), k


def test_holdout_needs_more_windows_than_it_holds_out() -> None:
    with pytest.raises(LowbitError, match="held-out windows need at least 5"):
        quantized("llama", "gptq", CALIB[:4], holdout_windows=4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_blockap_beats_rtn_block_error(arch: str) -> None:
    rtn = quantized(arch, "qlora", CALIB[:TRAIN])
    model = quantized(arch, "blockap", CALIB, epochs=2, holdout_windows=HOLDOUT)
    assert all(len(b["epoch_losses"]) == 2 for b in stats(model))
    assert first_block_error(model, arch, CALIB[:TRAIN]) < first_block_error(rtn, arch, CALIB[:TRAIN])
    assert first_block_error(model, arch, CALIB[TRAIN:]) < first_block_error(rtn, arch, CALIB[TRAIN:])
    for layer in quant_layers(model).values():
        q = layer.quantized()
        assert int(q.codes.max()) <= 3 and int(q.zeros.max()) <= 3
        assert layer.lora_B.abs().sum() > 0  # the LoRA starts from the whitened SVD of the residual


def test_blockap_training_lowers_its_loss_and_gptq_start_keeps_gptq_codes() -> None:
    trained = stats(quantized("llama", "blockap", CALIB[:TRAIN], epochs=3))
    assert all(s["epoch_losses"][-1] < s["epoch_losses"][0] for s in trained)
    gptq = quant_layers(quantized("llama", "gptq", CALIB[:TRAIN]))
    start = quant_layers(quantized("llama", "blockap", CALIB[:TRAIN], epochs=0, warm_start="gptq"))
    for name, layer in gptq.items():  # block 1's inputs differ: block 0 has a LoRA under blockap, none under gptq
        if ".0." in name:
            assert torch.equal(start[name].qweight, layer.qweight)
            assert torch.equal(start[name].scales, layer.scales)


@pytest.mark.parametrize("symmetric", [False, True])
def test_blockap_frozen_codes_are_what_training_saw(symmetric: bool) -> None:
    """Gradients reach weights, scales and zero points; after they move far (zero points out of range too), the
    frozen codes are in range, survive packing, and dequantize to exactly the weight the training forward used."""
    spec = QuantSpec(bits=2, group_size=32, symmetric=symmetric)
    fake = BlockAPLinear(torch.nn.Linear(64, 16), spec)
    fake(torch.randn(8, 64, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
    assert all(p.grad is not None for p in fake.parameters())  # zero points: only through the clamp
    assert fake.weight.grad.abs().sum() > 0 and fake.scale.grad.abs().sum() > 0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        fake.weight.add_(0.1 * torch.randn(fake.weight.shape, generator=g))
        fake.scale.mul_(torch.rand(fake.scale.shape, generator=g) * 2 + 0.3)
        for p in fake.qparams()[1:]:
            p.add_(3 * torch.randn(p.shape, generator=g))
    q = fake.frozen()
    assert int(q.codes.max()) <= 3 and (q.zeros is None or int(q.zeros.max()) <= 3)
    assert torch.equal(dequantize_weight(q, spec), fake.fake_weight().detach())
    layer = QuantLinear(64, 16, spec)
    layer.set_weight(q)
    assert torch.equal(layer.dequantized_weight(), dequantize_weight(q, spec))


def test_blockap_options_are_checked_up_front() -> None:
    with pytest.raises(LowbitError, match="init blockap: --warm-start 'wsvd' is not known: choose none, gptq"):
        lowbit.QuantConfig(bits=2, init="blockap", options={"warm_start": "wsvd"})
    with pytest.raises(LowbitError, match="--weight-lr must be at least 0"):
        lowbit.QuantConfig(bits=2, init="blockap", options={"weight_lr": -1})
    nf = lowbit.QuantConfig(bits=4, group_size=32, format="nf", init="blockap", rank=4)
    with pytest.raises(LowbitError, match="--format int"):
        lowbit.quantize(tiny_model("llama"), nf, calib=CALIB[:TRAIN], progress=False)


@pytest.mark.parametrize("init,options", [("apiq-bw", {"epochs": 1}), ("blockap", {"epochs": 1})])
def test_resume_with_held_out_windows_is_identical(init: str, options: dict, tmp_path: Path) -> None:
    from test_calibrate import Crash, _crash_at, _files

    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    config = lowbit.QuantConfig(bits=2, group_size=32, init=init, rank=4, options={**options, "holdout_windows": 2})
    calib, quiet = CALIB[:6, :32], EngineOptions(progress=False)
    calibrate(folder, config, tmp_path / "full", calib, tiny_tokenizer(), engine=quiet)
    with pytest.raises(Crash):
        calibrate(folder, config, tmp_path / "resumed", calib, engine=quiet, on_block=_crash_at(1))
    summary = calibrate(folder, config, tmp_path / "resumed", calib, tiny_tokenizer(), engine=quiet)
    assert summary["resumed_from"] == 2
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")
    blocks = json.loads((tmp_path / "resumed" / "config.json").read_text())["quantization_config"]["calibration"]
    assert all("train_rel_error" in b and "rel_error" in b for b in blocks["blocks"])


def test_cli_holdout_windows(tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    folder = save_tiny(tmp_path / "m", "llama")
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(2000))
    args = ["quantize", str(folder), "--bits", "2", "--group-size", "32", "--init", "gptq", "--calib", str(text),
            "--calib-seqlen", "32", "--calib-windows", "4"]  # fmt: skip
    assert main([*args, "--holdout-windows", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--holdout-windows must be at least 0" in capsys.readouterr().err
    assert main([*args, "--holdout-windows", "3", "--out", str(tmp_path / "q")]) == 0
    assert "on 3 held-out windows" in capsys.readouterr().out
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["options"]["holdout_windows"] == 3
    assert all("train_mse" in b for b in qc["calibration"]["blocks"])


def test_p1_without_the_bible_modules_fails_in_one_line(monkeypatch, tmp_path: Path) -> None:
    """A row calibrated on Bible text needs the SWORD module: a machine without it gets the fix, not a traceback
    (other rows leave their Bible column empty instead, so ``make demo`` needs no Debian package)."""
    import lowbit.models
    from lowbit import parallel

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import p1

    monkeypatch.setattr(lowbit.models, "resolve_model_path", lambda _path: tmp_path)
    monkeypatch.setattr(lowbit.models, "load_tokenizer", lambda _folder: tiny_tokenizer())
    monkeypatch.setattr(parallel, "_open", lambda module, _dir: parallel._bible(module, tmp_path / "no-sword"))
    fix = r"p1.py: error: row gptq-w2-calib-bible: no SWORD modules in .*apt-get install sword-text-web"
    with pytest.raises(SystemExit, match=fix):
        p1.main(["--worker", "gptq-w2-calib-bible"])
