"""Initializers: how a block's weights become packed codes plus a LoRA start. One module per method.

``qlora`` and ``none`` round to nearest; ``loftq`` is data-free and alternates quantization with an SVD of the
residual; ``apiq-lw``, ``apiq-bw`` and ``wsvd`` use calibration activations from the engine
(:mod:`lowbit.engine`); ``gptq`` rounds for the block outputs with no adapter, for low-bit exports; ``blockap``
trains each block's weights and grid (EfficientQAT's Block-AP), then starts the LoRA from what is left.

Importing this package registers them in :data:`lowbit.config.INITIALIZERS`, where configs look them up.
"""

from __future__ import annotations

from lowbit.config import INITIALIZERS, QuantConfig
from lowbit.init.apiq_bw import ApiQBlockwise
from lowbit.init.apiq_lw import ApiQLayerwise
from lowbit.init.base import BlockContext, Initializer
from lowbit.init.blockap import BlockAP
from lowbit.init.gptq import GPTQ
from lowbit.init.loftq import LoftQ
from lowbit.init.qlora import NoAdapter, QLoRA
from lowbit.init.wsvd import WSVD

INITIALIZERS.update(
    {cls.name: cls for cls in (NoAdapter, QLoRA, LoftQ, WSVD, ApiQLayerwise, ApiQBlockwise, GPTQ, BlockAP)}
)


def get_initializer(config: QuantConfig) -> Initializer:
    """The initializer ``config`` names, made with its typed options."""
    return INITIALIZERS[config.init](config.method_options)


__all__ = ["BlockContext", "Initializer", "get_initializer"]
