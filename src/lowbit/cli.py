"""The ``lowbit`` command line: quantize, finetune, export, eval, info, report, generate, translate, adapt, cache.

Every command accepts ``--json`` and then prints exactly one JSON object on stdout (progress bars and logs still go
to stderr, with or without ``--json``). A user mistake prints one line, ``lowbit: error: <what is wrong and how to
fix it>``, and exits with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import sys
import time
import typing
from pathlib import Path

from lowbit.adapters import HIWI_TARGETS, METHODS
from lowbit.config import INITIALIZERS, flag
from lowbit.device import (
    DEVICE_CHOICES,
    PRECISIONS,
    inference_precision,
    parse_budget,
    prepare_deterministic,
    resolve_device,
)
from lowbit.errors import LowbitError
from lowbit.kernels import NAMES as KERNEL_NAMES
from lowbit.kernels import kernel, pinned, pinned_name, prepare_decoding, steady

EXIT_USER_ERROR = 2


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(args: argparse.Namespace, result: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))


def _format(args: argparse.Namespace) -> tuple[str, int]:
    """Resolve ``--format`` (``nf4`` etc. fix the bits) into (format, bits)."""
    fmt, bits = args.format, args.bits
    if fmt.startswith("nf") and fmt != "nf":
        fixed = int(fmt[2:])
        if args.bits_given and bits != fixed:
            raise LowbitError(f"--format {fmt} is {fixed}-bit but --bits {bits} was given: drop one of them")
        return "nf", fixed
    return fmt, bits


def _at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Refuse counts below 1 before any model is loaded (they would fail minutes later inside transformers)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {value}: give a positive count")


def _method_options() -> dict[str, list[tuple[str, object, dataclasses.Field]]]:
    """Every initializer option by name: ``(method, type, field)`` for each method that declares it."""
    found: dict[str, list[tuple[str, object, dataclasses.Field]]] = {}
    for method in INITIALIZERS.values():
        hints = typing.get_type_hints(method.Options)
        for f in dataclasses.fields(method.Options):
            found.setdefault(f.name, []).append((method.name, hints[f.name], f))
    return found


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per initializer option (``clip_lr`` -> ``--clip-lr``), made from the methods' ``Options`` fields:
    their type, choices, default and help. A flag not given is not recorded, so each method uses its default."""
    group = parser.add_argument_group("method options (defaults: the published recipes)")
    for name, uses in _method_options().items():
        kinds = {typing.get_origin(hint) or hint for _, hint, _ in uses}
        if len(kinds) > 1:
            raise TypeError(f"option {name} has different types in different methods: {kinds}")
        by_text: dict[str, list[str]] = {}  # "help (default X)" -> the methods it describes
        for method, _, f in uses:
            default = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            by_text.setdefault(f"{f.metadata['help']} (default {default})", []).append(method)
        text = "; ".join(f"{', '.join(methods)}: {line}" for line, methods in by_text.items())
        kwargs: dict = {"dest": name, "default": None, "help": text.replace("%", "%%")}
        hint = uses[0][1]
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(dict.fromkeys(c for _, h, _ in uses for c in typing.get_args(h)))
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = hint
        group.add_argument(flag(name), **kwargs)


def _options(args: argparse.Namespace) -> dict:
    """Method options from the flags that were given (recorded in the checkpoint)."""
    return {name: getattr(args, name) for name in _method_options() if getattr(args, name) is not None}


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from lowbit.calibrate import calibrate
    from lowbit.config import QuantConfig
    from lowbit.data import calib_sources
    from lowbit.engine import EngineOptions
    from lowbit.fsutil import check_output_dir
    from lowbit.models import is_lowbit_checkpoint, load_tokenizer, resolve_model_path

    fmt, bits = _format(args)
    config = QuantConfig(
        bits=bits,
        group_size=args.group_size,
        format=fmt,
        symmetric=args.symmetric,
        init=args.init,
        rank=args.rank,
        alpha=args.alpha,
        seed=args.seed,
        options=_options(args),
    )
    out = Path(args.out)
    protected = (Path(args.model),) if args.model else ()
    check_output_dir(out, args.overwrite, protected)  # the whole output path, before any loading
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    source = resolve_model_path(args.model)
    if is_lowbit_checkpoint(source):
        raise LowbitError(f"{args.model} is already a lowbit checkpoint: quantize the full-precision model instead")
    tokenizer = load_tokenizer(source)
    calib = None
    if INITIALIZERS[config.init].needs_data:
        if args.holdout_windows < 0:
            raise LowbitError(f"--holdout-windows must be at least 0, got {args.holdout_windows}")
        calib = _calib_windows(args, source, tokenizer, args.calib_windows + args.holdout_windows)
        if "self" in calib_sources(args.calib):
            config.options.update(calib_temperature=args.calib_temperature)
        config.options.update(calib=args.calib, calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen,
                              calib_seed=args.calib_seed, holdout_windows=args.holdout_windows)  # fmt: skip
    engine = EngineOptions(act_dtype=getattr(torch, args.act_dtype), progress=True, device=args.device,
                           act_budget=parse_budget(args.act_budget))  # fmt: skip
    summary = calibrate(source, config, out, calib, tokenizer, args.overwrite, engine, spill=args.spill)
    seconds = time.perf_counter() - start
    result = {
        "out": str(out),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **config.to_dict(),
        "resumed_from_block": summary["resumed_from"],
        "worst_block": summary["worst_block"],
    }
    lines = [
        f"wrote {out} ({config.spec.name}, init {config.init}) in {seconds:.1f} s, peak RSS {_peak_rss_mb():.0f} MiB"
    ]
    if summary["resumed_from"]:
        lines.append(f"resumed an interrupted run at block {summary['resumed_from']}")
    worst = summary["worst_block"]
    if worst and "rel_error" in worst:
        last = summary["blocks"][-1]
        where = f"{args.holdout_windows} held-out" if args.holdout_windows else "the calibration"
        lines.append(f"relative output error of the quantized stream on {where} windows: last block "
                     f"{last['rel_error']:.4f}, worst block {worst['index']} ({worst['rel_error']:.4f})")  # fmt: skip
    _emit(args, result, lines)


