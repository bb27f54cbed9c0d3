"""PaFi and HiWi (lowbit.adapters): the fixed smallest-magnitude mask, merges that reproduce the trained model,
exact resume, the command line end to end, and refused settings."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lowbit
from conftest import save_tiny, tiny_tokenizer
from lowbit import kernels
from lowbit.adapters import ADAPTER_SETTINGS, ADAPTER_TENSORS, HiWi, PaFi, pafi_count
from lowbit.calibrate import calibrate
from lowbit.checkpoint import ADAPTER_WEIGHTS, load_checkpoint
from lowbit.engine import EngineOptions
from lowbit.errors import LowbitError
from lowbit.export import export_merged, export_requantized
from lowbit.finetune import TrainConfig, finetune
from lowbit.layers import QuantLinear, dense_module, quant_layers
from lowbit.quant import QuantSpec
from test_finetune import HELD_OUT, Crash, _free_port, crash_at, quantized, run_cli, small, text_file


def test_pafi_mask_is_exactly_the_smallest_magnitude_fraction_with_ties_to_the_lower_index() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=g)
    weight[3, :10] = 0.25  # ties straddling the cut: the lower flat indices are taken
    weight[5, :10] = -0.25
    fraction = 0.3
    adapter = PaFi.from_weight(weight, fraction)
    k = pafi_count(fraction, weight.numel())
    assert adapter.index.dtype == torch.int32 and adapter.index.numel() == k == 288
    flat = weight.abs().flatten()
    expected = sorted(range(flat.numel()), key=lambda i: (flat[i].item(), i))[:k]
    assert adapter.index.tolist() == sorted(expected)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[adapter.index.long()] = True
    assert flat[mask].max() <= flat[~mask].min()
    assert pafi_count(1e-9, 10) == 1 and pafi_count(1.0, 10) == 10


def test_weight_adapters_forward_equals_the_merged_weight() -> None:
    """The layer's training forward (base product + x delta^T) and the merged weight give the same outputs."""
    lin = torch.nn.Linear(64, 48)
    layer = QuantLinear.from_linear(lin, QuantSpec(4, 32))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    adapters = (PaFi.from_weight(layer.base_weight(), 0.1), HiWi(64, 4, generator=torch.Generator().manual_seed(2)),
                HiWi(48, 4, "bias", generator=torch.Generator().manual_seed(3)))  # fmt: skip
    for adapter in adapters:
        for p in adapter.parameters():
            torch.nn.init.normal_(p, std=0.05)
        layer.adapter = adapter
        with kernels.pinned("reference"):  # the numerics a merge reproduces (not torch-int4's bf16 decoding)
            y = layer(x)
        merged = dense_module(layer, merge_lora=True)
        assert torch.allclose(merged(x), y, atol=1e-5), adapter
        plain = dense_module(layer)  # without the merge: the base alone
        assert torch.allclose(plain(x), F.linear(x, layer.dequantized_weight(), layer.bias), atol=1e-6)


