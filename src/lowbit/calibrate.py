"""Streaming, resumable quantization of a model folder straight into a checkpoint.

The model is built on the meta device; only the parts outside the blocks (embeddings, final norm, head) are
loaded up front, and each block is read from the source safetensors just before its turn. Each finished block is
written at once as its own shard (packed codes, norms) plus its LoRA factors, then freed. Progress lives in a
work folder next to the output (``.NAME.partial``): ``state.json`` is rewritten atomically after each block and
is the commit point, and the activation streams after block ``i`` are saved as ``acts-i.safetensors`` before it.
After a crash (even ``kill -9``) the same command finds the work folder, checks that settings, source and
calibration data are unchanged, and continues from the first unfinished block; because every block seeds its own
generator and reads exactly the saved activations, the result equals an uninterrupted run bit for bit. On
success the folder becomes the checkpoint (sharded weights with an index, PEFT adapter, tokenizer) by one rename.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.adapters import is_lora_tensor
from lowbit.api import check_shapes
from lowbit.arch import find_blocks
from lowbit.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INDEX,
    PEFT_PREFIX,
    STORAGE_DTYPES,
    adapter_fields,
    checkpoint_config,
    module_shape,
    q8_0_record,
    qconfig_dict,
    read_weight_map,
    write_checksums,
)
from lowbit.config import QuantConfig
from lowbit.engine import Activations, BlockResult, Engine, EngineOptions
from lowbit.errors import LowbitError
from lowbit.fsutil import (
    WORK_MARKER,
    check_output_dir,
    content_fingerprint,
    replace_dir,
    resume_work_dir,
    run_fingerprint,
    with_output_lock,
    work_dir,
    write_json,
)
from lowbit.init import get_initializer
from lowbit.layers import quant_layers

STATE = "state.json"


class SafetensorsSource:
    """Lazy, read-only access to the tensors of a Hugging Face folder (single file or sharded with an index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX
        try:
            if index.is_file():
                weight_map = read_weight_map(index)
            elif (folder / "model.safetensors").is_file():
                with safe_open(folder / "model.safetensors", "pt") as f:
                    weight_map = dict.fromkeys(f.keys(), "model.safetensors")
            else:
                raise LowbitError(f"{folder} has no safetensors weights (model.safetensors): convert the model first")
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            msg = f"cannot load the model in {folder}: its weights are truncated or corrupt ({exc})"
            raise LowbitError(msg) from exc
        self.weight_map: dict[str, str] = weight_map

    def dtypes(self) -> dict[str, torch.dtype]:
        """The stored dtype of every float tensor, from the file headers: the checkpoint keeps its untouched
        tensors (embeddings, norms, head, biases) in it instead of the float32 they are computed in."""
        out = {}
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.folder / file, "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    dtype = _DTYPES.get(f.get_slice(name).get_dtype())
                    if dtype is not None:
                        out[name] = dtype
        return out

    def identity(self) -> list:
        """What a resumed run checks the source against: the content of its weight files, not their path or size."""
        return content_fingerprint([self.folder / f for f in set(self.weight_map.values())])

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        try:
            for file, keys in by_file.items():
                out.update(read_tensors(self.folder / file, keys))
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            msg = f"cannot load the model in {self.folder}: {file} is truncated or corrupt ({exc})"
            raise LowbitError(msg) from exc
        return out


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read named tensors of a safetensors file as float32 with plain reads.

    Plain reads instead of a memory map: mapped pages of blocks already done would stay resident and make memory
    grow with depth, which is what streaming is for avoiding.
    """
    out = {}
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        for name in names:
            entry = header[name]
            start, end = entry["data_offsets"]
            f.seek(8 + header_len + start)
            data = bytearray(f.read(end - start))
            if len(data) != end - start:
                raise ValueError(f"tensor {name} is cut short")
            t = torch.frombuffer(data, dtype=_DTYPES[entry["dtype"]]) if data else torch.empty(0)
            out[name] = t.reshape(entry["shape"]).float()
    return out


def skeleton(folder: Path, source: SafetensorsSource) -> tuple[nn.Module, str]:
    """The model with meta-device blocks and real weights everywhere else; returns ``(model, blocks prefix)``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefix, _ = find_blocks(model)
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".") and k in source.weight_map]
    missing = model.load_state_dict(source.load(outside), strict=False, assign=True).missing_keys
    model.tie_weights()
    still_meta = [k for k, v in model.state_dict().items() if v.is_meta and not k.startswith(prefix + ".")]
    if still_meta:
        raise LowbitError(f"{folder}: weights {still_meta[:3]} are missing from the safetensors files ({missing[:3]})")
    return model.eval(), prefix


