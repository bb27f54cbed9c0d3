"""The ``lowbit`` command line: quantize, eval, info, generate.

Every command accepts ``--json`` and then prints exactly one JSON object on stdout (progress bars and logs go to
stderr). A user mistake prints one line, ``lowbit: error: <what is wrong and how to fix it>``, and exits with
status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from lowbit.errors import LowbitError

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


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from lowbit.api import QuantConfig, quantize
    from lowbit.checkpoint import save_checkpoint
    from lowbit.fsutil import check_output_dir
    from lowbit.models import load_model, resolve_model_path

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
    )
    protected = (Path(args.model),) if args.model else ()
    check_output_dir(Path(args.out), args.overwrite, protected)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    source = resolve_model_path(args.model)
    check_output_dir(Path(args.out), args.overwrite, (source,))
    model, tokenizer = load_model(source)
    if getattr(model, "lowbit_config", None) is not None:
        raise LowbitError(f"{args.model} is already a lowbit checkpoint: quantize the full-precision model instead")
    quantize(model, config, progress=not args.json)
    save_checkpoint(model, args.out, tokenizer, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    result = {
        "out": str(args.out),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **config.to_dict(),
    }
    _emit(
        args,
        result,
        [
            f"wrote {args.out} ({config.spec.name}, init {config.init}) in {seconds:.1f} s, "
            f"peak RSS {_peak_rss_mb():.0f} MiB"
        ],
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from lowbit.data import text_windows
    from lowbit.evaluate import perplexity
    from lowbit.models import load_model

    model, tokenizer = load_model(args.model)
    wins = text_windows(args.ppl, tokenizer, args.seqlen, split=args.split, limit=args.windows)
    start = time.perf_counter()
    result = perplexity(model, wins, batch_size=args.batch_size, progress=not args.json)
    seconds = time.perf_counter() - start
    out = {
        "ppl": result.ppl,
        "nll": result.nll,
        "tokens": result.tokens,
        "windows": int(wins.shape[0]),
        "seqlen": args.seqlen,
        "data": args.ppl if args.ppl != "ptb" else f"ptb-{args.split}",
        "model": str(args.model) if args.model else "default",
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
    _emit(args, info, lines)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from lowbit.models import load_model

    model, tokenizer = load_model(args.model)
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
    inputs = tokenizer(text, return_tensors="pt")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    new = out[0, inputs["input_ids"].shape[1] :]
    completion = tokenizer.decode(new, skip_special_tokens=True)
    _emit(args, {"prompt": args.prompt, "completion": completion, "new_tokens": int(new.numel())}, [completion])


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
    q.add_argument("--init", default="qlora", choices=["none", "qlora"], help="LoRA start: none, or qlora (B = 0)")
    q.add_argument("--rank", type=int, default=8, help="LoRA rank")
    q.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="output checkpoint folder")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=cmd_quantize)

    e = add("eval", "perplexity of a model or checkpoint")
    e.add_argument("model", nargs="?", help="checkpoint, HF folder or .gguf file (default: the default model)")
    e.add_argument("--ppl", default="ptb", help="ptb, a .txt file or a .jsonl file with a text field")
    e.add_argument("--split", default="test", help="PTB split: train, valid or test")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="evaluate the first N windows only")
    e.add_argument("--batch-size", type=int, default=1)
    e.set_defaults(func=cmd_eval)

    i = add("info", "format and size of a lowbit checkpoint")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)

    g = add("generate", "greedy text generation")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quantize":
        args.bits_given = args.bits is not None
        args.bits = 4 if args.bits is None else args.bits
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lowbit.models import quiet_transformers

    quiet_transformers()
    try:
        args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