def cmd_finetune(args: argparse.Namespace) -> None:
    from lowbit.finetune import TrainConfig, finetune

    names = ("data", "task", "seqlen", "samples", "epochs", "batch_size", "micro_batch", "lr", "weight_decay",
             "warmup", "max_grad_norm", "seed", "eval_data", "eval_every", "eval_windows", "save_every",
             "grad_checkpointing", "compile", "precision", "lora_dtype", "rank", "alpha", "method", "pafi_fraction",
             "hiwi_dim", "hiwi_target", "adapter_layers")  # fmt: skip
    config = TrainConfig(**{n: getattr(args, n) for n in names})
    result = finetune(args.dir, args.out, config, overwrite=args.overwrite, progress=True, device=args.device,
                      tensorboard=args.tensorboard)  # fmt: skip
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    lines = [
        f"wrote {result['out']}: {result['steps']} steps on {result['examples']} examples, final loss "
        f"{result['final_loss']:.4f}, {result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mb']:.0f} MiB"
    ]
    if result["eval_ppl"] is not None:
        lines.append(f"perplexity on {config.eval_data}: {result['eval_ppl']:.3f}")
    if result["resumed_from_step"]:
        lines.append(f"resumed an interrupted run at step {result['resumed_from_step']}")
    if result["truncated"]:
        lines.append(f"{result['truncated']} examples were longer than --seqlen {config.seqlen} and were cut")
    _emit(args, {k: v for k, v in result.items() if k != "losses"}, lines)


