"""CPU decoding (issue 14): PyTorch's int4 CPU matmul (kernel ``torch-int4``) on lowbit's W4 codes, against lowbit's
reference kernel.

lowbit's reference kernel dequantizes the whole weight on every call, which at one token (decoding) costs far more
than the product. PyTorch ships a CPU int4 matmul (``torch._weight_int4pack_mm_for_cpu``, the twin of the CUDA
tinygemm kernel) that reads 4-bit codes directly; lowbit's ``(q - z) * s`` is its ``(q - 8) * scale + m`` with
``m = (8 - z) * s``. Rows: ``<in>x<out>-m<M>``, median ms over 10 calls after one warm-up of

- ``reference_fp32_ms``: lowbit's reference kernel, float32 (what CPU decoding ran before torch-int4);
- ``int4pack_bf16_ms``: the int4 op with bf16 activations (its fast path), and its error against the reference;
- ``int4pack_fp32_ms``: the same op with float32 activations (a slow path, but lowbit's float32 numerics).

and ``decode-w4/w3/w2``: greedy decoding of 32 new tokens after a short prompt (at most 16 tokens) with the default
model (SmolLM2-135M-Instruct) quantized W4/W3/W2 g64 (RTN, QLoRA start), on the reference kernel and on
``torch-int4`` (``--kernel torch-int4``), there with each layer on its own repacked copy and with the layers that
read one tensor fused (``torch-int4-fused``: q/k/v and gate/up as two products, as ``lowbit generate`` decodes),
and fused in lowbit's own decoding loop (``torch-int4-fused-loop``: ``lowbit.decode.greedy``, as ``generate
--static-cache`` decodes), fused on a copy of the model without its LoRA (``torch-int4-fused-nolora``:
``lora_share`` is the share of a token's time the LoRA takes) and fused with the LoRA computed beside each layer as
lowbit did up to commit 4bc5761 and PEFT does (``torch-int4-fused-beside``: ``lora_share_beside``, and
``kept_lora_speedup``, what the kernel's kept LoRA copies gain against it); the five alternated ``rounds`` times,
medians): tokens/s and whether the runs chose the same
tokens (the loop's also against ``generate`` with a static cache: attention over the static cache's longer, masked
key range rounds differently from the dynamic cache's, which can flip a near tie);
``decode-compiled-w4``: lowbit's decoding loop with its step compiled by inductor (``greedy(compile=True)``) against
the uncompiled loop and ``generate``, at batch 1 and at batch 8 over few-shot translation prompts, and the compile
time with an empty and a filled inductor cache (:func:`compiled_row`);
``steady-w4``: one decoding step (a one-token forward, at 1 and at 8 rows) with the kernels checking their state
at every call against inside ``kernels.steady()``, where each layer is checked at its first call only, as
``generate``, ``translate`` and lowbit's loop decode (:func:`steady_row`);
``lora-step-w4``: one decoding step (a one-token forward) of the default model at W4 with a drawn r16 LoRA, its LoRA
from the kernel's kept copies, computed beside each layer, or absent, in 15 interleaved rounds (median ms: finer than
whole generations);
``stepwise-w4/w3/w2``: the default model at W4/W3 g64 (RTN; W2: P1's apiq-bw-gptq2-w2 start, since RTN W2 is a
broken model, made by ``bench/p1.py --keep`` when missing) reads 256 tokens of PTB test text and 256 of the P3
Bible eval text one token at a time, as decoding does (KV cache, one row per call), on each kernel: perplexity of
each next token, how far the two kernels' perplexities are apart and how often their top-1 predictions agree --
what bf16 rounding inside the layers costs a decoder, in numbers rather than in a few sampled outputs -- and, for
scale, the same for the whole model run under bf16 autocast on the reference kernel (``bf16``: how GPU users
decode);
and ``mt-w4``: the first 32 verses of the P3 test split translated English -> Spanish (5 shots from the training
split, as ``lowbit eval --mt`` does) by the default model at W4g64 on each kernel, and on torch-int4 with every row
running its whole prompt rather than the shared shots once: chrF, seconds, and how many translations are identical.

    python bench/cpu_int4.py                       # all rows; stores bench/results/cpu_int4.json
    python bench/cpu_int4.py --rows decode,compiled,lora,steady,stepwise,mt   # end-to-end rows (stepwise-w2: one row)
"""

