"""A decoding kernel's LoRA: the factors kept ready in the activations' dtype, siblings' joined: two products a step.

At one row a LoRA's work is tiny and its cost is the number of operations: a layer's ``s * B(A dropout(x))`` takes
a cast of each factor to the activations' dtype (bf16 under autocast, the factors being float32), two products, a
scaling and a sum -- four kernels on a GPU at the least. In P4's CUDA-graph layer rows (H100, commit cd0db78) a r16
LoRA added 16.7 us to a Llama-2-7B layer at one row on ``triton-decode``, more than tinygemm's whole W4 product of
that layer (15.0 us); on the CPU the default model at W4 with its LoRA decoded 9.4 tokens/s against 14.7 without
(``bench/cpu_int4.py``'s ``decode-w4`` row measures it now). The factors do not change between decoding steps, so
here they are cast once, the scaling folded into ``B``: a layer's LoRA is ``x A^T`` then one ``addmm`` into the base
product. Layers that read one tensor (q/k/v, gate/up: :mod:`lowbit.kernels.siblings`) share one copy, ``A``
stacked ``[sum of ranks, in]`` and ``s B`` block-diagonal ``[sum of outputs, sum of ranks]``, so the group's LoRA
is two products however many members it has (a member without a LoRA is a block of zeros).

A copy is remade when a factor is replaced, changed in place (an optimizer step; version counters, which eager calls
read), its scaling changes or the activations' dtype does. Compiled code can check identity only (like the
kernels' other copies, :func:`lowbit.kernels.made_from`), so :func:`lowbit.kernels.keep_lora_copies` -- which
``prepare_decoding`` (``generate``, ``translate``) and :func:`lowbit.decode.greedy` call before every decoding --
makes the missing copies and brings the others up to date, in place: a compiled step reads the current factors at
the addresses it was recorded with. After training a model yourself, call ``keep_lora_copies`` (or
``prepare_decoding``) before decoding it under your own ``torch.compile``. A factor given new storage through
``.data`` is seen too (by its address); one written in place through ``.data`` (which its version counter does not
see) needs :func:`lowbit.kernels.drop_caches`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lowbit.kernels import LayerState, steady_token, versions

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear


def dropout_active(layer: QuantLinear) -> bool:
    """Whether the layer's LoRA dropout would change its input (in training mode, at a positive rate): a decoding
    copy, which leaves dropout out, must not serve it."""
    dropout = layer.lora_dropout
    return layer.lora_A is not None and dropout.training and getattr(dropout, "p", 0.0) > 0


def _sources(layers: Sequence[QuantLinear]) -> tuple:
    """What a copy is made from: each layer's factors and scaling."""
    return tuple((m.lora_A, m.lora_B, m.scaling) for m in layers)


def _contents(sources: tuple) -> tuple:
    """What tells, eagerly, that the factors' contents changed: their version counters (in-place changes) and
    storage addresses (``p.data = ...``, which keeps the parameter and its counter)."""
    return tuple((versions(s[:2]), tuple(None if t is None else t.data_ptr() for t in s[:2])) for s in sources)


def joined(layers: Sequence[QuantLinear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A [sum r, in], s B [sum out, sum r])`` in ``dtype`` for ``layers`` (one input width), ``s B``
    block-diagonal with a zero block for a layer without a LoRA; None when no layer has one."""
    ranks = [0 if m.lora_A is None else m.lora_A.shape[0] for m in layers]
    if not any(ranks):
        return None
    # normal tensors even inside an inference-mode block: a later refresh outside one writes into them
    with torch.inference_mode(False), torch.no_grad():
        a = torch.cat([m.lora_A for m in layers if m.lora_A is not None]).to(dtype)
        sb = a.new_zeros(sum(m.out_features for m in layers), sum(ranks))
        row = col = 0
        for m, r in zip(layers, ranks, strict=True):
            if r:
                sb[row : row + m.out_features, col : col + r] = (m.scaling * m.lora_B.float()).to(dtype)
            row, col = row + m.out_features, col + r
    return a.contiguous(), sb


class LoraCopy(LayerState):
    """The decoding copy of some layers' LoRA factors (one layer, or a sibling group in output order) in one dtype.

    Holds the layers weakly (a layer's kernel cache holds its copy) and the factors it was made from strongly, so a
    replaced factor is told by identity: its memory cannot pass to a successor while the copy keeps it alive. A
    copied or pickled model has none (:class:`lowbit.kernels.LayerState`)."""

    __slots__ = ("a", "checked", "dtype", "layers", "made", "sb", "sources")

    def __init__(self, layers: Sequence[QuantLinear], dtype: torch.dtype) -> None:
        self.layers = tuple(weakref.ref(m) for m in layers)
        self.dtype = dtype
        self.a: torch.Tensor | None = None
        self.sb: torch.Tensor | None = None
        self.checked: object | None = None  # the steady block it was last checked in (lowbit.kernels.steady)
        self._make(layers, in_place=False)

    def _members(self) -> list[QuantLinear] | None:
        found = [ref() for ref in self.layers]
        return None if any(m is None for m in found) else found

    def _make(self, layers: Sequence[QuantLinear], in_place: bool) -> None:
        made = joined(layers, self.dtype)
        a, sb = (None, None) if made is None else made
        if in_place and a is not None and self.a is not None and a.shape == self.a.shape and sb.shape == self.sb.shape:
            with torch.inference_mode(False), torch.no_grad():
                self.a.copy_(a)  # the addresses a compiled step was recorded with
                self.sb.copy_(sb)
        else:
            self.a, self.sb = a, sb
        self.sources = _sources(layers)
        self.made = None if torch.compiler.is_compiling() else _contents(self.sources)

    def current(self, layers: Sequence[QuantLinear], check_versions: bool) -> bool:
        """Whether ``layers`` still have the factors and scalings the copy was made from (by identity) and, with
        ``check_versions``, their contents then."""
        now = _sources(layers)
        same = all(
            x[0] is y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(now, self.sources, strict=True)
        )  # fmt: skip
        return same and (not check_versions or self.made == _contents(now))

    def refresh(self, dtype: torch.dtype, check_versions: bool = True) -> None:
        """Remake the copy for activations in ``dtype`` if it is in another or a factor changed since it was made
        (with ``check_versions``, its contents too; compiled code checks identity only); like every remaking in the
        copy's own dtype, in place where the shapes allow."""
        layers = self._members()
        if layers is None:
            return
        if dtype != self.dtype:
            self.dtype = dtype
            self._make(layers, in_place=False)
        elif not self.current(layers, check_versions):
            self._make(layers, in_place=True)

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + x A^T (s B)^T``: the layers' LoRA added to their base product ``y [rows, sum out]`` for input
        ``x [rows, in]``, in ``y``'s dtype (the copy is remade for another); ``y`` itself where no layer has a
        LoRA; in a steady block (:func:`lowbit.kernels.steady`) the factors are checked at its first call only."""
        token = steady_token()
        if token is None or self.checked is not token or self.dtype != y.dtype:
            self.refresh(y.dtype, check_versions=not torch.compiler.is_compiling())
            if token is not None:  # (never in compiled code, which would replay the write after every step)
                self.checked = token
        if self.a is None:
            return y
        return torch.addmm(y, x.to(self.dtype) @ self.a.t(), self.sb.t())
