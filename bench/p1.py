"""Protocol P1 (../shared/BENCHMARK.md): quantization / initialization quality without fine-tuning.

For each row: load the default model in float32 on the CPU, run the quantize/initialize step (timed, peak RSS),
save a real checkpoint (bits per quantized weight from its files), and measure PTB-test perplexity over the first
64 windows of 512 tokens. Every row runs in its own subprocess so its peak RSS is its own.

    python bench/p1.py                                  # all rows
    python bench/p1.py --rows fp32,rtn4,rtn3,rtn2,nf4   # what `make demo` runs
    python bench/p1.py --rows rtn2 --windows 8          # quick look (not the protocol: marked in the output)

Results go to bench/results/p1.json (rows merged by name, so partial reruns update the file) and a markdown table
on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RESULTS = benchlib.ROOT / "bench" / "results" / "p1.json"
SEQLEN = 512
EVAL_WINDOWS = 64
CALIB_WINDOWS = 32
CALIB_SEED = 0

# name -> (label, QuantConfig keyword arguments or None for the full-precision reference)
ROWS: dict[str, tuple[str, dict | None]] = {
    "fp32": ("FP32 reference", None),
    "rtn4": ("RTN W4g64 (B = 0)", dict(bits=4, init="qlora")),
    "rtn3": ("RTN W3g64 (B = 0)", dict(bits=3, init="qlora")),
    "rtn2": ("RTN W2g64 (B = 0)", dict(bits=2, init="qlora")),
    "nf4": ("NF4 g64, QLoRA start (B = 0)", dict(bits=4, format="nf", init="qlora")),
}


def run_row(name: str, windows: int) -> dict:
    """Run one row in this process and return its measurements."""
    import torch

    import lowbit
    from lowbit.data import text_windows
    from lowbit.evaluate import perplexity
    from lowbit.models import quiet_transformers

    quiet_transformers()

    torch.manual_seed(0)
    label, kwargs = ROWS[name]
    model, tokenizer = lowbit.load_model()
    row: dict = {"row": name, "label": label}
    if kwargs is None:
        row.update(seconds=0.0, peak_rss_mb=round(benchlib.peak_rss_mb(), 1), bits_per_weight=32.0, lora_params=0)
    else:
        config = lowbit.QuantConfig(group_size=64, rank=8, alpha=16.0, seed=CALIB_SEED, **kwargs)
        start = time.perf_counter()
        lowbit.quantize(model, config, progress=False)
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
        with tempfile.TemporaryDirectory() as tmp:
            info = lowbit.info(lowbit.save(model, Path(tmp) / "ckpt"))
        row.update(
            bits_per_weight=round(info["bits_per_weight"], 4), lora_params=info["lora_params"], config=config.to_dict()
        )
    wins = text_windows("ptb", tokenizer, SEQLEN, split="test", limit=windows)
    start = time.perf_counter()
    result = perplexity(model, wins, progress=False)
    row.update(
        ppl=round(result.ppl, 3),
        eval_tokens=result.tokens,
        eval_windows=int(wins.shape[0]),
        eval_seconds=round(time.perf_counter() - start, 1),
    )
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| method | PTB-test ppl | quantize s | peak RSS MiB | bits/weight |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['ppl']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['bits_per_weight']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="PTB-test windows (P1: 64)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="do not update bench/results/p1.json")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_row(args.worker, args.windows)))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"p1.py: error: unknown rows {unknown}: choose from {', '.join(ROWS)}")

    env = benchlib.environment()
    rows = []
    for name in names:
        print(f"[p1] {name}: {ROWS[name][0]} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--windows", str(args.windows)],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.exit(f"p1.py: error: row {name} failed (exit {proc.returncode}); see the messages above")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"[p1] {name}: ppl {row['ppl']:.2f}, {row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)

    protocol = "P1" if args.windows == EVAL_WINDOWS else f"P1 with {args.windows} eval windows (not the protocol)"
    print(
        f"\n{protocol}: SmolLM2-135M-Instruct, float32 on CPU, PTB test first {args.windows} x {SEQLEN} tokens, "
        f"LoRA r8/a16 on all block linears\n"
    )
    print(table(rows))
    print(
        f"\n{env['date']}, commit {env['commit']}, {env['machine']['cpu']} ({env['machine']['cores']} cores), "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}"
    )
    if args.no_save or args.windows != EVAL_WINDOWS:
        return
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    previous["rows"].update({r["row"]: {**r, "env": env} for r in rows})
    previous["protocol"] = "P1"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(previous, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(f"wrote {RESULTS.relative_to(benchlib.ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