from __future__ import annotations

import statistics
import time

import benchlib

RESULTS = benchlib.ROOT / "bench" / "results" / "cpu_int4.json"
SHAPES = ((576, 1536), (1536, 576), (4096, 11008))  # SmolLM2-135M's MLP, Llama-2-7B's up projection
ROWS_M = (1, 4, 16, 64)


def median_ms(fn, calls: int = 10) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def shape_rows(in_f: int, out_f: int) -> list[dict]:
    """The rows of one layer shape, at every M."""
    import torch
    from torch import nn

    from lowbit.kernels import reference, torch_int4
    from lowbit.layers import QuantLinear
    from lowbit.quant import QuantSpec

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=False), QuantSpec(bits=4, group_size=64))
    codes, scales_and_offsets = torch_int4.packed(layer)
    fp32 = scales_and_offsets.float()

    def int4_fp32(x: torch.Tensor) -> torch.Tensor:  # the op's float32 path: lowbit's numerics, no fast path
        return torch._weight_int4pack_mm_for_cpu(x, codes, 64, fp32)

    rows = []
    for m in ROWS_M:
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            ref = reference.matmul(layer, x)
            err = ((torch_int4.matmul(layer, x) - ref).abs().max() / ref.abs().max()).item()
            row = {
                "row": f"{in_f}x{out_f}-m{m}",
                "reference_fp32_ms": round(median_ms(lambda x=x: reference.matmul(layer, x)), 3),
                "int4pack_bf16_ms": round(median_ms(lambda x=x: torch_int4.matmul(layer, x)), 3),
                "int4pack_fp32_ms": round(median_ms(lambda x=x: int4_fp32(x)), 3),
                "int4pack_bf16_rel_err": float(f"{err:.3g}"),
            }
        row["speedup_bf16"] = round(row["reference_fp32_ms"] / row["int4pack_bf16_ms"], 1)
        rows.append(row)
    return rows


def rtn_model(bits: int):
    """The default model (SmolLM2-135M-Instruct) quantized W{bits}g64 by rounding, with a QLoRA start, and its
    tokenizer: the model of the decode, stepwise (W4, W3) and mt rows."""
    import lowbit

    model, tokenizer = lowbit.load_model(None)
    lowbit.quantize(model, lowbit.QuantConfig(bits=bits, group_size=64, init="qlora"), progress=False)
    return model, tokenizer


