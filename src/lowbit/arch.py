"""Finding a model's decoder blocks and the linear layers lowbit quantizes, for any architecture.

Kept apart from model loading (:mod:`lowbit.models`) because the engine and the initializers need it on models
that are already in memory, and must not depend on how models and checkpoints are read.

Block discovery is architecture-generic: the decoder blocks are the longest ``nn.ModuleList`` of identical modules
that contain linear layers. That finds ``model.layers`` (Llama, Qwen2, Mistral, Gemma 1-3, Phi-3) and
``transformer.h`` (GPT-2) without a table of names, and names what it looked for when it fails.
"""

from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.layers import QuantLinear, is_linear


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
