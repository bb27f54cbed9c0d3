"""GPTQ export: a lowbit checkpoint as a folder that transformers (with GPTQModel) and vLLM load as GPTQ.

GPTQ's grid is lowbit's: ``w = (q - z) * s`` with fp16 scales per group of consecutive input columns. An integer
checkpoint without a (non-zero) adapter is therefore re-laid out, not re-rounded (:mod:`lowbit.quant.serving`):
``checkpoint_format: gptq_v2`` stores the zero points as they are (v1 stored ``z - 1``), ``sym: false`` (a
symmetric checkpoint's fixed zero point ``2**(bits-1)`` is simply stored), ``desc_act: false``. A checkpoint with
an adapter, or in NormalFloat, is first merged and re-quantized activation-aware (GPTQ on the merged model's
outputs, :func:`lowbit.export.on_grid`) onto W``bits`` with groups of 64. Everything outside the decoder blocks is
written in float16, as GPTQ models are.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit import __version__
from lowbit.checkpoint import load_checkpoint, read_config
from lowbit.config import QuantConfig
from lowbit.engine import EngineOptions
from lowbit.errors import LowbitError
from lowbit.export import has_adapter, on_grid
from lowbit.fsutil import atomic_dir, check_output_dir, with_output_lock, write_json
from lowbit.layers import quant_layers
from lowbit.quant.serving import gptq_tensors

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUP_SIZE = 64  # of a re-quantized export


def gptq_config(bits: int, group_size: int) -> dict:
    """The ``quantization_config`` that transformers, GPTQModel and vLLM read."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq_v2",
        "pack_dtype": "int32",
        "lm_head": False,
        "true_sequential": True,
        "static_groups": False,
        "meta": {"quantizer": [f"lowbit:{__version__}"]},
    }


def plan_gptq(checkpoint: Path, bits: int | None = None) -> tuple[int, bool]:
    """The bits of the export (``bits``, else the checkpoint's, 4 for NormalFloat) and whether the checkpoint must
    first be merged and re-quantized onto that grid."""
    qc = read_config(Path(checkpoint))["quantization_config"]
    integer = qc["format"] == "int" and qc["group_size"] > 0
    bits = bits or (qc["bits"] if integer else 4)
    if bits not in GPTQ_BITS:
        raise LowbitError(f"GPTQ export supports bits {', '.join(map(str, GPTQ_BITS))}, not {bits}: choose one")
    return bits, not integer or bits != qc["bits"] or has_adapter(checkpoint)


@with_output_lock
def export_gptq(
    checkpoint: str | Path,
    out: str | Path,
    bits: int | None = None,
    calib: torch.Tensor | None = None,
    overwrite: bool = False,
    progress: bool = True,
    options: dict | None = None,
    engine: EngineOptions | None = None,
) -> dict:
    """Write ``checkpoint`` as the GPTQ model folder ``out``; returns what was written.

    ``bits`` (2, 3, 4, 8; default: the checkpoint's, 4 for NormalFloat). ``calib`` (token windows) is needed when
    the checkpoint must be re-quantized (an adapter, NormalFloat, other bits); ``options`` are recorded in that
    re-quantization's config, which runs on ``engine`` (default: the CPU, with ``progress``).
    """
    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    qc = read_config(checkpoint)["quantization_config"]
    bits, requantize = plan_gptq(checkpoint, bits)
    if any(shape[3] for shape in qc["modules"].values()):
        raise LowbitError(f"{checkpoint} has GPT-2 style Conv1D layers, which the GPTQ export does not write yet: "
                          "export it with --merged")  # fmt: skip
    check_output_dir(out, overwrite, (checkpoint,))
    grid = QuantConfig(bits=bits, group_size=GPTQ_GROUP_SIZE, init="gptq", options=options or {})
    engine = engine or EngineOptions(progress=progress)
    with on_grid(checkpoint, out, grid if requantize else None, calib, engine) as source:
        group_size = write_gptq(source, out, bits, overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"out": str(out), "kind": "gptq", "bits": bits, "group_size": group_size, "requantized": requantize,
            "bytes": size, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def write_gptq(folder: Path, out: Path, bits: int, overwrite: bool) -> int:
    """Write the adapter-free integer checkpoint ``folder`` as a GPTQ folder, atomically; returns the group size."""
    model, tokenizer = load_checkpoint(folder)
    layers = quant_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        q = layer.quantized()
        zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, 1 << (bits - 1), dtype=torch.uint8)
        try:
            packed = gptq_tensors(q.codes, q.scales, zeros, bits)
        except ValueError as exc:
            raise LowbitError(f"layer {name} cannot be written as GPTQ ({exc})") from exc
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().half()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in layers and not (tied and name == "lm_head.weight"):
            tensors[name] = param.detach().half().contiguous()
    group_size = next(iter(layers.values())).spec.group_size
    config = model.config.to_dict()
    config["quantization_config"] = gptq_config(bits, group_size)
    config["dtype"] = "float16"
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "quantize_config.json", config["quantization_config"])
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return group_size
