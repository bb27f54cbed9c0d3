"""Data-free calibration text: windows the full-precision model samples itself (``lowbit quantize --calib self``).

Why: calibration text from one corpus teaches a method that corpus. In P1, GPTQ W2 calibrated on PTB reaches a
perplexity of 305 on English Bible text, against 54 when calibrated on Bible text, and the other way round 2023 on
PTB against 113. Text the model samples from its own start token at temperature 1 follows the model's own
distribution -- a mixture of what it was trained on -- rather than one corpus, and needs no data at all (LLM-QAT,
Liu et al. 2023, calibrates and trains on such text).

Sampling is per window: window ``i`` draws its tokens with its own generator, seeded from ``(seed, i)``, by the
Gumbel-max trick on the logits (``argmax(logits / T + Gumbel noise)`` is a sample of ``softmax(logits / T)``). So
the first ``n`` windows are the same whatever number is asked for -- held-out windows extend the draw without
changing the calibration windows, as :func:`lowbit.data.sample_windows` does for text -- with the same noise
whatever the batch (only the batched matmuls' last bits can differ).
A window that loops (fewer than half of its 4-grams distinct) or repeats an earlier one is dropped, and the next
index is drawn instead.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.data import bos_id
from lowbit.errors import LowbitError

MIN_DISTINCT_4GRAMS = 0.5  # below this share of distinct 4-grams a window is a loop, not text


def start_token(tokenizer) -> int:
    """The token every window starts with: BOS where the tokenizer adds one (as text windows have it), else the
    token that separates documents (BOS or EOS), from which a model starts a new text."""
    for token in (bos_id(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    raise LowbitError("the tokenizer has neither a BOS nor an EOS token to start sampling from: calibrate on text "
                      "(--calib ptb or a .txt/.jsonl file)")  # fmt: skip


def window_generator(seed: int, index: int) -> torch.Generator:
    """The generator of window ``index``'s sampling noise (CPU, so every device draws the same noise)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def is_degenerate(window: torch.Tensor) -> bool:
    """Whether ``window`` loops: fewer than :data:`MIN_DISTINCT_4GRAMS` of its 4-grams are distinct."""
    grams = window.unfold(0, 4, 1)
    return torch.unique(grams, dim=0).shape[0] < MIN_DISTINCT_4GRAMS * grams.shape[0]


class GumbelNoise:
    """A logits processor that makes greedy decoding sample: it scales the logits by ``1 / temperature``, bans the
    end-of-text tokens and adds each row's own Gumbel noise (drawn on the CPU from that window's generator)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, banned: list[int]) -> None:
        self.generators, self.temperature, self.banned = generators, temperature, banned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        scores[:, self.banned] = float("-inf")
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).clamp_(1e-20, 1.0)
        return scores + (-torch.log(-torch.log(uniform))).to(scores.device)


@torch.no_grad()
def sample_batch(
    model: nn.Module,
    start: int,
    indices: list[int],
    seqlen: int,
    seed: int,
    temperature: float,
    banned: list[int],
) -> torch.Tensor:
    """Windows ``indices`` ``[len(indices), seqlen]``: ``start``, then ``seqlen - 1`` sampled tokens each; tokens in
    ``banned`` (the end of text) are never drawn, so every window is one running text. Decoding is transformers'
    own (``generate``, greedy over :class:`GumbelNoise`'s scores), with its KV cache."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    noise = GumbelNoise([window_generator(seed, i) for i in indices], temperature, banned)
    ids = torch.full((len(indices), 1), start, dtype=torch.long, device=device)
    # A fresh config, not the model's generation_config: its repetition penalty, n-gram bans or sampling settings
    # would bend the draw away from the model's own distribution.
    config = GenerationConfig(do_sample=False, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                              pad_token_id=start, eos_token_id=None)  # fmt: skip
    mask, processors = torch.ones_like(ids), LogitsProcessorList([noise])
    return model.generate(ids, attention_mask=mask, generation_config=config, logits_processor=processors).cpu()


def self_calibration(
    model: nn.Module,
    tokenizer,
    n: int,
    seqlen: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` calibration windows ``[n, seqlen]`` sampled by the full-precision ``model`` itself (see the module
    docstring); deterministic for a given model, device, ``seed`` and ``temperature``."""
    if tokenizer is None:
        raise LowbitError("the model has no tokenizer files: copy the tokenizer into the model folder")
    if n < 1 or seqlen < 5:
        raise LowbitError(f"self-calibration needs at least 1 window of at least 5 tokens, got {n} x {seqlen}")
    if temperature <= 0:
        raise LowbitError(f"--calib-temperature must be positive, got {temperature}")
    start = start_token(tokenizer)
    banned = sorted({t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None} - {start})
    budget = 2 * n + 8  # draws before giving up on a model whose samples keep looping
    kept: list[torch.Tensor] = []
    seen: set[bytes] = set()
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="self-calibration", unit="window", disable=not progress)
    index = 0
    try:
        while len(kept) < n:
            if index >= budget:
                raise LowbitError(f"the model's samples loop: {len(kept)} of {n} usable windows after {budget} "
                                  "draws; calibrate on text instead (--calib ptb or a .txt/.jsonl file)")  # fmt: skip
            take = list(range(index, min(index + batch_size, index + n - len(kept), budget)))
            index = take[-1] + 1
            for window in sample_batch(model, start, take, seqlen, seed, temperature, banned):
                key = window.numpy().tobytes()
                if is_degenerate(window) or key in seen:
                    continue
                seen.add(key)
                kept.append(window)
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return torch.stack(kept[:n])