def _calib_windows(args: argparse.Namespace, source: Path, tokenizer, n: int, export: bool = False):
    """``n`` calibration windows from ``--calib`` (:func:`lowbit.data.calibration_windows`), ``self`` sampled by the
    full-precision model at ``source`` (:mod:`lowbit.selfcal`), each source drawn with ``--calib-seed``."""
    import torch

    from lowbit.data import calib_sources, calibration_windows

    if export and "self" in calib_sources(args.calib):
        raise LowbitError("export takes --calib ptb or a .txt/.jsonl file (or a mixture of them), not self: a "
                          "fine-tuned model's own samples would echo its training data rather than cover the text it "
                          "will see")  # fmt: skip

    def sample_self(count: int) -> torch.Tensor:
        from lowbit.api import load_model
        from lowbit.selfcal import self_calibration

        device = resolve_device(args.device)
        model, _ = load_model(source, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        wins = self_calibration(model, tokenizer, count, args.calib_seqlen, args.calib_seed, args.calib_temperature)
        del model  # freed before calibration sizes its device budget from the free memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return wins

    return calibration_windows(args.calib, tokenizer, n, args.calib_seqlen, args.calib_seed, sample_self)


def _export_calib(args: argparse.Namespace):
    """Calibration windows for an export that re-quantizes (from the checkpoint's tokenizer and the calib flags)."""
    from lowbit.models import load_tokenizer

    return _calib_windows(args, Path(args.dir), load_tokenizer(Path(args.dir)), args.calib_windows, export=True)


def cmd_export(args: argparse.Namespace) -> None:
    from lowbit.checkpoint import read_config
    from lowbit.config import QuantConfig
    from lowbit.engine import EngineOptions
    from lowbit.export import export_merged, export_requantized, merged_dtype

    targets = {"merged": args.merged, "requantize": args.requantize, "gguf": args.gguf, "gptq": args.gptq}
    if sum(v is not None for v in targets.values()) != 1:
        raise LowbitError("give exactly one of --merged OUT (full precision), --requantize OUT (low-bit, no "
                          "adapter), --gguf OUT.gguf (llama.cpp) or --gptq OUT (transformers, vLLM)")  # fmt: skip
    if args.dtype is not None and args.merged is None:
        raise LowbitError("--dtype applies to --merged only: drop it, or export with --merged")
    start = time.perf_counter()
    options = {"calib": args.calib, "calib_windows": args.calib_windows}
    engine = EngineOptions(progress=True, device=args.device, act_budget=parse_budget(args.act_budget))
    if args.merged:
        dtype = merged_dtype(args.dir, args.dtype)
        out = export_merged(args.dir, args.merged, args.overwrite, dtype)
        result = {"out": str(out), "kind": "merged", "dtype": dtype}
    elif args.gguf:
        from lowbit.export_gguf import export_gguf, plan_gguf

        calib = _export_calib(args) if plan_gguf(Path(args.dir), args.gguf_type)[1] else None
        result = export_gguf(args.dir, args.gguf, args.gguf_type, args.embeddings, calib, args.overwrite,
                             options=options, engine=engine)  # fmt: skip
    elif args.gptq:
        from lowbit.export_gptq import export_gptq, plan_gptq

        calib = _export_calib(args) if plan_gptq(Path(args.dir), args.bits)[1] else None
        result = export_gptq(args.dir, args.gptq, args.bits, calib, args.overwrite, options=options,
                             engine=engine)  # fmt: skip
    else:
        qc = read_config(Path(args.dir))["quantization_config"]
        bits = args.bits or qc["bits"]
        config = QuantConfig(
            bits=bits,
            group_size=args.group_size or qc["group_size"],
            init=args.init,
            seed=args.seed,
            options=options,
        )
        calib = _export_calib(args) if args.init == "gptq" else None
        summary = export_requantized(args.dir, args.requantize, config, calib, args.overwrite, engine=engine)
        out = Path(args.requantize)
        result = {"out": str(out), "kind": "requantized", "bits": bits, "init": args.init,
                  "worst_block": summary["worst_block"]}  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 2)
    what = result.get("dtype") or result.get("type") or f"W{result['bits']}"
    again = ", merged and re-quantized activation-aware" if result.get("requantized") else ""
    _emit(args, result, [f"wrote {result['out']} ({result['kind']} {what}{again}) in {result['seconds']:.1f} s"])


def _shots(args: argparse.Namespace) -> list:
    from lowbit.parallel import read_pairs

    if not args.shots:
        return []
    shots = read_pairs(args.shots)[: args.num_shots]
    if len(shots) < args.num_shots:
        raise LowbitError(f"--num-shots {args.num_shots} but {args.shots} has only {len(shots)} pairs")
    return shots


def cmd_translate(args: argparse.Namespace) -> None:
    from lowbit.api import load_model
    from lowbit.translate import translate

    _at_least_one(args, "max_new_tokens", "batch_size", "beams")
    if args.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(args.input)
        if not path.is_file():
            raise LowbitError(f"input file {path} does not exist: give a text file (one segment per line) or -")
        from lowbit.data import read_utf8

        lines = read_utf8(path).read().splitlines()
    sources = [line.strip() for line in lines if line.strip()]
    if not sources:
        raise LowbitError(f"{args.input} has no text to translate")
    shots = _shots(args)
    model, tokenizer = load_model(args.model, device=args.device)
    start = time.perf_counter()
    with _kernel_pin(args), inference_precision(model, args.precision):
        hyps = translate(model, tokenizer, sources, args.src, args.tgt, shots, batch_size=args.batch_size,
                         beams=args.beams, max_new_tokens=args.max_new_tokens, progress=True,
                         static_cache=args.static_cache)  # fmt: skip
    seconds = time.perf_counter() - start
    if args.output:
        from lowbit.fsutil import write_text

        write_text(Path(args.output), "".join(f"{h}\n" for h in hyps))
    result = {"translations": hyps, "segments": len(hyps), "seconds": round(seconds, 2), "shots": len(shots)}
    _emit(args, result, [f"wrote {len(hyps)} translations to {args.output}"] if args.output else hyps)


def _scored_windows(args: argparse.Namespace, source: str, tokenizer):
    """The first ``--windows`` windows of ``source``, with a note on stderr when the text has fewer."""
    from lowbit.data import text_windows

    wins = text_windows(source, tokenizer, args.seqlen, split=args.split, limit=args.windows)
    if args.windows and wins.shape[0] < args.windows:
        print(f"lowbit: note: {source} has only {wins.shape[0]} windows of {args.seqlen} tokens, fewer than "
              f"--windows {args.windows}: scoring those {wins.shape[0]}", file=sys.stderr)  # fmt: skip
    return wins