def without_lora(model, beside: bool = False):
    """A copy of ``model`` whose quantized layers have no LoRA (what a LoRA costs a step is the difference) or, with
    ``beside``, have theirs computed beside them as ``QuantLinear`` computed it up to commit 4bc5761 (and PEFT's
    LoRA layer does): each factor cast to the input's dtype, two products, a scaling and a sum -- the peer of the
    decoding kernel's kept copies."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    from lowbit.layers import quant_layers, set_module

    class Beside(nn.Module):
        def __init__(self, base: nn.Module, a: nn.Parameter, b: nn.Parameter, scaling: float) -> None:
            super().__init__()
            self.base, self.lora_A, self.lora_B, self.scaling = base, a, b, scaling
            self.lora_dropout = nn.Identity()

        def forward(self, x):
            y = self.base(x)
            h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))
            return y + self.scaling * F.linear(h, self.lora_B.to(x.dtype))

    bare = copy.deepcopy(model)
    for name, layer in quant_layers(bare).items():
        a, b, scaling = layer.lora_A, layer.lora_B, layer.scaling
        layer.lora_A = layer.lora_B = None
        layer.rank, layer.scaling, layer.lora_dropout = 0, 0.0, nn.Identity()
        if beside:
            set_module(bare, name, Beside(layer, a, b, scaling))
    return bare


def decode_row(bits: int, new_tokens: int = 32, rounds: int = 5) -> dict:
    """Greedy decoding of the default model at W{bits}g64 on the reference kernel and on torch-int4, the latter with
    each layer on its own copy (``torch-int4``), with sibling layers fused (``torch-int4-fused``: what ``lowbit
    generate`` runs since ``kernels.prepare_decoding`` fuses them), and fused in lowbit's own loop
    (``torch-int4-fused-loop``: :func:`lowbit.decode.greedy`, what ``generate --static-cache`` runs; eager on the
    CPU), alternated ``rounds`` times (medians)."""
    import torch

    from lowbit import kernels
    from lowbit.decode import greedy

    model, tokenizer = rtn_model(bits)
    variants = {"-nolora": without_lora(model), "-beside": without_lora(model, beside=True)}
    ids = tokenizer("The history of the English language begins with", return_tensors="pt").input_ids[:, :16]
    row: dict = {"row": f"decode-w{bits}", "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "rounds": rounds}
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)

    def generate(name: str) -> tuple[float, torch.Tensor]:
        suffix = next((v for v in variants if name.endswith(v)), "")
        model_ = variants.get(suffix, model)
        name = name.removesuffix(suffix)

        def run(tokens: int) -> torch.Tensor:
            # every run decodes ``tokens``: the loop with no end token, generate with min_new_tokens (which masks
            # EOS instead: their tokens could differ where EOS is the argmax, which the same_tokens fields show)
            if name.endswith("-loop"):
                return greedy(model_, ids, max_new_tokens=tokens, eos_token_id=[], pad_token_id=tokenizer.eos_token_id)
            return model_.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)

        with torch.no_grad(), kernels.pinned(name.removesuffix("-loop").removesuffix("-fused")):
            if "-fused" in name:
                made = kernels.prepare_decoding(model_)[0]  # 0 when the previous run left them made
                row["fused_layers"] = made or row.get("fused_layers", 0)
            else:
                kernels.drop_caches(model_)  # no fused copies: each layer makes its own
            run(2)  # warm-up (and the repacking)
            start = time.perf_counter()
            out = run(new_tokens)
            return new_tokens / (time.perf_counter() - start), out

    names = ("torch-int4", "torch-int4-fused", "torch-int4-fused-loop", "torch-int4-fused-nolora",
             "torch-int4-fused-beside")  # fmt: skip
    speeds: dict[str, list[float]] = {name: [] for name in names}
    outputs = {}
    speed, outputs["reference"] = generate("reference")
    row["reference_tokens_per_s"] = round(speed, 2)
    for _ in range(rounds):
        for name in speeds:
            speed, outputs[name] = generate(name)
            speeds[name].append(speed)
    for name, found in speeds.items():
        row[f"{name}_tokens_per_s"] = round(statistics.median(found), 2)
    row["each_round_tokens_per_s"] = {name: [round(v, 2) for v in found] for name, found in speeds.items()}
    row["speedup"] = round(row["torch-int4_tokens_per_s"] / row["reference_tokens_per_s"], 2)
    row["fused_speedup"] = round(row["torch-int4-fused_tokens_per_s"] / row["torch-int4_tokens_per_s"], 3)
    row["loop_speedup"] = round(row["torch-int4-fused-loop_tokens_per_s"] / row["torch-int4-fused_tokens_per_s"], 3)
    # the share of a token's time the LoRA takes: 1 - (time without it) / (time with it)
    row["lora_share"] = round(1 - row["torch-int4-fused_tokens_per_s"] / row["torch-int4-fused-nolora_tokens_per_s"], 3)
    row["lora_share_beside"] = round(
        1 - row["torch-int4-fused-beside_tokens_per_s"] / row["torch-int4-fused-nolora_tokens_per_s"], 3
    )
    row["kept_lora_speedup"] = round(
        row["torch-int4-fused_tokens_per_s"] / row["torch-int4-fused-beside_tokens_per_s"], 3
    )
    row["same_tokens"] = bool(torch.equal(outputs["reference"], outputs["torch-int4"]))
    row["same_tokens_fused"] = bool(torch.equal(outputs["torch-int4"], outputs["torch-int4-fused"]))
    row["same_tokens_loop"] = bool(torch.equal(outputs["torch-int4-fused"], outputs["torch-int4-fused-loop"]))
    row["same_tokens_beside"] = bool(torch.equal(outputs["torch-int4-fused"], outputs["torch-int4-fused-beside"]))
    with torch.no_grad(), kernels.pinned("torch-int4"):  # the loop's cache is static: against generate's static one
        static = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                cache_implementation="static", **kwargs)  # fmt: skip
    row["same_tokens_loop_static_generate"] = bool(torch.equal(static, outputs["torch-int4-fused-loop"]))
    return row


def compiled_row(bits: int = 4, new_tokens: int = 64, rounds: int = 5, steps: int = 32) -> dict:
    """What compiling lowbit's decoding step on the CPU (``greedy(compile=True)``: inductor's C++ kernels) gains on
    the default model at W{bits}g64 with its QLoRA start, on torch-int4 with fused siblings, as ``lowbit generate``
    decodes. Batch 1: ``new_tokens`` greedy tokens after a short prompt by transformers' ``generate`` (what
    ``lowbit generate`` runs by default), lowbit's loop uncompiled (``loop``: ``generate --static-cache`` on the
    CPU) and compiled (``loop-compiled``), each on its own copy of the model (one decoder is kept per model), in
    ``rounds`` rotated rounds (medians), and the first new token where the compiled loop's tokens leave the
    uncompiled loop's (None: nowhere). ``compile_cold_s``: the first call's time in an empty inductor cache (a
    machine's first run); ``compile_warm_s``: the same after the compiled step is dropped, with that cache filled
    (later runs). Batch 8, as ``translate`` decodes: 8 P3 test verses with 5 shots, left-padded (a few hundred
    tokens each): the prompt's time (``b8_prefill_s``, uncompiled everywhere) and ms a decoding step after it
    (``steps`` tokens' time less the first's), median of 3."""
    import copy
    import os
    import tempfile

    import torch

    from lowbit import kernels
    from lowbit.adapt import SHOTS
    from lowbit.decode import greedy, release
    from lowbit.parallel import bible_pairs, p3_split
    from lowbit.translate import prompt

    model, tokenizer = rtn_model(bits)
    names = ("generate", "loop", "loop-compiled")
    models = {"generate": model, "loop": copy.deepcopy(model), "loop-compiled": copy.deepcopy(model)}
    pad = tokenizer.eos_token_id
    one = tokenizer("The history of the English language begins with", return_tensors="pt").input_ids[:, :16]
    split = p3_split()
    shots = bible_pairs(split["train"])[:SHOTS]
    tokenizer.padding_side = "left"
    eight = tokenizer([prompt(p.source, "en", "es", shots) for p in bible_pairs(split["test"])[:8]],
                      return_tensors="pt", padding=True)  # fmt: skip
    row: dict = {"row": f"decode-compiled-w{bits}", "prompt_tokens": one.shape[1], "new_tokens": new_tokens,
                 "rounds": rounds, "b8_prompt_tokens": eight.input_ids.shape[1]}  # fmt: skip

    def run(name: str, tokens: int, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = models[name]
        if name == "generate":
            return m.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=pad)  # fmt: skip
        return greedy(m, ids, mask, max_new_tokens=tokens, eos_token_id=[], pad_token_id=pad,
                      compile=name == "loop-compiled")  # fmt: skip

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache, torch.no_grad(), kernels.pinned("torch-int4"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            for m in models.values():
                kernels.prepare_decoding(m)
            for name in ("generate", "loop"):
                run(name, 2, one)
            for key in ("compile_cold_s", "compile_warm_s"):
                torch._dynamo.reset()
                release(models["loop-compiled"])
                start = time.perf_counter()
                run("loop-compiled", 2, one)
                row[key] = round(time.perf_counter() - start, 1)
            speeds: dict[str, list[float]] = {name: [] for name in names}
            outputs = {}
            for shift in range(rounds):
                for name in names[shift % 3 :] + names[: shift % 3]:
                    start = time.perf_counter()
                    outputs[name] = run(name, new_tokens, one)
                    speeds[name].append(round(new_tokens / (time.perf_counter() - start), 2))
            for name, found in speeds.items():
                row[f"{name}_tokens_per_s"] = round(statistics.median(found), 2)
            row["each_round_tokens_per_s"] = speeds
            row["compiled_vs_loop"] = round(row["loop-compiled_tokens_per_s"] / row["loop_tokens_per_s"], 3)
            row["compiled_vs_generate"] = round(row["loop-compiled_tokens_per_s"] / row["generate_tokens_per_s"], 3)
            differ = (outputs["loop"] != outputs["loop-compiled"]).nonzero()
            row["first_differing_token"] = int(differ[0, 1]) - one.shape[1] if len(differ) else None
            # batch 8: a new decoder (and compiled step) for the batch, made by a warm-up call
            args = (eight.input_ids, eight.attention_mask)
            for name in names:
                run(name, 2, *args)
            step_ms: dict[str, list[float]] = {name: [] for name in names}
            prefill: dict[str, list[float]] = {name: [] for name in names}
            for shift in range(3):
                for name in names[shift:] + names[:shift]:
                    start = time.perf_counter()
                    run(name, 1, *args)
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    run(name, steps + 1, *args)
                    prefill[name].append(round(first, 2))
                    step_ms[name].append(round((time.perf_counter() - start - first) / steps * 1e3, 1))
            for name in names:
                row[f"b8_{name}_prefill_s"] = statistics.median(prefill[name])
                row[f"b8_{name}_step_ms"] = statistics.median(step_ms[name])
            row["b8_each_step_ms"] = step_ms
            row["b8_compiled_vs_loop"] = round(row["b8_loop_step_ms"] / row["b8_loop-compiled_step_ms"], 3)
            row["b8_compiled_vs_generate"] = round(row["b8_generate_step_ms"] / row["b8_loop-compiled_step_ms"], 3)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            torch._dynamo.reset()
    return row


def drawn_lora_model(bits: int):
    """:func:`rtn_model` with its r16 LoRA's ``B`` drawn (seed 0), as after fine-tuning: the model of the one-step
    rows (``lora-step``, ``steady``), whose LoRA must change the output."""
    import torch

    from lowbit.layers import quant_layers

    model, _ = rtn_model(bits)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in quant_layers(model).values():
            layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=gen))
    return model


def lora_step_row(bits: int = 4, rounds: int = 15, calls: int = 10) -> dict:
    """One decoding step's time (a one-token forward, the default model at W{bits}g64 with a r16 LoRA whose ``B`` is
    drawn, as after fine-tuning) with the LoRA from torch-int4's kept copies (``kept``), computed beside each layer as
    up to commit 4bc5761 (``beside``) and without a LoRA (``nolora``): ``rounds`` interleaved rounds of ``calls``
    calls each, median ms a step -- finer than the decode rows, whose whole generations vary by more than the
    difference -- and the largest logit difference between ``kept`` and ``beside``."""
    import torch

    from lowbit import kernels

    model = drawn_lora_model(bits)
    variants = {"kept": model, "beside": without_lora(model, beside=True), "nolora": without_lora(model)}
    ids = torch.tensor([[42]])
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad(), kernels.pinned("torch-int4"):
        for m in variants.values():
            kernels.prepare_decoding(m)
        logits = {name: m(ids).logits for name, m in variants.items()}
        for _ in range(rounds):
            for name, m in variants.items():
                start = time.perf_counter()
                for _ in range(calls):
                    m(ids)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
    row: dict = {"row": f"lora-step-w{bits}", "rounds": rounds, "calls": calls}
    row.update({f"{name}_ms": round(statistics.median(v), 2) for name, v in times.items()})
    row["each_round_ms"] = {name: [round(t, 2) for t in v] for name, v in times.items()}
    row["kept_speedup"] = round(row["beside_ms"] / row["kept_ms"], 3)
    row["lora_share_kept"] = round(1 - row["nolora_ms"] / row["kept_ms"], 3)
    row["lora_share_beside"] = round(1 - row["nolora_ms"] / row["beside_ms"], 3)
    diff = (logits["kept"] - logits["beside"]).abs().max() / logits["beside"].abs().max()
    row["max_logit_rel_diff"] = float(f"{diff.item():.3g}")
    return row


def steady_row(bits: int = 4, rounds: int = 15, calls: int = 10, batches: tuple[int, ...] = (1, 8)) -> dict:
    """One decoding step (a one-token forward per row, the default model at W{bits}g64 with a drawn r16 LoRA, q/k/v
    and gate/up fused, on torch-int4) with the kernels checking their state at every call (``checked``, as before
    ``kernels.steady`` existed and as a caller's own eager loop still runs) and inside a steady block, as
    ``generate``, ``translate`` and lowbit's loop decode (``steady``: each layer checked at its first call in the
    block), at 1 and 8 rows: ``rounds`` interleaved rounds of ``calls`` calls, median ms a step, and whether the
    logits are bit-identical."""
    import contextlib

    import torch

    from lowbit import kernels

    model = drawn_lora_model(bits)
    row: dict = {"row": f"steady-w{bits}", "rounds": rounds, "calls": calls}
    for batch in batches:
        ids = torch.full((batch, 1), 42)
        times: dict[str, list[float]] = {"checked": [], "steady": []}
        with torch.no_grad(), kernels.pinned("torch-int4"):
            kernels.prepare_decoding(model, rows=batch)
            checked = model(ids).logits
            with kernels.steady():
                same = torch.equal(model(ids).logits, checked) and torch.equal(model(ids).logits, checked)
            for _ in range(rounds):
                for name in times:
                    with kernels.steady() if name == "steady" else contextlib.nullcontext():
                        model(ids)  # the block's first call checks everything
                        start = time.perf_counter()
                        for _ in range(calls):
                            model(ids)
                        times[name].append((time.perf_counter() - start) / calls * 1e3)
        for name, v in times.items():
            row[f"b{batch}_{name}_ms"] = round(statistics.median(v), 2)
        row[f"b{batch}_each_round_ms"] = {name: [round(t, 2) for t in v] for name, v in times.items()}
        row[f"b{batch}_speedup"] = round(row[f"b{batch}_checked_ms"] / row[f"b{batch}_steady_ms"], 3)
        row[f"b{batch}_same_logits"] = same
    return row


def stepwise_texts(tokenizer, tokens: int) -> dict:
    """``tokens`` token ids of PTB test text and of the P3 Bible eval text (English), each as a ``[1, tokens]``
    tensor: the two domains the README's perplexities use."""
    from lowbit.data import load_text, tokenize
    from lowbit.parallel import MODULES, p3_split, verse

    split = p3_split()
    bible = "\n".join(verse(MODULES["en"], ref) for ref in split["test"][:64])
    return {name: tokenize(text, tokenizer)[:tokens][None] for name, text in (("ptb", load_text("ptb")),
                                                                              ("bible", bible))}  # fmt: skip


