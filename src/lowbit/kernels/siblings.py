"""Sibling layers: the quantized layers that read one tensor, computed as one product while decoding.

A Llama block calls ``q_proj``, ``k_proj`` and ``v_proj`` on one tensor and ``gate_proj`` and ``up_proj`` on another:
seven products a token where four would do, which is why gpt-fast keeps one fused ``wqkv``. At one row part of a
product's time does not grow with the layer -- a launch, a kernel too small to fill a GPU (TinyLlama's ``k_proj``
has 256 outputs), on the CPU the Python around the op -- so a kernel that concatenates siblings' codes along the
outputs and calls its op once pays that part once. lowbit's checkpoints keep the layers apart (PEFT adapters and
exports name them); only a decoding kernel's copy is fused.

Siblings are found, not named: :func:`shared_input_groups` runs the first block once on one token and groups its
quantized layers by the tensor each receives (by identity, as :mod:`lowbit.init.layerwise` groups calibration
captures), then takes the same names in every block -- so any architecture, fused projections (GPT-2's ``c_attn``)
and cross-reading layers included, gets exactly the groups it has.

At run time (:class:`Siblings`) the first member called computes every member's output and keeps the others' until
each is asked for; a member called with another tensor, or with the same one changed in place (eager calls), gets a
new product. Nothing is kept once every member has taken its output, so no activation outlives the step that made it
(CUDA graphs overwrite their outputs at the next replay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from lowbit.kernels import layer_buffers, versions

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear


class _Stop(Exception):
    """Raised when the probe reaches the second block: the first block's calls are all recorded."""


def shared_input_groups(model: nn.Module) -> list[list[QuantLinear]]:
    """Every set of two or more quantized layers in one block that receive the same tensor, in call order, found by
    one probe forward of one token (run on the reference kernel, so no kernel makes copies for it); none for a model
    the probe cannot call as ``model(input_ids=...)`` or without decoder blocks."""
    from lowbit import kernels
    from lowbit.arch import find_blocks
    from lowbit.errors import LowbitError
    from lowbit.layers import QuantLinear

    try:
        _, blocks = find_blocks(model)
    except LowbitError:
        return []
    calls: list[tuple[str, torch.Tensor]] = []  # kept alive: identity, not addresses the allocator may reuse
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
        for name, m in blocks[0].named_modules()
        if isinstance(m, QuantLinear)
    ]
    if len(blocks) > 1:
        hooks.append(blocks[1].register_forward_pre_hook(_stop))
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), kernels.pinned("reference"):
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    except _Stop:
        pass
    except (TypeError, ValueError):  # not a causal LM taking input_ids: decoded unfused
        return []
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:
        group = next((names for seen, names in groups if seen is x), None)
        if group is None:
            groups.append((x, [name]))
        elif name not in group:
            group.append(name)
    # A layer called on two tensors (shared weights) belongs to no group: one product could not serve both calls.
    twice = {name for name, _ in calls if sum(name in names for _, names in groups) > 1}
    names = [[n for n in group if n not in twice] for _, group in groups]
    return [[block.get_submodule(n) for n in group] for block in blocks for group in names if len(group) > 1]


def _stop(_module: nn.Module, _args: tuple) -> None:
    raise _Stop


class Member(NamedTuple):
    """What a fused layer keeps in its kernel cache: its group and its place in the group's outputs."""

    group: Siblings
    index: int

    def release(self) -> None:
        """Dissolve the group (:func:`lowbit.kernels.drop_caches` calls this when any member's cache goes)."""
        self.group.release()


class Siblings:
    """Layers that read one tensor, computed by one call of ``product(x, *weights)`` (``[..., in] -> [rows, sum of
    outputs]``) on the fused ``weights`` a kernel made from them."""

    def __init__(
        self,
        layers: list[QuantLinear],
        weights: tuple[torch.Tensor, ...],
        product: Callable[..., torch.Tensor],
        cache: str,
    ) -> None:
        self.layers = tuple(layers)
        self.weights = weights
        self.product = product
        self.cache = cache  # the layers' attribute that holds their Member
        self.splits = tuple(layer.out_features for layer in layers)
        self.sources = tuple(layer_buffers(layer) for layer in layers)
        self.versions = tuple(versions(b) for b in self.sources)
        self.x: torch.Tensor | None = None  # the input of the outputs still kept
        self.x_version: int | None = None
        self.outputs: tuple[torch.Tensor | None, ...] = (None,) * len(layers)

    def attach(self) -> None:
        """Make each layer a member: its kernel reads the group's outputs from now on."""
        for index, layer in enumerate(self.layers):
            layer.__dict__[self.cache] = Member(self, index)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s product ``x @ dequant(Q)^T``, ``[..., out]``; None when a member's buffers changed since
        the group was made (then the group is dissolved and the caller computes the layer alone)."""
        compiling = torch.compiler.is_compiling()
        kept = self.x is x and self.outputs[index] is not None and (compiling or self.x_version == versions((x,))[0])
        if not kept:
            if not compiling and not self.current():
                self.release()
                return None
            y = self.product(x, *self.weights)
            lead = x.shape[:-1]
            self.outputs = tuple(part.reshape(*lead, part.shape[-1]).contiguous() for part in y.split(self.splits, -1))
            self.x, self.x_version = x, None if compiling else versions((x,))[0]
        y = self.outputs[index]
        self.outputs = (*self.outputs[:index], None, *self.outputs[index + 1 :])
        if all(o is None for o in self.outputs):
            self.x = None
        return y

    def current(self) -> bool:
        """Whether every member still has the buffers (and, in place, the contents) the fused weights were made
        from; compiled code reads only identity, and a load or a move drops the caches (see ``QuantLinear``)."""
        for layer, source, made in zip(self.layers, self.sources, self.versions, strict=True):
            now = layer_buffers(layer)
            if any(a is not b for a, b in zip(now, source, strict=True)) or versions(now) != made:
                return False
        return True

    def release(self) -> None:
        """Take the group out of its members' caches (their kernel makes each its own copy again) and let go of the
        kept outputs."""
        for layer in self.layers:
            cached = layer.__dict__.get(self.cache)
            if isinstance(cached, Member) and cached.group is self:
                del layer.__dict__[self.cache]
        self.x, self.outputs = None, (None,) * len(self.layers)
