"""Real low-bit checkpoints: save, load and inspect.

A checkpoint folder holds

- ``config.json``: the model's own config plus ``quantization_config`` (``quant_method: lowbit``, the method,
  bits, group size, symmetry, format, the quantized modules and their shapes, the ``packing_version`` of the
  packed codes (:mod:`lowbit.quant.packing`; absent in older checkpoints, which use version 1), and the lowbit,
  torch and transformers versions that wrote it);
- ``model.safetensors``: packed codes, fp16 scales, packed zero points and every non-quantized parameter, in the
  source model's dtype, or as llama.cpp's ``Q8_0`` (``NAME.q8_codes`` int8 + ``NAME.q8_scales`` fp16, listed in
  ``quantization_config.q8_0_tensors``) when that holds its values exactly -- the embeddings of a model converted
  from a GGUF file with ``Q8_0`` embeddings, which do not fit 16 bits and would otherwise take float32;
- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA adapter in PEFT's format (absent for
  ``init=none``), which PEFT loads onto the dense base of :func:`lowbit.layers.to_dense`;
- ``weight_adapter.json`` + ``weight_adapter.safetensors``: a PaFi or HiWi adapter (:mod:`lowbit.adapters`), its
  method and settings and its tensors by layer (PaFi: int32 indices + float32 values; HiWi: the two projections);
- the tokenizer files, when the model had a tokenizer;
- ``checksums.sha256``: the SHA-256 of every weight file, the index and the adapter config (``sha256sum -c``
  format), checked on load so that a damaged or swapped file is an error, not a silently different model.

The whole folder is written to a temporary sibling and renamed, so it appears complete or not at all. Loading
builds the architecture without allocating its full-precision weights and gives back exactly the saved tensors,
so save then load is bit-exact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.adapters import (
    ADAPTER,
    ADAPTER_SETTINGS,
    ADAPTER_TENSORS,
    ADAPTERS,
    is_adapter_tensor,
)
from lowbit.config import LoraSpec, QuantConfig
from lowbit.errors import LowbitError
from lowbit.fsutil import atomic_dir, sha256_files, write_json, write_text
from lowbit.layers import QuantLinear, adapter_layers, quant_layers, set_module, train_only_adapter
from lowbit.models import _first_line, load_tokenizer
from lowbit.quant import QuantSpec
from lowbit.quant.packing import PACKING_VERSION
from lowbit.quant.serving import BLOCK, q8_0_dequantize, q8_0_exact

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints (written by streaming calibration)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PACKED_KEYS = ("qweight", "scales", "qzeros")
STORAGE_DTYPES = "lowbit_storage_dtypes"  # model attribute: tensor name -> dtype it is stored in (the source's)
Q8_0_TENSORS = "q8_0_tensors"  # quantization_config entry: the tensors stored losslessly as Q8_0 (absent: none)
Q8_CODES, Q8_SCALES = ".q8_codes", ".q8_scales"  # suffixes of a Q8_0-stored tensor's int8 codes and fp16 scales
CHECKSUMS = "checksums.sha256"
VERIFY_ENV = "LOWBIT_VERIFY"  # "0": load checkpoints without checking their digests (the CLI's --no-verify)
LOWBIT_MODEL_TYPE = "lowbit"  # config.json's model_type: plain transformers refuses it (see checkpoint_config)


def _versions() -> dict[str, str]:
    import transformers

    from lowbit import __version__

    return {
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def module_shape(layer: QuantLinear) -> list[int]:
    """How a quantized module is recorded in the config: ``[out, in, has_bias, fan_in_fan_out]``."""
    return [layer.out_features, layer.in_features, int(layer.bias is not None), int(layer.fan_in_fan_out)]


def qconfig_dict(config: QuantConfig, modules: dict[str, list[int]]) -> dict:
    """The ``quantization_config`` entry for ``config`` and the quantized ``modules`` (name -> [out, in, bias, t])."""
    return {
        "quant_method": "lowbit",
        "method": config.method,
        "init": config.init,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "format": config.format,
        "options": config.options,
        "seed": config.seed,
        "modules": modules,
        "packing_version": PACKING_VERSION,
        **_versions(),
    }


def checkpoint_config(model_config: dict, qconfig: dict) -> dict:
    """``config.json`` of a checkpoint: the model's config, its ``quantization_config``, and ``model_type: lowbit``.

    transformers skips a ``quant_method`` it does not know with a warning and then loads the model with every
    quantized layer reported missing and randomly initialized -- a model that "works" and outputs noise. An
    unknown ``model_type`` instead stops ``from_pretrained`` with an error naming ``lowbit`` (as it does every
    other reader of the config, such as vLLM); the real type is kept in ``quantization_config.model_type`` for
    :func:`load_checkpoint`. Serving formats come from ``lowbit export --gguf/--gptq/--merged``.
    """
    config = {k: v for k, v in model_config.items() if k != "quantization_config"}
    config["quantization_config"] = {**qconfig, "model_type": config.get("model_type")}
    config["model_type"] = LOWBIT_MODEL_TYPE
    return config


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry that describes ``model``'s quantized layers."""
    config: QuantConfig | None = getattr(model, "lowbit_config", None)
    layers = quant_layers(model)
    if config is None or not layers:
        raise LowbitError("the model is not quantized by lowbit: call lowbit.quantize(model, config) first")
    return qconfig_dict(config, {name: module_shape(m) for name, m in layers.items()})


