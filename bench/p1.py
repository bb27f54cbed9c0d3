"""Protocol P1 (../shared/BENCHMARK.md): quantization / initialization quality without fine-tuning.

Every row runs in its own subprocess, exactly as ``lowbit quantize`` does it: the default model streams block by
block from its safetensors folder into a real checkpoint (timed; peak RSS of that step), then the checkpoint is
loaded and its perplexity measured on two domains: PTB test (the first 64 windows of 512 tokens) and English Bible
text (the English WEB side of the P3 test and validation verses, concatenated, windows of 512). Calibration: 32
windows of 512 tokens from PTB train, seed 0, plus 4 held-out windows of the same draw on which the per-block error
is measured (they change no result: the method trains on the same 32); rows named ``...-calib-bible`` calibrate
on the English side of the P3 mono and train verses instead (disjoint from the Bible eval text), so a method that
only learns its calibration text shows it; rows named ``...-calib-self`` calibrate on 36 windows the full-precision
model samples itself from BOS at temperature 1 (``lowbit quantize --calib self``; data-free, the sampling time is
part of the row's quantize time); rows named ``...-calib-mix`` calibrate on 18 PTB windows and 18 self-sampled
ones, alternating (``lowbit quantize --calib ptb,self``), so the Bible column is a domain neither saw; rows named
``...-nudgeN`` calibrate (and evaluate) a copy of the model whose every weight is multiplied by 1 + 1e-6 N(0, 1)
with seed N: how far apart two equally valid runs land (on gpu_calib.py's random-init model a CUDA run lands as far
from a CPU run); rows named ``...val...`` hold the last 4 of the 32 windows back from the training steps and keep,
per block, the epoch with the lowest loss on them (``--val-windows 4``). LoRA r8/alpha16 on every block linear. The
Bible text needs pysword and the Debian SWORD module (``apt-get install sword-text-web``).

    python bench/p1.py                                  # all rows
    python bench/p1.py --rows fp32,rtn4,rtn3,rtn2,nf4 --results runs/demo/p1.json   # what `make demo` runs
    python bench/p1.py --rows wsvd-w2 --windows 8       # quick look (not the protocol: marked, not saved)

Results go to ``--results`` (default bench/results/p1.json, the published numbers; `make demo` writes to the
git-ignored runs/demo/p1.json instead), rows merged by name and saved after each row, so partial reruns update the
file; the markdown table fills in on stdout row by row while each row's progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import benchlib

if TYPE_CHECKING:
    import torch

RESULTS = benchlib.ROOT / "bench" / "results" / "p1.json"
SEQLEN = 512
EVAL_WINDOWS = 64
CALIB_WINDOWS = 32
CALIB_SEED = 0
HOLDOUT_WINDOWS = 4
BIBLE_EVAL_SPLITS = ("test", "valid")  # P3 verses whose English side is the Bible eval text
BIBLE_CALIB_SPLITS = ("mono", "train")  # the other P3 verses: Bible calibration text, disjoint from the eval text
# W2 rows also calibrated on the Bible, self-sampled text, and a mixture
CROSS_DOMAIN = ("gptq", "apiq-bw-gptq2", "apiq-bw-gptq2val", "blockap", "blockap-gptq")
PUBLISHED = {"epochs": 20, "clip_lr": 5e-3, "lora_lr": 5e-4, "weight_decay": 0.1, "batch": 1, "clip_init": 4.0}
WARM_EPOCHS = 2
VAL_WINDOWS = 4  # of the 32 calibration windows, held back from the steps of the ...val rows (they train on 28)
# W2 rows run again on copies of the model whose every weight is multiplied by 1 + NUDGE * N(0, 1) (a few float32
# ulps, whose one is 1.2e-7: the order of the difference between two BLAS libraries' sums, e.g. the CPU's and
# CUDA's): how far apart equally valid runs land, the yardstick for "same answer on both devices" (issue 13)
NUDGED = ("gptq", "apiq-bw-gptq2")
NUDGE = 1e-6
NUDGE_SEEDS = (1, 2, 3)


def _rows() -> dict[str, tuple[str, dict | None]]:
    """Row name -> (label, QuantConfig keyword arguments; None for the full-precision reference)."""
    rows: dict[str, tuple[str, dict | None]] = {"fp32": ("FP32 reference", None)}
    for b in (4, 3, 2):
        rows[f"rtn{b}"] = (f"RTN W{b}g64, QLoRA start (B = 0)", dict(bits=b, init="qlora"))
    rows["nf4"] = ("NF4 g64, QLoRA start (B = 0)", dict(bits=4, format="nf", init="qlora"))
    rows["bnb-nf4"] = ("peer: bitsandbytes NF4 Linear4bit, blocksize 64, double quant", {"peer": "bnb-nf4"})
    for b in (4, 3, 2):
        w = f"W{b}g64"
        rows[f"loftq1-w{b}"] = (f"LoftQ 1 iter {w}", dict(bits=b, init="loftq", options={"loftq_iters": 1}))
        rows[f"loftq5-w{b}"] = (f"LoftQ 5 iters {w}", dict(bits=b, init="loftq", options={"loftq_iters": 5}))
        rows[f"wsvd-w{b}"] = (f"wsvd closed form {w} (lowbit)", dict(bits=b, init="wsvd"))
        rows[f"gptq-w{b}"] = (f"GPTQ {w}, no adapter (lowbit)", dict(bits=b, init="gptq"))
        rows[f"apiq-lw-w{b}"] = (f"ApiQ-lw published {w}", dict(bits=b, init="apiq-lw", options=dict(PUBLISHED)))
        rows[f"apiq-bw-w{b}"] = (f"ApiQ-bw published {w}", dict(bits=b, init="apiq-bw", options=dict(PUBLISHED)))
        warm = {**PUBLISHED, "epochs": WARM_EPOCHS, "warm_start": "wsvd"}
        rows[f"apiq-bw-warm-w{b}"] = (f"ApiQ-bw wsvd start, {WARM_EPOCHS} epochs {w} (lowbit)",
                                      dict(bits=b, init="apiq-bw", options=warm))  # fmt: skip
        for epochs in (4, 6):
            options = {**warm, "epochs": epochs}
            rows[f"apiq-bw-warm{epochs}-w{b}"] = (f"ApiQ-bw wsvd start, {epochs} epochs {w} (lowbit)",
                                                  dict(bits=b, init="apiq-bw", options=options))  # fmt: skip
        for epochs in (0, 2, 4):  # GPTQ codes (fixed) + wsvd LoRA, then ApiQ-bw's block objective on the LoRA
            options = {**warm, "epochs": epochs, "warm_start": "gptq"}
            rows[f"apiq-bw-gptq{epochs}-w{b}"] = (f"ApiQ-bw GPTQ+wsvd start, {epochs} LoRA epochs {w} (lowbit)",
                                                  dict(bits=b, init="apiq-bw", options=options))  # fmt: skip
        options = {**warm, "warm_start": "gptq", "val_windows": VAL_WINDOWS}  # each block keeps its best epoch
        rows[f"apiq-bw-gptq2val-w{b}"] = (f"ApiQ-bw GPTQ+wsvd start, best of 2 LoRA epochs on {VAL_WINDOWS} "
                                          f"validation windows {w} (lowbit)", dict(bits=b, init="apiq-bw",
                                                                                  options=options))  # fmt: skip
        rows[f"blockap-w{b}"] = (f"Block-AP (EfficientQAT) min-max start, wsvd LoRA {w}", dict(bits=b, init="blockap"))
        rows[f"blockap-gptq-w{b}"] = (f"Block-AP (EfficientQAT) GPTQ start, wsvd LoRA {w}",
                                      dict(bits=b, init="blockap", options={"warm_start": "gptq"}))  # fmt: skip
    for name in NUDGED:
        label, kwargs = rows[f"{name}-w2"]
        for seed in NUDGE_SEEDS:
            rows[f"{name}-w2-nudge{seed}"] = (f"{label}, weights nudged by (1 + {NUDGE:g} N(0,1)), seed {seed}",
                                              {**kwargs, "nudge_seed": seed})  # fmt: skip
    for name in CROSS_DOMAIN:
        label, kwargs = rows[f"{name}-w2"]
        rows[f"{name}-w2-calib-bible"] = (f"{label}, calibrated on Bible text", {**kwargs, "calib": "bible"})
        rows[f"{name}-w2-calib-self"] = (f"{label}, self-calibrated (model-sampled text)", {**kwargs, "calib": "self"})
        rows[f"{name}-w2-calib-mix"] = (f"{label}, PTB + self-sampled mixture", {**kwargs, "calib": "ptb,self"})
    return rows


ROWS = _rows()


def bible_windows(tokenizer, splits: tuple[str, ...], limit: int | None = None) -> torch.Tensor:
    """Windows of 512 tokens of the English WEB text of the P3 verses in ``splits``, concatenated in split order."""
    from lowbit.data import bos_id, tokenize, windows
    from lowbit.parallel import MODULES, p3_split, verse

    split = p3_split()
    text = "\n".join(verse(MODULES["en"], ref) for s in splits for ref in split[s])
    wins = windows(tokenize(text, tokenizer), SEQLEN, bos_id(tokenizer))
    return wins[:limit] if limit else wins


def run_row(name: str, windows: int, keep: Path | None = None, bible_column: bool = True) -> dict:
    """Run one row in this process and return its measurements; ``keep`` keeps the checkpoint as ``keep/name``."""
    import torch

    import lowbit
    from lowbit.calibrate import calibrate
    from lowbit.config import INITIALIZERS
    from lowbit.data import calib_sources, calibration_windows, text_windows
    from lowbit.engine import EngineOptions
    from lowbit.errors import LowbitError
    from lowbit.evaluate import perplexity
    from lowbit.models import load_tokenizer, quiet_transformers, resolve_model_path
    from lowbit.selfcal import self_calibration

    quiet_transformers()
    torch.manual_seed(0)
    label, kwargs = ROWS[name]
    kwargs = None if kwargs is None else dict(kwargs)
    calib_source = "ptb" if kwargs is None else kwargs.pop("calib", "ptb")
    nudge_seed = None if kwargs is None else kwargs.pop("nudge_seed", None)
    folder = resolve_model_path(None)
    tokenizer = load_tokenizer(folder)
    row: dict = {"row": name, "label": label}
    bible = None
    bible_calib = "bible" in calib_sources(calib_source)
    if bible_column or bible_calib:
        try:
            bible = bible_windows(tokenizer, BIBLE_EVAL_SPLITS, limit=windows)
        except LowbitError as exc:
            if bible_calib:  # the row is about Bible text: without it, one line and no work done
                raise
            # a first run needs no Debian package: the Bible column is left empty, and said so
            print(f"[p1] {name}: no Bible perplexity ({exc})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if kwargs is None:
            model, _ = lowbit.load_model(folder)
            row.update(seconds=None, peak_rss_mb=None, bits_per_weight=32.0, lora_params=0)
        elif "peer" in kwargs:
            model, _ = lowbit.load_model(folder)
            start = time.perf_counter()
            bits = bnb_nf4(model)
            row.update(seconds=round(time.perf_counter() - start, 2), peak_rss_mb=round(benchlib.peak_rss_mb(), 1),
                       bits_per_weight=round(bits, 4), lora_params=0)  # fmt: skip
        else:
            config = lowbit.QuantConfig(group_size=64, rank=8, alpha=16.0, seed=CALIB_SEED, **kwargs)
            calib = None
            if INITIALIZERS[config.init].needs_data:
                sources = calib_sources(calib_source)
                start = time.perf_counter()

                def sample_self(count: int) -> torch.Tensor:  # timed with the row
                    fp, _ = lowbit.load_model(folder)
                    return self_calibration(fp, tokenizer, count, SEQLEN, CALIB_SEED, progress=sys.stderr.isatty())

                # one draw: its first CALIB_WINDOWS are the windows P1 always trained on, the rest held out
                calib = calibration_windows(
                    calib_source,
                    tokenizer,
                    CALIB_WINDOWS + HOLDOUT_WINDOWS,
                    SEQLEN,
                    CALIB_SEED,
                    sample_self,
                    {"bible": lambda: bible_windows(tokenizer, BIBLE_CALIB_SPLITS)},
                )
                if "self" in sources:
                    row["calib_seconds"] = round(time.perf_counter() - start, 2)
                    config.options.update(calib_temperature=1.0)
                config.options.update(calib=calib_source, holdout_windows=HOLDOUT_WINDOWS)
            row["calib"] = calib_source if calib is not None else None
            source = folder
            if nudge_seed is not None:  # untimed: a copy of the model to calibrate, not part of the method
                source = nudged_copy(folder, Path(tmp) / "nudged", NUDGE, nudge_seed)
                row.update(nudge=NUDGE, nudge_seed=nudge_seed)
            start = time.perf_counter() - row.get("calib_seconds", 0.0)
            ckpt = keep / name if keep else Path(tmp) / "ckpt"
            summary = calibrate(source, config, ckpt, calib, tokenizer, overwrite=True,
                                engine=EngineOptions(progress=sys.stderr.isatty()))  # fmt: skip
            row["seconds"] = round(time.perf_counter() - start, 2)
            row["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
            info = lowbit.info(ckpt)
            row.update(bits_per_weight=round(info["bits_per_weight"], 4), lora_params=info["lora_params"],
                       config=config.to_dict(), blocks=summary["blocks"])  # fmt: skip
            model, _ = lowbit.load(ckpt)
        wins = text_windows("ptb", tokenizer, SEQLEN, split="test", limit=windows)
        start = time.perf_counter()
        result = perplexity(model, wins)  # progress (with the running perplexity) on stderr
        row.update(ppl=round(result.ppl, 3), eval_tokens=result.tokens, eval_windows=int(wins.shape[0]),
                   eval_seconds=round(time.perf_counter() - start, 1))  # fmt: skip
        if bible is not None:
            result = perplexity(model, bible)
            row.update(bible_ppl=round(result.ppl, 3), bible_eval_tokens=result.tokens,
                       bible_eval_windows=int(bible.shape[0]))  # fmt: skip
    return row


def nudged_copy(folder: Path, out: Path, nudge: float, seed: int) -> Path:
    """Copy the model folder to ``out`` with every floating-point weight multiplied by ``1 + nudge * N(0, 1)``
    (seeded): a model a last-bits difference away from the default one, as valid a start as it, whose rows show
    how far apart two equally valid runs of a method land."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    g = torch.Generator().manual_seed(seed)
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        for key in sorted(tensors):
            t = tensors[key]
            if t.is_floating_point():
                tensors[key] = t * (1 + nudge * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return out


def bnb_nf4(model) -> float:
    """Replace every block linear by bitsandbytes' ``Linear4bit`` (NF4, blocksize 64, QLoRA's double quantization,
    float32 compute) in place; returns the stored bits per quantized weight (codes + all quantization state)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        sys.exit("the bitsandbytes peer rows need bitsandbytes: pip install -e '.[bench]' (or leave out those rows)")
    import torch

    from lowbit.arch import target_linears
    from lowbit.layers import set_module

    stored, weights = 0, 0
    for name, linear in target_linears(model).items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=64,
                                         compress_statistics=True)  # fmt: skip
        if linear.bias is not None:
            layer.bias = linear.bias
        layer = layer.to("cpu")  # quantizes
        state = layer.weight.quant_state
        stored += (
            layer.weight.numel() * layer.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
        )
        if state.state2 is not None:
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the fp32 offset
        weights += linear.weight.numel()
        set_module(model, name, layer)
    return 8 * stored / weights


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


HEADER = ("| method | calib | PTB-test ppl | Bible ppl | quantize s | peak RSS MiB | bits/weight |\n"
          "|---|---|---:|---:|---:|---:|---:|")  # fmt: skip


CALIB_NAMES = {"ptb": "PTB", "bible": "Bible", "self": "self (model-sampled)", "ptb,self": "PTB + self", None: "—"}


def table_row(r: dict) -> str:
    """One row; rows measured before the Bible column (all calibrated on PTB) show a dash for its perplexity."""
    from lowbit.config import INITIALIZERS

    calib = r.get("calib", "ptb" if r.get("config") and INITIALIZERS[r["config"]["init"]].needs_data else None)
    return (f"| {r['label']} | {CALIB_NAMES[calib]} | {r['ppl']:.2f} | {_cell(r.get('bible_ppl'), '.2f')} | "
            f"{_cell(r['seconds'], '.1f')} | {_cell(r['peak_rss_mb'], '.0f')} | "
            f"{r['bits_per_weight']:.3f} |")  # fmt: skip


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *map(table_row, rows)])


def measure(name: str, windows: int, keep: Path | None, bible_column: bool = True) -> dict:
    """Run one row in a fresh process (its own peak RSS and timing); its progress goes straight to stderr."""
    cmd = [sys.executable, __file__, "--worker", name, "--windows", str(windows)]
    cmd += ["--keep", str(keep)] if keep else []
    cmd += [] if bible_column else ["--no-bible"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        sys.exit(f"p1.py: error: row {name} failed (exit {proc.returncode}); see the messages above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="PTB-test windows (P1: 64)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the stored results as one table and exit")
    parser.add_argument("--keep", type=Path, help="keep each row's checkpoint in KEEP/ROW (P2 starts from them)")
    parser.add_argument("--no-save", action="store_true", help="do not update the --results file")
    parser.add_argument("--no-bible", action="store_true", help="leave the Bible column empty (halves each row's "
                        "evaluation: `make demo` shows its first row in about 1.5 minutes)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file the rows are merged into "
                        "(default: the published bench/results/p1.json)")  # fmt: skip
    args = parser.parse_args(argv)

    if args.table:
        print(benchlib.stored_table(args.results, list(ROWS), table))
        return
    if args.worker:
        from lowbit.errors import LowbitError

        try:
            print(json.dumps(run_row(args.worker, args.windows, args.keep, not args.no_bible)))
        except LowbitError as exc:  # e.g. no pysword / SWORD module for the Bible text: one line, not a traceback
            sys.exit(f"p1.py: error: row {args.worker}: {exc}")
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"p1.py: error: unknown rows {unknown}: choose from {', '.join(ROWS)}")

    env = benchlib.environment()
    save_rows = not args.no_save and args.windows == EVAL_WINDOWS
    protocol = "P1" if args.windows == EVAL_WINDOWS else f"P1 with {args.windows} eval windows (not the protocol)"
    print(f"{protocol}: SmolLM2-135M-Instruct, float32 on CPU, PTB test and P3 Bible test+valid (English), first "
          f"{args.windows} x {SEQLEN} tokens each, "
          f"LoRA r8/a16 on all block linears; {len(names)} rows, each in its own process\n\n{HEADER}",
          flush=True)  # fmt: skip
    for name in names:
        print(f"[p1] {name}: {ROWS[name][0]} ...", file=sys.stderr, flush=True)
        row = measure(name, args.windows, args.keep, not args.no_bible)
        print(table_row(row), flush=True)
        if save_rows:  # after every row: an interrupted run keeps the rows it finished
            benchlib.save_rows(args.results, [row], env, "P1")
    print(f"\n{env['date']}, commit {env['commit']}, {env['machine']['cpu']} ({env['machine']['cores']} cores), "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}")  # fmt: skip
    if save_rows:
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
