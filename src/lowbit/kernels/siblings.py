"""Sibling layers: the quantized layers that read one tensor, computed as one product while decoding.

A Llama block calls ``q_proj``, ``k_proj`` and ``v_proj`` on one tensor and ``gate_proj`` and ``up_proj`` on another:
seven products a token where four would do, which is why gpt-fast keeps one fused ``wqkv``. At one row part of a
product's time does not grow with the layer -- a launch, a kernel too small to fill a GPU (TinyLlama's ``k_proj``
has 256 outputs), on the CPU the Python around the op -- so a kernel that concatenates siblings' codes along the
outputs and calls its op once pays that part once. lowbit's checkpoints keep the layers apart (PEFT adapters and
exports name them); only a decoding kernel's copy is fused.

Siblings are found, not named: :func:`shared_input_groups` runs the model once on one token with every quantized
layer replaced by a recorder that returns zeros (nothing is computed or dequantized) and groups the layers by the
tensor they received -- by identity and version, so a tensor changed in place between two calls makes two groups.
Any architecture gets the groups its forward has: fused projections (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``) stay
alone, blocks that differ (dense, then mixture-of-experts blocks) are grouped each as it runs, and a layer called on
two tensors joins no group.

At run time (:class:`Siblings`) the first member called computes every member's output and keeps the others' until
each is asked for; a member called with another tensor (or, eagerly, with the same one changed in place since) gets
a new product, and a member whose buffers were replaced or changed since the fused copy was made gets its own,
alone; a member that stops taking its share (an adapter put on its weight after the fusing) dissolves the group at
the next step. Once every member has taken its output nothing is kept, so no activation outlives the step that made
it (CUDA graphs overwrite their outputs at the next replay). Two threads decoding on one model may each compute a
product the other could have served, never take the other's output.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.kernels import (
    SELECTED,
    LayerState,
    input_weight,
    layer_buffers,
    made_from,
    steady_token,
    version_of,
    versions,
)

if TYPE_CHECKING:
    from lowbit.layers import QuantLinear

_warned: set[str] = set()  # the probe failures already reported (each once a process)
_ABSENT = object()


def shared_input_groups(model: nn.Module) -> list[list[QuantLinear]]:
    """Every set of two or more quantized layers that receive the same tensor in one forward, each in call order;
    none for a model that cannot be called as ``model(input_ids=..., use_cache=False)`` (it decodes unfused, and a
    probe that fails says why once)."""
    from lowbit.layers import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        inspect.signature(model.forward).bind(input_ids=None, use_cache=False)
    except (TypeError, ValueError):
        return []
    if not layers:
        return []
    calls: list[tuple[QuantLinear, torch.Tensor, int]] = []  # inputs kept alive: identity, not reusable addresses

    def recorder(layer: QuantLinear) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            calls.append((layer, x, x._version))
            return x.new_zeros(*x.shape[:-1], layer.out_features)

        return forward

    # The recorder is an instance attribute, which shadows QuantLinear.forward; one a layer had already (a user's, or
    # the wrapper accelerate's hooks install) is put back afterwards.
    previous = [layer.__dict__.get("forward", _ABSENT) for layer in layers]
    for layer in layers:
        layer.__dict__["forward"] = recorder(layer)
    try:
        # inference_mode(False): inside an inference-mode block the probe's tensors would have no version counters
        with torch.inference_mode(False), torch.no_grad():
            weight = input_weight(model)  # the token ids go where the embeddings are
            device = weight.device if weight is not None else torch.device("cpu")
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    except Exception as exc:  # an optimization's probe must not stop decoding: the model decodes unfused
        message = f"{type(exc).__name__}: {exc}"
        if message not in _warned:
            _warned.add(message)
            print(f"lowbit: note: decoding without fused sibling layers: probing the model failed ({message})",
                  file=sys.stderr)  # fmt: skip
        return []
    finally:
        for layer, forward in zip(layers, previous, strict=True):
            if forward is _ABSENT:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = forward
    groups: list[tuple[torch.Tensor, int, list[QuantLinear]]] = []
    for layer, x, version in calls:
        group = next((members for seen, v, members in groups if seen is x and v == version), None)
        if group is None:
            groups.append((x, version, [layer]))
        elif layer not in group:
            group.append(layer)
    # A layer called on two tensors (or twice in a step) could not be served by one product: it joins no group.
    times = Counter(id(layer) for layer, _, _ in calls)
    found = [[m for m in members if times[id(m)] == 1] for _, _, members in groups]
    return [members for members in found if len(members) > 1]


class Member(LayerState):
    """What a fused layer keeps in its kernel cache: its group and its place among the group's outputs. A copied or
    pickled model is unfused (its layers make their own copies, or prepare_decoding fuses it anew)."""

    __slots__ = ("group", "index")

    def __init__(self, group: Siblings, index: int) -> None:
        self.group = group
        self.index = index

    def release(self) -> None:
        """Dissolve the group (:func:`lowbit.kernels.drop_caches` calls this when any member's cache goes)."""
        self.group.release()


class Siblings:
    """Layers that read one tensor, computed by one call of ``product(x, *weights)`` (``x [..., in] -> [rows, sum of
    outputs]``) on fused ``weights`` a kernel made from them; each layer's :class:`Member` sits in its ``cache``
    attribute."""

    def __init__(
        self,
        layers: list[QuantLinear],
        weights: tuple[torch.Tensor, ...],
        product: Callable[..., torch.Tensor],
        cache: str,
    ) -> None:
        self.layers = tuple(weakref.ref(layer) for layer in layers)  # weak: layer -> Member -> group, no cycle
        self.weights = weights
        self.product = product
        self.cache = cache
        self.splits = tuple(layer.out_features for layer in layers)
        self.sources = tuple(layer_buffers(layer) for layer in layers)  # what the fused copy was made from
        self.versions = tuple(versions(b) for b in self.sources)
        # per member, the steady block (lowbit.kernels.steady) its buffers were last checked in
        self.checked: list[object | None] = [None] * len(layers)
        # (input, its version, each member's output or None once taken) while outputs are kept, else None. One
        # attribute, read once and replaced whole: a call works on its own snapshot, so two threads decoding on one
        # model can cost a product twice but never hand one of them the other's output.
        self.kept: tuple[torch.Tensor, int | None, tuple[torch.Tensor | None, ...]] | None = None

    def attach(self) -> None:
        """Make each layer a member: its kernel reads the group's outputs from now on."""
        for index, ref in enumerate(self.layers):
            ref().__dict__[self.cache] = Member(self, index)

    def output(self, layer: QuantLinear, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s (``layer``'s) product ``x @ dequant(Q)^T``, ``[..., out]``; None, and eagerly the group
        dissolved, when ``layer``'s buffers were replaced or changed since the fused copy was made or a new input
        finds the last product's outputs untaken (a member no longer takes its share): the caller computes the layer
        alone."""
        compiling = torch.compiler.is_compiling()
        token = steady_token()
        if token is None or self.checked[index] is not token:
            if not self.current(layer, index, check_versions=not compiling):
                if not compiling:
                    self.release()
                return None
            if token is not None:  # (never in compiled code, which would replay the write after every step)
                self.checked[index] = token
        version = None if compiling else version_of(x)
        kept = self.kept
        if kept is None or kept[0] is not x or kept[1] != version or kept[2][index] is None:
            if kept is not None and kept[0] is not x and any(o is not None for o in kept[2]) and not compiling:
                # A new input while the last product's outputs wait: a member no longer takes its share (an adapter
                # now computes it, it left the model). Its siblings decode alone rather than compute it every step.
                self.release()
                return None
            y = self.product(x, *self.weights)
            lead = x.shape[:-1]
            outputs = tuple(part.reshape(*lead, part.shape[-1]).contiguous() for part in y.split(self.splits, -1))
            kept = (x, version, outputs)
        outputs = kept[2]
        left = (*outputs[:index], None, *outputs[index + 1 :])
        self.kept = None if all(o is None for o in left) else (x, version, left)
        return outputs[index]

    def current(self, layer: QuantLinear, index: int, check_versions: bool = True) -> bool:
        """Whether ``layer`` (member ``index``) still has the buffers its share of the fused copy was made from
        (:func:`lowbit.kernels.made_from`)."""
        return made_from(layer, self.sources[index], self.versions[index], check_versions)

    def release(self) -> None:
        """Take the group out of its members' caches (their kernel makes each its own copy again) and let go of the
        kept outputs."""
        for ref in self.layers:
            layer = ref()
            cached = None if layer is None else layer.__dict__.get(self.cache)
            if isinstance(cached, Member) and cached.group is self:
                del layer.__dict__[self.cache]
                # a kernel chosen for it in a steady block counted on the group's copy: the choice is made again
                # (alone, its copy may not fit)
                layer.__dict__.pop(SELECTED, None)
        self.kept = None
