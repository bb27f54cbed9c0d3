"""Every command on a GPU, once, on a tiny random-init model: a device bug (a tensor left on the CPU) fails here.

Runs the CLI in-process with ``--device`` (default ``cuda``): quantize (gptq with the activation streams on the
GPU; apiq-bw gptq-warm with ``--act-budget 0``, i.e. pinned host streams), finetune (bf16 precision, bf16 LoRA
factors, gradient checkpointing), eval (the same checkpoint on the CPU too: perplexities compared), generate,
translate, report and ``export --requantize``. Prints one JSON object: each command's exit status and output.
CI has no GPU; ``--device cpu`` runs the same script here in about a minute.

    python bench/gpu_smoke.py [--device cuda] [--out smoke.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(argv: list) -> dict:
    """``lowbit`` with ``argv`` in this process: exit status, its JSON output (or the error line), seconds."""
    from lowbit.cli import main

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    result: dict = {
        "argv": " ".join(str(a) for a in argv),
        "code": code,
        "seconds": round(time.perf_counter() - start, 2),
    }
    try:
        result["json"] = json.loads(out.getvalue())
    except json.JSONDecodeError:
        result["stderr_tail"] = err.getvalue()[-2000:]
    return result


def smoke(device: str, folder: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny, tiny_text

    source = save_tiny(folder / "fp", "llama")
    text = folder / "text.txt"
    text.write_text(tiny_text(4000))
    lines = folder / "src.txt"
    lines.write_text("w1 w2 w3\nw4 w5\n")
    calib = ["--calib", text, "--calib-windows", "8", "--calib-seqlen", "64"]
    dev = ["--device", device, "--json"]
    steps = {
        "quantize-gptq": ["quantize", source, "--bits", "2", "--group-size", "32", "--init", "gptq", *calib,
                          "--out", folder / "gptq", *dev],
        "quantize-apiq-host-streams": ["quantize", source, "--bits", "2", "--group-size", "32", "--init", "apiq-bw",
                                       "--warm-start", "gptq", "--epochs", "1", "--act-budget", "0", *calib,
                                       "--out", folder / "apiq", *dev],
        "finetune-bf16": ["finetune", folder / "apiq", "--data", text, "--seqlen", "64", "--samples", "16",
                          "--precision", "bf16", "--lora-dtype", "bf16", "--grad-checkpointing", "--out",
                          folder / "ft", *dev],
        "eval": ["eval", folder / "ft", "--ppl", text, "--seqlen", "64", *dev],
        "eval-cpu": ["eval", folder / "ft", "--ppl", text, "--seqlen", "64", "--device", "cpu", "--json"],
        "generate": ["generate", folder / "ft", "w1 w2 w3", "--max-new-tokens", "8", *dev],
        "translate": ["translate", folder / "ft", "--input", lines, "--max-new-tokens", "8", *dev],
        "report": ["report", folder / "gptq", "--base", source, "--data", text, "--seqlen", "64", "--windows", "2",
                   *dev],
        "export-requantize": ["export", folder / "ft", "--requantize", folder / "rq", *calib, *dev],
    }  # fmt: skip
    results = {name: run(argv) for name, argv in steps.items()}
    ppl = {k: results[k].get("json", {}).get("ppl") for k in ("eval", "eval-cpu")}
    if None not in ppl.values():
        results["eval_ppl_rel_diff_device_vs_cpu"] = abs(ppl["eval"] - ppl["eval-cpu"]) / ppl["eval-cpu"]
    results["all_ok"] = all(r["code"] == 0 for r in results.values() if isinstance(r, dict))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lowbit-gpu-smoke-") as tmp:
        result = {"device": args.device, "steps": smoke(args.device, Path(tmp))}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    sys.exit(0 if result["steps"]["all_ok"] else 1)


if __name__ == "__main__":
    main()
