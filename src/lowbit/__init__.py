"""lowbit: fine-tune 2-, 3- and 4-bit LLMs without the low-bit quality collapse.

The Python API mirrors the command line::

    model, tokenizer = lowbit.load_model()             # default model, or a local folder / .gguf file
    lowbit.quantize(model, lowbit.QuantConfig(bits=3))  # packed W3g64 layers + LoRA start
    lowbit.save(model, "out", tokenizer)
    model, tokenizer = lowbit.load("out")
"""

from __future__ import annotations

__version__ = "0.1.0"

from lowbit.api import load, load_model, quantize
from lowbit.checkpoint import checkpoint_info as info
from lowbit.checkpoint import save_checkpoint as save
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.layers import QuantLinear, to_dense
from lowbit.quant import QuantSpec

__all__ = [
    "LowbitError",
    "QuantConfig",
    "QuantLinear",
    "QuantSpec",
    "__version__",
    "info",
    "load",
    "load_model",
    "quantize",
    "save",
    "to_dense",
]