@pytest.mark.parametrize("method", ["pafi", "hiwi"])
def test_training_keeps_the_base_and_the_merge_reproduces_the_trained_model(method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = quantized(tmp_path)
    result = finetune(ckpt, tmp_path / "ft", small(text_file(tmp_path), epochs=2, method=method), progress=False)
    assert result["losses"][-1] < result["losses"][0]
    source, _ = load_checkpoint(ckpt)
    trained, _ = load_checkpoint(tmp_path / "ft")
    settings = json.loads((tmp_path / "ft" / ADAPTER_SETTINGS).read_text())
    assert settings["method"] == method and settings["modules"] == sorted(quant_layers(trained))
    assert load_file(tmp_path / "ft" / ADAPTER_WEIGHTS).keys() == load_file(ckpt / ADAPTER_WEIGHTS).keys()
    for name, layer in quant_layers(trained).items():
        base = quant_layers(source)[name]
        assert torch.equal(layer.qweight, base.qweight) and torch.equal(layer.scales, base.scales)
        assert torch.equal(layer.lora_B, base.lora_B) and not layer.lora_A.requires_grad  # the LoRA start froze
        merged = dense_module(layer, merge_lora=True).weight
        if method == "pafi":
            fixed = PaFi.from_weight(base.base_weight(), TrainConfig().pafi_fraction).index
            assert torch.equal(layer.adapter.index, fixed)  # the mask chosen before training stayed
            untouched = torch.ones(merged.numel(), dtype=torch.bool)
            untouched[fixed.long()] = False
            assert torch.equal(merged.flatten()[untouched], base.base_weight().flatten()[untouched])
            assert layer.adapter.values.abs().sum() > 0
        else:
            assert layer.adapter.up.abs().sum() > 0
    export_merged(tmp_path / "ft", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref, got = trained(HELD_OUT).logits, plain(HELD_OUT).logits
        untrained = source(HELD_OUT).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    assert ((untrained - ref).norm() / ref.norm()).item() > 1e-3  # the adapter did move the outputs


@pytest.mark.parametrize("method", ["pafi", "hiwi"])
def test_resume_after_crash_gives_identical_weight_adapter(method: str, tmp_path: Path) -> None:
    ckpt = quantized(tmp_path)
    config = small(text_file(tmp_path), save_every=2, method=method)
    reference = finetune(ckpt, tmp_path / "a", config, progress=False)
    with pytest.raises(Crash):
        finetune(ckpt, tmp_path / "b", config, progress=False, on_step=crash_at(5))
    resumed = finetune(ckpt, tmp_path / "b", config, progress=False)
    assert resumed["resumed_from_step"] == 4 and resumed["losses"] == reference["losses"]
    ref, res = load_file(tmp_path / "a" / ADAPTER_TENSORS), load_file(tmp_path / "b" / ADAPTER_TENSORS)
    assert ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)
    assert resumed["adapter_sha256"] == reference["adapter_sha256"]


@pytest.mark.parametrize("method", ["pafi", "hiwi"])
def test_ddp_two_processes_match_one(method: str, tmp_path: Path) -> None:
    ckpt = quantized(tmp_path)
    data = text_file(tmp_path)
    single = finetune(ckpt, tmp_path / "single", small(data, method=method), progress=False)
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_finetune import small
        from lowbit.finetune import finetune
        result = finetune({str(ckpt)!r}, {str(tmp_path / "ddp")!r}, small({str(data)!r}, method={method!r}),
                          progress=False)
        with open({str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.json", "w") as f:
            json.dump(result, f)
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    a, b = load_file(tmp_path / "single" / ADAPTER_TENSORS), load_file(tmp_path / "ddp" / ADAPTER_TENSORS)
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.parametrize("method", ["pafi", "hiwi"])
def test_weight_adapter_backward_under_bf16_autocast(method: str, tmp_path: Path) -> None:
    from lowbit.finetune import ensure_adapter

    model, _ = load_checkpoint(quantized(tmp_path))
    ensure_adapter(model, TrainConfig(method=method))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randint(3, 120, (2, 16))).logits.float().pow(2).mean()
    loss.backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".adapter." in n for n in trained)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in trained.values())


