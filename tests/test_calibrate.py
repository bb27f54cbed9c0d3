"""Calibration engine and initializers on tiny models: quality order, closed-form optimality, resume, memory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowbit
from conftest import run_until_killed, save_tiny, tiny_model, tiny_tokenizer
from lowbit.calibrate import calibrate
from lowbit.errors import LowbitError
from lowbit.init.lowrank import best_rank, top_singular, whitened_best_rank
from lowbit.layers import QuantLinear, quant_layers

CALIB = torch.randint(3, 120, (8, 64), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(3, 120, (4, 64), generator=torch.Generator().manual_seed(1))


def logit_error(arch: str, init: str, bits: int = 2, **options) -> float:
    ref_model = tiny_model(arch)
    model = tiny_model(arch)
    config = lowbit.QuantConfig(bits=bits, group_size=32, init=init, rank=4, options=options)
    lowbit.quantize(model, config, calib=CALIB, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
    with torch.no_grad():
        ref, out = ref_model(HELD_OUT).logits, model(HELD_OUT).logits
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "gpt2"])
def test_every_initializer_runs(arch: str) -> None:
    for init, options in [("none", {}), ("loftq", {"loftq_iters": 2}), ("wsvd", {}), ("apiq-lw", {"epochs": 1}),
                          ("apiq-bw", {"epochs": 1, "warm_start": "wsvd", "second_loss": 1}),
                          ("apiq-bw", {"epochs": 1, "warm_start": "gptq"}),
                          ("gptq", {})]:  # fmt: skip
        assert logit_error(arch, init, **options) < 1.5


def test_quality_order_on_llama() -> None:
    rtn = logit_error("llama", "qlora")
    loftq1 = logit_error("llama", "loftq", loftq_iters=1)
    wsvd = logit_error("llama", "wsvd")
    cold = logit_error("llama", "apiq-bw", epochs=4)
    warm = logit_error("llama", "apiq-bw", epochs=4, warm_start="wsvd")
    assert loftq1 < rtn
    assert wsvd < loftq1  # activation-aware beats weight-only SVD of the same residual
    assert cold < rtn
    assert warm < cold  # warm start: better at equal epochs
    assert logit_error("llama", "apiq-bw", epochs=4, warm_start="gptq") < warm  # GPTQ codes under the LoRA
    assert logit_error("llama", "gptq") < logit_error("llama", "none")  # no adapter: GPTQ beats rounding


def test_wsvd_clip_search_beats_min_max() -> None:
    assert logit_error("llama", "wsvd") < logit_error("llama", "wsvd", wsvd_clip="none")
    with pytest.raises(LowbitError, match="--wsvd-clip 'grid' is not known"):
        logit_error("llama", "wsvd", wsvd_clip="grid")


def test_apiq_bw_reduces_block_loss() -> None:
    def block_mse(epochs: int) -> list[float]:
        model = tiny_model("llama")
        config = lowbit.QuantConfig(bits=2, group_size=32, init="apiq-bw", rank=4, options={"epochs": epochs})
        lowbit.quantize(model, config, calib=CALIB, progress=False)
        return [block["stats"]["mse"] for block in model.lowbit_stats]

    trained, untrained = block_mse(3), block_mse(0)
    assert all(t < u for t, u in zip(trained, untrained, strict=True))


def test_whitened_rank_fit_is_optimal_in_its_metric() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g) * torch.linspace(0.1, 3, 32)  # anisotropic activations
    target = torch.randn(24, 32, generator=g)
    gram = x.t() @ x

    def loss(a, b):
        return (x @ (target - 2.0 * b @ a).t()).norm().item()

    a, b = whitened_best_rank(target, gram, rank=4, scaling=2.0, damp=0.0)
    a_plain, b_plain = best_rank(target, 4, 2.0)
    assert loss(a, b) < loss(a_plain, b_plain)
    for _ in range(5):  # no nearby factors do better
        assert loss(a, b) <= loss(a + 1e-3 * torch.randn(a.shape, generator=g), b) + 1e-6
    # Frobenius metric: the weight-space fit is the truncated SVD, exactly.
    assert torch.allclose(2.0 * b_plain @ a_plain, _svd_r(target, 4), atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 32), (32, 24), (16, 16)])
def test_top_singular_matches_the_full_svd(shape) -> None:
    """The Gram-eigendecomposition shortcut gives the truncated SVD of wide, tall and square matrices, and a
    rank-deficient matrix gets zero (not NaN) vectors for its zero singular values."""
    m = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = top_singular(m, 5)
    assert u.shape == (shape[0], 5) and vh.shape == (5, shape[1])
    assert torch.allclose(s, torch.linalg.svdvals(m)[:5], atol=1e-10)
    assert torch.allclose(u * s @ vh, _svd_r(m, 5), atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=m.dtype), atol=1e-10)
    one = torch.zeros(shape, dtype=torch.float64)
    one[2, 3] = 4.0
    u, s, vh = top_singular(one, 3)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert s.tolist() == [4.0, 0.0, 0.0] and torch.equal(u * s @ vh, one)


def _svd_r(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def test_loftq_iterations_reduce_weight_error() -> None:
    errs = []
    for iters in (1, 5):
        model = tiny_model("llama")
        lowbit.quantize(model, lowbit.QuantConfig(bits=2, group_size=32, init="loftq", rank=8,
                                                  options={"loftq_iters": iters}), progress=False)  # fmt: skip
        errs.append(max(b["stats"]["weight_error"] for b in model.lowbit_stats))
    assert errs[1] < errs[0]


def test_data_methods_need_calibration() -> None:
    with pytest.raises(LowbitError, match="needs calibration windows"):
        lowbit.quantize(tiny_model("llama"), lowbit.QuantConfig(bits=3, group_size=32, init="wsvd"), progress=False)


# ----- streaming, resume ---------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, tuple]:
    """Every tensor (as bytes) and the metadata of each safetensors file (whose header order is not fixed)."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            out[p.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
    return out