def stepwise_row(bits: int, tokens: int = 256) -> dict:
    """Teacher-forced decoding, one token per call, of the default model at W{bits}g64 on both kernels."""
    import inspect
    import math

    import torch
    from transformers import DynamicCache

    import lowbit
    from lowbit import kernels

    if bits == 2:  # RTN W2 is a broken model (P1: perplexity 1e6); W2 users decode a calibrated one: P1's best
        from p2 import start_checkpoint

        model, tokenizer = lowbit.load(start_checkpoint("lowbit-apiq-gptq-w2"))
    else:
        model, tokenizer = rtn_model(bits)
    row: dict = {"row": f"stepwise-w{bits}", "tokens": tokens, "model": "apiq-bw-gptq2-w2" if bits == 2 else "rtn"}
    # transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for domain, ids in stepwise_texts(tokenizer, tokens).items():
        logprobs, top1 = {}, {}
        for name in ("reference", "torch-int4", "bf16"):
            cache, nll, picks = DynamicCache(), [], []
            start = time.perf_counter()
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16")
            with torch.no_grad(), kernels.pinned("torch-int4" if name == "torch-int4" else "reference"), autocast:
                for i in range(ids.shape[1] - 1):
                    out = model(input_ids=ids[:, i : i + 1], **{cache_arg: cache}, use_cache=True)
                    logits = out.logits[0, -1].float()
                    nll.append(-torch.log_softmax(logits, -1)[ids[0, i + 1]].item())
                    picks.append(int(logits.argmax()))
            logprobs[name], top1[name] = nll, picks
            row[f"{domain}_{name}_ppl"] = round(math.exp(sum(nll) / len(nll)), 3)
            row[f"{domain}_{name}_seconds"] = round(time.perf_counter() - start, 1)
        ref = row[f"{domain}_reference_ppl"]
        for name in ("torch-int4", "bf16"):
            pairs = list(zip(logprobs["reference"], logprobs[name], strict=True))
            row[f"{domain}_{name}_ppl_rel_diff"] = float(f"{(row[f'{domain}_{name}_ppl'] - ref) / ref:.3g}")
            row[f"{domain}_{name}_top1_agree"] = round(
                sum(a == b for a, b in zip(top1["reference"], top1[name], strict=True)) / len(pairs), 4
            )
            row[f"{domain}_{name}_max_token_nll_diff"] = round(max(abs(a - b) for a, b in pairs), 4)
    return row