@pytest.mark.parametrize(("method", "flag"), [("pafi", "--pafi-fraction"), ("hiwi", "--hiwi-dim")])
def test_cli_finetune_and_export_plain_model(method: str, flag: str, tmp_path: Path, capsys) -> None:
    ckpt = quantized(tmp_path)
    data = text_file(tmp_path)
    value = "0.02" if method == "pafi" else "3"
    code, out, err = run_cli(["finetune", str(ckpt), "--data", str(data), "--seqlen", "32", "--samples", "8",
                              "--out", str(tmp_path / "ft"), "--method", method, flag, value, "--json"],
                             capsys)  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["method"] == method and result["steps"] == 2 and result["tokens_per_s"] > 0
    settings = json.loads((tmp_path / "ft" / ADAPTER_SETTINGS).read_text())
    assert settings[{"pafi": "fraction", "hiwi": "dim"}[method]] == float(value)
    code, out, err = run_cli(["info", str(tmp_path / "ft"), "--json"], capsys)
    assert code == 0, err
    info, stored = json.loads(out), load_file(tmp_path / "ft" / ADAPTER_TENSORS)
    assert info["weight_adapter"] == method
    assert info["weight_adapter_params"] == sum(v.numel() for k, v in stored.items() if not k.endswith(".index")) > 0
    code, out, err = run_cli(["export", str(tmp_path / "ft"), "--merged", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0, err
    assert not list((tmp_path / "m").glob("*adapter*"))
    config = lowbit.QuantConfig(bits=4, group_size=32, init="none")
    export_requantized(tmp_path / "ft", tmp_path / "rq", config, None, progress=False)
    model, _ = load_checkpoint(tmp_path / "rq")
    assert not (tmp_path / "rq" / ADAPTER_SETTINGS).exists()
    assert all(m.adapter is None for m in quant_layers(model).values())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--method", "pafi", "--pafi-fraction", "0"], "--pafi-fraction must be in (0, 1], got 0.0"),
        (["--method", "pafi", "--pafi-fraction", "1.5"], "--pafi-fraction must be in (0, 1], got 1.5"),
        (["--method", "hiwi", "--hiwi-dim", "0"], "--hiwi-dim must be at least 1, got 0"),
        (["--method", "hiwi", "--hiwi-target", "bias"], "--hiwi-target bias adapts layer biases, and none of the"),
        (["--method", "pafi", "--adapter-layers", "nothing_here"], "matches none of the 14 linear layers"),
        (["--method", "pafi", "--adapter-layers", "mlp("], "is not a regular expression"),
        (["--adapter-layers", "mlp"], "--adapter-layers selects the layers of a pafi or hiwi adapter"),
    ],
)
def test_cli_bad_setting_is_a_one_line_error(args: list, match: str, tmp_path: Path, capsys) -> None:
    ckpt = quantized(tmp_path)
    data = text_file(tmp_path)
    capsys.readouterr()
    code, _, err = run_cli(["finetune", str(ckpt), "--data", str(data), "--seqlen", "32", "--samples", "8",
                            "--out", str(tmp_path / "o"), *args], capsys)  # fmt: skip
    assert code == 2 and err.startswith("lowbit: error:") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_another_method_on_a_weight_adapter_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = quantized(tmp_path)
    data = text_file(tmp_path)
    finetune(ckpt, tmp_path / "ft", small(data, samples=8, method="pafi"), progress=False)
    for method in ("lora", "hiwi"):
        with pytest.raises(LowbitError, match="has a pafi adapter"):
            finetune(tmp_path / "ft", tmp_path / method, small(data, samples=8, method=method), progress=False)


def test_settings_that_would_change_an_existing_adapter_are_named_as_unused(tmp_path: Path, capsys) -> None:
    """Training a PaFi checkpoint further keeps its mask: a different --pafi-fraction or --adapter-layers changes
    nothing, and stderr says so; the same settings say nothing."""
    ckpt = quantized(tmp_path)
    data = text_file(tmp_path)
    finetune(ckpt, tmp_path / "ft", small(data, samples=8, method="pafi", pafi_fraction=0.02), progress=False)
    mask = load_file(tmp_path / "ft" / ADAPTER_TENSORS)
    capsys.readouterr()
    finetune(tmp_path / "ft", tmp_path / "same", small(data, samples=8, method="pafi", pafi_fraction=0.02),
             progress=False)  # fmt: skip
    assert "note" not in capsys.readouterr().err
    config = small(data, samples=8, method="pafi", pafi_fraction=0.1, adapter_layers="mlp")
    finetune(tmp_path / "ft", tmp_path / "more", config, progress=False)
    err = capsys.readouterr().err
    assert "the checkpoint's pafi adapter (fraction 0.02, 14 layers) is trained further as it is" in err
    assert "--pafi-fraction 0.1, --adapter-layers 'mlp' not used" in err
    again = load_file(tmp_path / "more" / ADAPTER_TENSORS)
    assert all(torch.equal(again[k], v) for k, v in mask.items() if k.endswith(".index"))


