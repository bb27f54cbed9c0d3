"""Protocol P2 (../shared/BENCHMARK.md): LoRA fine-tuning from each P1 start, against PEFT peers.

Training: 128 windows of 256 tokens from PTB train drawn with seed 1, one epoch, effective batch 4 (32 steps;
micro-batch 1 with 4 accumulation steps by default, ``--micro-batch 4`` does one forward per step for every row),
AdamW lr 3e-4, weight decay 0.1, cosine schedule with 3% warm-up, only LoRA r8/alpha16 trainable. Every row then
measures PTB-test perplexity over the first 64 windows of 512 tokens.

Rows (each in its own subprocess, so peak RSS is the row's own):

- ``fp-lora``: PEFT LoRA on the full-precision model (the quality ceiling);
- ``bnb-qlora``: PEFT LoRA on bitsandbytes NF4 ``Linear4bit`` (blocksize 64, double quantization): the peer;
- ``lowbit-{qlora,loftq,apiq,apiq-gptq,gptq}-w{4,3,2}``: ``lowbit.finetune`` on the packed checkpoint from P1's
  start of that name (``rtnB``, ``loftq1-wB`` -- PEFT's default of one LoftQ iteration -- ``apiq-bw-warm-wB``,
  ``apiq-bw-gptq2-wB``, P1's best, and ``gptq-wB``). ``gptq`` is GPTQ-LoRA, the strongest simple start: P1's
  adapter-free GPTQ codes, to which ``lowbit.finetune`` adds the QLoRA adapter start (A Kaiming-uniform, B = 0),
  so "the start matters after fine-tuning" is tested against better codes and not only against RTN and LoftQ.
  Starts are made once with ``bench/p1.py --keep`` into ``bench/.starts`` and reused. The trained checkpoint is
  kept in ``bench/.p2/ROW``;
- ``lowbit-qlora-w4-compiled``: ``lowbit-qlora-w4`` with ``finetune --compile`` (torch.compile of forward and
  backward; ``steady_tokens_per_s``, which every lowbit row records, leaves out the first two steps and with them
  the compilation);
- ``lowbit-...-requant``: that trained row merged and re-quantized to the same format with no adapter
  (``lowbit export --requantize``: GPTQ on 32 PTB-train windows), perplexity only;
- ``fp-{pafi,hiwi}`` and ``lowbit-{qlora-w4,apiq-gptq-w2}-{pafi,hiwi}``: ``lowbit finetune --method pafi|hiwi`` on the
  full-precision model (its output is the merged plain model) or from that start, at the
  LoRA rows' number of trainable parameters (PaFi: the fraction ``lora_params / quantized_params`` of each layer;
  HiWi: the bottleneck width whose ``2 * in * dim`` per layer comes nearest), the start's LoRA frozen in the base.

Every lowbit row and ``fp-lora`` also record the trained parameters, the size of the trained adapter's files, and
CPU forward latency (median of 5 calls, one 512-token window and one single-token step without cache) of the model
as trained and as deployed: on a low-bit base, the same packed layers with every adapter removed, which is what
``export --requantize`` gives for PaFi and HiWi (and for LoRA after its merge) -- the latency depends on shapes,
not values; on full precision, the merged plain model (PEFT's ``merge_and_unload`` for LoRA).

The peers train with the same data order, loss normalization, optimizer and schedule as ``lowbit.finetune``
(the functions are imported from it), so tokens per second compare the layers, not the loops. Peak RSS is
measured over the training step only (VmHWM reset just before it), and over the whole row.

    python bench/p2.py --rows bnb-qlora,lowbit-qlora-w4     # the throughput comparison
    python bench/p2.py                                      # every row

Results merge into bench/results/p2.json by row name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RESULTS = benchlib.ROOT / "bench" / "results" / "p2.json"
STARTS = benchlib.ROOT / "bench" / ".starts"
TRAINED = benchlib.ROOT / "bench" / ".p2"  # trained lowbit rows, kept for their -requant rows
EVAL_WINDOWS = 64
EVAL_SEQLEN = 512
START_ROWS = {"qlora": "rtn{b}", "loftq": "loftq1-w{b}", "apiq": "apiq-bw-warm-w{b}", "apiq-gptq": "apiq-bw-gptq2-w{b}",
              "gptq": "gptq-w{b}"}  # fmt: skip
WEIGHT_METHODS = ("pafi", "hiwi")  # issue 16: fine-tuning that merges into the weights, beside LoRA
WEIGHT_METHOD_STARTS = ("qlora-w4", "apiq-gptq-w2")


def _rows() -> dict[str, str]:
    rows = {"fp-lora": "full-precision LoRA (PEFT)", "bnb-qlora": "peer: PEFT + bitsandbytes NF4 QLoRA"}
    for b in (4, 3, 2):
        for start, p1_row in START_ROWS.items():
            rows[f"lowbit-{start}-w{b}"] = f"lowbit W{b}g64 from the {start} start ({p1_row.format(b=b)})"
            rows[f"lowbit-{start}-w{b}-requant"] = (f"lowbit W{b}g64 {start} start, trained, merged and re-quantized "
                                                    f"to W{b}g64 (no adapter)")  # fmt: skip
    rows["lowbit-qlora-w4-compiled"] = "lowbit W4g64 from the qlora start (rtn4), finetune --compile"
    for method in WEIGHT_METHODS:
        rows[f"fp-{method}"] = f"full precision, lowbit {method} (LoRA's size)"
    for start in WEIGHT_METHOD_STARTS:
        for method in WEIGHT_METHODS:
            kind, bits = start.rsplit("-", 1)
            rows[f"lowbit-{start}-{method}"] = f"lowbit {bits.upper()}g64 from the {kind} start, {method} (LoRA's size)"
    return rows


ROWS = _rows()


def start_checkpoint(name: str) -> Path:
    """The P1 start checkpoint of a lowbit row, made with ``bench/p1.py --keep`` when missing."""
    start, bits = (name.removeprefix("lowbit-").removesuffix("-compiled").removesuffix("-pafi").removesuffix("-hiwi")
                   .rsplit("-w", 1))  # fmt: skip
    p1_row = START_ROWS[start].format(b=bits)
    folder = STARTS / p1_row
    if not (folder / "config.json").is_file():
        print(f"[p2] making the start {p1_row} with bench/p1.py ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(Path(__file__).with_name("p1.py")), "--rows", p1_row, "--keep", str(STARTS)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def weight_method_config(name: str, base: Path, config):
    """The TrainConfig of a pafi/hiwi row: ``config`` with that method, at LoRA r8's parameter count on ``base``'s
    layers (PaFi: that count over the layers' weights, as each layer's fraction; HiWi: the nearest width)."""
    import lowbit
    from lowbit.arch import target_linears
    from lowbit.layers import quant_layers

    method = name.rsplit("-", 1)[1]
    model, _ = lowbit.load_model(base)
    shapes = [(m.out_features, m.in_features) for m in (quant_layers(model) or target_linears(model)).values()]
    lora = sum(8 * (o + i) for o, i in shapes)
    if method == "pafi":
        return dataclasses.replace(config, method=method, pafi_fraction=lora / sum(o * i for o, i in shapes))
    return dataclasses.replace(config, method=method, hiwi_dim=max(1, round(lora / sum(2 * i for _, i in shapes))))


def trained_adapter(folder: Path) -> tuple[int, int]:
    """The trained adapter's parameter count and bytes on disk in a finished row's ``folder``: the PaFi/HiWi files
    where there are some (a frozen LoRA start beside them is part of the base), else the LoRA adapter's."""
    from safetensors import safe_open

    files = sorted(folder.glob("weight_adapter.*")) or sorted(folder.glob("adapter_*"))
    params = 0
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:  # PaFi's index is its fixed mask, not trained
                names = [k for k in st.keys() if not k.endswith(".index")]  # noqa: SIM118 (safe_open: no __iter__)
                params += sum(math.prod(st.get_slice(k).get_shape()) for k in names)
    return params, sum(f.stat().st_size for f in files)


