"""GGUF export: a lowbit checkpoint as one file that llama.cpp (``llama-cli -m OUT.gguf``) runs as is.

The decoder blocks' codes are re-laid out, not re-rounded, in the llama.cpp type that holds lowbit's grid
(:mod:`lowbit.quant.serving`): asymmetric W4 with groups of a multiple of 32 -> ``Q4_1``, symmetric W4 ->
``Q4_0``, symmetric W8 -> ``Q8_0``. Every other checkpoint -- one with an adapter, W2, W3, asymmetric W8, NF --
is first merged and re-quantized activation-aware onto the target grid by :func:`lowbit.export.on_grid` (GPTQ on
the merged model's outputs, groups of 32, which cost nothing extra since these types store a scale per 32
weights anyway): ``Q8_0`` for 8 bits, ``Q4_1`` below. llama.cpp's 2- and 3-bit k-quants (``Q2_K``, ``Q3_K``)
use super-blocks with 4- and 6-bit quantized sub-block scales that lowbit's fp16-scale grid does not map onto,
so W2 and W3 checkpoints go to ``Q4_1`` (larger, but they keep what calibration and fine-tuning achieved).

Embeddings and an untied head go in F16, or in ``Q8_0``: ``auto`` (the default) picks ``Q8_0`` exactly when the
weights already lie on a ``Q8_0`` grid -- as the default model's do, since it came from a GGUF file with ``Q8_0``
embeddings -- so the file is not bigger than its source for no gain in accuracy. llama.cpp stores a Llama's
``q`` and ``k`` projections with the rows of each head interleaved for its rotary kernel (``convert_hf_to_gguf``
permutes them, transformers' GGUF loader un-permutes them); permuting rows moves whole quantization groups, so
it is exact. Tokenizer metadata is copied from the GGUF file the model came from when there is one (the
default model), else built from the checkpoint's tokenizer files with gguf-py's vocabulary readers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.checkpoint import load_checkpoint, read_config
from lowbit.config import QuantConfig
from lowbit.engine import EngineOptions
from lowbit.errors import LowbitError
from lowbit.export import has_adapter, on_grid
from lowbit.fsutil import check_output_path, default_permissions, with_output_lock
from lowbit.layers import quant_layers
from lowbit.quant.serving import BLOCK, GGUF_GRIDS, gguf_blocks, q8_0_exact, q8_0_quantize

ARCHITECTURES = ("llama",)
EMBEDDINGS = ("auto", "f16", "q8_0")
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7}  # gguf.LlamaFileType: the type of most tensors
ROPE_PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def native_type(qc: dict) -> str | None:
    """The llama.cpp type that holds the checkpoint's grid exactly (``quantization_config``), or None."""
    if qc["format"] != "int" or qc["group_size"] <= 0 or qc["group_size"] % BLOCK:
        return None
    return next((t for t, grid in GGUF_GRIDS.items() if grid == (qc["bits"], qc["symmetric"])), None)


def plan_gguf(checkpoint: Path, qtype: str | None = None) -> tuple[str, bool]:
    """The llama.cpp type the blocks are written in (``qtype``, else the checkpoint's own grid, else ``q8_0`` for
    8 bits and ``q4_1`` below) and whether the checkpoint must first be merged and re-quantized onto it."""
    qc = read_config(Path(checkpoint))["quantization_config"]
    native = native_type(qc)
    target = qtype or native or ("q8_0" if qc["bits"] == 8 else "q4_1")
    return target, native != target or has_adapter(checkpoint)


