"""Initializers: how a block's weights become packed codes plus a LoRA start. One module per method.

``qlora`` and ``none`` round to nearest; ``loftq`` is data-free and alternates quantization with an SVD of the
residual; ``apiq-lw``, ``apiq-bw`` and ``wsvd`` use calibration activations from the engine
(:mod:`lowbit.engine`); ``gptq`` rounds for the block outputs with no adapter, for low-bit exports; ``blockap``
trains each block's weights and grid (EfficientQAT's Block-AP), then starts the LoRA from what is left.
"""

from __future__ import annotations

from lowbit.init.apiq_bw import ApiQBlockwise
from lowbit.init.apiq_lw import ApiQLayerwise
from lowbit.init.base import BlockContext, Initializer, LoraSpec
from lowbit.init.blockap import BlockAP
from lowbit.init.gptq import GPTQ
from lowbit.init.loftq import LoftQ
from lowbit.init.qlora import NoAdapter, QLoRA
from lowbit.init.wsvd import WSVD

INITIALIZERS: dict[str, type[Initializer]] = {
    cls.name: cls for cls in (NoAdapter, QLoRA, LoftQ, WSVD, ApiQLayerwise, ApiQBlockwise, GPTQ, BlockAP)
}


def get_initializer(name: str) -> Initializer:
    return INITIALIZERS[name]()


__all__ = ["INITIALIZERS", "BlockContext", "Initializer", "LoraSpec", "get_initializer"]
