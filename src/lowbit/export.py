"""Exports of a lowbit checkpoint that need no lowbit at inference.

- :func:`export_merged`: a plain full-precision Hugging Face model with ``W = dequant(Q) + s·BA`` -- the
  quantized base the adapter was trained on, not the original weights -- so plain ``transformers`` gives the lowbit
  model's logits.
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
import shutil
from pathlib import Path

import torch

from lowbit.api import QuantConfig
from lowbit.checkpoint import load_checkpoint, read_config
from lowbit.errors import LowbitError
from lowbit.fsutil import atomic_dir, check_output_dir, work_dir, write_json
from lowbit.layers import to_dense


def export_merged(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` with its adapter merged as a plain full-precision HF model folder; returns ``out``."""
    checkpoint, out = Path(checkpoint), Path(out)
    qc = read_config(checkpoint)["quantization_config"]
    check_output_dir(out, overwrite, (checkpoint,))
    model, tokenizer = load_checkpoint(checkpoint)
    to_dense(model, merge_lora=True)
    del model.lowbit_config
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = {k: qc.get(k) for k in ("init", "bits", "group_size", "format", "lowbit_version")}
        write_json(tmp / "lowbit_export.json", {"merged_from": str(checkpoint.resolve()), "base": provenance})
    return out


def export_requantized(
    checkpoint: str | Path,
    out: str | Path,
    config: QuantConfig,
    calib: torch.Tensor,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Merge ``checkpoint``'s adapter and quantize the result into an adapter-free lowbit checkpoint ``out``.

    ``config.init`` must be an adapter-free method (``gptq``: activation-aware; ``none``: plain rounding, for
    comparison). The merged model is kept in the work folder until the end, so an interrupted export resumes.
    """
    from lowbit.calibrate import calibrate
    from lowbit.engine import EngineOptions
    from lowbit.models import load_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if config.lora is not None:
        raise LowbitError(f"init {config.init} adds an adapter; a re-quantized export has none: use gptq or none")
    work = work_dir(out)
    merged = work.with_name(work.name + "-merged")
    if not (merged / "config.json").is_file():
        check_output_dir(out, overwrite, (checkpoint,))
        export_merged(checkpoint, merged, overwrite=True)
    summary = calibrate(merged, config, out, calib, load_tokenizer(merged), overwrite, EngineOptions(progress=progress))
    config_path = out / "config.json"
    hf = json.loads(config_path.read_text())
    hf["quantization_config"]["source"] = str(checkpoint.resolve())
    hf["quantization_config"]["requantized_from"] = json.loads((merged / "lowbit_export.json").read_text())
    write_json(config_path, hf)
    shutil.rmtree(merged, ignore_errors=True)
    return summary
