"""Fine-tuning methods that merge into the weight: PaFi and HiWi (Liao, Meng and Monz, ACL 2023), beside LoRA.

Every method answers the same four questions for a :class:`~lowbit.layers.QuantLinear`: what it adds to the layer,
which parameters train, how it merges into the weight and how it is saved.

- ``lora``: the layer's own ``lora_A``/``lora_B`` (``x A^T B^T`` beside the base product, merged as ``s B A``,
  saved in PEFT's format by :mod:`lowbit.checkpoint`; see :mod:`lowbit.layers`).
- ``pafi`` (:class:`PaFi`): a fixed sparse mask of the base weights with the smallest magnitude; only those entries
  train. The delta is stored as indices + values.
- ``hiwi`` (:class:`HiWi`): an adapter ``f(W) = up(relu(down(W)))`` that reads the base *weight*, not the hidden
  states: ``W' = W + f(W)``. Only the small adapter is stored.

Both are a :class:`WeightAdapter`: a submodule ``adapter`` of the layer that gives a weight delta. The base weight
``W`` they read is the layer's frozen effective weight ``dequant(Q) (+ s B A`` of a frozen LoRA start such as
ApiQ's): on a low-bit base the delta is kept in full precision over ``dequant(Q)`` during training, and
``lowbit export --merged/--requantize`` (and the serving exports, through the merge) write ``W + delta`` as a plain
weight, so the deployed model runs at the base model's speed. During training the layer adds ``x delta^T`` to its
base product; that costs one dense matmul and one weight-sized tensor per layer, which the merge removes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

METHODS = ("lora", "pafi", "hiwi")
LORA_KEYS = ("lora_A", "lora_B")  # a QuantLinear's LoRA factors (PEFT's names)
ADAPTER = "adapter"  # the submodule name of a layer's WeightAdapter (its tensors are ``<layer>.adapter.<name>``)
ADAPTER_SETTINGS = "weight_adapter.json"  # a checkpoint's PaFi/HiWi method and settings
ADAPTER_TENSORS = "weight_adapter.safetensors"  # its tensors, ``<layer>.<name>``


class WeightAdapter(nn.Module):
    """A trainable delta of a layer's weight, ``W' = merged(W)``, given the frozen base weight ``W [out, in]``.

    A subclass names its ``method``, says whether :meth:`delta` reads the base weight (``needs_weight``: the layer
    then rebuilds it each forward), keeps its trained tensors as parameters and the fixed ones as buffers, and
    records what rebuilds its shapes in :meth:`settings` (for :meth:`empty`, which a checkpoint load fills).
    """

    method: ClassVar[str]
    needs_weight: ClassVar[bool]

    def delta(self, weight: torch.Tensor | None) -> torch.Tensor:
        """The ``[out, in]`` delta added to the base ``weight`` (None when ``needs_weight`` is False)."""
        raise NotImplementedError

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight ``W + delta(W)`` in ``weight``'s dtype."""
        return weight + self.delta(weight).to(weight.dtype)

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
    needs_weight = False

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

    def delta(self, weight: torch.Tensor | None) -> torch.Tensor:
        flat = torch.zeros(self.shape[0] * self.shape[1], dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.index.long(),), self.values).view(self.shape)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``W`` with the trained values added at the mask only: every other entry stays bit-identical."""
        flat = weight.flatten().clone()
        index = self.index.long()
        flat[index] = flat[index] + self.values.detach().to(weight.dtype)
        return flat.view(weight.shape)

    def settings(self) -> dict:
        return {"method": self.method, "fraction": self.fraction}

    def extra_repr(self) -> str:
        return f"trainable={self.index.numel()} of {self.shape[0] * self.shape[1]}"


class HiWi(WeightAdapter):
    """HiWi (weight variant): ``f(W) = relu(W D) U`` with ``D [in, dim]``, ``U [dim, in]``, each row of ``W`` going
    through the bottleneck as a hidden state would. ``U`` starts at zero (so ``W' = W`` at the start, as an adapter
    and LoRA start) and ``D`` Kaiming-uniform from the seeded CPU generator, so every device starts the same."""

    method = "hiwi"
    needs_weight = True

    def __init__(self, in_features: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dim = dim
        bound = 1.0 / math.sqrt(in_features)
        self.down = nn.Parameter(torch.empty(in_features, dim).uniform_(-bound, bound, generator=generator))
        self.up = nn.Parameter(torch.zeros(dim, in_features))

    @classmethod
    def empty(cls, out_features: int, in_features: int, settings: Mapping) -> HiWi:
        return cls(in_features, settings["dim"])

    def delta(self, weight: torch.Tensor | None) -> torch.Tensor:
        return F.relu(weight.to(self.down.dtype) @ self.down) @ self.up

    def settings(self) -> dict:
        return {"method": self.method, "dim": self.dim}


ADAPTERS: dict[str, type[WeightAdapter]] = {PaFi.method: PaFi, HiWi.method: HiWi}


def check_settings(method: str, pafi_fraction: float, hiwi_dim: int) -> None:
    """Refuse an unknown method or a setting out of range, naming the flag."""
    if method not in METHODS:
        raise LowbitError(f"unknown --method {method!r}: choose {', '.join(METHODS)}")
    if not 0 < pafi_fraction <= 1:
        raise LowbitError(f"--pafi-fraction must be in (0, 1], got {pafi_fraction}")
    if hiwi_dim < 1:
        raise LowbitError(f"--hiwi-dim must be at least 1, got {hiwi_dim}")


def is_adapter_tensor(name: str) -> bool:
    """Whether state-dict entry ``name`` belongs to a trained adapter (LoRA factors or a WeightAdapter's tensors),
    not to the base model."""
    return name.rsplit(".", 1)[-1] in LORA_KEYS or is_weight_adapter_tensor(name)


def is_weight_adapter_tensor(name: str) -> bool:
    """Whether state-dict entry ``name`` belongs to a layer's :class:`WeightAdapter`."""
    return f".{ADAPTER}." in f".{name}"
