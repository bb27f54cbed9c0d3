"""Protocol P4 (../shared/BENCHMARK.md): lowbit's kernels on one GPU, against dense bf16 and bitsandbytes NF4.

Everything runs in one process on random-init weights (speed and memory depend on shapes, not values), with bf16
activations under autocast. Rows:

- ``layer-<in>x<out>-<method>``: one linear layer of Llama-2-7B shape (4096->4096, 4096->11008, 11008->4096);
  median ms of forward at M = 1 and 16 tokens and of forward + backward (grad_x and the LoRA grads) at M = 2048.
  Methods: ``dense-bf16`` (``nn.Linear``), ``bnb-nf4`` (``Linear4bit``, blocksize 64, double quantization, bf16
  compute), ``bnb-nf4-lora`` (the same with PEFT's r16 LoRA layer on it: the peer of the lowbit rows, which carry
  one), ``lowbit-w4/w3/w2`` (g64 asymmetric, r16 LoRA, the kernels :func:`lowbit.kernels.select` picks),
  ``lowbit-w4-base`` (no LoRA: the kernel alone), ``lowbit-w4-gemm`` / ``lowbit-w4-dequant`` (every size on that
  one kernel: where does each win?), ``lowbit-w4-reference`` (pinned to the reference kernel: lowbit before the
  fused kernels) and ``gemlite-w4/w2`` (GemLite's ``GemLiteLinear`` packed with the same layer's lowbit codes,
  scales and zero points -- its format is lowbit's ``(q - z) * s`` -- forward only: GemLite has no backward and no
  3-bit; the library the kernel seam would call if it won). The forward-only peers record their largest error
  against lowbit's reference kernel on the same codes (``max_rel_err``), which checks the conversion. lowbit rows
  also record the kernel used at each size and its largest error against the reference at full size
  (``max_rel_err``: relative to the output's largest magnitude). With ``--profile`` each row also records the
  device time of its forward + backward at M = 2048 (``fwdbwd_device``: kernels only, where the eager
  ``fwdbwd_ms`` also holds Python and launch overhead).
- ``graph-<in>x<out>-<method>``: the same layers' forward at M = 1 and 16 captured in a CUDA graph and replayed
  (``triton.testing.do_bench_cudagraph``): device time without Python and launch overhead, as in graph-captured
  decoding; for lowbit also the dequantization kernel alone (``dequant_us``: the transient weight of
  ``triton-dequant``) and the kernel that ran at each M (``kernels``). Methods: ``dense-bf16``, ``bnb-nf4``,
  ``lowbit-w4/w3/w2-base`` (what :func:`lowbit.kernels.select` picks: ``triton-decode`` in rows of commit cd0db78
  and before, ``torch-int4`` after), ``lowbit-w4/w3/w2-decode`` (pinned to ``triton-decode``), ``lowbit-w4`` (LoRA),
  ``lowbit-w4/w3/w2-gemv`` (no LoRA, pinned to ``triton-gemv``: M = 1 only), ``lowbit-w4/w3/w2-int4`` (no LoRA,
  pinned to ``torch-int4``: PyTorch's tinygemm kernel, ``torch._weight_int4pack_mm``, which gpt-fast and torchao
  decode with, on the layer's codes repacked to its 4-bit layout), both with their largest error against the
  reference (``max_rel_err``), and ``gemlite-w4/w2``. Also at TinyLlama-1.1B's layer shapes (2048->2048,
  2048->256, 2048->5632, 5632->2048: the decode rows' model) and at the two products decoding fuses them into
  (2048->2560: q/k/v; 2048->11264: gate/up; :mod:`lowbit.kernels.siblings`) for the peers and the W4/W2 decoding
  kernels, each replay over at most 1024 copies. ``--repeats N`` times each size N times (median, and every run in
  ``fwd_m1_us_runs``: is W2's 0.9% over W4 on the same kernel more than two runs of one kernel differ?).
- ``train-<method>``: LoRA r16/alpha 32 training of a TinyLlama-1.1B-shaped Llama (all 7 linears of each block) at
  batch 4 x 512 tokens: tokens/s over 8 AdamW steps after 2 warm-up steps, and peak allocated memory. Methods:
  ``bf16-lora`` (PEFT on the bf16 model), ``bnb-qlora`` (PEFT + bitsandbytes NF4), ``lowbit-w4/w3/w2``, and
  ``lowbit-w4/w2-compiled`` (the model compiled in place, as ``finetune --compile`` does; the two warm-up steps
  compile). ``train-interleaved``: ``bnb-qlora`` and ``lowbit-w4/w3/w2`` resident together, trained in rotated
  rounds, so that no method gains from where it runs in the order (:func:`interleaved_row`);
  ``train-interleaved-compiled`` the same for ``bnb-qlora`` and ``lowbit-w4/w2-compiled``.
- ``decode-<method>[-graphs|-loop]``: greedy decoding of 64 new tokens after an 8-token prompt, batch 1, tokens/s
  after a warm-up call (``tokens_per_s``, the prompt's prefill included; ``decode_tokens_per_s``: the 63 tokens after
  the first, from the time of a one-token call subtracted); ``-graphs`` uses transformers' static cache, which
  compiles the forward with ``torch.compile`` (mode ``reduce-overhead``: CUDA graphs); ``-loop`` runs lowbit's own
  loop (:func:`lowbit.decode.greedy`, as ``generate --static-cache`` does: the same compiled step a token, without
  transformers' per-token bookkeeping and sync) for :data:`LOOP_METHODS`. Methods: ``bf16``, ``bnb-nf4``,
  ``lowbit-w4/w3/w2`` (with r16 LoRA, the kernels :func:`lowbit.kernels.select` picks: a fine-tuned model),
  ``lowbit-w4-base`` (the same without a LoRA: a served model, e.g. ``export --requantize``'s; on ``triton-decode`` in
  commit cd0db78's rows, on ``torch-int4`` after), ``lowbit-w4-unfused`` (the same with each layer on its own copy:
  lowbit rows from commit 6ed33d2 on prepare decoding as ``lowbit generate`` does, ``kernels.prepare_decoding``, which
  fuses q/k/v and gate/up into two products; ``copied_layers``), ``lowbit-w4-int4`` / ``lowbit-w4-gemv`` (without a
  LoRA, decoding pinned to ``torch-int4`` / ``triton-gemv``; calls a pinned kernel does not take, such as the 8-token
  prompt on the one-row GEMV, run on the reference -- hence ``decode_tokens_per_s``, which leaves the prompt out), and
  ``bf16-nolinear`` (``-graphs`` and ``-loop`` only: every block linear replaced by an uninitialized output of its
  shape, so no kernel runs for it -- the floor that attention, norms, the head and the step's bookkeeping set, which
  no matmul kernel can go below); by default ``-graphs`` only for ``bf16`` and ``lowbit-w4`` (compiling takes about a
  minute a model).
- ``calib-*`` (``calib``: all of them): calibration speed and CPU/CUDA agreement rows from ``bench/gpu_calib.py``
  (``calibration_rows(args)``, imported only when a ``calib`` row is asked for; ``--blocks`` passes through).

    python bench/gpu.py                          # the default rows (DEFAULT_ROWS; at most 8 minutes on one H100)
    python bench/gpu.py --rows layer,decode-lowbit-w4-graphs
    python bench/gpu.py --rows train-lowbit-w4,train-lowbit-w2 --profile   # + each kernel's device time a step
    python bench/gpu.py --dry-run                # tiny shapes on the CPU: checks the script in well under a minute
    python bench/gpu.py --table                  # the stored results as markdown

A row that fails is recorded with its error and the run goes on; results merge into bench/results/gpu.json by row
name after every row (not in ``--dry-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import benchlib

RESULTS = benchlib.ROOT / "bench" / "results" / "gpu.json"
SHAPES = {"4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "11008x4096": (11008, 4096)}
# TinyLlama-1.1B's layers (the decode rows' model: q/o, k/v, gate/up, down), graph rows only: is a W4 kernel's time at
# these sizes set by the bytes or by a per-call cost, and which kernel is fastest at each?
# With them the products decoding fuses (lowbit.kernels.siblings): q/k/v as one 2048->2560, gate/up as one 2048->11264.
DECODE_SHAPES = {"2048x2048": (2048, 2048), "2048x256": (2048, 256), "2048x5632": (2048, 5632),
                 "5632x2048": (5632, 2048), "2048x2560": (2048, 2560), "2048x11264": (2048, 11264)}  # fmt: skip
GRAPH_METHODS_DECODE = ("dense-bf16", "bnb-nf4", "lowbit-w4-int4", "lowbit-w4-decode", "lowbit-w4-gemv",
                        "lowbit-w2-gemv", "gemlite-w4", "gemlite-w2")  # fmt: skip
LAYER_METHODS = ("dense-bf16", "bnb-nf4", "bnb-nf4-lora", "lowbit-w4", "lowbit-w3", "lowbit-w2", "lowbit-w4-base",
                 "lowbit-w4-gemm", "lowbit-w4-dequant", "lowbit-w4-reference", "gemlite-w4", "gemlite-w2")  # fmt: skip
FORWARD_ONLY = ("gemlite",)  # peers without a backward: forward rows only, checked against lowbit
# Layer methods that run on one kernel only, with its row limit lifted (which kernel is faster at which M?). In the
# order they run within a shape: the M = 1 goal's rows (W4: the default, tinygemm, the GEMV) first, in case a lease's
# time runs out (the goal's shape, 4096x11008, is the first graph shape gpu_session.sh names).
GRAPH_METHODS_LAYER = ("dense-bf16", "bnb-nf4", "lowbit-w4-base", "lowbit-w4-int4", "lowbit-w4-gemv",
                       "lowbit-w3-base", "lowbit-w2-base", "lowbit-w3-int4", "lowbit-w2-int4", "lowbit-w3-gemv",
                       "lowbit-w2-gemv", "lowbit-w4", "gemlite-w4", "gemlite-w2", "lowbit-w4-decode",
                       "lowbit-w3-decode", "lowbit-w2-decode")  # fmt: skip
# Method suffixes that pin one kernel (triton-gemv: pin-only; triton-decode: what -base rows ran up to commit cd0db78,
# behind torch-int4 after it, measured faster there).
PINNED = {"gemv": "triton-gemv", "int4": "torch-int4", "decode": "triton-decode"}
NO_LORA = ("-base", "-unfused", *(f"-{suffix}" for suffix in PINNED))  # lowbit methods measured without an adapter
ONLY_KERNEL = {"lowbit-w4-gemm": "triton-gemm", "lowbit-w4-dequant": "triton-dequant"}
TRAIN_METHODS = ("bf16-lora", "bnb-qlora", "lowbit-w4", "lowbit-w3", "lowbit-w2", "lowbit-w4-compiled",
                 "lowbit-w2-compiled")  # fmt: skip
# The interleaved row's methods: the fine-tuning goal's peer and lowbit's three widths, resident together.
INTERLEAVED = {
    "train-interleaved": ("bnb-qlora", "lowbit-w4", "lowbit-w3", "lowbit-w2"),
    # ``finetune --compile``'s steps (torch.compile of forward and backward) against the same peer
    "train-interleaved-compiled": ("bnb-qlora", "lowbit-w4-compiled", "lowbit-w2-compiled"),
}
DECODE_METHODS = ("bf16", "bnb-nf4", "lowbit-w4", "lowbit-w3", "lowbit-w2", "lowbit-w4-base", "lowbit-w4-unfused",
                  "lowbit-w4-int4", "lowbit-w4-gemv")  # fmt: skip
GRAPH_METHODS = ("bf16", "lowbit-w4", "lowbit-w3", "lowbit-w2", "lowbit-w4-base", "lowbit-w4-unfused", "lowbit-w4-int4",
                 "lowbit-w4-gemv", "bf16-nolinear")  # fmt: skip
# lowbit's own decoding loop (lowbit.decode.greedy, which ``generate``/``translate --static-cache`` run): one CUDA-graph
# replay a token and no per-token sync, against transformers' generate loop in the -graphs rows.
LOOP_METHODS = ("bf16", "lowbit-w4-base", "lowbit-w4-unfused", "lowbit-w4", "bf16-nolinear")
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
RANK, ALPHA, GROUP = 16, 32.0, 64


def _rows() -> dict[str, str]:
    rows = {f"layer-{s}-{m}": f"layer {s.replace('x', '->')}, {m}" for s in SHAPES for m in LAYER_METHODS}
    rows.update({f"graph-{s}-{m}": f"layer {s.replace('x', '->')}, {m}, CUDA graph" for s in SHAPES
                 for m in GRAPH_METHODS_LAYER})  # fmt: skip
    rows.update({f"graph-{s}-{m}": f"layer {s.replace('x', '->')} (TinyLlama), {m}, CUDA graph" for s in DECODE_SHAPES
                 for m in GRAPH_METHODS_DECODE})  # fmt: skip
    rows.update({f"train-{m}": f"TinyLlama-1.1B LoRA training, {m}" for m in TRAIN_METHODS})
    rows.update({n: f"TinyLlama-1.1B LoRA training, {', '.join(m)} in alternating rounds" for n, m in
                 INTERLEAVED.items()})  # fmt: skip
    rows.update({f"decode-{m}": f"TinyLlama-1.1B greedy decoding, {m}, eager" for m in DECODE_METHODS})
    rows.update({f"decode-{m}-graphs": f"TinyLlama-1.1B greedy decoding, {m}, CUDA graphs" for m in GRAPH_METHODS})
    rows.update({f"decode-{m}-loop": f"TinyLlama-1.1B greedy decoding, {m}, lowbit's loop (CUDA graphs)"
                 for m in LOOP_METHODS})  # fmt: skip
    return rows


ROWS = _rows()
DEFAULT_ROWS = ",".join(["layer", *(f"train-{m}" for m in TRAIN_METHODS if not m.endswith("-compiled")),
                         "train-interleaved", *(f"decode-{m}" for m in DECODE_METHODS), "decode-bf16-graphs",
                         "decode-lowbit-w4-graphs"])  # fmt: skip


class Setup:
    """Sizes and device of a run: P4's, or tiny ones on the CPU for ``--dry-run``."""

    def __init__(self, dry_run: bool, profile: bool = False, repeats: int = 1) -> None:
        import torch

        self.dry_run = dry_run
        self.profile = profile  # layer, train and decode rows: where the device time goes (kernel_profile)
        self.repeats = repeats  # graph rows: timings per size (the median is stored, each run beside it)
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.scale = 32 if dry_run else 1  # layer widths divided by this
        self.big_m = 64 if dry_run else 2048
        self.calls, self.warmup = (1, 1) if dry_run else (25, 3)
        self.model = dict(TINYLLAMA, num_hidden_layers=2, vocab_size=256) if dry_run else TINYLLAMA
        if dry_run:
            self.model.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        self.batch, self.seqlen = (2, 32) if dry_run else (4, 512)
        self.steps, self.warmup_steps = (1, 1) if dry_run else (8, 2)
        self.new_tokens = 4 if dry_run else 64

    def width(self, features: int) -> int:
        """A layer width at this run's scale (a multiple of the group size)."""
        return max(GROUP, features // self.scale // GROUP * GROUP)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed_ms(setup: Setup, fn: Callable[[], object]) -> float:
    """Median wall time of ``fn`` in ms over ``setup.calls`` synchronized calls after ``setup.warmup`` calls."""
    for _ in range(setup.warmup):
        fn()
    times = []
    for _ in range(setup.calls):
        setup.sync()
        start = time.perf_counter()
        fn()
        setup.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- layers ---------------------------------------------------------------------------------------------------
def bnb_linear(linear, device):
    """bitsandbytes ``Linear4bit`` of ``linear``: NF4, blocksize 64, double quantization, bf16 compute."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.bfloat16).cpu(), requires_grad=False,
                                     quant_type="nf4", blocksize=GROUP, compress_statistics=True)  # fmt: skip
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer.to(device)  # quantizes


def gemlite_linear(linear, spec):
    """GemLite's layer holding lowbit's RTN codes of ``linear`` (bf16 in and out, fma mode: ``q * s - z * s``)."""
    import torch
    from gemlite import DType, GemLiteLinear

    from lowbit.layers import QuantLinear

    q = QuantLinear.from_linear(linear, spec).quantized()
    layer = GemLiteLinear(spec.bits, group_size=spec.group_size, in_features=linear.in_features,
                          out_features=linear.out_features, input_dtype=DType.BF16,
                          output_dtype=DType.BF16)  # fmt: skip
    layer.pack(q.codes, q.scales.to(torch.bfloat16), q.zeros.to(torch.bfloat16), None)
    return layer


def lowbit_spec(method: str):
    from lowbit.quant import QuantSpec

    return QuantSpec(bits=int(method.removeprefix("lowbit-w")[0]), group_size=GROUP)


def make_layer(method: str, in_f: int, out_f: int, setup: Setup):
    import torch
    from torch import nn

    from lowbit.layers import QuantLinear

    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=False, device=setup.device)
    if method == "dense-bf16":
        return linear.to(torch.bfloat16).requires_grad_(False)
    if method.startswith("gemlite"):
        return gemlite_linear(linear, lowbit_spec(method.replace("gemlite", "lowbit")))
    if method.startswith("bnb-nf4"):
        layer = bnb_linear(linear, setup.device)
        if method.endswith("-lora"):
            from peft import LoraConfig, inject_adapter_in_model

            layer = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"]),
                                            nn.Sequential(layer))  # fmt: skip
            nn.init.normal_(layer[0].lora_B["default"].weight, std=0.01)
        return layer
    layer = QuantLinear.from_linear(linear, lowbit_spec(method))
    if not method.endswith(NO_LORA):
        layer.add_lora(RANK, ALPHA)
        nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter (B = 0 would be the same work)
    return layer


def layer_row(name: str, setup: Setup) -> dict:
    import torch

    from lowbit import kernels

    shape, method = name.removeprefix("layer-").split("-", 1)
    in_f, out_f = (setup.width(d) for d in SHAPES[shape])
    layer = make_layer(method, in_f, out_f, setup)
    gen = torch.Generator(device=setup.device).manual_seed(1)
    xs = {m: torch.randn(m, in_f, device=setup.device, generator=gen, dtype=torch.bfloat16) for m in (1, 16)}
    x_big = torch.randn(setup.big_m, in_f, device=setup.device, generator=gen, dtype=torch.bfloat16)
    x_big.requires_grad_()
    grad = torch.randn(setup.big_m, out_f, device=setup.device, generator=gen, dtype=torch.bfloat16)
    if method.endswith("-reference"):
        pin = kernels.pinned("reference")
    elif method in ONLY_KERNEL:
        pin = only_kernel(ONLY_KERNEL[method])
    else:
        pin = contextlib.nullcontext()
    row: dict = {"row": name, "label": ROWS[name], "in": in_f, "out": out_f}
    with pin, torch.autocast(setup.device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            for m, x in xs.items():
                row[f"fwd_m{m}_ms"] = round(timed_ms(setup, lambda x=x: layer(x)), 4)

        def step() -> None:
            layer(x_big).backward(grad)
            x_big.grad = None
            layer.zero_grad(set_to_none=True)

        if method.startswith(FORWARD_ONLY):
            row["max_rel_err"] = peer_error(layer, method, in_f, out_f, xs[16], setup)
        else:
            row["fwdbwd_ms"] = round(timed_ms(setup, step), 4)
            if setup.profile:  # the same call's device time: no Python or launch overhead, which the eager time holds
                row["fwdbwd_device"] = kernel_profile(step, setup, calls=5)
        if method.startswith("lowbit") and not method.endswith("-reference"):
            row.update(kernel_check(layer, xs, x_big, grad, setup))
    row["fwdbwd_m"] = setup.big_m
    return row


# Weights each graph-row replay reads: over twice the L2 of an H100 or H200 (50 MB), so every layer comes from memory;
# a small layer takes many copies (a W2 2048 -> 256 layer: 1024).
L2_FLUSH_BYTES = 128 * 2**20
MAX_COPIES = 1024


def weight_bytes(method: str, in_f: int, out_f: int) -> float:
    """Bytes of one layer's weights: bf16 dense, 4-bit bitsandbytes or torch-int4's repacked codes, or lowbit/GemLite
    codes (scales aside)."""
    if method.startswith("dense"):
        bits = 16
    elif method.startswith("bnb") or method.endswith("-int4"):
        bits = 4
    else:
        bits = int(method.split("-w")[1][0])
    return in_f * out_f * bits / 8


def graph_row(name: str, setup: Setup) -> dict:
    """Device time of one forward (and of lowbit's dequantization kernel) from a replayed CUDA graph, in us.

    A graph replaying one layer would read its weights from L2 (50 MB on an H100/H200) from the second call on,
    while a decoding model reads every layer from memory: so each replay runs ``copies`` identical layers holding
    together at least :data:`L2_FLUSH_BYTES` of weights, one after the other, and the time is per layer.
    """
    import torch

    from lowbit import kernels

    shape, method = name.removeprefix("graph-").split("-", 1)
    in_f, out_f = (setup.width(d) for d in (SHAPES | DECODE_SHAPES)[shape])
    n_copies = 2 if setup.dry_run else min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / weight_bytes(method, in_f, out_f)))
    layers = [make_layer(method, in_f, out_f, setup) for _ in range(n_copies)]
    layer = layers[0]
    row: dict = {"row": name, "label": ROWS[name], "in": in_f, "out": out_f, "copies": n_copies}

    def bench(fn: Callable[[torch.nn.Module], object]) -> float:
        def each() -> None:
            for one in layers:
                fn(one)

        if setup.dry_run:
            return timed_ms(setup, each) * 1e3 / n_copies
        from triton.testing import do_bench_cudagraph

        each()  # autotuning and allocation happen outside the capture
        return do_bench_cudagraph(each, rep=100) * 1e3 / n_copies

    def timed(key: str, fn: Callable[[torch.nn.Module], object]) -> None:
        runs = [round(bench(fn), 2) for _ in range(setup.repeats)]
        row[key] = statistics.median(runs)
        if setup.repeats > 1:  # how far apart runs of one kernel on the same bytes land: the noise a difference beats
            row[f"{key}_runs"] = runs

    pinned, pin = method_pin(method)
    with pin, torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
        for m in (1,) if pinned == "triton-gemv" else (1, 16):
            x = torch.randn(m, in_f, device=setup.device, dtype=torch.bfloat16)
            timed(f"fwd_m{m}_us", lambda one, x=x: one(x))
            if method.startswith("lowbit"):  # which kernel ran (the default changes as kernels are measured)
                row.setdefault("kernels", {})[f"m{m}"] = kernels.select(layer, x, training=False).name
        if pinned:
            y = layer(x).float()
            with kernels.pinned("reference"):
                y_ref = layer(x).float()
            row["max_rel_err"] = rel_err(y, y_ref)
        if method.startswith("lowbit") and not setup.dry_run:
            from lowbit.kernels import triton_dequant

            row["dequant_us"] = round(bench(lambda one: triton_dequant._weight(one, torch.bfloat16)), 2)
    return row


def peer_error(layer, method: str, in_f: int, out_f: int, x, setup: Setup) -> float:
    """Largest error of a forward-only peer's output against lowbit's reference kernel on the same codes (relative
    to the output's largest magnitude): ``make_layer`` seeds every method's layer alike, so the codes are equal."""
    import torch

    from lowbit import kernels

    bits = method.split("-w")[1][0]
    ours = make_layer(f"lowbit-w{bits}-base", in_f, out_f, setup)
    with torch.no_grad(), kernels.pinned("reference"):
        y_ref = ours(x).float()
        y = layer(x).float()
    return rel_err(y, y_ref)


def rel_err(y, y_ref) -> float:
    """``y``'s largest error against ``y_ref``, relative to ``y_ref``'s largest magnitude, to 3 significant digits."""
    return float(f"{(y - y_ref).abs().max().item() / y_ref.abs().max().item():.3g}")


def method_pin(method: str) -> tuple[str | None, contextlib.AbstractContextManager]:
    """The kernel a method's suffix pins (:data:`PINNED`; None for the others) and the context that pins it."""
    from lowbit import kernels

    pinned = PINNED.get(method.rsplit("-", 1)[-1])
    return pinned, kernels.pinned(pinned) if pinned else contextlib.nullcontext()


@contextlib.contextmanager
def only_kernel(name: str) -> Iterator[None]:
    """Run every call that kernel ``name`` supports on it, whatever the rows (the reference elsewhere; on the CPU
    of ``--dry-run`` there are no Triton kernels and the reference runs)."""
    from unittest import mock

    from lowbit import kernels
    from lowbit.errors import LowbitError

    try:
        lifted = {name: dataclasses.replace(kernels.kernel(name), max_m=None)}
    except LowbitError:  # no Triton here
        lifted = {}
    with mock.patch.object(kernels, "_gpu_table", lifted), kernels.pinned(name):
        yield


def kernel_check(layer, xs: dict, x_big, grad, setup: Setup) -> dict:
    """Which kernel ran at each size, and its largest error against the reference (relative to the output's max)."""
    import torch

    from lowbit import kernels

    def run(x):
        with torch.autocast(setup.device.type, dtype=torch.bfloat16):
            x = x.detach().requires_grad_()
            y = layer(x)
            g = torch.autograd.grad(y, x, grad[: x.shape[0]])[0]
        return y.float(), g.float()

    names, errors = {}, {}
    for m, x in {**xs, setup.big_m: x_big}.items():
        names[f"m{m}"] = kernels.select(layer, x, training=True).name
        y, g = run(x)
        with kernels.pinned("reference"):
            y_ref, g_ref = run(x)
        errors[f"fwd_m{m}"] = (y - y_ref).abs().max().item() / y_ref.abs().max().item()
        errors[f"grad_m{m}"] = (g - g_ref).abs().max().item() / g_ref.abs().max().item()
    return {"kernels": names, "max_rel_err": {k: float(f"{v:.3g}") for k, v in errors.items()}}


# ----- models -----------------------------------------------------------------------------------------------------
def make_model(method: str, setup: Setup, lora: bool):
    """A random-init TinyLlama-shaped model for ``method``; LoRA r16/alpha 32 on all 7 linears when ``lora``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    from lowbit.arch import target_linears
    from lowbit.layers import QuantLinear, set_module

    torch.manual_seed(0)
    config = LlamaConfig(**setup.model, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dtype = torch.float32 if method.startswith("lowbit") else torch.bfloat16
    with setup.device:
        model = LlamaForCausalLM(config).to(dtype)
    if method.startswith("lowbit"):
        bits = int(method.removeprefix("lowbit-w")[0])
        config = lowbit.QuantConfig(bits=bits, group_size=GROUP, init="qlora" if lora else "none", rank=RANK,
                                    alpha=ALPHA)  # fmt: skip
        lowbit.quantize(model, config, progress=False)
        # The rest of the model in bf16 like the peers'; packed buffers, fp16 scales and the LoRA stay as they are.
        quant = {id(t) for m in model.modules() if isinstance(m, QuantLinear) for t in m.parameters()}
        for p in model.parameters():
            if id(p) not in quant:
                p.data = p.data.to(torch.bfloat16)
        return model.eval()
    if method.startswith("bnb"):
        for name, linear in target_linears(model).items():
            set_module(model, name, bnb_linear(linear, setup.device))
    if method == "bf16-nolinear":
        for name, linear in target_linears(model).items():
            set_module(model, name, no_linear(linear.out_features))
    if lora:
        from peft import LoraConfig, get_peft_model

        modules = sorted({n.rsplit(".", 1)[-1] for n in target_linears(model)})
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=modules))
    return model.eval()


def no_linear(out_features: int):
    """A block linear that launches nothing: its output is an uninitialized tensor of the right shape (an allocation,
    which a CUDA graph serves from its pool), so a decoding step's time without it is the floor of the rest."""
    from torch import nn

    class NoLinear(nn.Module):
        def forward(self, x):
            return x.new_empty(*x.shape[:-1], out_features)

    return NoLinear()


def trainer(method: str, setup: Setup) -> tuple[Callable[[], object], list]:
    """One training step of ``method``'s model (LoRA only, AdamW, a fixed random batch) and its trainable tensors."""
    import torch

    model = make_model(method.removesuffix("-compiled"), setup, lora=True)
    if method.endswith("-compiled"):  # as ``finetune --compile`` does: in place, inductor's default mode
        model.compile()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Every method trains the same LoRA factors and nothing else (a base left trainable once made lowbit's rows
    # train the embeddings and head too: more work and memory, and a meaningless comparison).
    others = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if others:
        raise RuntimeError(f"{method}: {len(others)} trainable parameters outside the LoRA, e.g. {others[0]}")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=setup.device).manual_seed(0)
    ids = torch.randint(3, setup.model["vocab_size"], (setup.batch, setup.seqlen), device=setup.device, generator=gen)

    def step() -> torch.Tensor:
        with torch.autocast(setup.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, params


def train_row(name: str, setup: Setup) -> dict:
    import torch

    step, params = trainer(name.removeprefix("train-"), setup)
    for _ in range(setup.warmup_steps):
        step()
    setup.sync()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(setup.steps):
        loss = step()
    setup.sync()
    seconds = time.perf_counter() - start
    row = {"row": name, "label": ROWS[name], "steps": setup.steps, "batch": [setup.batch, setup.seqlen],
           "tokens_per_s": round(setup.steps * setup.batch * setup.seqlen / seconds, 1),
           "step_ms": round(seconds / setup.steps * 1e3, 1),  # against profile_per_step's device time: idle GPU
           "final_loss": round(float(loss), 4), "trainable_params": sum(p.numel() for p in params)}  # fmt: skip
    if setup.device.type == "cuda":
        row["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if setup.profile:  # after the peak: the profiler's own buffers must not count
        row["profile_per_step"] = kernel_profile(step, setup, calls=2)
    return row


def interleaved_row(name: str, setup: Setup) -> dict:
    """Tokens/s of the row's :data:`INTERLEAVED` methods with no run order to favour any: every model resident at
    once, then rounds in which each method runs half of P4's steps, the order rotated a place each round (so each
    method runs once in each position); medians over the rounds, and each method's ratio to PEFT + bitsandbytes. The
    per-method ``train-*`` rows run one model after another, so a slowdown that follows the run order (the
    allocator's state, clocks) reads there as the later method's cost. Peak memory per method, as if it ran alone
    (CUDA): what its model, LoRA and optimizer state hold after the warm-up steps (``resident_mib``) plus the most a
    step allocated on top (``step_peak_mib``). Without bitsandbytes (``--dry-run``) its method is left out."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        methods = [m for m in INTERLEAVED[name] if not m.startswith("bnb")]
    else:
        methods = list(INTERLEAVED[name])
    cuda = setup.device.type == "cuda"
    if cuda:  # the process's one-time allocations (cuBLAS workspaces) before any method's, not in the first one's
        x = torch.randn(64, 64, device=setup.device, dtype=torch.bfloat16, requires_grad=True)
        (x @ x).sum().backward()
        setup.sync()
    steps, resident = {}, {}
    for m in methods:
        before = torch.cuda.memory_allocated() if cuda else 0
        steps[m] = trainer(m, setup)[0]
        for _ in range(setup.warmup_steps):
            steps[m]()
        setup.sync()
        if cuda:
            resident[m] = round((torch.cuda.memory_allocated() - before) / 2**20, 1)
    per_round = max(1, setup.steps // 2)
    tokens = per_round * setup.batch * setup.seqlen
    speeds: dict[str, list[float]] = {m: [] for m in methods}
    extra: dict[str, float] = dict.fromkeys(methods, 0.0)
    for shift in range(len(methods)):
        for method in methods[shift:] + methods[:shift]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            for _ in range(per_round):
                steps[method]()
            setup.sync()
            speeds[method].append(round(tokens / (time.perf_counter() - start), 1))
            if cuda:
                extra[method] = max(extra[method], (torch.cuda.max_memory_allocated() - before) / 2**20)
    row = {"row": name, "label": ROWS[name], "rounds": len(methods), "steps_per_round": per_round,
           "batch": [setup.batch, setup.seqlen], "per_round_tokens_per_s": speeds,
           "tokens_per_s": {m: round(statistics.median(v), 1) for m, v in speeds.items()}}  # fmt: skip
    if cuda:
        row["resident_mib"] = resident
        row["step_peak_mib"] = {m: round(v, 1) for m, v in extra.items()}
        row["peak_mib"] = {m: round(resident[m] + extra[m], 1) for m in methods}
    if "bnb-qlora" in speeds:
        row["vs_bnb"] = {m: round(v / row["tokens_per_s"]["bnb-qlora"], 3) for m, v in row["tokens_per_s"].items()}
        if cuda:
            row["peak_vs_bnb"] = {m: round(v / row["peak_mib"]["bnb-qlora"], 3) for m, v in row["peak_mib"].items()}
    return row


def decode_row(name: str, setup: Setup) -> dict:
    import torch

    from lowbit.decode import greedy

    method = name.removeprefix("decode-").removesuffix("-graphs").removesuffix("-loop")
    graphs, loop = name.endswith("-graphs"), name.endswith("-loop")
    model = make_model(method, setup, lora=method.startswith("lowbit") and not method.endswith(NO_LORA))
    gen = torch.Generator(device=setup.device).manual_seed(0)
    prompt = torch.randint(3, setup.model["vocab_size"], (1, 8), device=setup.device, generator=gen)
    kwargs = dict(do_sample=False, pad_token_id=0)
    if graphs:
        kwargs["cache_implementation"] = "static"  # on CUDA transformers compiles the forward (CUDA graphs)

    def run(tokens: int):
        # every call decodes ``tokens``: the loop with no end token, generate with min_new_tokens (which masks
        # EOS instead, so their tokens could differ where EOS is the argmax; the time a token does not)
        if loop:
            return greedy(model, prompt, max_new_tokens=tokens, eos_token_id=[], pad_token_id=0,
                          compile=setup.device.type == "cuda")  # fmt: skip
        return model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)

    row: dict = {"row": name, "label": ROWS[name], "new_tokens": setup.new_tokens}
    pinned, pin = method_pin(method)
    if pinned:
        row["kernel"] = pinned
    from torch._dynamo.utils import counters

    from lowbit import kernels

    counters.clear()
    # as ``lowbit generate`` decodes: in a steady block (each layer's kernel state checked at its first call, not
    # every token; rows measured before steady blocks existed checked every call -- it matters to eager rows only,
    # compiled steps never check), with kernel copies made up front and siblings fused (no-ops for the peers)
    with pin, torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16), kernels.steady():
        if method.startswith("lowbit"):
            row["copied_layers"] = kernels.prepare_decoding(model, fuse=not method.endswith("-unfused"))[0]
        start = time.perf_counter()
        run(setup.new_tokens)  # warm-up (and compilation)
        setup.sync()
        row["warmup_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        out = run(setup.new_tokens)
        setup.sync()
        seconds = time.perf_counter() - start
        row["tokens_per_s"] = round((out.shape[1] - prompt.shape[1]) / seconds, 2)
        start = time.perf_counter()
        run(1)  # the prompt and the first token alone
        setup.sync()
        row["decode_tokens_per_s"] = round((setup.new_tokens - 1) / (seconds - (time.perf_counter() - start)), 2)
        # did the compiled step run as CUDA graphs, compiled once? (a skip or a recompile reads as a slow row)
        row["compiled"] = {
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        }
        if setup.profile:  # one more generation, per new token (the prompt's prefill included)
            row["profile_per_token"] = kernel_profile(lambda: run(setup.new_tokens), setup, calls=1,
                                                      per=setup.new_tokens)  # fmt: skip
    return row


def kernel_profile(fn: Callable[[], object], setup: Setup, calls: int, per: int = 1) -> dict:
    """Where the device time of ``calls`` calls of ``fn`` goes: the total and the 15 largest kernels, in us per
    ``calls * per`` (a training step, a decoded token), with their launch counts on the same footing.

    On CUDA these are the kernels (CUPTI; graph replays included where the driver reports them); on the CPU of
    ``--dry-run`` the ops' self CPU time stands in, which checks the code path only. Meant to attribute a gap
    between two rows (e.g. W4 against W2 training) to the kernels that differ.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = setup.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(calls):
            fn()
        setup.sync()
    unit = calls * per
    found = []
    for event in prof.key_averages():
        if event.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU):
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            found.append((us / unit, event.key, event.count / unit))
    found.sort(key=lambda item: -item[0])
    top = [{"name": name[:100], "us": round(us, 1), "launches": round(n, 2)} for us, name, n in found[:15]]
    return {"total_us": round(sum(us for us, _, _ in found), 1), "device": "cuda kernels" if cuda else "cpu ops",
            "top": top}  # fmt: skip


# ----- driver -----------------------------------------------------------------------------------------------------
def run_row(name: str, setup: Setup) -> dict | None:
    """One row, or None where a peer library is missing (the row is left out, with a note)."""
    needs = [package for package, wanted in (("bitsandbytes", "bnb" in name), ("gemlite", "gemlite" in name),
             ("peft", name.startswith("train-") or name.endswith("-lora"))) if wanted]  # fmt: skip
    for package in needs:
        try:
            __import__(package)
        except ImportError:
            print(f"[gpu] {name}: skipped, {package} is not installed", file=sys.stderr, flush=True)
            return None
    start = time.perf_counter()
    try:
        if name.startswith("layer-"):
            row = layer_row(name, setup)
        elif name.startswith("graph-"):
            row = graph_row(name, setup)
        elif name in INTERLEAVED:
            row = interleaved_row(name, setup)
        elif name.startswith("train-"):
            row = train_row(name, setup)
        else:
            row = decode_row(name, setup)
    except Exception as exc:  # one broken row must not cost the others (a GPU session is short)
        traceback.print_exc()
        row = {"row": name, "label": ROWS[name], "error": f"{type(exc).__name__}: {exc}"[:1000]}
    row["seconds"] = round(time.perf_counter() - start, 1)
    _free()
    return row


def calibration_rows(names: list[str], args: argparse.Namespace) -> list[dict]:
    """The calibration rows, from ``bench/gpu_calib.py`` (kept there so it also runs alone)."""
    try:
        import gpu_calib
    except ImportError:
        sys.exit("gpu.py: error: calib-* rows need bench/gpu_calib.py (calibration_rows(args) -> list[dict])")
    args.rows = [] if "calib" in names else names  # ``calib`` alone: every calibration row (none named)
    return gpu_calib.calibration_rows(args)


def select_rows(spec: str) -> list[str]:
    """Row names from a comma list of exact names or prefixes (``layer``, ``train``, ``decode``,
    ``layer-4096x11008``); an exact name means that row only (``decode-bf16`` is not ``decode-bf16-graphs``)."""
    names = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "calib" or item.startswith("calib-"):
            names.append(item)
            continue
        matched = [item] if item in ROWS else [n for n in ROWS if n.startswith(item + "-")]
        if not matched:
            sys.exit(f"gpu.py: error: no row matches {item!r}; rows: {', '.join(ROWS)} or calib-*")
        names += [n for n in matched if n not in names]
    return names


def _ms(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "—"


def table(rows: list[dict]) -> str:
    lines = []
    layers = [r for r in rows if r["row"].startswith("layer-")]
    if layers:
        lines += ["| layer | method | fwd M=1 ms | fwd M=16 ms | fwd+bwd M=2048 ms | kernels (M=1/16/2048) |",
                  "|---|---|---:|---:|---:|---|"]  # fmt: skip
        for r in layers:
            shape, method = r["row"].removeprefix("layer-").split("-", 1)
            used = "error: " + r["error"][:80] if "error" in r else "/".join(r.get("kernels", {}).values()) or "—"
            lines.append(f"| {shape.replace('x', '->')} | {method} | {_ms(r, 'fwd_m1_ms')} | {_ms(r, 'fwd_m16_ms')} "
                         f"| {_ms(r, 'fwdbwd_ms')} | {used} |")  # fmt: skip
    graphs = [r for r in rows if r["row"].startswith("graph-")]
    if graphs:
        lines += ["", "| layer | method (CUDA graph) | fwd M=1 us | fwd M=16 us | dequantize us |",
                  "|---|---|---:|---:|---:|"]  # fmt: skip
        for r in graphs:
            shape, method = r["row"].removeprefix("graph-").split("-", 1)
            cells = [f"{r[k]:.1f}" if k in r else "—" for k in ("fwd_m1_us", "fwd_m16_us", "dequant_us")]
            if "error" in r:
                cells = ["error: " + r["error"][:80], "", ""]
            lines.append(f"| {shape.replace('x', '->')} | {method} | {' | '.join(cells)} |")
    other = [r for r in rows if not r["row"].startswith(("layer-", "graph-", "calib"))]
    if other:
        lines += ["", "| row | tokens/s | peak allocated MiB |", "|---|---:|---:|"]
        for r in other:
            memory = f"{r['peak_allocated_mib']:.0f}" if "peak_allocated_mib" in r else "—"
            if "peak_mib" in r:  # the interleaved rows: each method's, as if it ran alone
                memory = ", ".join(f"{m} {v:.0f}" for m, v in r["peak_mib"].items())
            speed = "error: " + r["error"][:80] if "error" in r else r.get("tokens_per_s", "—")
            if isinstance(speed, dict):  # the interleaved row: each method's median
                speed = ", ".join(f"{m} {v}" for m, v in speed.items())
            lines.append(f"| {r.get('label', r['row'])} | {speed} | {memory} |")
    calib = [r["row"] for r in rows if r["row"].startswith("calib")]
    if calib:
        lines += ["", f"Calibration rows (bench/gpu_calib.py; figures in the JSON): {', '.join(calib)}"]
    return "\n".join(lines).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row names or prefixes "
                        "(layer, train, decode, layer-4096x11008, ...) or calib-* rows")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; nothing is stored")
    parser.add_argument("--table", action="store_true", help="print the stored results as markdown and exit")
    parser.add_argument("--blocks", type=int, help="calib rows: blocks built and timed (default 3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="layer (forward + backward), train and decode rows: also record each kernel's device time "
        "(kernel_profile)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="graph rows: time each size this many times and "
                        "store the median and every run (default 1)")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        stored = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else {}
        print(benchlib.stored_table(RESULTS, [*ROWS, *sorted(n for n in stored if n.startswith("calib"))], table))
        return
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu.py: error: no CUDA device; use --dry-run to check the script on the CPU")
    if not args.dry_run:  # before the first CUDA product, as the CLI does: calib rows train in deterministic mode
        from lowbit.device import prepare_deterministic

        prepare_deterministic(torch.device("cuda"))
    names = select_rows(args.rows)
    if args.repeats < 1:
        sys.exit("gpu.py: error: --repeats must be at least 1")
    setup = Setup(args.dry_run, args.profile, args.repeats)
    env = benchlib.environment()
    rows = []
    for name in [n for n in names if not n.startswith("calib")]:
        print(f"[gpu] {name} ...", file=sys.stderr, flush=True)
        row = run_row(name, setup)
        if row is not None:
            print(f"[gpu] {name}: {json.dumps({k: v for k, v in row.items() if k != 'label'})}", file=sys.stderr)
            rows.append(row)
            if not args.dry_run:
                benchlib.save_rows(RESULTS, [row], env, "P4")
    for name in [n for n in names if n.startswith("calib")]:  # one at a time: each is stored as soon as it ends
        try:
            calib_rows = calibration_rows([name], args)
        except Exception as exc:  # as in run_row: the rows after it still run
            traceback.print_exc()
            calib_rows = [{"row": name, "error": f"{type(exc).__name__}: {exc}"[:1000]}]
        rows += calib_rows
        if not args.dry_run:
            benchlib.save_rows(RESULTS, calib_rows, env, "P4")
    print(f"\nP4 on {env['machine']['device']}{' (dry run: tiny shapes)' if args.dry_run else ''}\n")
    print(table(rows))
    print(f"\n{env['date']}, commit {env['commit']}, torch {env['versions']['torch']}, triton "
          f"{env['versions']['triton']}, transformers {env['versions']['transformers']}, peft "
          f"{env['versions']['peft']}, bitsandbytes {env['versions']['bitsandbytes']}")  # fmt: skip
    if not args.dry_run:
        print(f"\nstored in {RESULTS.relative_to(benchlib.ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
