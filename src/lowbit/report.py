"""Activation-error report: how far each block's and layer's output drifts from the full-precision model.

On held-out windows, the full-precision model and each quantized checkpoint run on the same tokens; for every
decoder block and every quantized linear layer the report accumulates ``||Y_fp - Y_q|| / ||Y_fp||``, where each
model is fed by its own earlier layers. This is the picture that shows whether error piles up with depth (QLoRA
and RTN at low bits) or stays flat (activation-preserving initializations).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import find_blocks, target_linears
from lowbit.errors import LowbitError


@contextmanager
def _recording(model: nn.Module, layers: set[str], store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record the outputs of every decoder block (as ``block.<i>``) and of the named ``layers`` into ``store``."""
    _, blocks = find_blocks(model)
    handles = []

    def keep(name: str):
        def hook(_m, _inp, out):
            store[name] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(keep(f"block.{i}")))
    for name, module in model.named_modules():
        if name in layers:
            handles.append(module.register_forward_hook(keep(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_error(base: nn.Module, models: dict[str, nn.Module], windows: torch.Tensor, progress: bool = True):
    """Per-block and per-layer relative output error of each model in ``models`` against ``base``."""
    layers = set(target_linears(base))  # the quantized models hold QuantLinear under the same names
    sums: dict[str, dict[str, list[float]]] = {label: {} for label in models}
    for w in tqdm(range(windows.shape[0]), desc="activation error", disable=not progress, leave=False):
        ids = windows[w : w + 1]
        ref: dict[str, torch.Tensor] = {}
        with _recording(base, layers, ref):
            base(input_ids=ids.to(base.device), use_cache=False)
        for label, model in models.items():
            got: dict[str, torch.Tensor] = {}
            with _recording(model, layers, got):
                model(input_ids=ids.to(model.device), use_cache=False)
            for name, y in ref.items():
                if name not in got:
                    continue
                acc = sums[label].setdefault(name, [0.0, 0.0])
                acc[0] += float((got[name].float() - y.to(got[name].device).float()).pow(2).sum())
                acc[1] += float(y.float().pow(2).sum())
    result = {}
    for label, per in sums.items():
        blocks = sorted((int(n.split(".")[1]), math.sqrt(a / max(b, 1e-30))) for n, (a, b) in per.items()
                        if n.startswith("block."))  # fmt: skip
        layers = {n: math.sqrt(a / max(b, 1e-30)) for n, (a, b) in per.items() if not n.startswith("block.")}
        result[label] = {"blocks": [e for _, e in blocks], "layers": layers}
    return result


def plot(result: dict, path: Path, title: str) -> None:
    """One line per checkpoint: relative block-output error against depth (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LowbitError("the plot needs matplotlib: `pip install matplotlib`, or drop --plot") from exc
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, data in result.items():
        ax.plot(range(len(data["blocks"])), data["blocks"], marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error ||Y_fp - Y_q|| / ||Y_fp||")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
