"""What every benchmark records next to its numbers (BENCHMARK.md): machine, commit, command, date, versions."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

# Protocol P2's fine-tuning set (BENCHMARK.md): training windows drawn; `lowbit finetune` takes all the data by
# default, so every bench that fine-tunes passes this.
P2_SAMPLES = 128

ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    """The checkout's commit; ``LOWBIT_COMMIT`` names it where the tree travelled without its ``.git`` (a GPU box)."""
    if os.environ.get("LOWBIT_COMMIT"):
        return os.environ["LOWBIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Machine, software versions, commit, command and date of this run."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": _cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "device": device,
        },
        "versions": {p: _version(p) for p in ("lowbit", "torch", "transformers", "peft", "bitsandbytes", "triton")},
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: ``clear_refs`` 5 resets VmHWM); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    """Peak resident memory since :func:`reset_peak_rss` (VmHWM), in MiB; the whole-process peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def stored_table(results: Path, order: list[str], table) -> str:
    """The markdown table of every stored row (in ``order``), then when and where each was measured."""
    stored = json.loads(results.read_text())["rows"] if results.is_file() else {}
    rows = [stored[name] for name in order if name in stored]
    runs = sorted({(r["env"]["date"], r["env"]["commit"], r["env"]["command"]) for r in rows})
    notes = "\n".join(f"- {date}, commit {commit}: `{command}`" for date, commit, command in runs)
    return f"{table(rows)}\n\nMeasured:\n{notes}"


def save_rows(results: Path, rows: list[dict], env: dict, protocol: str) -> None:
    """Merge ``rows`` into the JSON file ``results`` by row name (atomic rewrite), each with the run's ``env``; a
    bench calls it after every row, so an interrupted run keeps the rows it finished. A row run again moves its
    earlier result to the file's ``superseded`` list: a number quoted from an earlier run (another commit, another
    GPU) stays on record."""
    previous = json.loads(results.read_text()) if results.is_file() else {"rows": {}}
    for r in rows:
        if r["row"] in previous["rows"]:
            previous.setdefault("superseded", []).append(previous["rows"][r["row"]])
    previous["rows"].update({r["row"]: {**r, "env": env} for r in rows})
    previous["protocol"] = protocol
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(previous, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(results)