def base_tensors(model: nn.Module, skip_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Non-adapter tensors to store, with tied (same-storage) duplicates replaced by an alias to the first name.

    ``skip_prefix`` leaves out the tensors under it (the blocks, which streaming calibration writes itself). A
    tensor named in the model's ``lowbit_storage_dtypes`` is stored in that dtype (the source's, e.g. bf16), not in
    the float32 lowbit computes in, so a checkpoint is not larger than its 16-bit source. A 2-D tensor whose
    values ``Q8_0`` holds exactly (checked bit for bit, never assumed) is stored as its codes and scales instead
    (:data:`Q8_CODES`, :data:`Q8_SCALES`): 8.5 bits per value, where a GGUF source's ``Q8_0`` embeddings would
    otherwise take 32 (their values do not fit 16 bits).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storage: dict[str, torch.dtype] = getattr(model, STORAGE_DTYPES, {})
    for name, tensor in model.state_dict().items():
        if is_adapter_tensor(name) or (skip_prefix and name.startswith(skip_prefix)):
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().contiguous().cpu()
        q8 = q8_0_exact(tensor) if _q8_0_candidate(name, tensor) else None
        if q8 is not None:
            tensors[name + Q8_CODES], tensors[name + Q8_SCALES] = q8
            continue
        tensors[name] = tensor.to(storage.get(name, tensor.dtype))
    return tensors, aliases


def _q8_0_candidate(name: str, tensor: torch.Tensor) -> bool:
    """A float matrix of whole ``Q8_0`` rows that is not a quantized layer's fp16 scales (an embedding, a head)."""
    return (
        tensor.dim() == 2
        and tensor.numel() > 0
        and tensor.is_floating_point()
        and tensor.shape[-1] % BLOCK == 0
        and name.rsplit(".", 1)[-1] not in PACKED_KEYS
    )


def q8_0_record(stored: Iterable[str]) -> dict[str, list[str]]:
    """The ``quantization_config`` entry naming the tensors that the stored tensor names ``stored`` hold as Q8_0
    (empty when none is, so other checkpoints' configs are as before)."""
    names = sorted(n.removesuffix(Q8_CODES) for n in stored if n.endswith(Q8_CODES))
    return {Q8_0_TENSORS: names} if names else {}