def test_adapter_layers_selects_the_layers_that_train(tmp_path: Path) -> None:
    ckpt = quantized(tmp_path)
    config = small(text_file(tmp_path), samples=8, method="hiwi", adapter_layers=r"mlp\.(up|down)_proj")
    finetune(ckpt, tmp_path / "ft", config, progress=False)
    trained, _ = load_checkpoint(tmp_path / "ft")
    layers = quant_layers(trained)
    chosen = sorted(n for n in layers if n.endswith(("mlp.up_proj", "mlp.down_proj")))
    assert chosen and len(chosen) < len(layers)
    assert json.loads((tmp_path / "ft" / ADAPTER_SETTINGS).read_text())["modules"] == chosen
    assert sorted(n for n, m in layers.items() if m.adapter is not None) == chosen
    assert {k.rsplit(".", 1)[0] for k in load_file(tmp_path / "ft" / ADAPTER_TENSORS)} == set(chosen)


def test_hiwi_bias_variant_changes_only_the_biases_and_merges(tmp_path: Path) -> None:
    """The paper's bias variant on GPT-2 (Conv1D layers with biases), on the attention layers only: only those get
    an adapter, every weight stays the base's, and the merged plain model reproduces the trained one."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path / "fp", "gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # a pre-trained model's biases are not zero (a zero bias gives the adapter no input)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(folder)
    ckpt = tmp_path / "q"
    config = lowbit.QuantConfig(bits=4, group_size=32, init="qlora", rank=4)
    calibrate(folder, config, ckpt, None, tiny_tokenizer(), engine=EngineOptions(progress=False))
    config = small(text_file(tmp_path), samples=16, method="hiwi", hiwi_target="bias", hiwi_dim=4,
                   adapter_layers=r"\.attn\.")  # fmt: skip
    result = finetune(ckpt, tmp_path / "ft", config, progress=False)
    assert result["losses"][-1] < result["losses"][0]
    source, _ = load_checkpoint(ckpt)
    trained, _ = load_checkpoint(tmp_path / "ft")
    layers, base_layers = quant_layers(trained), quant_layers(source)
    chosen = sorted(n for n in layers if ".attn." in n)
    assert chosen and len(chosen) < len(layers) and all(layers[n].bias is not None for n in chosen)
    assert sorted(n for n, m in layers.items() if m.adapter is not None) == chosen
    for name in chosen:
        layer, base = layers[name], base_layers[name]
        assert layer.adapter.target == "bias" and layer.adapter.down.shape == (layer.out_features, 4)
        merged = dense_module(layer, merge_lora=True)
        assert torch.equal(merged.weight, base.base_weight().t())  # the weight is the base's (Conv1D: [in, out])
        assert not torch.equal(merged.bias, base.bias)  # the bias moved
    export_merged(tmp_path / "ft", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref, got, untrained = trained(HELD_OUT).logits, plain(HELD_OUT).logits, source(HELD_OUT).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    assert ((untrained - ref).norm() / ref.norm()).item() > 1e-4


def test_hiwi_bias_variant_on_zero_biases_is_refused(tmp_path: Path) -> None:
    ckpt = quantized(tmp_path, arch="gpt2")  # a freshly initialized GPT-2: every bias is zero
    with pytest.raises(LowbitError, match="are all zero"):
        finetune(ckpt, tmp_path / "ft", small(text_file(tmp_path), method="hiwi", hiwi_target="bias"), progress=False)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("method", ["pafi", "hiwi"])
def test_full_precision_base_trains_and_saves_the_merged_model(method: str, tmp_path: Path) -> None:
    """On a full-precision model (no quantization) the adapter trains over the frozen weights and ``out`` is the
    plain merged model: it loads with plain transformers and gives the trained model's outputs; PaFi leaves every
    weight outside its mask bit-identical, and nothing but the decoder's linear weights changes."""
    from transformers import AutoModelForCausalLM

    from lowbit.finetune import ensure_adapter, load_base

    folder = save_tiny(tmp_path / "fp", "llama")
    config = small(text_file(tmp_path), samples=16, method=method)
    trained_model, _ = load_base(folder, config)
    ensure_adapter(trained_model, config)
    result = finetune(folder, tmp_path / "ft", config, progress=False)
    assert result["losses"][-1] < result["losses"][0]
    assert json.loads((tmp_path / "ft" / ADAPTER_SETTINGS).read_text())["method"] == method
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ft", dtype=torch.float32).eval()
    before, after = source.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    if method == "pafi":
        for name in changed:
            mask = PaFi.from_weight(before[name], config.pafi_fraction).index.long()
            moved = (before[name] != after[name]).flatten().nonzero().flatten()
            assert set(moved.tolist()) <= set(mask.tolist())
    # The merged model gives the outputs of the trained one (the adapter applied in its training form).
    from lowbit.layers import adapter_layers

    stored = load_file(tmp_path / "ft" / ADAPTER_TENSORS)
    for name, layer in adapter_layers(trained_model).items():
        for key in layer.adapter.state_dict():
            getattr(layer.adapter, key).data = stored[f"{name}.{key}"]
    with torch.no_grad():
        ref, got = trained_model(HELD_OUT).logits, merged(HELD_OUT).logits
        untrained = source(HELD_OUT).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    assert ((untrained - ref).norm() / ref.norm()).item() > 1e-4


