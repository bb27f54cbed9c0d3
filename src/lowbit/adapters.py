"""Fine-tuning methods that merge into the weight: PaFi and HiWi (Liao, Meng and Monz, ACL 2023), beside LoRA.

Every method answers the same four questions for a :class:`~lowbit.layers.QuantLinear`: what it adds to the layer,
which parameters train, how it merges into the weight and how it is saved.

- ``lora``: the layer's own ``lora_A``/``lora_B`` (``x A^T B^T`` beside the base product, merged as ``s B A``,
  saved in PEFT's format by :mod:`lowbit.checkpoint`; see :mod:`lowbit.layers`).
- ``pafi`` (:class:`PaFi`): a fixed sparse mask of the base weights with the smallest magnitude; only those entries
  train. The delta is stored as indices + values.
- ``hiwi`` (:class:`HiWi`): an adapter ``f(W) = up(relu(down(W)))`` that reads the base *weight*, not the hidden
  states: ``W' = W + f(W)``; or, in the paper's bias variant, the base *bias*: ``b' = b + f(b)``. Only the small
  adapter is stored.

Both are a :class:`WeightAdapter`: a submodule ``adapter`` of the layer that gives a delta of its weight (or, for
HiWi's bias variant, of its bias; ``target``). The base weight
``W`` they read is the layer's frozen effective weight ``dequant(Q) (+ s B A`` of a frozen LoRA start such as
ApiQ's): on a low-bit base the delta is kept in full precision over ``dequant(Q)`` during training, and
``lowbit export --merged/--requantize`` (and the serving exports, through the merge) write ``W + delta`` as a plain
weight, so the deployed model runs at the base model's speed. Until then the layer computes ``x merged(W)^T`` as one
matmul on the merged weight, rebuilt in backward rather than kept (:class:`MergedLinear`); the merge removes the
rebuild.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

METHODS = ("lora", "pafi", "hiwi")
HIWI_TARGETS = ("weight", "bias")  # what a HiWi adapter reads and changes
LORA_KEYS = ("lora_A", "lora_B")  # a QuantLinear's LoRA factors (PEFT's names)
ADAPTER = "adapter"  # the submodule name of a layer's WeightAdapter (its tensors are ``<layer>.adapter.<name>``)
ADAPTER_SETTINGS = "weight_adapter.json"  # a checkpoint's PaFi/HiWi method and settings
ADAPTER_TENSORS = "weight_adapter.safetensors"  # its tensors, ``<layer>.<name>``


class WeightAdapter(nn.Module):
    """A trainable delta of a layer's weight, ``W' = merged(W)``, given the frozen base weight ``W [out, in]`` -- or
    of its bias ``b [out]`` where ``target`` is ``"bias"``.

    A subclass names its ``method``, gives :meth:`delta` (and may override :meth:`merged`), keeps its trained
    tensors as parameters and the fixed ones as buffers, and records what rebuilds its shapes in :meth:`settings`
    (for :meth:`empty`, which a checkpoint load fills).
    """

    method: ClassVar[str]
    target: str = "weight"  # the layer tensor the delta is added to: "weight" or "bias"

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """The delta added to the ``base`` tensor, of its shape."""
        raise NotImplementedError

    def merged(self, base: torch.Tensor) -> torch.Tensor:
        """The merged tensor ``base + delta(base)`` in ``base``'s dtype (differentiable in the adapter's parameters)."""
        return base + self.delta(base).to(base.dtype)

    def linear(self, x: torch.Tensor, weight: Callable[[], torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """A weight-targeting adapter's layer output ``x merged(W)^T + b``, where ``weight()`` gives the layer's frozen
        ``[out, in]`` base weight and ``bias`` is its bias."""
        if not torch.is_grad_enabled():
            y = F.linear(x, self.merged(weight()).to(x.dtype))
        else:
            y = MergedLinear.apply(x, self, weight, *[p for p in self.parameters() if p.requires_grad])
        return y if bias is None else y + bias.to(y.dtype)

    def bias_delta(self, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What a bias-targeting adapter adds to the layer's output: ``delta(b)``, in ``dtype``."""
        return self.delta(bias.detach()).to(dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's ``(weight [out, in], bias)`` with the adapter merged into the one it targets."""
        with torch.no_grad():
            if self.target == "bias":
                return weight, self.merged(bias)
            return self.merged(weight), bias

    def settings(self) -> dict:
        """The method's settings as recorded in the checkpoint (shared by every layer)."""
        raise NotImplementedError

    @classmethod
    def empty(cls, out_features: int, in_features: int, settings: Mapping) -> WeightAdapter:
        """An adapter of the right shapes for ``settings``, whose tensors a checkpoint load assigns."""
        raise NotImplementedError


def pafi_count(fraction: float, numel: int) -> int:
    """How many of a layer's ``numel`` weights PaFi trains: ``round(fraction * numel)``, at least one."""
    return max(1, round(fraction * numel))


class PaFi(WeightAdapter):
    """PaFi: only the base weights of smallest magnitude train, through a sparse delta (``values`` at ``index``).

    The mask is chosen per layer (each layer trains the same fraction of its weights): on a low-bit base each layer
    has its own quantization scales, so magnitudes are not comparable across layers, and a global threshold could
    leave a layer with nothing to train. It is a pure function of the weight: a stable sort of ``|W|``, ties going
    to the lower flat index -- on a low-bit base ``dequant(Q)`` takes few distinct values, so ties are common.
    """

    method = "pafi"

    def __init__(self, out_features: int, in_features: int, index: torch.Tensor, fraction: float) -> None:
        super().__init__()
        self.shape = (out_features, in_features)
        self.fraction = fraction
        self.register_buffer("index", index.to(torch.int32))  # flat positions in [out, in], ascending
        self.values = nn.Parameter(torch.zeros(index.numel(), device=index.device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fraction: float) -> PaFi:
        """The PaFi adapter of a layer whose base weight is ``weight``: the ``fraction`` of smallest ``|W|``."""
        k = pafi_count(fraction, weight.numel())
        order = torch.sort(weight.detach().float().abs().flatten().cpu(), stable=True).indices
        index = order[:k].sort().values
        return cls(weight.shape[0], weight.shape[1], index.to(weight.device), fraction)

    @classmethod
    def empty(cls, out_features: int, in_features: int, settings: Mapping) -> PaFi:
        k = pafi_count(settings["fraction"], out_features * in_features)
        return cls(out_features, in_features, torch.zeros(k, dtype=torch.int32), settings["fraction"])

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(self.shape[0] * self.shape[1], dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.index.long(),), self.values).view(self.shape)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``W`` with the trained values added at the mask only: every other entry stays bit-identical."""
        flat = weight.flatten()
        index = self.index.long()
        return flat.index_put((index,), flat[index] + self.values.to(weight.dtype)).view(weight.shape)

    def settings(self) -> dict:
        return {"method": self.method, "fraction": self.fraction}

    def extra_repr(self) -> str:
        return f"trainable={self.index.numel()} of {self.shape[0] * self.shape[1]}"


class HiWi(WeightAdapter):
    """HiWi: ``f(W) = relu(W D) U`` with ``D [in, dim]``, ``U [dim, in]``, each row of ``W`` going through the
    bottleneck as a hidden state would; in the bias variant (``target="bias"``) ``b' = b + relu(b D) U`` with
    ``D [out, dim]``, ``U [dim, out]``, the bias vector as the one input. ``U`` starts at zero (so the merged layer
    equals the base at the start, as an adapter and a LoRA start do) and ``D`` Kaiming-uniform from the seeded CPU
    generator, so every device starts the same."""

    method = "hiwi"

    def __init__(
        self, features: int, dim: int, target: str = "weight", generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.dim, self.target = dim, target
        bound = 1.0 / math.sqrt(features)
        self.down = nn.Parameter(torch.empty(features, dim).uniform_(-bound, bound, generator=generator))
        self.up = nn.Parameter(torch.zeros(dim, features))

    @classmethod
    def empty(cls, out_features: int, in_features: int, settings: Mapping) -> HiWi:
        target = settings.get("target", "weight")  # checkpoints before the bias variant: weight
        return cls(in_features if target == "weight" else out_features, settings["dim"], target)

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        return F.relu(base.to(self.down.dtype) @ self.down) @ self.up

    def settings(self) -> dict:
        return {"method": self.method, "dim": self.dim, "target": self.target}


ADAPTERS: dict[str, type[WeightAdapter]] = {PaFi.method: PaFi, HiWi.method: HiWi}


class MergedLinear(torch.autograd.Function):
    """``y = x merged(W)^T`` for a weight-targeting adapter, keeping only ``x`` for backward.

    Why not plain autograd: it would hold every adapted layer's merged weight (a float32 copy of all adapted
    weights) from forward to backward. Why not a delta beside the base product (``x W^T + x delta^T``, the delta
    recomputed in backward): that is six weight-sized matmuls per layer and step. Here forward is one matmul on the
    merged weight; backward rebuilds it (an elementwise pass, plus HiWi's thin ``relu(W D) U``) and does two,
    ``grad_x = grad W'`` and the weight gradient ``grad^T x``, which autograd then carries to the adapter's
    parameters (PaFi: its values, gathered at the mask; HiWi: ``D`` and ``U``). Under autocast both passes run in
    the autocast dtype, as ``F.linear`` would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, adapter: WeightAdapter, weight: Callable[[], torch.Tensor], *params):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.adapter, ctx.weight, ctx.dtype = adapter, weight, dtype
        ctx.save_for_backward(x)
        with torch.no_grad():
            merged = adapter.merged(weight())
        with torch.autocast(device, enabled=False):
            return F.linear(x.to(dtype), merged.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.adapter.parameters() if p.requires_grad]  # as forward got them
        with torch.enable_grad():
            merged = ctx.adapter.merged(ctx.weight().detach())
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(ctx.dtype)
            grad_x = (g @ merged.detach().to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = g.reshape(-1, g.shape[-1]).t() @ x.to(ctx.dtype).reshape(-1, x.shape[-1])
        grads = torch.autograd.grad(merged, params, grad_w.to(merged.dtype)) if params else ()
        return (grad_x, None, None, *grads)


def check_settings(method: str, pafi_fraction: float, hiwi_dim: int, hiwi_target: str, layers: str) -> None:
    """Refuse an unknown method or a setting out of range, naming the flag."""
    if method not in METHODS:
        raise LowbitError(f"unknown --method {method!r}: choose {', '.join(METHODS)}")
    if not 0 < pafi_fraction <= 1:
        raise LowbitError(f"--pafi-fraction must be in (0, 1], got {pafi_fraction}")
    if hiwi_dim < 1:
        raise LowbitError(f"--hiwi-dim must be at least 1, got {hiwi_dim}")
    if hiwi_target not in HIWI_TARGETS:
        raise LowbitError(f"unknown --hiwi-target {hiwi_target!r}: choose {' or '.join(HIWI_TARGETS)}")
    if layers and method == "lora":
        raise LowbitError(
            "--adapter-layers selects the layers of a pafi or hiwi adapter; LoRA trains the layers "
            "its checkpoint's adapter covers: drop --adapter-layers or use --method pafi|hiwi"
        )
    try:
        re.compile(layers)
    except re.error as exc:
        raise LowbitError(f"--adapter-layers {layers!r} is not a regular expression ({exc})") from None


def select_layers(names: list[str], pattern: str) -> list[str]:
    """The layer names that ``pattern`` (a regular expression, searched; empty: all) selects, in order; an error
    that lists some names when it selects none."""
    chosen = [n for n in names if re.search(pattern, n)] if pattern else list(names)
    if not chosen:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise LowbitError(f"--adapter-layers {pattern!r} matches none of the {len(names)} linear layers "
                          f"({shown}): give a pattern such as 'mlp' or 'self_attn\\.(q|v)_proj'")  # fmt: skip
    return chosen


def is_lora_tensor(name: str) -> bool:
    """Whether state-dict entry ``name`` is a layer's LoRA factor."""
    return name.rsplit(".", 1)[-1] in LORA_KEYS


def is_adapter_tensor(name: str) -> bool:
    """Whether state-dict entry ``name`` belongs to a trained adapter (LoRA factors or a WeightAdapter's tensors),
    not to the base model."""
    return is_lora_tensor(name) or is_weight_adapter_tensor(name)


def is_weight_adapter_tensor(name: str) -> bool:
    """Whether state-dict entry ``name`` belongs to a layer's :class:`WeightAdapter`."""
    return f".{ADAPTER}." in f".{name}"