def mt_row(verses: int = 32) -> dict:
    """Translation of P3 test verses by the default model at W4g64 on the reference kernel and on torch-int4, both
    running the prompts' shared shots once (``translate``'s default), and on torch-int4 with every row running its
    whole prompt (``torch-int4-whole``: as up to commit d27aac0)."""
    import torch

    import lowbit.translate as mt
    from lowbit import kernels
    from lowbit.adapt import SHOTS, AdaptConfig, evaluate_mt
    from lowbit.parallel import bible_pairs, p3_split

    split = p3_split()
    test, shots = bible_pairs(split["test"])[:verses], bible_pairs(split["train"])[:SHOTS]
    model, tokenizer = rtn_model(4)
    config = AdaptConfig(max_new_tokens=64, translate_batch=8)
    row: dict = {"row": "mt-w4", "verses": len(test), "shots": len(shots)}
    hyps = {}
    sharing = mt.MIN_SHARED
    for name in ("reference", "torch-int4", "torch-int4-whole"):
        mt.MIN_SHARED = 10**9 if name.endswith("-whole") else sharing
        try:
            with torch.no_grad(), kernels.pinned(name.removesuffix("-whole")):
                result = evaluate_mt(model, tokenizer, test, config, shots)
        finally:
            mt.MIN_SHARED = sharing
        row[f"{name}_chrf"] = round(result["chrf"], 2)
        row[f"{name}_seconds"] = result["translate_seconds"]
        hyps[name] = result["hypotheses"]
    row["identical_translations"] = sum(a == b for a, b in zip(hyps["reference"], hyps["torch-int4"], strict=True))
    row["identical_shared_whole"] = sum(
        a == b for a, b in zip(hyps["torch-int4"], hyps["torch-int4-whole"], strict=True)
    )
    row["speedup"] = round(row["reference_seconds"] / row["torch-int4_seconds"], 2)
    row["shared_speedup"] = round(row["torch-int4-whole_seconds"] / row["torch-int4_seconds"], 2)
    return row


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="layers,decode,compiled,lora,steady,stepwise,mt",
                        help="layers, decode, compiled, lora, steady, stepwise, mt (comma-separated)")  # fmt: skip
    wanted = parser.parse_args().rows.split(",")
    env = benchlib.environment()

    def emit(rows: list[dict]) -> None:  # each row printed and stored as soon as it is measured
        for row in rows:
            print(row, flush=True)
        benchlib.save_rows(RESULTS, rows, env, "cpu-int4")

    for in_f, out_f in SHAPES if "layers" in wanted else ():
        emit(shape_rows(in_f, out_f))
    for bits in (4, 3, 2) if "decode" in wanted else ():
        emit([decode_row(bits)])
    if "compiled" in wanted:
        emit([compiled_row()])
    if "lora" in wanted:
        emit([lora_step_row()])
    if "steady" in wanted:
        emit([steady_row()])
    for bits in [b for b in (4, 3, 2) if "stepwise" in wanted or f"stepwise-w{b}" in wanted]:
        emit([stepwise_row(bits)])
    if "mt" in wanted:
        emit([mt_row()])
    print(f"\n{env['date']}, commit {env['commit']}, {env['machine']['cpu']}, torch {env['versions']['torch']}")


if __name__ == "__main__":
    main()