def _decode_q8_0(tensors: dict[str, torch.Tensor], names: list[str], folder: Path) -> None:
    """Replace the codes and scales of the tensors stored as Q8_0 by their float32 values, in place."""
    for name in names:
        if name + Q8_CODES not in tensors or name + Q8_SCALES not in tensors:
            raise LowbitError(f"checkpoint {folder} lists {name} as stored in Q8_0 but has no {name}{Q8_CODES} and "
                              f"{name}{Q8_SCALES}: restore config.json or re-create the checkpoint")  # fmt: skip
        tensors[name] = q8_0_dequantize(tensors.pop(name + Q8_CODES), tensors.pop(name + Q8_SCALES))


def adapter_fields(target_modules: list[str], lora: LoraSpec, fan_in_fan_out: bool) -> dict:
    """PEFT ``LoraConfig`` fields for an adapter on ``target_modules`` (full module names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(model: nn.Module, folder: Path) -> bool:
    """Write the LoRA adapter in PEFT's format into ``folder``; returns False when the model has none."""
    layers = {name: m for name, m in quant_layers(model).items() if m.lora_A is not None}
    if not layers:
        return False
    ranks = {(m.rank, m.scaling) for m in layers.values()}
    if len(ranks) > 1:
        raise LowbitError("layers have different LoRA ranks or scalings; PEFT's format needs one rank and alpha")
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    lora = LoraSpec(first.rank, first.scaling * first.rank, dropout)
    write_json(folder / ADAPTER_CONFIG, adapter_fields(sorted(layers), lora, first.fan_in_fan_out))
    return True


def save_weight_adapter(model: nn.Module, folder: Path) -> bool:
    """Write the PaFi/HiWi adapter into ``folder``; returns False when the model has none."""
    layers = {name: m.adapter for name, m in adapter_layers(model).items() if m.adapter is not None}
    if not layers:
        return False
    settings = {json.dumps(a.settings(), sort_keys=True) for a in layers.values()}
    if len(settings) > 1:
        raise LowbitError("layers have different weight-adapter settings; a checkpoint records one method")
    # float32 values whatever they trained in (``--lora-dtype bf16``), as the LoRA adapter is saved; PaFi's index as is
    tensors = {f"{name}.{k}": (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
               for name, a in layers.items() for k, v in a.state_dict().items()}  # fmt: skip
    save_file(tensors, folder / ADAPTER_TENSORS, metadata={"format": "pt"})
    write_json(folder / ADAPTER_SETTINGS, {**json.loads(settings.pop()), "modules": sorted(layers)})
    return True


def write_extra(folder: Path, extra: dict[str, object] | None) -> None:
    """Write each of ``extra``'s records into ``folder``: a JSON file, or a ``Path`` (file or folder) copied in."""
    for name, record in (extra or {}).items():
        if isinstance(record, Path):
            (shutil.copytree if record.is_dir() else shutil.copyfile)(record, folder / name)
        else:
            write_json(folder / name, record)


def read_weight_adapter(folder: Path) -> dict | None:
    """The checkpoint's PaFi/HiWi settings (``weight_adapter.json``), or None when it has none; an unknown method or
    a damaged file is a clear error."""
    path = folder / ADAPTER_SETTINGS
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path} is damaged ({exc}): re-create the checkpoint") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("modules"), list):
        raise LowbitError(f"{path} has no list of modules: it was edited or damaged; re-create the checkpoint")
    if settings.get("method") not in ADAPTERS:
        raise LowbitError(f"{path} names an unknown adapter method {settings.get('method')!r}: upgrade lowbit or "
                          "re-create it")  # fmt: skip
    return settings


