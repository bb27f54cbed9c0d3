"""``QuantLinear``: a linear layer stored as packed low-bit codes, with a full-precision LoRA adapter.

The layer keeps only packed buffers (``qweight``, ``scales``, ``qzeros``) -- never a full-precision copy of the
weight -- and rebuilds the weight on the fly for each matmul (the fused kernels of :mod:`lowbit.kernels` rebuild
only a tile of it at a time). The backward pass rebuilds it again instead of saving it, so training memory holds
at most one dequantized weight at a time, not one per layer.

The output is ``x W^T + b + scaling * dropout(x) A^T B^T`` with ``W = dequant(Q)``, which is PEFT's LoRA on a
base whose weight is ``dequant(Q)``: the adapter saved by :mod:`lowbit.checkpoint` loads with PEFT onto the
dense base that :func:`lowbit.layers.to_dense` produces.

A PaFi or HiWi adapter (:mod:`lowbit.adapters`) instead adds ``x delta^T``, a learned delta of the layer's effective
weight, and merges into it as ``W + delta``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.adapters import WeightAdapter, is_lora_tensor, is_weight_adapter_tensor
from lowbit.quant import (
    QuantizedWeight,
    QuantSpec,
    dequantize_weight,
    pack,
    packed_numel,
    quantize_weight,
    unpack,
)


class QuantLinear(nn.Module):
    """Packed low-bit linear layer plus LoRA (``rank`` 0 means no adapter) and/or a weight-space adapter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = False,
        rank: int = 0,
        alpha: float = 16.0,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        # True when this layer replaced a GPT-2 style Conv1D (weight stored [in, out]); kept so the dense
        # export and PEFT's adapter config can restore the original layout.
        self.fan_in_fan_out = fan_in_fan_out
        n_groups = spec.groups(in_features)
        numel = in_features * out_features
        self.register_buffer("qweight", torch.zeros(packed_numel(numel, spec.bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        zeros_bytes = packed_numel(out_features * n_groups, spec.bits) if spec.has_zeros else 0
        self.register_buffer("qzeros", torch.zeros(zeros_bytes, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.rank = 0
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.scaling = 0.0
        self.lora_dropout: nn.Module = nn.Identity()
        self.adapter: WeightAdapter | None = None  # PaFi/HiWi: a learned delta of base_weight()
        if rank:
            self.add_lora(rank, alpha, dropout)

    # ----- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, module: nn.Module, spec: QuantSpec, quantized: QuantizedWeight | None = None) -> QuantLinear:
        """Quantize an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2) into a new QuantLinear.

        ``quantized`` supplies codes an initializer chose itself (clipped, LoftQ); by default the weight is rounded
        to nearest.
        """
        weight, fan_in_fan_out = linear_weight(module)
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            spec,
            bias=module.bias is not None,
            fan_in_fan_out=fan_in_fan_out,
            device=weight.device,
        )
        layer.set_weight(quantized if quantized is not None else quantize_weight(weight, spec))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer

    def set_weight(self, q: QuantizedWeight) -> None:
        """Store a quantized weight, packing its codes (used by initializers that choose their own codes)."""
        kernels.drop_caches(self)
        self.qweight = pack(q.codes, self.spec.bits)
        self.scales = q.scales.to(torch.float16).contiguous()
        if self.spec.has_zeros:
            self.qzeros = pack(q.zeros, self.spec.bits)

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Attach a LoRA adapter with PEFT's default start: A Kaiming-uniform, B = 0 (so the output is unchanged)."""
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        device = self.scales.device
        self.rank = rank
        self.scaling = alpha / rank
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT do: bound = 1 / sqrt(fan_in). Drawn on the CPU so a
        # seeded CPU generator gives the same start on every device.
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def set_lora(self, a: torch.Tensor, b: torch.Tensor, alpha: float, dropout: float = 0.0) -> None:
        """Attach a LoRA adapter with given factors ``A [r, in]`` and ``B [out, r]`` (an initializer's start)."""
        self.add_lora(a.shape[0], alpha, dropout)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    # ----- weights ------------------------------------------------------------------------------------------
    def quantized(self, dtype: torch.dtype = torch.uint8) -> QuantizedWeight:
        """Unpacked codes (as ``dtype``), scales and zeros."""
        out, n_groups = self.scales.shape
        codes = unpack(self.qweight, self.spec.bits, out * self.in_features, dtype).view(out, self.in_features)
        zeros = None
        if self.spec.has_zeros:
            zeros = unpack(self.qzeros, self.spec.bits, out * n_groups, dtype).view(out, n_groups)
        return QuantizedWeight(codes, self.scales, zeros)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight ``dequant(Q)`` as ``[out, in]`` in ``dtype``.

        The hot path of training (twice per layer per step): codes are unpacked straight into ``dtype`` and that
        buffer becomes the weight, so one weight-sized tensor is allocated and no uint8 copy is made.
        """
        return dequantize_weight(self.quantized(dtype), self.spec, dtype, overwrite=True)

    def lora_delta(self) -> torch.Tensor | None:
        """``scaling * B A`` as ``[out, in]``, or None without an adapter."""
        if self.lora_A is None:
            return None
        return self.scaling * (self.lora_B @ self.lora_A)

    def base_weight(self) -> torch.Tensor:
        """The frozen effective weight a weight-space adapter reads and merges into: ``dequant(Q) + s B A``
        (without LoRA: ``dequant(Q)``), float32 ``[out, in]``."""
        weight = self.dequantized_weight(torch.float32)
        delta = self.lora_delta()
        return weight if delta is None else weight + delta.float()

    # ----- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None and self.adapter.target == "weight":
            # PaFi / HiWi on the weight: one matmul on merged(dequant(Q) + s B A), the frozen LoRA start included
            return self.adapter.linear(x, self.base_weight, self.bias)
        # The base product runs on the kernel selected for this call (lowbit.kernels): torch-int4 when decoding int
        # W2-W4 (CPU and CUDA), fused Triton kernels on CUDA otherwise where they support the format and shape, else
        # the reference. Grad mode counts as training even where x needs no gradient (a first block's input): its
        # forward keeps the training numerics, not decoding's.
        kernel = kernels.select(self, x, torch.is_grad_enabled())
        y = kernel.matmul(self, x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.lora_A is not None and not kernel.adds_lora:  # a decoding kernel may add it from its own copy
            h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))
            if y.is_cuda:
                # One cuBLAS call adds scaling * h @ B^T into y: no output-sized temporaries for the product, the
                # scaling and the sum, in forward or backward (at training sizes those passes cost as much as the
                # quantized matmul). The CPU keeps the separate ops, so its numbers stay bit for bit.
                y2 = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]),
                                 self.lora_B.to(h.dtype).t(), alpha=self.scaling)  # fmt: skip
                y = y2.reshape(y.shape)
            else:
                y = y + self.scaling * F.linear(h, self.lora_B.to(x.dtype))
        if self.adapter is not None:  # HiWi's bias variant
            y = y + self.adapter.bias_delta(self.bias, y.dtype)
        return y

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() make new buffers: a kernel's state made from the old ones (torch-int4's repacked
        # codes) must not keep them alive, nor serve the new device.
        kernels.drop_caches(self)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # Loading copies into the buffers in place; a compiled model checks its cache by identity only (see
        # lowbit.kernels.torch_int4.packed), so the cache goes here.
        kernels.drop_caches(self)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}"
            f"{' sym' if self.spec.symmetric else ''}, bias={self.bias is not None}, rank={self.rank}"
        )


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The ``[out, in]`` float32 weight of an ``nn.Linear`` or GPT-2 ``Conv1D``, and whether it was transposed."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float(), False
    if is_conv1d(module):
        return module.weight.detach().float().t().contiguous(), True
    raise TypeError(f"cannot quantize a {type(module).__name__}: expected nn.Linear or Conv1D")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style ``Conv1D`` (a linear layer with weight ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a layer lowbit quantizes (``nn.Linear`` or ``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


@torch.no_grad()
def dense_module(layer: QuantLinear, merge_lora: bool = False) -> nn.Module:
    """A plain ``nn.Linear`` (or ``Conv1D`` where the layer came from one) with weight ``dequant(Q)``.

    With ``merge_lora`` the trained adapters are merged: the LoRA product is added to the weight, ``W = dequant(Q)
    + scaling * B A``, and a PaFi/HiWi adapter's delta over that, or over the bias for HiWi's bias variant (see
    :meth:`WeightAdapter.merged`).
    """
    weight = layer.base_weight() if merge_lora else layer.dequantized_weight(torch.float32)
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    if merge_lora and layer.adapter is not None:
        weight, bias = layer.adapter.merge(weight, bias)
    return plain_linear(weight, bias, layer.fan_in_fan_out)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool) -> nn.Module:
    """An ``nn.Linear`` with ``weight [out, in]`` and ``bias``, or GPT-2's ``Conv1D`` (``fan_in_fan_out``), which
    stores the weight transposed and always has a bias."""
    out_features, in_features = weight.shape
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_features, in_features)
        dense.weight.data = weight.t().contiguous()
        dense.bias.data = bias if bias is not None else torch.zeros(out_features, dtype=weight.dtype)
        return dense
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    dense.weight.data = weight
    if bias is not None:
        dense.bias.data = bias
    return dense


class AdaptedLinear(nn.Module):
    """A full-precision linear layer (``nn.Linear``, or GPT-2's ``Conv1D``) with a PaFi/HiWi adapter: what
    :class:`QuantLinear` is to a packed base, for fine-tuning a full-precision model with a method that merges into
    its weights. The base stays frozen; :meth:`merged` gives the plain layer the model is saved with."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.fan_in_fan_out = is_conv1d(base)
        self.base = base.requires_grad_(False)
        rows, cols = base.weight.shape  # nn.Linear: [out, in]; Conv1D: [in, out]
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.adapter: WeightAdapter | None = None  # set by lowbit.finetune

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def base_weight(self) -> torch.Tensor:
        """The frozen weight, float32 ``[out, in]`` (Conv1D's transposed back)."""
        weight = self.base.weight.float()
        return weight.t() if self.fan_in_fan_out else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return self.base(x)
        if self.adapter.target == "bias":
            return self.base(x) + self.adapter.bias_delta(self.bias, x.dtype)
        return self.adapter.linear(x, self.base_weight, self.bias)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The plain layer with the adapter merged, in the base's dtype."""
        dtype = self.base.weight.dtype
        bias = self.bias.detach().float().clone() if self.bias is not None else None
        weight = self.base_weight().detach().clone()
        if self.adapter is not None:
            weight, bias = self.adapter.merge(weight, bias)
        return plain_linear(weight.to(dtype), bias.to(dtype) if bias is not None else None, self.fan_in_fan_out)


def train_only_adapter(model: nn.Module) -> None:
    """Make the adapter the only trainable parameters, as PEFT's ``get_peft_model`` does: embeddings, head and
    norms left trainable would be trained by any optimizer given ``model.parameters()`` -- more memory and work,
    and a fine-tune that silently changes the base. The adapter is the PaFi/HiWi one where a layer has one (a LoRA
    start, such as ApiQ's, is then part of the frozen base it reads), else the LoRA factors."""
    weight_adapter = any(isinstance(m, WeightAdapter) for m in model.modules())
    for name, p in model.named_parameters():
        p.requires_grad_(is_weight_adapter_tensor(name) if weight_adapter else is_lora_tensor(name))


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """All QuantLinear modules of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def adapter_layers(model: nn.Module) -> dict[str, QuantLinear | AdaptedLinear]:
    """The layers that can carry a PaFi/HiWi adapter: the quantized ones, or a full-precision model's wrapped ones."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear | AdaptedLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``; the new module takes the old one's train/eval mode.

    A module is built in training mode, so a layer put into an eval model would otherwise be the one part of it
    still training: its LoRA dropout would drop activations at inference (and in calibration, the inputs the next
    block is fitted on), and decoding kernels, which leave dropout out, would refuse it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module):
        module.train(old.training)
    setattr(parent, child, module)


@torch.no_grad()
def to_dense(model: nn.Module, merge_lora: bool = False) -> nn.Module:
    """Replace every QuantLinear in ``model`` (in place) by its dense equivalent; returns ``model``.

    Without ``merge_lora`` this is the base that the saved PEFT adapter applies to; with it, a plain model whose
    logits equal the lowbit model's.
    """
    for name, layer in quant_layers(model).items():
        set_module(model, name, dense_module(layer, merge_lora))
    return model
