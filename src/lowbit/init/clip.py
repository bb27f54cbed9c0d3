"""Block-wise learned clipping without an adapter: ApiQ-bw's objective with only the clipping logits trained.

This is OmniQuant's learnable weight clipping fitted to ``block_fp(X) ≈ block_q(Xq)``. lowbit uses it where the
result must run without LoRA, above all when a fine-tuned model is merged and re-quantized (``lowbit export
--requantize``): the merged weights are quantized so that the block outputs, not the weights, stay close.
"""

from __future__ import annotations

from lowbit.init.apiq_bw import ApiQBlockwise


class LearnedClip(ApiQBlockwise):
    name = "clip"
    needs_lora = False
    adapter = False