def forward_ms(model, ids) -> float:
    """Median wall time of 5 no-grad forwards of ``ids [1, seq]`` (after one warm-up), in milliseconds."""
    import statistics

    import torch

    times = []
    with torch.no_grad():
        for i in range(6):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if i:
                times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def latency(form: str, model, window) -> dict:
    """Forward latency of ``model`` (``form``: as trained or as deployed): one window, and one single-token step."""
    ids = window[None]
    return {f"forward_ms_{form}": forward_ms(model, ids), f"step_ms_{form}": forward_ms(model, ids[:, :1])}


def without_adapters(model):
    """``model`` (a lowbit model) with every adapter removed: the layers of what ``export --requantize`` deploys
    for PaFi and HiWi, and for LoRA after its merge (latency depends on the shapes, not the values)."""
    from lowbit.layers import quant_layers

    for m in quant_layers(model).values():
        m.lora_A = m.lora_B = None
        m.adapter = None
    return model


def peft_train(model, tokenizer, config) -> dict:
    """LoRA training of a PEFT model with exactly lowbit.finetune's data order, loss, optimizer and schedule."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from lowbit.data import collate
    from lowbit.finetune import epoch_order, targets, token_nll, training_examples

    examples, _ = training_examples(config, tokenizer)
    steps = len(examples) // config.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup * steps), steps)
    torch.manual_seed(config.seed * 1_000_003)
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, tokens, seconds = [], 0, 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        order = epoch_order(len(examples), config.seed, 0)
        batch = [examples[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]]
        n = sum(targets(e) for e in batch)
        total = 0.0
        for m in range(0, len(batch), config.micro_batch):
            ids, mask, labels = collate(batch[m : m + config.micro_batch], pad)
            nll = token_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
            (nll / n).backward()
            total += nll.item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / n)
        tokens += sum(int(e.ids.numel()) for e in batch)
        seconds += time.perf_counter() - t0
    model.eval()
    return {"losses": losses, "final_loss": losses[-1], "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": tokens / seconds}  # fmt: skip


def peft_model(name: str, folder: Path):
    from peft import LoraConfig, get_peft_model

    import lowbit
    from lowbit.arch import target_linears

    model, tokenizer = lowbit.load_model(folder)
    modules = sorted({n.rsplit(".", 1)[-1] for n in target_linears(model)})
    bits = 32.0
    if name == "bnb-qlora":
        sys.path.insert(0, str(Path(__file__).parent))
        from p1 import bnb_nf4

        bits = bnb_nf4(model)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer, bits


def run_row(name: str, eval_windows: int, micro_batch: int = 1) -> dict:
    import torch

    import lowbit
    from lowbit.data import text_windows
    from lowbit.evaluate import perplexity
    from lowbit.finetune import TrainConfig, finetune
    from lowbit.models import quiet_transformers, resolve_model_path

    quiet_transformers()
    torch.manual_seed(0)
    config = TrainConfig(samples=benchlib.P2_SAMPLES, micro_batch=micro_batch)
    row: dict = {"row": name, "label": ROWS[name], "train_config": config.__dict__}
    with tempfile.TemporaryDirectory() as tmp:
        if name.endswith("-requant"):
            return requant_row(name, row, Path(tmp), eval_windows)
        if name.startswith("lowbit-"):
            start = start_checkpoint(name)
            if name.endswith(WEIGHT_METHODS):
                config = weight_method_config(name, start, config)
                row["train_config"] = config.__dict__
            if name.endswith("-compiled"):
                config = dataclasses.replace(config, compile=True)
                row["train_config"] = config.__dict__
            benchlib.reset_peak_rss()
            result = finetune(start, TRAINED / name, config, overwrite=True, progress=sys.stderr.isatty())
            row["train_peak_rss_mb"] = round(benchlib.peak_rss_since_reset_mb(), 1)
            row["steady_tokens_per_s"] = steady_speed(TRAINED / name / "metrics.jsonl")
            model, tokenizer = lowbit.load(TRAINED / name)
            row["bits_per_weight"] = round(lowbit.info(start)["bits_per_weight"], 4)
            row["start"] = str(start.relative_to(benchlib.ROOT))
            trained_form = model
            deployed = lambda: without_adapters(lowbit.load(TRAINED / name)[0])  # noqa: E731
        elif name.startswith("fp-") and name.endswith(WEIGHT_METHODS):
            fp = resolve_model_path(None)
            config = weight_method_config(name, fp, config)
            row["train_config"] = config.__dict__
            benchlib.reset_peak_rss()
            result = finetune(fp, TRAINED / name, config, overwrite=True, progress=sys.stderr.isatty())
            row["train_peak_rss_mb"] = round(benchlib.peak_rss_since_reset_mb(), 1)
            model, tokenizer = lowbit.load_model(TRAINED / name)  # the merged plain model: what is deployed
            row["bits_per_weight"] = 32.0
            row["start"] = "full precision"
            merged = model
            deployed = lambda: merged  # noqa: E731
            trained_form = fp_training_form(fp, config)
        else:
            model, tokenizer, bits = peft_model(name, resolve_model_path(None))
            benchlib.reset_peak_rss()
            result = peft_train(model, tokenizer, config)
            row["train_peak_rss_mb"] = round(benchlib.peak_rss_since_reset_mb(), 1)
            row["bits_per_weight"] = round(bits, 4)
            row["start"] = "full precision" if name == "fp-lora" else "bitsandbytes NF4"
            trained_form, deployed = model, model.merge_and_unload  # PEFT merges in place: measured last
        row["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
        row.update({k: result[k] for k in ("final_loss", "tokens", "seconds", "tokens_per_s", "losses")})
        wins = text_windows("ptb", tokenizer, EVAL_SEQLEN, split="test", limit=eval_windows)
        row["ppl"] = round(perplexity(model, wins, progress=False).ppl, 3)
        if name.startswith(("lowbit-", "fp-")):
            if (TRAINED / name).is_dir():
                row["trainable_params"], row["adapter_bytes"] = trained_adapter(TRAINED / name)
            else:  # PEFT's LoRA: counted in memory, saved as PEFT saves it
                row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                model.save_pretrained(Path(tmp) / "adapter")
                row["adapter_bytes"] = sum(f.stat().st_size for f in (Path(tmp) / "adapter").iterdir())
            row.update(latency("trained", trained_form, wins[0]))
            row.update(latency("deployed", deployed(), wins[0]))
    return row


def steady_speed(log: Path, skip: int = 2) -> float:
    """Tokens/s after the first ``skip`` steps, from a run's metrics log (cumulative tokens and seconds a step):
    the pace once compilation (``--compile``: in the first step) and warm-up are over."""
    steps = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line and '"tokens"' in line]
    first, last = steps[skip - 1], steps[-1]
    return round((last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"]), 1)


def fp_training_form(fp: Path, config):
    """The full-precision model with a fresh adapter of ``config``'s shapes: the form a pafi/hiwi row trains in
    (its saved output is merged), for the forward latency as trained, which depends on the shapes only."""
    from lowbit.finetune import ensure_adapter, load_base

    model, _ = load_base(fp, config)
    ensure_adapter(model, config)
    return model


def requant_row(name: str, row: dict, tmp: Path, eval_windows: int) -> dict:
    """Merge a trained row's adapter and re-quantize (``lowbit export --requantize``: GPTQ, 32 PTB-train windows of
    512 tokens, seed 0), then measure its perplexity like the other rows."""
    import lowbit
    from lowbit.data import sample_windows, text_windows
    from lowbit.evaluate import perplexity
    from lowbit.export import export_requantized

    trained = TRAINED / name.removesuffix("-requant")
    if not (trained / "config.json").is_file():
        sys.exit(f"p2.py: error: row {name} needs the trained row {trained.name}: run it first")
    bits = int(name.removesuffix("-requant").rsplit("-w", 1)[1])
    config = lowbit.QuantConfig(bits=bits, group_size=64, init="gptq", seed=0)
    _, tokenizer = lowbit.load(trained)
    calib = sample_windows(text_windows("ptb", tokenizer, EVAL_SEQLEN, split="train"), 32, 0)
    start = time.perf_counter()
    export_requantized(trained, tmp / "rq", config, calib, progress=sys.stderr.isatty())
    row["export_seconds"] = round(time.perf_counter() - start, 1)
    model, tokenizer = lowbit.load(tmp / "rq")
    info = lowbit.info(tmp / "rq")
    row.update(bits_per_weight=round(info["bits_per_weight"], 4), lora_params=info["lora_params"])
    row["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
    wins = text_windows("ptb", tokenizer, EVAL_SEQLEN, split="test", limit=eval_windows)
    row["ppl"] = round(perplexity(model, wins, progress=False).ppl, 3)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | PTB-test ppl after P2 | train tokens/s | train peak RSS MiB | bits/weight |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "tokens_per_s" not in r:  # a re-quantized export: no training of its own
            lines.append(f"| {r['label']} | {r['ppl']:.2f} | — | — | {r['bits_per_weight']:.3f} |")
            continue
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['tokens_per_s']:.0f} | {r['train_peak_rss_mb']:.0f} | "
                     f"{r['bits_per_weight']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def methods_table(rows: list[dict]) -> str:
    """Issue 16's comparison: LoRA, PaFi and HiWi from the same starts at (about) the same trainable parameters."""
    lines = ["| start | method | trainable params | PTB-test ppl after P2 | train tokens/s | train peak RSS MiB | "
             "adapter on disk KiB | forward ms as trained | forward ms deployed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "trainable_params" not in r:
            continue
        start = r["start"].rsplit("/", 1)[-1]
        lines.append(f"| {start} | {r['train_config']['method']} | {r['trainable_params']:,} | {r['ppl']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['train_peak_rss_mb']:.0f} | {r['adapter_bytes'] / 1024:,.0f} | "
                     f"{r['forward_ms_trained']:.0f} | {r['forward_ms_deployed']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="PTB-test windows (P2: 64)")
    parser.add_argument("--micro-batch", type=int, default=1, help="examples per forward, every row (1 or 4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the stored results as one table and exit")
    parser.add_argument("--methods-table", action="store_true",
                        help="print the stored LoRA / PaFi / HiWi comparison (issue 16) and exit")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(benchlib.stored_table(RESULTS, list(ROWS), table))
        return
    if args.methods_table:
        suffixes = ("", *(f"-{w}" for w in WEIGHT_METHODS))
        compared = [f"fp-{m}" for m in ("lora", *WEIGHT_METHODS)]
        compared += [f"lowbit-{s}{m}" for s in WEIGHT_METHOD_STARTS for m in suffixes]
        stored = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else {}
        measured = [n for n in ROWS if n in compared and "trainable_params" in stored.get(n, {})]
        print(benchlib.stored_table(RESULTS, measured, methods_table))
        return
    if args.worker:
        print(json.dumps(run_row(args.worker, args.windows, args.micro_batch)))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"p2.py: error: unknown rows {unknown}: choose from {', '.join(ROWS)}")
    env = benchlib.environment()
    rows = []
    for name in names:
        print(f"[p2] {name}: {ROWS[name]} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", name, "--windows", str(args.windows)]
        cmd += ["--micro-batch", str(args.micro_batch)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode:
            sys.exit(f"p2.py: error: row {name} failed (exit {proc.returncode}); see the messages above")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        speed = ""
        if "tokens_per_s" in row:
            speed = f", {row['tokens_per_s']:.0f} tok/s, train peak {row['train_peak_rss_mb']:.0f} MiB"
        print(f"[p2] {name}: ppl {row['ppl']:.2f}{speed}", file=sys.stderr, flush=True)
        rows.append(row)
        if args.windows == EVAL_WINDOWS:
            benchlib.save_rows(RESULTS, [row], env, "P2")  # each row as it ends: an interrupted run keeps them
    print(f"\nP2: SmolLM2-135M-Instruct, float32 on CPU; PTB test first {args.windows} x {EVAL_SEQLEN} tokens\n")
    print(table(rows))
    by = {r["row"]: r for r in rows}
    if "bnb-qlora" in by and "lowbit-qlora-w4" in by:
        peer, ours = by["bnb-qlora"], by["lowbit-qlora-w4"]
        speed = ours["tokens_per_s"] / peer["tokens_per_s"]
        memory = ours["train_peak_rss_mb"] / peer["train_peak_rss_mb"]
        print(f"\nlowbit W4 / bitsandbytes NF4 (same run): throughput x{speed:.2f}, train peak RSS x{memory:.2f}")
    print(f"\n{env['date']}, commit {env['commit']}, {env['machine']['cpu']} ({env['machine']['cores']} cores), "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
          f"peft {env['versions']['peft']}, bitsandbytes {env['versions']['bitsandbytes']}")  # fmt: skip
    if args.windows == EVAL_WINDOWS:
        print(f"wrote {RESULTS.relative_to(benchlib.ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
