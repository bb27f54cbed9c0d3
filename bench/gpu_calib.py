"""Protocol P4's calibration rows (../shared/BENCHMARK.md): seconds per block and peak GPU memory of streaming
calibration at 7B scale, and CPU-versus-CUDA agreement.

- ``calib-gptq`` and ``calib-apiq``: a random-init Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32
  heads, vocabulary 32000) is written block by block as a bf16 safetensors folder (one block in RAM at a time),
  then calibrated by ``lowbit.calibrate.calibrate`` -- the path ``lowbit quantize`` takes: blocks are read from
  disk one at a time, moved to the GPU, quantized, moved back and saved -- at W2g64 with ``gptq`` and with
  ``apiq-bw --warm-start gptq --epochs 2``, on 128 random-token windows of 2048. Time depends on shapes, not
  values, so only ``--blocks`` blocks (default 3) are built and timed; the 32-block total is *extrapolated*
  (setup + 32 x the mean of the blocks after the first, which carries CUDA's warm-up), and the row says so.
  Per-block seconds are wall-clock from block to block: reading the block, initializing it, saving it and the
  resume point (the x/xq streams) included.
- ``calib-agree``: the same tiny random-init Llama calibrated with both methods on the CPU and on CUDA (a CPU model
  whose blocks visit the GPU one at a time); the relative difference of every block's output and of the final
  logits between the two, on held-out windows, next to the quantization error itself for scale.
- ``calib-nudge``: how far two equally valid runs of ``gptq`` land on ``calib-agree``'s model: calibrated once as is
  and once with every weight nudged by a relative 1e-6 (a few float32 ulps); runs on any device, the CPU included
  (``--device cpu --store`` merges it into bench/results/gpu.json).
- ``calib-devices``: every initializer (qlora, none, NF, loftq, wsvd, gptq, apiq-lw, apiq-bw with each warm start)
  on the device, with the activation streams on the device and in pinned host memory: final-logit differences
  against the CPU run. A tensor left on the wrong device fails this row.

``bench/gpu.py`` imports :func:`calibration_rows` for ``--rows calib-gptq,calib-apiq,...`` and adds device,
versions and commit. Alone::

    python bench/gpu_calib.py --dry-run          # tiny shapes on whatever device there is (CPU: seconds)
    python bench/gpu_calib.py --rows calib-gptq --blocks 2 --out rows.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROWS = ("calib-gptq", "calib-apiq", "calib-agree", "calib-nudge", "calib-devices")
METHODS = {
    "calib-gptq": ("gptq", {}),
    "calib-apiq": ("apiq-bw", {"warm_start": "gptq", "epochs": 2}),
}
GOAL = {"seconds_per_block": 56.0, "total_minutes_32_blocks": 30.0, "peak_gpu_gib": 20.0}
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A Llama shape and the calibration set it is timed on."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    layers_full: int  # the real model's depth, for the extrapolation
    windows: int
    seqlen: int


LLAMA2_7B = Shape("llama-2-7b-shaped", 4096, 11008, 32, 32000, 32, 128, 2048)
DRY = Shape("tiny (dry run)", 128, 256, 4, 512, 32, 4, 64)


def llama_config(shape: Shape, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=max(shape.seqlen, 128), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _random(shape: torch.Size, name: str, g: torch.Generator) -> torch.Tensor:
    """HF's Llama init in bf16: N(0, 0.02) weights, norms at one."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_source(folder: Path, shape: Shape, layers: int, seed: int = 0) -> Path:
    """A random-init Llama folder with one safetensors shard per block (and one for the rest), written block by
    block: only one block's tensors exist in RAM at a time, never the whole model."""
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = llama_config(shape, layers)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        block_shapes = {k: v.shape for k, v in LlamaDecoderLayer(config, 0).state_dict().items()}
    outside = {
        "model.embed_tokens.weight": torch.Size([shape.vocab, shape.hidden]),
        "model.norm.weight": torch.Size([shape.hidden]),
        "lm_head.weight": torch.Size([shape.vocab, shape.hidden]),
    }
    weight_map = {}
    shards = [("model-outside.safetensors", outside)]
    shards += [(f"model-block-{i:05d}.safetensors", {f"model.layers.{i}.{k}": s for k, s in block_shapes.items()})
               for i in range(layers)]  # fmt: skip
    for file, shapes in shards:
        save_file({name: _random(s, name, g) for name, s in shapes.items()}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shapes, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Where a block's time goes: (module, function) pairs timed by :func:`phase_timers`.
PHASES = {
    "grams": ("lowbit.init.wsvd", "grams"),
    "gptq_rounding": ("lowbit.init.gptq", "gptq_quantize"),
    "whitened_svd": ("lowbit.init.wsvd", "whitened_best_rank"),
    "clip_search": ("lowbit.init.gptq", "search_clip"),
    "read_source": ("lowbit.calibrate", "read_tensors"),
    "write_shards_and_resume_point": ("lowbit.calibrate", "_save"),
}


@contextlib.contextmanager
def phase_timers(device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in each of :data:`PHASES` while the block runs (the functions are wrapped where the
    initializers look them up, with a device sync on both sides, and restored afterwards)."""
    import importlib

    totals = dict.fromkeys(PHASES, 0.0)
    saved = []
    for phase, (module_name, name) in PHASES.items():
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _sync(device)
                totals[_phase] += time.perf_counter() - start

        saved.append((module, name, original))
        setattr(module, name, timed)
    try:
        yield totals
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def calibration_row(
    row: str, shape: Shape, blocks: int, device: torch.device, act_dtype: torch.dtype, act_budget: int | None
) -> dict:
    """One timed calibration of ``blocks`` blocks of ``shape`` with the method of ``row`` (``act_budget``: bytes
    for the activation streams on the device, None: the engine's default)."""
    from benchlib import peak_rss_mb
    from lowbit.calibrate import calibrate
    from lowbit.config import QuantConfig
    from lowbit.device import default_budget, stream_placement
    from lowbit.engine import STREAMS, EngineOptions

    init, options = METHODS[row]
    config = QuantConfig(bits=2, group_size=64, init=init, options=dict(options))
    calib = torch.randint(3, shape.vocab, (shape.windows, shape.seqlen), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="lowbit-p4-calib-") as tmp:
        t0 = time.perf_counter()
        source = write_source(Path(tmp) / "source", shape, blocks)
        write_s = time.perf_counter() - t0
        stream_bytes = STREAMS * shape.windows * shape.seqlen * shape.hidden * act_dtype.itemsize
        budget = act_budget if act_budget is not None else default_budget(device, spill=False)
        placement = stream_placement(stream_bytes, budget, spill=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        marks: list[float] = []

        def on_block(_i: int) -> None:
            _sync(device)
            marks.append(time.perf_counter())

        _sync(device)
        start = time.perf_counter()
        engine = EngineOptions(act_dtype=act_dtype, progress=sys.stderr.isatty(), device=device, act_budget=budget)
        with phase_timers(device) as phases:
            summary = calibrate(source, config, Path(tmp) / "out", calib, None, engine=engine, on_block=on_block)
        total = time.perf_counter() - start
    per_block = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)]
    steady = per_block[1:] or per_block  # block 0 also pays CUDA's warm-up (kernels, allocator)
    seconds_per_block = sum(steady) / len(steady)
    setup = total - sum(per_block)  # skeleton, recording the calibration windows' block-0 inputs, final rename
    extrapolated = setup + shape.layers_full * seconds_per_block
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    return {
        "row": row,
        "protocol": "P4",
        "model": f"{shape.name} random init (hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.heads} heads), bf16 source streamed from safetensors, computed in float32",
        "shape": asdict(shape),
        "method": f"{init} {json.dumps(options)}" if options else init,
        "format": config.spec.name,
        "windows": shape.windows,
        "seqlen": shape.seqlen,
        "act_dtype": str(act_dtype).removeprefix("torch."),
        "stream_placement": placement,
        "act_budget_gib": round(budget / GIB, 2),
        "timed_blocks": blocks,
        "block_seconds": [round(s, 2) for s in per_block],
        "engine_block_seconds": [b["seconds"] for b in summary["blocks"]],
        "phase_seconds_all_blocks": {k: round(v, 2) for k, v in phases.items()},
        "seconds_per_block": round(seconds_per_block, 2),
        "setup_seconds": round(setup, 2),
        "extrapolated": True,
        "extrapolated_total_s": round(extrapolated, 1),
        "extrapolated_note": f"setup + {shape.layers_full} x mean seconds of timed blocks 1..{blocks - 1} "
        "(per-block time depends on shapes only); not a full run",
        "peak_gpu_allocated_gib": None if peak is None else round(peak, 2),
        "peak_gpu_reserved_gib": None if reserved is None else round(reserved, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "source_write_seconds": round(write_s, 1),
        "last_block_rel_error": summary["blocks"][-1].get("rel_error"),
        "goal": GOAL,
        "meets_goal": None
        if peak is None
        else bool(seconds_per_block <= GOAL["seconds_per_block"] and peak <= GOAL["peak_gpu_gib"]),
    }


# ----- CPU-versus-CUDA agreement ------------------------------------------------------------------------------------
def _outputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output and the logits of ``model`` (on the CPU) on ``ids``."""
    from lowbit.arch import find_blocks

    _, blocks = find_blocks(model)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]  # fmt: skip
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _compare(first: tuple, second: tuple, fp: tuple, name: str) -> dict:
    """Two quantized runs ``(model, block outputs, logits)`` of one model: how far apart they land, each one's error
    against full precision ``fp = (block outputs, logits)`` (the second's keys prefixed ``name``), and the fraction
    of packed bytes they share."""
    from lowbit.layers import quant_layers

    (a_model, a_blocks, a_logits), (b_model, b_blocks, b_logits) = first, second
    fp_blocks, fp_logits = fp
    pairs = zip(quant_layers(a_model).values(), quant_layers(b_model).values(), strict=True)
    codes = [(a.qweight == b.qweight).double().mean().item() for a, b in pairs]
    return {
        "block_output_rel_diff": [round(_rel(b, a), 7) for b, a in zip(b_blocks, a_blocks, strict=True)],
        "logits_rel_diff": round(_rel(b_logits, a_logits), 7),
        "quantization_block_rel_error": [round(_rel(a, f), 5) for a, f in zip(a_blocks, fp_blocks, strict=True)],
        "quantization_logits_rel_error": round(_rel(a_logits, fp_logits), 5),
        f"{name}_quantization_block_rel_error": [
            round(_rel(b, f), 5) for b, f in zip(b_blocks, fp_blocks, strict=True)
        ],
        f"{name}_quantization_logits_rel_error": round(_rel(b_logits, fp_logits), 5),
        "packed_bytes_equal_fraction": round(sum(codes) / len(codes), 5),
    }


def agreement_row(shape: Shape, layers: int, device: torch.device) -> dict:
    """The same random-init model calibrated on the CPU and on ``device``; block-output and logit differences."""
    from transformers import AutoModelForCausalLM

    import lowbit

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(llama_config(shape, layers), dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(3, shape.vocab, (shape.windows, shape.seqlen), generator=g)
    held_out = torch.randint(3, shape.vocab, (4, shape.seqlen), generator=g)
    fp_blocks, fp_logits = _outputs(build(), held_out)
    methods = {}
    for row, (init, options) in METHODS.items():
        config = lowbit.QuantConfig(bits=2, group_size=64, init=init, options=dict(options))
        runs = []
        for where in ("cpu", device):
            model = lowbit.quantize(build(), config, calib, progress=False, device=where)
            runs.append((model, *_outputs(model, held_out)))
        methods[row] = {
            "method": f"{init} {json.dumps(options)}" if options else init,
            # the device model's own error too: equal quality is the goal, equal codes are not (GPTQ's sequential
            # rounding turns last-bit differences into different, equally good, codes)
            **_compare(runs[0], runs[1], (fp_blocks, fp_logits), "device"),
        }
    return {
        "row": "calib-agree",
        "protocol": "P4",
        "model": f"random-init Llama (hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.heads} heads, "
        f"{layers} blocks), float32; {shape.windows} calibration windows of {shape.seqlen}, 4 held-out windows",
        "devices": ["cpu", str(device)],
        "note": "differences of the CUDA-calibrated model against the CPU-calibrated one, both evaluated on the CPU; "
        "the quantization error of each against full precision is given for scale",
        "methods": methods,
    }


def nudge_row(shape: Shape, layers: int, device: torch.device, nudge: float = 1e-6) -> dict:
    """How far apart two equally valid GPTQ runs land: ``calib-agree``'s model and calibration set, calibrated on
    ``device`` as is and with every weight multiplied by ``1 + nudge * N(0, 1)`` (1e-6: a few float32 ulps, the size
    of the difference between two BLAS libraries' sums). Compare its differences with ``calib-agree``'s."""
    from transformers import AutoModelForCausalLM

    import lowbit

    def build(nudged: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_config(shape, layers), dtype=torch.float32).eval()
        if nudged:
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + nudge * torch.randn(p.shape, generator=g))
        return model

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(3, shape.vocab, (shape.windows, shape.seqlen), generator=g)
    held_out = torch.randint(3, shape.vocab, (4, shape.seqlen), generator=g)
    fp_blocks, fp_logits = _outputs(build(False), held_out)
    config = lowbit.QuantConfig(bits=2, group_size=64, init="gptq")
    runs = []
    for nudged in (False, True):
        model = lowbit.quantize(build(nudged), config, calib, progress=False, device=device)
        runs.append((model, *_outputs(model, held_out)))
    return {
        "row": "calib-nudge",
        "protocol": "P4",
        "model": f"as calib-agree: random-init Llama (hidden {shape.hidden}, {layers} blocks), gptq W2g64, "
        f"{shape.windows} windows of {shape.seqlen}; weights nudged by (1 + {nudge:g} N(0,1)) in the second run",
        "device": str(device),
        **_compare(runs[0], runs[1], (fp_blocks, fp_logits), "nudged"),
    }


# Every initializer (and format) the engine runs, for the device smoke row.
ALL_INITS = {
    "none": ("none", {}, "int"),
    "qlora": ("qlora", {}, "int"),
    "qlora-nf": ("qlora", {}, "nf"),
    "loftq": ("loftq", {"loftq_iters": 2}, "int"),
    "wsvd": ("wsvd", {}, "int"),
    "gptq": ("gptq", {}, "int"),
    "apiq-lw": ("apiq-lw", {"epochs": 1}, "int"),
    "apiq-bw": ("apiq-bw", {"epochs": 1}, "int"),
    "apiq-bw-wsvd-second-loss": ("apiq-bw", {"warm_start": "wsvd", "epochs": 1, "second_loss": 1}, "int"),
    "apiq-bw-gptq-nf": ("apiq-bw", {"warm_start": "gptq", "epochs": 1}, "nf"),
}


def devices_row(shape: Shape, layers: int, device: torch.device) -> dict:
    """Every initializer on ``device`` with the activation streams on the device and in (pinned) host memory:
    the final logits' relative difference against the same run on the CPU (a device bug raises instead)."""
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.engine import EngineOptions

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(3, shape.vocab, (shape.windows, shape.seqlen), generator=g)
    held_out = torch.randint(3, shape.vocab, (2, shape.seqlen), generator=g)
    engines = {
        "cpu": EngineOptions(progress=False, device="cpu"),
        "device-streams": EngineOptions(progress=False, device=device),
        "host-streams": EngineOptions(progress=False, device=device, act_budget=0),
    }
    result = {}
    for label, (init, options, fmt) in ALL_INITS.items():
        config = lowbit.QuantConfig(bits=2 if fmt == "int" else 4, group_size=64, format=fmt, init=init, rank=8,
                                    options=dict(options))  # fmt: skip
        logits = {}
        for name, engine in engines.items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(llama_config(shape, layers), dtype=torch.float32).eval()
            start = time.perf_counter()
            lowbit.quantize(model, config, calib, engine=engine)
            seconds = time.perf_counter() - start
            logits[name] = (_outputs(model, held_out)[1], seconds)
        reference = logits.pop("cpu")[0]
        result[label] = {name: {"logits_rel_diff_vs_cpu": round(_rel(value, reference), 7), "seconds": round(sec, 2)}
                         for name, (value, sec) in logits.items()}  # fmt: skip
    return {
        "row": "calib-devices",
        "protocol": "P4",
        "model": f"random-init Llama (hidden {shape.hidden}, {layers} blocks), {shape.windows} windows of "
        f"{shape.seqlen}",
        "devices": ["cpu", str(device)],
        "note": "each initializer calibrated on the device (blocks visit it one at a time) with the activation "
        "streams on the device and in pinned host memory; final logits (on the CPU) against the CPU run",
        "inits": result,
    }


# ----- entry points -------------------------------------------------------------------------------------------------
def calibration_rows(args) -> list[dict]:
    """P4 calibration rows named in ``args.rows`` (a list or a comma-separated string; rows of other scripts are
    ignored; none named: all of :data:`ROWS`). ``args.dry_run``: tiny shapes, seconds on a CPU. Optional:
    ``args.blocks`` (timed blocks), ``args.device``, ``args.act_dtype``, ``args.act_budget`` (GiB)."""
    from lowbit.device import parse_budget, resolve_device

    wanted = getattr(args, "rows", None) or list(ROWS)
    if isinstance(wanted, str):
        wanted = wanted.split(",")
    dry = bool(getattr(args, "dry_run", False))
    shape = DRY if dry else LLAMA2_7B
    blocks = int(getattr(args, "blocks", None) or (2 if dry else 3))
    device = resolve_device(getattr(args, "device", None) or "auto")
    act_dtype = getattr(torch, getattr(args, "act_dtype", None) or "float32")
    act_budget = parse_budget(getattr(args, "act_budget", None))
    rows = []
    for row in ROWS:
        if row not in wanted:
            continue
        tiny = Shape("tiny", 256, 512, 4, 1000, 4, 4 if dry else 16, 32 if dry else 128)
        if row == "calib-agree":
            rows.append(agreement_row(tiny, 2 if dry else 4, device))
        elif row == "calib-nudge":
            rows.append(nudge_row(tiny, 2 if dry else 4, device))
        elif row == "calib-devices":
            rows.append(devices_row(Shape("tiny", 128, 256, 4, 512, 2, 4, 32), 2, device))
        else:
            rows.append(calibration_row(row, shape, blocks, device, act_dtype, act_budget))
        if dry:
            rows[-1]["dry_run"] = True
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    import benchlib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes: checks the script in seconds on a CPU")
    parser.add_argument("--blocks", type=int, help="blocks built and timed (default 3; dry run 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--act-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--act-budget", type=float, help="GiB of GPU memory for the activation streams")
    parser.add_argument("--out", help="write {env, rows} as JSON here")
    parser.add_argument("--store", action="store_true", help="merge the rows into bench/results/gpu.json")
    args = parser.parse_args()
    from lowbit.device import prepare_deterministic, resolve_device

    prepare_deterministic(resolve_device(args.device))  # before the first CUDA product, as the CLI does
    result = {"env": benchlib.environment(), "rows": calibration_rows(args)}
    if args.store and not args.dry_run:
        benchlib.save_rows(benchlib.ROOT / "bench" / "results" / "gpu.json", result["rows"], result["env"], "P4")
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