@with_output_lock
def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    qtype: str | None = None,
    embeddings: str = "auto",
    calib: torch.Tensor | None = None,
    overwrite: bool = False,
    progress: bool = True,
    options: dict | None = None,
    engine: EngineOptions | None = None,
) -> dict:
    """Write ``checkpoint`` as the GGUF file ``out``; returns what was written.

    ``qtype`` (``q4_1``, ``q4_0``, ``q8_0``; default: see :func:`plan_gguf`) is the type of the block layers.
    ``calib`` (token windows) is needed when the checkpoint must be re-quantized (an adapter, or a grid no llama.cpp
    type holds); ``options`` are recorded in that re-quantization's config, which runs on ``engine`` (default: the
    CPU, with ``progress``).
    """
    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    config = read_config(checkpoint)
    qc = config["quantization_config"]
    arch = qc.get("model_type") or config.get("model_type")
    if arch not in ARCHITECTURES:
        raise LowbitError(f"GGUF export supports the {', '.join(ARCHITECTURES)} architecture, not {arch}: "
                          "export this model with --gptq or --merged")  # fmt: skip
    if qtype is not None and qtype not in GGUF_GRIDS:
        raise LowbitError(f"GGUF type {qtype!r} is not supported: choose one of {', '.join(GGUF_GRIDS)}")
    if embeddings not in EMBEDDINGS:
        raise LowbitError(f"embeddings type {embeddings!r} is not supported: choose one of {', '.join(EMBEDDINGS)}")
    _check_llama(config)
    _check_output_file(out, overwrite, checkpoint)
    target, requantize = plan_gguf(checkpoint, qtype)
    bits, symmetric = GGUF_GRIDS[target]
    grid = QuantConfig(bits=bits, group_size=BLOCK, symmetric=symmetric, init="gptq", options=options or {})
    engine = engine or EngineOptions(progress=progress)
    with on_grid(checkpoint, out, grid if requantize else None, calib, engine) as source:
        written = write_gguf(source, out, target, embeddings, tokenizer_origin=checkpoint)
    return {
        "out": str(out),
        "kind": "gguf",
        "type": target,
        "requantized": requantize,
        **written,
        "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _check_output_file(out: Path, overwrite: bool, checkpoint: Path) -> None:
    check_output_path(out)
    if out.resolve().is_relative_to(checkpoint.resolve()):
        raise LowbitError(f"output {out} is inside the input {checkpoint}: choose another path; inputs are never "
                          "modified")  # fmt: skip
    if out.is_dir():
        raise LowbitError(f"output {out} is a folder: give a file path such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} exists: choose another path or pass --overwrite")


def write_gguf(folder: Path, out: Path, qtype: str, embeddings: str, tokenizer_origin: Path) -> dict:
    """Write the adapter-free checkpoint ``folder`` (on ``qtype``'s grid) as GGUF, atomically."""
    import gguf

    model, _ = load_checkpoint(folder)
    hf = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writer = gguf.GGUFWriter(tmp / out.name, "llama")
        writer.add_name(tokenizer_origin.resolve().name)
        _write_llama_metadata(writer, hf, qtype)
        tokenizer = _write_tokenizer(writer, tokenizer_origin, folder, hf.vocab_size)
        types = _write_tensors(writer, model, qtype, embeddings)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        default_permissions(tmp)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"tokenizer": tokenizer, "tensor_types": types}