def cmd_eval(args: argparse.Namespace) -> None:
    if args.mt:
        return _eval_mt(args)
    from lowbit.api import load_model
    from lowbit.evaluate import perplexity

    model, tokenizer = load_model(args.model, device=args.device)
    wins = _scored_windows(args, args.ppl, tokenizer)
    start = time.perf_counter()
    with _kernel_pin(args):
        result = perplexity(model, wins, batch_size=args.batch_size, progress=True)
        used = pinned_name() or "default"
    seconds = time.perf_counter() - start
    out = {
        "ppl": result.ppl,
        "nll": result.nll,
        "tokens": result.tokens,
        "windows": int(wins.shape[0]),
        "seqlen": args.seqlen,
        "data": args.ppl if args.ppl != "ptb" else f"ptb-{args.split}",
        "model": str(args.model) if args.model else "default",
        "kernel": used,
        "seconds": round(seconds, 2),
    }
    _emit(
        args,
        out,
        [
            f"perplexity {result.ppl:.3f} on {out['data']} "
            f"({result.tokens} tokens, {wins.shape[0]} windows of {args.seqlen})"
        ],
    )


def _eval_mt(args: argparse.Namespace) -> None:
    from lowbit.adapt import AdaptConfig, evaluate_mt
    from lowbit.api import load_model
    from lowbit.parallel import read_pairs

    _at_least_one(args, "max_new_tokens", "batch_size")
    test = read_pairs(args.mt)
    if args.windows:
        test = test[: args.windows]
    shots = _shots(args)
    model, tokenizer = load_model(args.model, device=args.device)
    config = AdaptConfig(
        src=args.src, tgt=args.tgt, max_new_tokens=args.max_new_tokens, translate_batch=args.batch_size
    )
    with _kernel_pin(args):
        result = evaluate_mt(model, tokenizer, test, config, shots, progress=True)
        used = pinned_name() or "default"
    result.update(data=args.mt, model=str(args.model) if args.model else "default", shots=len(shots), kernel=used)
    if args.output:
        from lowbit.fsutil import write_text

        write_text(Path(args.output), "".join(f"{h}\n" for h in result["hypotheses"]))
    lines = [f"chrF {result['chrf']:.2f}  BLEU {result['bleu']:.2f}  target-side perplexity {result['ppl']:.2f}  "
             f"({result['segments']} segments, {len(shots)} shots, {args.src}->{args.tgt})"]  # fmt: skip
    _emit(args, result, lines)


def cmd_adapt(args: argparse.Namespace) -> None:
    from lowbit.adapt import WARM, AdaptConfig, adapt
    from lowbit.config import QuantConfig

    fmt, bits = _format(args)
    options = _options(args)
    if args.init == "apiq-bw" and not options:
        options = dict(WARM)
    quant = QuantConfig(bits=bits, group_size=args.group_size, format=fmt, init=args.init, rank=args.rank,
                        alpha=args.alpha, seed=args.seed, options=options)  # fmt: skip
    names = ("src", "tgt", "mono", "pairs", "test", "calib_windows", "calib_seqlen", "cpt_epochs", "sft_epochs",
             "lr", "batch_size", "micro_batch", "max_new_tokens", "test_limit")  # fmt: skip
    config = AdaptConfig(quant=quant, **{n: getattr(args, n) for n in names})
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    # --kernel: the decoding kernel of its evaluation (calibration pins its own; training runs in grad mode, which
    # the decoding kernels never take)
    with _kernel_pin(args):
        result = adapt(args.model, Path(args.out), config, progress=True, log=log, save_every=args.save_every,
                       device=args.device)  # fmt: skip
        used = pinned_name() or "default"
    summary = {k: v for k, v in result.items() if k != "hypotheses"} | {"kernel": used}
    _emit(args, {**summary, "out": args.out},
          [f"chrF {result['chrf']:.2f}  BLEU {result['bleu']:.2f}  {config.tgt} perplexity {result['ppl']:.2f} "
           f"on {result['segments']} test segments; stages in {args.out}"])  # fmt: skip


def cmd_info(args: argparse.Namespace) -> None:
    from lowbit.checkpoint import checkpoint_info

    info = checkpoint_info(Path(args.dir))
    lines = [
        f"{info['path']}: {info['format']} {info['bits']}-bit, group {info['group_size']}"
        f"{', symmetric' if info['symmetric'] else ''} (method {info['method']}, init {info['init']})",
        f"quantized weights: {info['quantized_params']:,} at {info['bits_per_weight']:.3f} bits/weight "
        f"({info['quantized_bytes'] / 2**20:.1f} MiB)",
        f"LoRA parameters: {info['lora_params']:,}",
        f"checkpoint: {info['checkpoint_bytes'] / 2**20:.1f} MiB in {len(info['files'])} files",
    ]
    if info["weight_adapter"]:
        lines.insert(3, f"{info['weight_adapter']} parameters: {info['weight_adapter_params']:,}")
    if info["q8_0_tensors"]:
        lines.append(f"stored as Q8_0 (lossless: the values lie on its grid): {', '.join(info['q8_0_tensors'])}")
    _emit(args, info, lines)