class Crash(Exception):
    pass


def _crash_at(block: int):
    """An ``on_block`` callback that dies right after ``block`` is committed, like a kill at that moment."""

    def hook(i: int) -> None:
        if i == block:
            raise Crash

    return hook


@pytest.mark.parametrize("init,options", [("apiq-bw", {"epochs": 1}), ("loftq", {"loftq_iters": 2})])
def test_resume_after_crash_gives_identical_checkpoint(init: str, options: dict, tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    config = lowbit.QuantConfig(bits=2, group_size=32, init=init, rank=4, options=options)
    calib = CALIB[:4, :32]
    calibrate(folder, config, tmp_path / "full", calib, tiny_tokenizer(), engine=_quiet())

    with pytest.raises(Crash):
        calibrate(folder, config, tmp_path / "resumed", calib, engine=_quiet(), on_block=_crash_at(1))
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").is_dir()
    summary = calibrate(folder, config, tmp_path / "resumed", calib, tiny_tokenizer(), engine=_quiet())
    assert summary["resumed_from"] == 2
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")
    assert not (tmp_path / ".resumed.partial").exists()
    model, _ = lowbit.load(tmp_path / "resumed")
    with torch.no_grad():
        assert torch.isfinite(model(HELD_OUT).logits).all()


def test_sigkill_mid_calibration_then_resume_is_identical(tmp_path: Path) -> None:
    """A real ``kill -9`` right after block 1 is committed (no handlers run), then the same call resumes."""
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    config = lowbit.QuantConfig(bits=2, group_size=32, init="apiq-bw", rank=4, options={"epochs": 1})
    calibrate(folder, config, tmp_path / "full", CALIB[:4, :32], tiny_tokenizer(), engine=_quiet())
    run_until_killed(
        tmp_path,
        f"""
        import lowbit
        from test_calibrate import CALIB, _quiet
        from lowbit.calibrate import calibrate

        def die(i):
            if i == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        config = lowbit.QuantConfig(bits=2, group_size=32, init="apiq-bw", rank=4, options={{"epochs": 1}})
        calibrate({str(folder)!r}, config, {str(tmp_path / "resumed")!r}, CALIB[:4, :32], engine=_quiet(),
                  on_block=die)
    """,
    )
    summary = calibrate(folder, config, tmp_path / "resumed", CALIB[:4, :32], tiny_tokenizer(), engine=_quiet())
    assert summary["resumed_from"] == 2
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")


@pytest.mark.parametrize("init", ["qlora", "apiq-bw"])
def test_nonfinite_weight_names_block_and_layer_and_keeps_finished_blocks(init: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = lowbit.QuantConfig(bits=2, group_size=32, init=init, rank=4, options={"epochs": 1})
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.down_proj\.weight contains NaN or inf"):
        calibrate(folder, config, tmp_path / "q", CALIB[:4, :32], engine=_quiet())
    work = tmp_path / ".q.partial"
    assert (work / "model-block-00000.safetensors").is_file()  # block 0 is kept for a rerun
    assert not (work / "model-block-00001.safetensors").exists()


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    config = lowbit.QuantConfig(bits=2, group_size=32, init="qlora", rank=4)
    with pytest.raises(Crash):
        calibrate(folder, config, tmp_path / "o", engine=_quiet(), on_block=_crash_at(0))
    other = lowbit.QuantConfig(bits=3, group_size=32, init="qlora", rank=4)
    with pytest.raises(LowbitError, match=r"different settings.*--overwrite"):
        calibrate(folder, other, tmp_path / "o", engine=_quiet())
    calibrate(folder, other, tmp_path / "o", engine=_quiet(), overwrite=True)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["bits"] == 3


def test_streamed_equals_in_memory(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "qwen2", layers=3)
    config = lowbit.QuantConfig(bits=3, group_size=32, init="wsvd", rank=4)
    calibrate(folder, config, tmp_path / "s", CALIB, engine=_quiet())
    streamed, _ = lowbit.load(tmp_path / "s")
    in_memory, _ = lowbit.load_model(folder)
    lowbit.quantize(in_memory, config, calib=CALIB, progress=False)
    with torch.no_grad():
        assert torch.allclose(streamed(HELD_OUT).logits, in_memory(HELD_OUT).logits, atol=1e-5)


def _quiet():
    from lowbit.engine import EngineOptions

    return EngineOptions(progress=False)


# ----- memory does not grow with depth ----------------------------------------------------------------------------
MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from pathlib import Path
    import lowbit
    from lowbit.calibrate import calibrate
    from lowbit.engine import EngineOptions

    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    calib = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    config = lowbit.QuantConfig(bits=2, group_size=64, init="wsvd", rank=4)
    per_block = []

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    calibrate(folder, config, out / "run", calib, engine=EngineOptions(progress=False),
              on_block=lambda i: per_block.append(peak_mb()))
    print(json.dumps({"peak": peak_mb(), "per_block": per_block}))
    """
)


def test_peak_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    import transformers

    peaks, weights, per_block = {}, {}, {}
    for layers in (2, 8):
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=8
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        folder = tmp_path / f"m{layers}"
        model.save_pretrained(folder)
        block_mb = sum(p.numel() for p in model.model.layers[0].parameters()) * 4 / 2**20
        weights[layers] = sum(p.numel() for p in model.parameters()) * 4 / 2**20
        del model
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), str(tmp_path / f"o{layers}")],
                              capture_output=True, text=True, check=True)  # fmt: skip
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[layers], per_block[layers] = probe["peak"], probe["per_block"]
    # The issue's criterion: peak minus the weights' own size grows by at most 30% from 2 to 8 blocks.
    assert (peaks[8] - weights[8]) / (peaks[2] - weights[2]) <= 1.3, (peaks, weights)
    # Stricter: once the allocator has warmed up (the first blocks, up to ~2 blocks' worth on CI), the peak from the
    # 3rd to the 8th block barely moves; an engine that kept finished or loaded blocks would add at least one block
    # (16 MiB here) per block, 80 MiB in all, against at most 48 allowed here.
    assert per_block[8][-1] - per_block[8][2] < 3 * block_mb, per_block


def test_layer_groups_follow_shared_inputs() -> None:
    from lowbit.engine import _record, run_block
    from lowbit.init import BlockContext
    from lowbit.init.layerwise import forward_groups
    from lowbit.quant import QuantSpec

    model = tiny_model("llama")
    calls, h0 = _record(model.model.layers, model, CALIB[:1], 1)
    ctx = BlockContext(0, QuantSpec(2, 32), None, torch.Generator(), x=h0)
    ctx.forward = lambda blk, h: run_block(blk, calls[0], h)
    for _ in range(3):  # stable across allocator states
        assert forward_groups(model.model.layers[0], ctx) == [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ]


def test_gptq_warm_start_keeps_the_gptq_codes_and_trains_only_the_lora() -> None:
    def run(init: str, **options) -> tuple[dict, dict, list[float]]:
        model = tiny_model("llama", layers=1)  # one block: every run sees the same inputs, so the codes must match
        config = lowbit.QuantConfig(bits=2, group_size=32, init=init, rank=4, options=options)
        lowbit.quantize(model, config, calib=CALIB, progress=False)
        layers = quant_layers(model)
        weights = {n: m.dequantized_weight() for n, m in layers.items()}
        loras = {n: m.lora_delta() for n, m in layers.items()}
        return weights, loras, [b["stats"]["mse"] for b in model.lowbit_stats]

    gptq, _, _ = run("gptq")
    start, start_lora, start_mse = run("apiq-bw", epochs=0, warm_start="gptq")
    trained, trained_lora, trained_mse = run("apiq-bw", epochs=3, warm_start="gptq")
    first_group = [n for n in gptq if n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert len(first_group) == 3
    for name in first_group:  # same inputs as the gptq init (later layers see the LoRA of the earlier ones)
        assert torch.equal(start[name], gptq[name])
    for name in gptq:
        assert torch.equal(trained[name], start[name])  # training moves the LoRA only: codes and grids stay
        assert start_lora[name].abs().max() > 0  # the wsvd start, not B = 0
        assert not torch.equal(trained_lora[name], start_lora[name])
    assert all(t < s for t, s in zip(trained_mse, start_mse, strict=True))
    with pytest.raises(LowbitError, match="--warm-start 'loftq' is not known"):
        lowbit.QuantConfig(bits=2, init="apiq-bw", options={"warm_start": "loftq"})