def save_checkpoint(
    model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False, extra: dict[str, object] | None = None
) -> Path:
    """Save a lowbit-quantized model (and tokenizer) as a checkpoint folder, atomically; returns the folder.

    ``extra`` maps file names to JSON-serializable records written alongside (e.g. ``training.json``), or to
    files or folders copied in as they are (a ``Path``: the training metrics log, TensorBoard's event files).
    """
    out = Path(out)
    qconfig = quantization_config(model)
    with atomic_dir(out, overwrite) as tmp:
        tensors, aliases = base_tensors(model)
        qconfig.update(q8_0_record(tensors))
        meta = {"format": "pt", "lowbit_aliases": json.dumps(aliases), "lowbit_version": qconfig["lowbit_version"]}
        save_file(tensors, tmp / WEIGHTS, metadata=meta)
        save_adapter(model, tmp)
        save_weight_adapter(model, tmp)
        write_json(tmp / "config.json", checkpoint_config(model.config.to_dict(), qconfig))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extra(tmp, extra)
        write_checksums(tmp)
    return out


def write_checksums(folder: Path) -> None:
    """Record the SHA-256 of the files that hold or map the weights (the last file a checkpoint gets)."""
    mapping = (INDEX, ADAPTER_CONFIG, ADAPTER_SETTINGS)
    digested = [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name in mapping]
    write_text(folder / CHECKSUMS, "".join(f"{d}  {name}\n" for name, d in sha256_files(digested).items()))


def verify_checksums(folder: Path) -> None:
    """Check the recorded digests; a checkpoint written before lowbit recorded them loads unchecked, with a note."""
    path = folder / CHECKSUMS
    if not path.is_file():
        print(f"lowbit: note: {folder} has no {CHECKSUMS} (written by an older lowbit): its files are not verified",
              file=sys.stderr)  # fmt: skip
        return
    recorded = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        recorded[_plain_name(name, path)] = digest
    missing = [name for name in recorded if not (folder / name).is_file()]
    if missing:
        raise LowbitError(f"checkpoint file {folder / missing[0]} is missing: re-create the checkpoint")
    actual = sha256_files([folder / name for name in recorded])
    for name, digest in recorded.items():
        if actual[name] != digest:
            raise LowbitError(f"checkpoint file {folder / name} does not match its recorded SHA-256 (damaged or "
                              "changed since it was written): re-create the checkpoint, or load it unchecked with "
                              "--no-verify")  # fmt: skip


def read_config(folder: Path) -> dict:
    """The checkpoint's config.json, with a clear error when it is missing or is not a lowbit checkpoint."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LowbitError(
            f"{folder} is not a lowbit checkpoint: it has no config.json (create one with `lowbit quantize`)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged, re-create it") from exc
    if (config.get("quantization_config") or {}).get("quant_method") != "lowbit":
        raise LowbitError(
            f"{folder} is not a lowbit checkpoint: quantize it first with `lowbit quantize {folder} --out DIR`"
        )
    return config


def read_weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard map of a sharded folder's index, whose shards must be plain file names in that folder.

    A crafted or damaged index must not make lowbit read outside the folder (``../../x``, an absolute path) or mix
    in another checkpoint's shard.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LowbitError(f"{index} is damaged ({exc}); re-create it") from exc
    for name in shards:
        _plain_name(name, index)
    return weight_map


def _plain_name(name: object, source: Path) -> str:
    if not isinstance(name, str) or name in ("", "..") or Path(name).name != name or "\\" in name:
        raise LowbitError(f"{source} names the file {name!r}, which is not a plain file name inside {source.parent}: "
                          "the file is damaged or crafted; re-create it")  # fmt: skip
    return name


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards named by the index, or the single ``model.safetensors``."""
    index = folder / INDEX
    if not index.is_file():
        return [folder / WEIGHTS]
    return [folder / name for name in sorted(set(read_weight_map(index).values()))]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise LowbitError(f"checkpoint file {path} is missing: the checkpoint is incomplete, re-create it")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise LowbitError(f"checkpoint file {path} is truncated or corrupt ({exc}); re-create the checkpoint") from exc


