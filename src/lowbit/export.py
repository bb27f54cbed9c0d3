"""Exports of a lowbit checkpoint that need no lowbit at inference.

- :func:`export_merged`: a plain full-precision Hugging Face model with ``W = dequant(Q) + s·BA`` -- the
  quantized base the adapter was trained on, not the original weights -- so plain ``transformers`` gives the lowbit
  model's logits; a PaFi/HiWi adapter (:mod:`lowbit.adapters`) is merged over that, ``W + delta``.
- :func:`export_requantized`: the merged model quantized again, block by block on the calibration engine, with
  GPTQ rounding fitted to the merged model's outputs (init ``gptq``), giving a low-bit checkpoint with no adapter.
  ``dequant(Q) + s·BA`` lies on the old grid plus a small delta: rounding it again onto the merged weights' own,
  slightly shifted grid adds a second full rounding error and loses the delta (measured: a trained W4 model
  exported that way was worse than the untrained start), which is why peers refuse this merge or do it lossily.
  GPTQ moves each column's rounding error onto the columns after it so the layer's outputs, which carry what the
  adapter learned, stay close.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lowbit.adapters import ADAPTER_SETTINGS
from lowbit.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_checkpoint, read_config
from lowbit.config import QuantConfig
from lowbit.engine import EngineOptions
from lowbit.errors import LowbitError
from lowbit.fsutil import (
    atomic_dir,
    check_output_dir,
    claim_work_dir,
    remove_work_dir,
    with_output_lock,
    work_dir,
    write_json,
)
from lowbit.layers import to_dense

MERGED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merged_dtype(checkpoint: str | Path, dtype: str | None = None) -> str:
    """The dtype a merged export is written in: ``dtype``, else the source model's (recorded in the checkpoint's
    config), else float32 -- lowbit computes the merge in float32, so it loses nothing by default."""
    config = read_config(Path(checkpoint))
    source = config.get("dtype") or config.get("torch_dtype")
    name = dtype or (source if source in MERGED_DTYPES else "float32")
    if name not in MERGED_DTYPES:
        raise LowbitError(f"unknown dtype {name!r}: choose one of {', '.join(MERGED_DTYPES)}")
    return name


@with_output_lock
def export_merged(checkpoint: str | Path, out: str | Path, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write ``checkpoint`` with its adapter merged as a plain HF model folder in ``dtype`` (see
    :func:`merged_dtype`); returns ``out``."""
    checkpoint, out = Path(checkpoint), Path(out)
    qc = read_config(checkpoint)["quantization_config"]
    name = merged_dtype(checkpoint, dtype)
    check_output_dir(out, overwrite, (checkpoint,))
    model, tokenizer = load_checkpoint(checkpoint)
    to_dense(model, merge_lora=True)
    del model.lowbit_config
    model.to(MERGED_DTYPES[name])
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = {k: qc.get(k) for k in ("init", "bits", "group_size", "format", "lowbit_version")}
        write_json(tmp / "lowbit_export.json", {"merged_from": str(checkpoint.resolve()), "base": provenance})
    return out


@with_output_lock
def export_requantized(
    checkpoint: str | Path,
    out: str | Path,
    config: QuantConfig,
    calib: torch.Tensor,
    overwrite: bool = False,
    progress: bool = True,
    engine: EngineOptions | None = None,
) -> dict:
    """Merge ``checkpoint``'s adapter and quantize the result into an adapter-free lowbit checkpoint ``out``.

    ``config.init`` must be an adapter-free method (``gptq``: activation-aware; ``none``: plain rounding, for
    comparison). The merged model is kept in the work folder until the end, so an interrupted export resumes.
    ``engine`` sets the calibration's device and activation budget (default: ``progress`` only, on the CPU).
    """
    from lowbit.calibrate import calibrate
    from lowbit.models import load_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if config.lora is not None:
        raise LowbitError(f"init {config.init} adds an adapter; a re-quantized export has none: use gptq or none")
    check_output_dir(out, overwrite, (checkpoint,))
    work = work_dir(out)
    merged = claim_work_dir(work.with_name(work.name + "-merged")) / "model"
    if not (merged / "config.json").is_file():
        export_merged(checkpoint, merged, overwrite=True)
    engine = engine or EngineOptions(progress=progress)
    summary = calibrate(merged, config, out, calib, load_tokenizer(merged), overwrite, engine)
    config_path = out / "config.json"
    hf = json.loads(config_path.read_text())
    hf["quantization_config"]["source"] = str(checkpoint.resolve())
    hf["quantization_config"]["requantized_from"] = json.loads((merged / "lowbit_export.json").read_text())
    write_json(config_path, hf)
    remove_work_dir(merged.parent)
    return summary


@contextmanager
def on_grid(
    checkpoint: Path, out: Path, grid: QuantConfig | None, calib: torch.Tensor | None, engine: EngineOptions
) -> Iterator[Path]:
    """An adapter-free checkpoint on the grid a serving format holds, for the exporters of ``out``.

    ``grid`` None: ``checkpoint`` itself (it has no adapter and is already on the format's grid). Otherwise
    ``checkpoint`` merged and re-quantized onto ``grid`` by :func:`export_requantized` (GPTQ on the merged model's
    outputs, so a fine-tuned adapter survives, on ``engine``'s device) in a hidden sibling of ``out``, removed
    once the export is written.
    """
    if grid is None:
        yield checkpoint
        return
    if grid.init == "gptq" and calib is None:
        raise LowbitError(
            f"{checkpoint} must be re-quantized for this format ({grid.spec.name}"
            f"{' sym' if grid.symmetric else ''}), which needs calibration windows: pass calib"
        )
    work = claim_work_dir(work_dir(out).with_name(work_dir(out).name + "-requantized"))
    folder = work / "model"
    if not (folder / "config.json").is_file():  # else a finished re-quantization from an interrupted export
        export_requantized(checkpoint, folder, grid, calib, overwrite=True, engine=engine)
    yield folder
    remove_work_dir(work)


def has_adapter(checkpoint: Path) -> bool:
    """Whether the checkpoint's adapter changes its weights (a serving format cannot hold it: it must be merged). A
    PaFi/HiWi adapter does; a QLoRA start (``B = 0``) does not: its base is exported as it is, not re-quantized."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if (checkpoint / ADAPTER_SETTINGS).is_file():
        return True
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        return False
    lora = load_file(checkpoint / ADAPTER_WEIGHTS)
    return any(t.any() for name, t in lora.items() if ".lora_B." in name)
