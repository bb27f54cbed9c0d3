"""Walking a block's linear layers in forward order with their calibration inputs (for layer-wise methods).

Layer-wise initializers (``apiq-lw``, ``wsvd``) handle one linear layer at a time, in the order the block calls
them, each seeing two inputs: what the layer receives inside the full-precision block fed with ``x``, and what it
receives inside the *partially quantized* block (earlier layers already replaced) fed with ``xq``. Layers that
read the same tensor (q/k/v, gate/up) form one group and share one capture.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from lowbit.arch import block_linears
from lowbit.init.base import BlockContext


class _Stop(Exception):
    """Raised by a capture hook to end a block forward once the wanted input is recorded."""


def forward_groups(block: nn.Module, ctx: BlockContext) -> list[list[str]]:
    """Names of the block's linear layers in call order, grouped by shared input tensor."""
    # Inputs are kept alive and compared by identity: comparing addresses would be fooled by the allocator
    # reusing a freed input's memory for the next layer's input.
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])))
        for name, m in block_linears(block).items()
    ]
    try:
        with torch.no_grad():
            ctx.forward(block, ctx.window(ctx.x, 0))
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, inp in order:
        if name in {n for g in groups for n in g}:
            continue
        if groups and inp is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = inp
    return groups


@torch.no_grad()
def layer_input(block: nn.Module, name: str, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """What layer ``name`` receives when ``block`` runs on hidden states ``h``, as float ``[tokens, in]``; the
    block's forward stops there."""
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].reshape(-1, args[0].shape[-1]).float())
        raise _Stop

    handle = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with contextlib.suppress(_Stop):
            ctx.forward(block, h)
    finally:
        handle.remove()
    return got[0]


def walk(block: nn.Module, ctx: BlockContext) -> Iterator[tuple[list[str], nn.Module]]:
    """Yield ``(group, fp_block)`` in forward order; the caller replaces the group's layers in ``block``.

    ``fp_block`` is an untouched full-precision copy of the block, to capture the full-precision inputs from.
    Because the caller replaces a group before asking for the next, later groups see quantized earlier layers.
    """
    fp_block = copy.deepcopy(block)
    for group in forward_groups(block, ctx):
        yield group, fp_block
