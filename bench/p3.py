"""Protocol P3 (../shared/BENCHMARK.md): teach SmolLM2-135M-Instruct English-to-Spanish translation.

Data: the shipped P3 split of aligned Bible verses (English WEB, Spanish Reina-Valera 1909; references in
``src/lowbit/resources/p3_split.json``): 200 test pairs, 100 validation, 1,000 Spanish verses for continued
pre-training (CPT), 2,000 pairs for translation fine-tuning (SFT), 5 fixed shots (the first 5 training pairs).
Metric: chrF and BLEU (sacrebleu defaults) of greedy translations of the test verses (at most 128 new tokens),
and perplexity on the Spanish side of the test verses.

Rows (each in its own subprocess):

- ``fp-0shot``, ``fp-5shot``: the full-precision model, prompted (``lowbit.translate.prompt``);
- ``fp-lora``: PEFT LoRA r8 on the full-precision model, trained exactly like the lowbit rows (CPT, then SFT);
- ``{qlora,loftq,apiq}-w{4,3,2}``: ``lowbit.adapt`` -- quantize with that start (calibrating on the Spanish
  CPT text where the start uses data), CPT, SFT, evaluate; stage outputs are kept in ``bench/.p3/ROW`` so an
  interrupted row resumes and a finished one is only re-read.

    python bench/p3.py --rows fp-0shot,fp-5shot,fp-lora,apiq-w2      # the headline comparison
    python bench/p3.py --limit 20 --rows fp-0shot                    # quick look (not saved)

Results merge into bench/results/p3.json by row name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import benchlib

RESULTS = benchlib.ROOT / "bench" / "results" / "p3.json"
RUNS = benchlib.ROOT / "bench" / ".p3"
STARTS = {
    "qlora": {"init": "qlora"},
    "loftq": {"init": "loftq", "options": {"loftq_iters": 1}},
    "apiq": {"init": "apiq-bw", "options": {"warm_start": "wsvd", "epochs": 2}},
}


def _rows() -> dict[str, str]:
    rows = {"fp-0shot": "full precision, zero-shot", "fp-5shot": "full precision, 5-shot",
            "fp-lora": "full-precision LoRA (PEFT), CPT + SFT"}  # fmt: skip
    for b in (4, 3, 2):
        for start in STARTS:
            rows[f"{start}-w{b}"] = f"lowbit W{b}g64 from the {start} start, CPT + SFT"
    return rows


ROWS = _rows()


def run_row(name: str, limit: int) -> dict:
    import torch

    import lowbit
    from lowbit.adapt import AdaptConfig, adapt, evaluate_mt, write_data
    from lowbit.api import load_model
    from lowbit.config import QuantConfig
    from lowbit.models import quiet_transformers
    from lowbit.parallel import read_pairs

    quiet_transformers()
    torch.manual_seed(0)
    row: dict = {"row": name, "label": ROWS[name]}
    start = time.perf_counter()
    if name.startswith("fp-"):
        config = AdaptConfig(test_limit=limit)
        data = RUNS / "data"
        if not (data / "test.tsv").is_file():
            write_data(data, config)
        test = read_pairs(data / "test.tsv")[: limit or None]
        model, tokenizer = load_model(None)
        shots = read_pairs(data / "shots.tsv") if name == "fp-5shot" else []
        if name == "fp-lora":
            model, row["training"] = fp_lora(model, tokenizer, data, config)
        row["bits_per_weight"] = 32.0
        result = evaluate_mt(model, tokenizer, test, config, shots)
    else:
        start_name, bits = name.rsplit("-w", 1)
        quant = QuantConfig(bits=int(bits), group_size=64, rank=8, alpha=16.0, seed=0, **STARTS[start_name])
        config = AdaptConfig(quant=quant, test_limit=limit)
        run = RUNS / name if not limit else RUNS / f"{name}-limit{limit}"
        result = adapt(None, run, config, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
        row["run"] = str(run.relative_to(benchlib.ROOT))
        row["stages"] = {s: json.loads((run / s / "training.json").read_text()) for s in ("cpt", "sft")}
        for stage in row["stages"].values():
            stage.pop("losses", None)
        row["bits_per_weight"] = round(lowbit.info(run / "quantized")["bits_per_weight"], 4)
    row.update({k: result[k] for k in ("chrf", "bleu", "ppl", "segments", "translate_seconds")})
    row["examples"] = [{"hyp": h} for h in result["hypotheses"][:3]]
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["peak_rss_mb"] = round(benchlib.peak_rss_mb(), 1)
    return row


def fp_lora(model, tokenizer, data: Path, config) -> tuple[object, dict]:
    """PEFT LoRA on the full-precision model: CPT then SFT with the lowbit rows' data, order and settings."""
    from peft import LoraConfig, get_peft_model

    from lowbit.arch import target_linears
    from lowbit.finetune import TrainConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from p2 import peft_train

    modules = sorted({n.rsplit(".", 1)[-1] for n in target_linears(model)})
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    common = dict(lr=config.lr, batch_size=config.batch_size, micro_batch=config.micro_batch, seed=config.seed,
                  samples=0)  # fmt: skip
    stages = {}
    for stage, train in (("cpt", TrainConfig(data=str(data / "mono.txt"), task="clm", **common)),
                         ("sft", TrainConfig(data=str(data / "train.jsonl"), task="sft", **common))):  # fmt: skip
        result = peft_train(model, tokenizer, train)
        stages[stage] = {k: result[k] for k in ("final_loss", "tokens", "seconds", "tokens_per_s")}
    return model, stages


def table(rows: list[dict]) -> str:
    lines = ["| method | chrF | BLEU | es ppl (test) | bits/weight |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['chrf']:.2f} | {r['bleu']:.2f} | {r['ppl']:.2f} | "
                     f"{r['bits_per_weight']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--limit", type=int, default=0, help="first N test verses only (quick look; not saved)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the stored results as one table and exit")
    args = parser.parse_args()
    if args.table:
        print(benchlib.stored_table(RESULTS, list(ROWS), table))
        return
    if args.worker:
        print(json.dumps(run_row(args.worker, args.limit), ensure_ascii=False))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"p3.py: error: unknown rows {unknown}: choose from {', '.join(ROWS)}")
    env = benchlib.environment()
    rows = []
    for name in names:
        print(f"[p3] {name}: {ROWS[name]} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", name, "--limit", str(args.limit)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode:
            sys.exit(f"p3.py: error: row {name} failed (exit {proc.returncode}); see the messages above")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[p3] {name}: chrF {row['chrf']:.2f}, BLEU {row['bleu']:.2f}, es ppl {row['ppl']:.2f}, "
              f"{row['seconds']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        rows.append(row)
        if not args.limit:  # each row is saved as it finishes, so a long run interrupted later keeps it
            save(row, env)
    print(f"\nP3: SmolLM2-135M-Instruct, English -> Spanish Bible verses, float32 on CPU, "
          f"{rows[0]['segments'] if rows else 0} test verses\n")  # fmt: skip
    print(table(rows))
    print(f"\n{env['date']}, commit {env['commit']}, {env['machine']['cpu']} ({env['machine']['cores']} cores), "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}")  # fmt: skip


def save(row: dict, env: dict) -> None:
    """Merge one finished row into bench/results/p3.json (``benchlib.save_rows``)."""
    benchlib.save_rows(RESULTS, [row], env, "P3")
    print(f"[p3] {row['row']} saved to {RESULTS.relative_to(benchlib.ROOT)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