def test_lora_on_a_full_precision_model_is_refused(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "fp", "llama")
    with pytest.raises(LowbitError, match="lowbit's LoRA trains a quantized base"):
        finetune(folder, tmp_path / "ft", small(text_file(tmp_path)), progress=False)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("conv1d", [False, True])
def test_adapted_full_precision_layer_forward_equals_its_merge(conv1d: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    from lowbit.layers import AdaptedLinear

    torch.manual_seed(0)
    base = Conv1D(48, 64) if conv1d else torch.nn.Linear(64, 48)
    torch.nn.init.normal_(base.bias, std=0.1)
    x = torch.randn(5, 64)
    for make in (lambda w: PaFi.from_weight(w, 0.1), lambda w: HiWi(64, 4), lambda w: HiWi(48, 4, "bias")):
        layer = AdaptedLinear(base)
        assert (layer.in_features, layer.out_features) == (64, 48)
        layer.adapter = make(layer.base_weight())
        for p in layer.adapter.parameters():
            torch.nn.init.normal_(p, std=0.05)
        merged = layer.merged()
        assert type(merged) is type(base) and merged.weight.shape == base.weight.shape
        assert torch.allclose(merged(x), layer(x), atol=1e-5)
        assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("kind", ["pafi", "hiwi", "hiwi-bias"])
def test_recomputed_delta_gives_plain_autograds_gradients(kind: str) -> None:
    """The training form rebuilds the merged weight in backward (no per-layer dense copy kept); its gradients are
    those of the plain computation ``x (W + delta)^T + b``."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), QuantSpec(4, 32))
    torch.nn.init.normal_(layer.bias, std=0.1)
    layer.bias.requires_grad_(False)
    layer.adapter = {"pafi": lambda: PaFi.from_weight(layer.base_weight(), 0.1), "hiwi": lambda: HiWi(64, 4),
                     "hiwi-bias": lambda: HiWi(48, 4, "bias")}[kind]()  # fmt: skip
    for p in layer.adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    got = [p.grad.clone() for p in layer.adapter.parameters()] + [x.grad.clone()]
    for p in [*layer.adapter.parameters(), x]:
        p.grad = None
    weight, bias = layer.base_weight(), layer.bias.detach().float()
    if kind == "hiwi-bias":
        bias = bias + layer.adapter.delta(bias)
    else:
        weight = weight + layer.adapter.delta(weight)
    F.linear(x, weight, bias).square().sum().backward()
    expected = [p.grad for p in layer.adapter.parameters()] + [x.grad]
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in zip(got, expected, strict=True))
    assert all(g.abs().sum() > 0 for g in got)


def test_adapter_trained_in_bf16_is_saved_as_float32(tmp_path: Path) -> None:
    ckpt = quantized(tmp_path)
    config = small(text_file(tmp_path), samples=8, method="pafi", lora_dtype="bf16")
    finetune(ckpt, tmp_path / "ft", config, progress=False)
    stored = load_file(tmp_path / "ft" / ADAPTER_TENSORS)
    assert {v.dtype for k, v in stored.items() if k.endswith(".values")} == {torch.float32}
    assert {v.dtype for k, v in stored.items() if k.endswith(".index")} == {torch.int32}