@with_output_lock
def calibrate(
    folder: Path,
    config: QuantConfig,
    out: Path,
    calib: torch.Tensor | None = None,
    tokenizer=None,
    overwrite: bool = False,
    engine: EngineOptions | None = None,
    spill: bool = False,
    on_block: Callable[[int], None] | None = None,
) -> dict:
    """Quantize the model in ``folder`` into the checkpoint ``out``, resuming an interrupted run of the same job.

    Returns a summary: per-block statistics, seconds per block, the resumed-from block and the worst block.
    """
    out, folder = Path(out), Path(folder)
    check_output_dir(out, overwrite, (folder,))  # also when resuming: a non-empty --out is refused before any block
    engine = engine or EngineOptions()
    source = SafetensorsSource(folder)
    model, prefix = skeleton(folder, source)
    check_shapes(model, config)  # shapes are known on the meta device: fail before any work or work folder
    storage = source.dtypes()
    setattr(model, STORAGE_DTYPES, storage)  # _write_base stores the untouched tensors in the source's dtype
    work = work_dir(out)
    settings = [config.to_dict(), source.identity(), str(engine.act_dtype)]
    key = run_fingerprint(settings, [] if calib is None else [calib.numpy().tobytes()])
    what = "run with different settings, model or calibration data"
    state = resume_work_dir(work, STATE, key, overwrite, what) or {
        "fingerprint": key, "next_block": 0, "blocks": [], "modules": {}, "source": str(folder.resolve())
    }  # fmt: skip
    if spill:
        engine = dataclasses.replace(engine, spill_dir=work / "spill")

    init = get_initializer(config)
    run = Engine(model, init, config.spec, config.lora, config.seed, config.options, calib, engine)
    start = state["next_block"]
    if start == 0:
        _write_base(model, prefix, work)
    streams = None
    if start > 0 and init.needs_data:
        saved = load_file(work / f"acts-{start - 1:05d}.safetensors")
        streams = tuple(_restore(run, name, saved[name]) for name in ("x", "xq"))

    def load_block(i: int, block: nn.Module) -> None:
        names = [f"{prefix}.{i}.{k}" for k in block.state_dict()]
        tensors = source.load(names)
        block.load_state_dict({k[len(f"{prefix}.{i}.") :]: v for k, v in tensors.items()}, assign=True)

    def finish_block(i: int, block: nn.Module, result: BlockResult, x, xq) -> None:
        tensors = {f"{prefix}.{i}.{k}": v.cpu().contiguous() for k, v in block.state_dict().items()}
        base = {k: v.to(storage.get(k, v.dtype)) for k, v in tensors.items() if not is_lora_tensor(k)}
        lora = {k: v for k, v in tensors.items() if is_lora_tensor(k)}
        _save(base, work / f"model-block-{i:05d}.safetensors")
        if lora:
            _save(lora, work / f"lora-{i:05d}.safetensors")
        if x is not None:
            _save({"x": x.data.cpu(), "xq": xq.data.cpu()}, work / f"acts-{i:05d}.safetensors")
        for name, m in quant_layers(block).items():
            state["modules"][f"{prefix}.{i}.{name}"] = module_shape(m)
        state["blocks"].append({"index": i, "seconds": round(result.seconds, 2), **result.stats})
        state["next_block"] = i + 1
        write_json(work / STATE, state)  # the commit point of block i
        (work / f"acts-{i - 1:05d}.safetensors").unlink(missing_ok=True)
        block.to("meta")
        if on_block is not None:
            on_block(i)

    run.run(load_block, finish_block, start=start, streams=streams)
    _finalize(model, config, state, work, out, tokenizer, overwrite)
    blocks = state["blocks"]
    worst = max(blocks, key=lambda b: b.get("rel_error", 0.0), default=None)
    return {"blocks": blocks, "resumed_from": start, "worst_block": worst}


def _restore(run: Engine, name: str, data: torch.Tensor) -> Activations:
    acts = run.stream(name, tuple(data.shape))
    acts.data.copy_(data)
    return acts


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    tmp.replace(path)


def _write_base(model: nn.Module, prefix: str, work: Path) -> None:
    from lowbit.checkpoint import base_tensors

    tensors, aliases = base_tensors(model, skip_prefix=prefix + ".")
    _save(tensors, work / "model-base.safetensors", {"lowbit_aliases": json.dumps(aliases)})


def _finalize(model, config: QuantConfig, state: dict, work: Path, out: Path, tokenizer, overwrite: bool) -> None:
    """Turn the work folder into the checkpoint: index, adapter, config, tokenizer, digests; then one rename."""
    check_output_dir(out, overwrite)  # before the resumable state is deleted: a refusal keeps it for the rerun
    weight_map = {}
    for shard in sorted(work.glob("model-*.safetensors")):
        with safe_open(shard, "pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), shard.name))
    write_json(work / INDEX, {"metadata": {"format": "lowbit"}, "weight_map": weight_map})
    if config.lora is not None:
        lora = {}
        for piece in sorted(work.glob("lora-*.safetensors")):
            for k, v in load_file(piece).items():
                lora[f"{PEFT_PREFIX}{k}.weight"] = v
        _save(lora, work / ADAPTER_WEIGHTS)
        fan_in_fan_out = any(m[3] for m in state["modules"].values())
        write_json(work / ADAPTER_CONFIG, adapter_fields(sorted(state["modules"]), config.lora, fan_in_fan_out))
    hf = checkpoint_config(model.config.to_dict(), qconfig_dict(config, state["modules"]))
    hf["quantization_config"]["calibration"] = {"blocks": state["blocks"]}
    hf["quantization_config"]["source"] = state["source"]
    hf["quantization_config"].update(q8_0_record(weight_map))  # what _write_base stored as Q8_0
    write_json(work / "config.json", hf)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(work)
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    for p in [*work.glob("lora-*.safetensors"), *work.glob("acts-*.safetensors"), work / STATE]:
        p.unlink(missing_ok=True)
    shutil.rmtree(work / "spill", ignore_errors=True)
    write_checksums(work)
    (work / WORK_MARKER).unlink()
    replace_dir(work, out)