def _check_packing(qc: dict, folder: Path) -> None:
    """Refuse codes packed in a layout this version cannot read (no ``packing_version``: written before it was
    recorded, in layout 1)."""
    version = qc.get("packing_version", 1)
    if version != PACKING_VERSION:
        raise LowbitError(f"{folder} packs its codes in layout version {version!r}, but this lowbit reads version "
                          f"{PACKING_VERSION}; upgrade lowbit or re-create the checkpoint")  # fmt: skip


def _quant_config(qc: dict, adapter: dict | None) -> QuantConfig:
    return QuantConfig(
        bits=qc["bits"],
        group_size=qc["group_size"],
        format=qc["format"],
        symmetric=qc["symmetric"],
        init=qc.get("init", "none") if adapter else "none",
        rank=adapter["r"] if adapter else 0,
        alpha=adapter["lora_alpha"] if adapter else 16.0,
        dropout=adapter.get("lora_dropout", 0.0) if adapter else 0.0,
        seed=qc.get("seed", 0),
        options=qc.get("options", {}),
    )


def _compute_in_float32(tensors: dict[str, torch.Tensor], modules: dict) -> dict[str, torch.dtype]:
    """Upcast the 16-bit untouched tensors (embeddings, norms, head, biases) to float32 in place; return their
    stored dtypes, so a later save writes them back as they were (the values round-trip exactly).

    The checkpoint keeps them in the source model's dtype (a bf16 model's embeddings stay bf16 on disk), but lowbit
    computes in float32 like the model it was calibrated from; the packed codes and fp16 scales stay as stored.
    """
    storage = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf in PACKED_KEYS:
            continue
        if tensor.dtype in (torch.float16, torch.bfloat16):
            storage[name] = tensor.dtype
            tensors[name] = tensor.float()
    return storage