def cmd_cache(args: argparse.Namespace) -> None:
    from lowbit.models import cache_dir, cache_entries, clear_cache

    if args.action == "clear":
        entries = cache_entries()
        removed = clear_cache()
        freed = sum(e["bytes"] for e in entries)
        _emit(args, {"removed": removed, "bytes": freed, "cache": str(cache_dir())},
              [f"removed {removed} converted models ({freed / 2**20:.0f} MiB) from {cache_dir()}"])  # fmt: skip
        return
    entries = cache_entries()
    lines = [f"{e['bytes'] / 2**20:8.0f} MiB  {e['path']}  (from {', '.join(e['sources']) or 'unknown'})"
             for e in entries]  # fmt: skip
    total = sum(e["bytes"] for e in entries)
    lines.append(f"{len(entries)} converted models, {total / 2**20:.0f} MiB in {cache_dir()}; `lowbit cache clear` "
                 "deletes them (they convert again when loaded)")  # fmt: skip
    _emit(args, {"cache": str(cache_dir()), "entries": entries, "bytes": total}, lines)


def _kernel_pin(args: argparse.Namespace) -> typing.ContextManager:
    """``--kernel``: the kernel the quantized layers run on inside the ``with`` block (nothing pinned without it);
    one this install cannot run (no Triton, torch before 2.6) is an error, not a silent fallback."""
    import contextlib

    if not args.kernel:
        return contextlib.nullcontext()
    kernel(args.kernel)
    return pinned(args.kernel)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from lowbit.api import load_model
    from lowbit.decode import greedy

    _at_least_one(args, "max_new_tokens")
    model, tokenizer = load_model(args.model, device=args.device)
    if tokenizer is None:
        raise LowbitError(f"{args.model} has no tokenizer files: copy the tokenizer into the model folder")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LowbitError("the tokenizer has no chat template: drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    torch.manual_seed(args.seed)
    with torch.no_grad(), _kernel_pin(args), inference_precision(model, args.precision), steady():
        prepare_decoding(model)  # per-layer kernel copies made while they fit, not inside a compiled step
        if args.static_cache:
            out = greedy(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=args.max_new_tokens,
                         pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        else:
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[0, inputs["input_ids"].shape[1] :]
    completion = tokenizer.decode(new, skip_special_tokens=True)
    _emit(args, {"prompt": args.prompt, "completion": completion, "new_tokens": int(new.numel())}, [completion])


def cmd_report(args: argparse.Namespace) -> None:
    from lowbit.api import load_model
    from lowbit.checkpoint import read_config
    from lowbit.fsutil import write_json
    from lowbit.quant import QuantSpec
    from lowbit.report import activation_error, plot

    configs = {d: read_config(Path(d))["quantization_config"] for d in args.dirs}
    base_path = args.base
    if base_path is None:
        sources = {qc.get("source") for qc in configs.values()}
        if len(sources) != 1 or None in sources:
            raise LowbitError("the checkpoints do not name one common source model: pass --base MODEL")
        base_path = sources.pop()
    base, tokenizer = load_model(base_path, device=args.device)
    models = {}
    for d, qc in configs.items():
        label = f"{Path(d).name} ({qc.get('init')} {QuantSpec(qc['bits'], qc['group_size'], qc['format']).name})"
        models[label] = load_model(d, device=args.device)[0]
    wins = _scored_windows(args, args.data, tokenizer)
    result = activation_error(base, models, wins, progress=True)
    split = args.split if args.data == "ptb" else None  # --split only chooses among PTB's splits
    report = {"base": str(base_path), "data": args.data, "split": split, "windows": int(wins.shape[0]),
              "seqlen": args.seqlen, "checkpoints": result}  # fmt: skip
    if args.out:
        write_json(Path(args.out), report)
    if args.plot:
        where = f"{args.data} {split}" if split else args.data
        plot(result, Path(args.plot), f"activation error on {where}, {wins.shape[0]} x {args.seqlen}")
    lines = []
    for label, data in result.items():
        blocks = data["blocks"]
        worst = max(range(len(blocks)), key=blocks.__getitem__)
        layer, err = max(data["layers"].items(), key=lambda kv: kv[1])
        lines.append(f"{label}: block error first {blocks[0]:.4f}, last {blocks[-1]:.4f}, worst block {worst} "
                     f"({blocks[worst]:.4f}); worst layer {layer} ({err:.4f})")  # fmt: skip
    _emit(args, report, lines)


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize, fine-tune and evaluate 2/3/4-bit LLMs.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        return p

    q = add("quantize", "quantize a model into a packed low-bit checkpoint with a LoRA start")
    q.add_argument("model", nargs="?", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    q.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=64, help="input columns per scale; -1 = one group per row")
    q.add_argument(
        "--format", default="int", choices=["int", "nf", "nf4", "nf3", "nf2"], help="int (uniform) or NormalFloat"
    )
    q.add_argument("--symmetric", action="store_true", help="symmetric integer grid (no zero points)")
    q.add_argument("--init", default="qlora", choices=list(INITIALIZERS),
                   help="codes + LoRA start: " + ", ".join(INITIALIZERS))  # fmt: skip
    q.add_argument("--rank", type=int, default=8, help="LoRA rank")
    q.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    q.add_argument("--seed", type=int, default=0)
    c = q.add_argument_group(f"calibration ({', '.join(n for n, i in INITIALIZERS.items() if i.needs_data)})")
    c.add_argument("--calib", default="ptb,self", help="ptb (train split), a .txt or a .jsonl file, self: text the "
                   "full-precision model samples itself (data-free; no one corpus's domain), or a mixture of them "
                   "joined by commas (the windows alternate between the sources); the default, ptb,self, held up best "
                   "off its own text (README, P1)")  # fmt: skip
    c.add_argument("--calib-temperature", type=float, default=1.0, help="--calib self: sampling temperature")
    c.add_argument("--calib-windows", type=int, default=32, help="number of calibration windows")
    c.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration window choice")
    c.add_argument("--holdout-windows", type=int, default=4, help="extra windows of --calib the method never sees; "
                   "the per-block error is measured on them (0: on the calibration windows)")  # fmt: skip
    c.add_argument("--act-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="activation storage")  # fmt: skip
    c.add_argument("--spill", action="store_true",
                   help="activations that do not fit --act-budget go to memory-mapped files, not RAM")  # fmt: skip
    _add_method_flags(q)
    q.add_argument("--out", required=True, help="output checkpoint folder")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=cmd_quantize)

    f = add("finetune", "train the adapter (LoRA, PaFi or HiWi) of a lowbit checkpoint (packed base; resumable; "
            "accelerate/torchrun)")  # fmt: skip
    f.add_argument("dir", help="lowbit checkpoint (from `lowbit quantize`); with --method pafi|hiwi also a "
                   "full-precision model folder or .gguf file (OUT is then the merged plain model)")  # fmt: skip
    f.add_argument(
        "--data", default="ptb", help="clm: ptb, .txt or .jsonl text; sft: .jsonl prompt/response or messages"
    )
    f.add_argument("--task", default="clm", choices=["clm", "sft"])
    f.add_argument("--out", required=True, help="output checkpoint folder (base + trained adapter)")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out or a stale interrupted run")
    f.add_argument("--seqlen", type=int, default=256, help="clm window / longest sft sequence")
    f.add_argument("--samples", type=int, default=0, help="examples drawn with --seed (default 0: all the data)")
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--batch-size", type=int, default=4, help="effective batch over all processes")
    f.add_argument("--micro-batch", type=int, default=1, help="examples per forward (the rest is accumulation)")
    f.add_argument("--lr", type=float, default=3e-4)
    f.add_argument("--weight-decay", type=float, default=0.1)
    f.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction before the cosine decay")
    f.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: off)")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--eval-data", help="perplexity data (ptb: valid split; a file: all of it) every --eval-every")
    f.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    f.add_argument("--eval-windows", type=int, default=16)
    f.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints (0: none)")
    f.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    f.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward and backward: less Python and launch overhead a step "
                        "(a GPU step of a small model is bound by it) after a compilation of a minute or more; "
                        "needs a C++ compiler on the CPU; results equal eager ones to rounding; LoRA only in "
                        "effect (pafi/hiwi compile in pieces)")  # fmt: skip
    f.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="auto: bf16 on a CUDA GPU of the Ampere generation or later, float32 elsewhere")  # fmt: skip
    f.add_argument("--lora-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="storage of the trained adapter (and AdamW state): bf16 halves it")  # fmt: skip
    f.add_argument("--rank", type=int, default=8, help="LoRA rank when the checkpoint has no adapter")
    f.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha when the checkpoint has no adapter")
    f.add_argument("--method", default="lora", choices=METHODS,
                   help="what trains: lora (the LoRA factors), pafi (the smallest "
                   "weights, as a sparse delta) or hiwi (an adapter on the weights); pafi/hiwi merge into the "
                   "weights with export --merged/--requantize")  # fmt: skip
    f.add_argument("--pafi-fraction", type=float, default=0.005,
                   help="pafi: fraction of each layer's weights (smallest |W|) that trains")  # fmt: skip
    f.add_argument("--hiwi-dim", type=int, default=8, help="hiwi: bottleneck width of the adapter on the weights")
    f.add_argument("--hiwi-target", default="weight", choices=HIWI_TARGETS,
                   help="hiwi: the tensor the adapter reads and changes: each layer's weight, or its bias (the "
                   "paper's bias variant: only layers with a bias)")  # fmt: skip
    f.add_argument("--adapter-layers", default="", metavar="REGEX",
                   help="pafi/hiwi: the quantized layers that train, a regular expression searched in each layer's "
                   "name (e.g. 'mlp' or 'self_attn\\.(q|v)_proj'); default every quantized layer")  # fmt: skip
    f.add_argument("--tensorboard", nargs="?", const=True, default=False, metavar="DIR",
                   help="also log the per-step metrics (metrics.jsonl) as TensorBoard events, to DIR or by default "
                   "to OUT/tensorboard (needs `pip install tensorboard`)")  # fmt: skip
    f.set_defaults(func=cmd_finetune)

    x = add("export", "serve the model: GGUF (llama.cpp), GPTQ (transformers, vLLM), merged or re-quantized")
    x.add_argument("dir", help="lowbit checkpoint")
    x.add_argument("--merged", metavar="OUT", help="write W = dequant(Q) + s*BA as a plain transformers model")
    x.add_argument("--requantize", metavar="OUT", help="merge, then quantize again (no adapter needed)")
    x.add_argument("--gguf", metavar="OUT.gguf", help="one GGUF file for llama.cpp (adapter merged)")
    x.add_argument("--gptq", metavar="OUT", help="a GPTQ (gptq_v2) folder for transformers/GPTQModel/vLLM")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="--merged: weight dtype "
                   "(default: the source model's, else float32)")  # fmt: skip
    x.add_argument("--gguf-type", choices=["q4_1", "q4_0", "q8_0"], help="--gguf: type of the block layers "
                   "(default: the checkpoint's grid, else q4_1)")  # fmt: skip
    x.add_argument("--embeddings", default="auto", choices=["auto", "f16", "q8_0"],
                   help="--gguf: embeddings/head type (auto: q8_0 when lossless, else f16)")  # fmt: skip
    x.add_argument("--bits", type=int, help="bits of a --requantize/--gptq model (default: the checkpoint's)")
    x.add_argument("--group-size", type=int, help="group size (default: the checkpoint's)")
    x.add_argument("--init", default="gptq", choices=["gptq", "none"], help="gptq: activation-aware; none: rounding")
    x.add_argument("--calib", default="ptb", help="calibration text: ptb (train split), .txt or .jsonl, or a "
                   "mixture of them joined by commas")  # fmt: skip
    x.add_argument("--calib-windows", type=int, default=32)
    x.add_argument("--calib-seqlen", type=int, default=512)
    x.add_argument("--calib-seed", type=int, default=0)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    x.set_defaults(func=cmd_export)

    e = add("eval", "perplexity of a model or checkpoint")
    e.add_argument("model", nargs="?", help="checkpoint, HF folder or .gguf file (default: the default model)")
    e.add_argument("--ppl", default="ptb", help="ptb, a .txt file or a .jsonl file with a text field")
    e.add_argument("--split", default="test", help="PTB split: train, valid or test")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="evaluate the first N windows (--mt: segments) only")
    e.add_argument("--batch-size", type=int, default=1, help="windows (or, with --mt, segments) per forward")
    e.add_argument("--mt", metavar="PAIRS", help="translate the sources of a .tsv/.jsonl and score chrF and BLEU")
    e.add_argument("--output", help="with --mt: write the translations here, one per line")
    _translation_flags(e)
    e.set_defaults(func=cmd_eval)

    t = add("translate", "translate text with the fixed lowbit prompt (greedy or beam search)")
    t.add_argument("model", nargs="?", help="checkpoint, HF folder or .gguf file (default: the default model)")
    t.add_argument("--input", required=True, help="text file, one segment per line, or - for stdin")
    t.add_argument("--output", help="write the translations here (default: print them)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--beams", type=int, default=1, help="1: greedy")
    _translation_flags(t)
    t.set_defaults(func=cmd_translate)

    a = add("adapt", "teach a model a new language: calibrate, continue pre-training, fine-tune on pairs, evaluate")
    a.add_argument("model", nargs="?", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    a.add_argument("--out", required=True, help="run folder: every stage keeps its output here; reruns resume")
    a.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 2)")
    a.add_argument("--group-size", type=int, default=64)
    a.add_argument("--format", default="int", choices=["int", "nf", "nf4", "nf3", "nf2"])
    a.add_argument("--init", default="apiq-bw", choices=list(INITIALIZERS), help="LoRA start (apiq-bw: warm, 2 epochs)")
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--alpha", type=float, default=16.0)
    a.add_argument("--seed", type=int, default=0, help="quantization seed")
    _add_method_flags(a)
    a.add_argument("--mono", help="target-language .txt (default: the P3 Spanish Bible verses)")
    a.add_argument("--pairs", help="training pairs .tsv/.jsonl (default: the P3 Bible pairs)")
    a.add_argument("--test", help="test pairs .tsv/.jsonl (default: the P3 Bible test verses)")
    a.add_argument("--src", default="en")
    a.add_argument("--tgt", default="es")
    a.add_argument("--calib-windows", type=int, default=32)
    a.add_argument("--calib-seqlen", type=int, default=512)
    a.add_argument("--cpt-epochs", type=int, default=1)
    a.add_argument("--sft-epochs", type=int, default=1)
    a.add_argument("--lr", type=float, default=3e-4)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--micro-batch", type=int, default=8, help="examples per forward pass (divides --batch-size)")
    a.add_argument("--save-every", type=int, default=20, help="fine-tuning checkpoint every N steps (0: none)")
    a.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--test-limit", type=int, default=0, help="evaluate the first N test pairs (0: all)")
    a.set_defaults(func=cmd_adapt)

    i = add("info", "format and size of a lowbit checkpoint")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)

    k = add("cache", "list or clear the converted GGUF models (in $LOWBIT_CACHE or ~/.cache/lowbit)")
    k.add_argument("action", choices=["list", "clear"])
    k.set_defaults(func=cmd_cache)

    r = add("report", "per-block and per-layer activation error of checkpoints against the full-precision model")
    r.add_argument("dirs", nargs="+", help="lowbit checkpoints to compare")
    r.add_argument("--base", help="full-precision model (default: the source recorded in the checkpoints)")
    r.add_argument("--data", default="ptb", help="ptb, a .txt or a .jsonl file (held-out text)")
    r.add_argument("--split", default="valid", help="PTB split (valid: never used for calibration)")
    r.add_argument("--windows", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--out", help="write the report as JSON here")
    r.add_argument("--plot", help="write a PNG plot of error against depth here")
    r.set_defaults(func=cmd_report)

    g = add("generate", "greedy text generation")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    for p in (t, g, e, a):  # the commands that run a finished model (adapt: its evaluation)
        p.add_argument("--kernel", choices=list(KERNEL_NAMES),
                       help="run the quantized layers on this kernel wherever it applies (lowbit.kernels); "
                            "default: the fastest that applies -- W2-W4 layers decode on torch-int4 (PyTorch's int4 "
                            "matmul, bf16 inside; on the CPU 2.8-5x the reference's speed, perplexity within 0.7%%; "
                            "on an H100 3.3x triton-decode's at one row); "
                            "reference: float32 numerics everywhere")  # fmt: skip
    for p in (t, g):
        p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                       help="auto: bf16 on a CUDA GPU of the Ampere generation or later (embeddings, head, norms "
                            "and LoRA in bf16, bf16 autocast), float32 on the CPU")  # fmt: skip
        p.add_argument("--static-cache", action="store_true",
                       help="keep the KV cache in fixed-size buffers and decode greedily in lowbit's own loop, "
                            "which on a CUDA GPU runs each token as one replay of a CUDA graph (a minute or two of "
                            "warm-up for a 1B model, then several times faster; pays for long outputs and many "
                            "segments); the same greedy decoding, though attention over the fixed-size cache and "
                            "compiled kernels may round differently and flip a near tie (translate's beam search: "
                            "transformers' generate with a static cache)")  # fmt: skip
    for p in (q, f, x, e, t, a, r, g):  # every command that computes
        p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: CUDA when available)")
    for p in (q, x):  # the commands that calibrate
        p.add_argument("--act-budget", type=float, metavar="GIB",
                       help="device memory for calibration's activation streams; beyond it they stay in "
                            "(pinned) host RAM or --spill files (default: half the free GPU memory)")  # fmt: skip
    for p in (f, x, e, t, r, g):  # the commands that load lowbit checkpoints
        p.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's SHA-256 digests")
    return parser