def _check_llama(config: dict) -> None:
    """Refuse the Llama variants whose extra metadata or tensors the writer does not handle (before any work)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise LowbitError(f"rope scaling {rope['rope_type']!r} is not written to GGUF yet: export with --gptq or "
                          "--merged")  # fmt: skip
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise LowbitError("Llama models with attention or MLP biases are not written to GGUF yet: export with --gptq")


def _write_llama_metadata(writer, hf, qtype: str) -> None:
    import gguf

    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = getattr(hf, "rope_parameters", None) or {}
    writer.add_vocab_size(hf.vocab_size)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(hf.num_attention_heads)
    writer.add_head_count_kv(hf.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(hf, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hf.hidden_size // hf.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tensors(writer, model, qtype: str, embeddings: str) -> dict[str, int]:
    """Add every tensor under its llama.cpp name; returns how many tensors of each type were written."""
    import gguf

    hf = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf.num_hidden_layers)
    layers = quant_layers(model)
    types: dict[str, int] = {}

    def add(hf_name: str, array: np.ndarray, raw: gguf.GGMLQuantizationType | None) -> None:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"tensor {hf_name} has no llama.cpp name: this Llama variant is not supported for GGUF")
        writer.add_tensor(name, array, raw_dtype=raw)
        kind = raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[array.dtype.type]
        types[kind] = types.get(kind, 0) + 1

    raw = gguf.GGMLQuantizationType[qtype.upper()]
    for module, layer in layers.items():
        q = layer.quantized()
        codes, scales, zeros = q.codes, q.scales, q.zeros
        heads_attr = ROPE_PERMUTED.get(module.rsplit(".", 1)[-1])
        if heads_attr is not None:
            order = _rope_row_order(layer.out_features, getattr(hf, heads_attr))
            codes, scales = codes[order], scales[order]
            zeros = zeros[order] if zeros is not None else None
        add(module + ".weight", gguf_blocks(codes, scales, zeros, qtype).numpy(), raw)
    tied = getattr(hf, "tie_word_embeddings", False)
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in layers or (tied and name == "lm_head.weight"):
            continue
        if param.dim() == 1:
            add(name, param.detach().float().numpy(), None)
        else:
            add(name, *_embedding(param.detach().float(), embeddings))
    return types


def _rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a ``q``/``k`` projection: within each head, the two rotary halves interleaved."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _embedding(weight: torch.Tensor, mode: str) -> tuple[np.ndarray, object]:
    """An embedding or head as ``Q8_0`` (``q8_0``; ``auto``: when that is lossless) or F16."""
    import gguf

    if mode != "f16" and weight.shape[-1] % BLOCK == 0:
        q8 = q8_0_quantize(weight) if mode == "q8_0" else q8_0_exact(weight)
        if q8 is not None:
            codes, scales = q8
            lowbit_codes = (codes.to(torch.int16) + 128).to(torch.uint8)  # symmetric W8 codes, zero point 128
            blocks = gguf_blocks(lowbit_codes, scales, None, "q8_0")
            return blocks.numpy(), gguf.GGMLQuantizationType.Q8_0
    elif mode == "q8_0":
        raise LowbitError(f"embeddings of width {weight.shape[-1]} do not split into Q8_0 blocks of {BLOCK}: use f16")
    return weight.numpy().astype(np.float16), None


# ----- tokenizer ------------------------------------------------------------------------------------------------------
def source_gguf(folder: Path, depth: int = 0) -> Path | None:
    """The GGUF file a checkpoint's model was converted from, following its sources; None when there is none.

    A checkpoint records its source model folder (``quantization_config.source``), a re-quantized one the
    checkpoint it was merged from, a fine-tuned one its base (``training.json``); lowbit's GGUF conversions
    record the files they were loaded from (:data:`lowbit.models.GGUF_SOURCE`).
    """
    from lowbit.models import GGUF_SOURCE, _source_record

    folder = Path(folder)
    if (folder / GGUF_SOURCE).is_file():
        return next((Path(p) for p in _source_record(folder).get("sources", []) if Path(p).is_file()), None)
    if depth > 8 or not (folder / "config.json").is_file():
        return None
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    links = [qc.get("source"), (qc.get("requantized_from") or {}).get("merged_from")]
    if (folder / "training.json").is_file():
        links.append(json.loads((folder / "training.json").read_text()).get("base"))
    for link in links:
        if link and Path(link).is_dir() and Path(link).resolve() != folder.resolve():
            found = source_gguf(Path(link), depth + 1)
            if found is not None:
                return found
    return None


def _write_tokenizer(writer, origin: Path, folder: Path, vocab_size: int) -> str:
    """Tokenizer metadata: copied from the source GGUF file, else built from the tokenizer files; says which."""
    import gguf

    source = source_gguf(origin)
    if source is not None:
        reader = gguf.GGUFReader(source)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) == vocab_size:
            for name, field in reader.fields.items():
                if name.startswith("tokenizer."):
                    sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                    writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
            return f"copied from {source}"
    if (folder / "tokenizer.model").is_file():
        vocab = gguf.vocab.SentencePieceVocab(folder)
    else:
        try:
            vocab = gguf.vocab.BpeVocab(folder)
        except FileNotFoundError as exc:
            raise LowbitError(f"the tokenizer of {origin} is neither GPT-2 style BPE (tokenizer.json) nor "
                              "SentencePiece (tokenizer.model): it cannot be written to GGUF") from exc  # fmt: skip
    tokens, scores, token_types = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
    for i in range(len(tokens), vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        token_types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")  # llama.cpp names pre-tokenizers by a hash of their output
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )
    return f"built from {folder}"