def load_checkpoint(folder: str | Path, verify: bool | None = None) -> tuple[nn.Module, object | None]:
    """Load a lowbit checkpoint into a ready model (eval mode) and its tokenizer (None if it has none).

    ``verify`` checks every weight file against the digests recorded when it was saved (about 2 s per GB); the
    default is on unless the environment sets ``LOWBIT_VERIFY=0`` (what the CLI's ``--no-verify`` does).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config_dict = read_config(folder)
    qc = config_dict.pop("quantization_config")
    _check_packing(qc, folder)
    if (folder / ADAPTER_WEIGHTS).is_file() and not (folder / ADAPTER_CONFIG).is_file():
        raise LowbitError(f"{folder} has adapter weights ({ADAPTER_WEIGHTS}) but no {ADAPTER_CONFIG}: the checkpoint "
                          "is incomplete; restore that file or re-create the checkpoint")  # fmt: skip
    if verify is None:
        verify = os.environ.get(VERIFY_ENV) != "0"
    if verify:
        verify_checksums(folder)
    adapter = None
    if (folder / ADAPTER_CONFIG).is_file():
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    config = _quant_config(qc, adapter)
    spec: QuantSpec = config.spec

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for path in weight_files(folder):
        part, metadata = _read_safetensors(path)
        tensors.update(part)
        aliases.update(json.loads(metadata.get("lowbit_aliases", "{}")))
    _decode_q8_0(tensors, qc.get(Q8_0_TENSORS, []), folder)
    storage = _compute_in_float32(tensors, qc["modules"])
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
        if name in storage:
            storage[alias] = storage[name]
    if adapter is not None:
        lora, _ = _read_safetensors(folder / ADAPTER_WEIGHTS)
        for key, value in lora.items():
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")  # "<module>.lora_A"
            tensors[name] = value
    weight_adapter = read_weight_adapter(folder)
    if weight_adapter is not None:
        for key, value in _read_safetensors(folder / ADAPTER_TENSORS)[0].items():
            module, _, leaf = key.rpartition(".")
            tensors[f"{module}.{ADAPTER}.{leaf}"] = value

    model_type = config_dict.pop("model_type", None)  # the real type in checkpoints older than the marker
    if model_type == LOWBIT_MODEL_TYPE:
        model_type = qc["model_type"]
    hf_config = AutoConfig.for_model(model_type, **config_dict)
    # Parameters go on the meta device (no memory); buffers such as rotary tables are built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    for name, (out_f, in_f, bias, fan_in_fan_out) in qc["modules"].items():
        layer = QuantLinear(in_f, out_f, spec, bias=bool(bias), fan_in_fan_out=bool(fan_in_fan_out))
        if adapter is not None:
            layer.add_lora(config.rank, config.alpha, config.dropout)
        if weight_adapter is not None and name in weight_adapter["modules"]:
            layer.adapter = ADAPTERS[weight_adapter["method"]].empty(out_f, in_f, weight_adapter)
        set_module(model, name, layer)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches: the config's bits, group size or shapes were edited
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), _first_line(exc))
        msg = (f"checkpoint {folder} does not match its config ({first}); it was written by another version or "
               "config.json was edited: restore config.json or re-create the checkpoint")  # fmt: skip
        raise LowbitError(msg) from exc
    if missing or unexpected:
        raise LowbitError(
            f"checkpoint {folder} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "it was written by another version or edited: re-create it"
        )
    train_only_adapter(model)
    model.lowbit_config = config
    setattr(model, STORAGE_DTYPES, storage)
    model.eval()
    return model, load_tokenizer(folder)


def checkpoint_info(folder: str | Path) -> dict:
    """Sizes and format of a checkpoint, read from its headers only (no tensors are loaded)."""
    folder = Path(folder)
    qc = read_config(folder)["quantization_config"]
    quant_bytes = 0
    path = folder / WEIGHTS
    try:
        for path in weight_files(folder):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    module, _, leaf = key.rpartition(".")
                    if module in qc["modules"] and leaf in PACKED_KEYS:
                        s = f.get_slice(key)
                        quant_bytes += math.prod(s.get_shape()) * _dtype_bytes(s.get_dtype())
    except (SafetensorError, OSError) as exc:
        raise LowbitError(
            f"checkpoint file {path} is missing, truncated or corrupt ({exc}); re-create the checkpoint"
        ) from exc
    quantized_params = sum(out_f * in_f for out_f, in_f, *_ in qc["modules"].values())
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    lora_params = 0
    if (folder / ADAPTER_CONFIG).is_file():
        r = json.loads((folder / ADAPTER_CONFIG).read_text())["r"]
        lora_params = sum(r * (out_f + in_f) for out_f, in_f, *_ in qc["modules"].values())
    adapter_method, adapter_params = None, 0
    settings = read_weight_adapter(folder)
    if settings is not None:
        adapter_method = settings["method"]
        for name in settings["modules"]:  # the trained parameters of an empty adapter of each layer's shape
            out_f, in_f, *_ = qc["modules"][name]
            adapter_params += sum(p.numel() for p in ADAPTERS[adapter_method].empty(out_f, in_f, settings).parameters())
    return {
        "path": str(folder),
        "method": qc["method"],
        "init": qc.get("init"),
        "format": qc["format"],
        "bits": qc["bits"],
        "group_size": qc["group_size"],
        "symmetric": qc["symmetric"],
        "quantized_params": quantized_params,
        "quantized_bytes": quant_bytes,
        "bits_per_weight": 8 * quant_bytes / quantized_params,
        "lora_params": lora_params,
        "q8_0_tensors": qc.get(Q8_0_TENSORS, []),
        "weight_adapter": adapter_method,  # pafi, hiwi or None
        "weight_adapter_params": adapter_params,
        "checkpoint_bytes": sum(files.values()),
        "files": files,
        "lowbit_version": qc.get("lowbit_version"),
    }


def _dtype_bytes(dtype: str) -> int:
    return {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}[dtype]