def _translation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", default="en", help="source language code (en, es, fr, de, pt, it or a name)")
    p.add_argument("--tgt", default="es", help="target language code")
    p.add_argument("--shots", help="solved pairs (.tsv/.jsonl) put before each prompt (few-shot)")
    p.add_argument("--num-shots", type=int, default=5, help="how many of --shots to use")
    p.add_argument("--max-new-tokens", type=int, default=128)


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command left: resumable work in ``.OUT.partial``, or nothing at all."""
    from lowbit.fsutil import work_dir

    if args.command == "adapt":
        return f"the finished stages are kept in {args.out}: run the same command again to resume"
    for out in (getattr(args, name, None) for name in ("out", "requantize", "merged")):
        if out and work_dir(Path(out)).is_dir():
            return (f"{out} was not written; the finished work is kept in {work_dir(Path(out))}: run the same "
                    "command again to resume (or pass --overwrite to start over)")  # fmt: skip
    return "nothing was written"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("quantize", "adapt"):
        args.bits_given = args.bits is not None
        if args.bits is None:
            args.bits = 4 if args.command == "quantize" else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "no_verify", False):
        from lowbit.checkpoint import VERIFY_ENV

        os.environ[VERIFY_ENV] = "0"  # every checkpoint this command loads, however deep (and its worker processes)
    from lowbit.models import quiet_transformers

    quiet_transformers()
    try:
        if hasattr(args, "device"):  # a machine without the asked-for device fails here, before any loading
            args.device = resolve_device(args.device)
            prepare_deterministic(args.device)  # before any CUDA product: torch reads its variable once
        args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"lowbit: interrupted; {_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
