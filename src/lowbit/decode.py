"""Greedy decoding in a loop of its own, gpt-fast's way: one compiled step a token, nothing else.

transformers' ``generate`` wraps every token in Python: input preparation, logits processors, stopping criteria and a
device-to-host sync to ask whether all rows are done. With CUDA graphs the model's step itself costs little host
time, so that wrapping is a large part of a small model's token: in P4 the 1.1B model took 2.08 ms a token with
every block linear doing nothing, of 3.58 ms in bf16 (README, "Results: protocol P4"; attention, norms, the head and
the loop's bookkeeping together, in shares not measured apart). Here a token is one call of a step -- the forward
over a static KV cache and the argmax, compiled with CUDA graphs on a GPU (``torch.compile`` mode
``reduce-overhead``) -- plus four small in-place updates of its static inputs; whether every row has ended is asked
every :data:`CHECK_EVERY` tokens, and the tokens past the end are cut afterwards, so the output is what ``generate``
with a static cache returns for greedy decoding without logits processors (tested token for token). Against a
dynamic cache a near tie can flip: attention over the static cache's longer, masked key range rounds differently
(``bench/cpu_int4.py``'s ``decode-w2`` row saw it once, at an RTN-W2 model's 15th token).

A :class:`Decoder` (its cache, static inputs and compiled step) is kept per model and batch size and reused while
it is long enough, so ``translate``'s batches and repeated ``generate`` calls compile once per batch size. The
prompt runs uncompiled: its length varies from call to call, and it runs once.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Iterable

import torch
from torch import nn

# Tokens between two checks of whether every row has ended (a device-to-host sync each); at most this many steps
# run past the end, and their tokens are cut.
CHECK_EVERY = 16
# Cache lengths are rounded up to a multiple of this, so that calls with somewhat longer prompts reuse a decoder.
LENGTH_STEP = 256

# How the step is compiled: CUDA graphs, and an error rather than a silent graph break (tests trace it with another
# backend on the CPU).
COMPILE: dict = {"mode": "reduce-overhead", "fullgraph": True}
# Settings of a generation config that make transformers' greedy search differ from a plain argmax, with the value
# that does nothing. A model whose config sets one is decoded by ``generate`` (see :func:`processors`).
_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "sequence_bias": None, "min_length": 0, "min_new_tokens": None, "encoder_repetition_penalty": 1.0,
            "exponential_decay_length_penalty": None}  # fmt: skip

# Each model's decoders, by batch size and whether compiled (``translate``'s last batch is smaller: kept apart, it
# does not make the full batches' decoder compile again); a decoder holds no reference to its model, which is passed
# to every call.
_decoders: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, bool], Decoder]] = weakref.WeakKeyDictionary()


def processors(model: nn.Module) -> list[str]:
    """The settings of ``model``'s generation config that the plain argmax here would ignore (empty: none)."""
    config = getattr(model, "generation_config", None)
    unusual = []
    for key, neutral in _NEUTRAL.items():
        value = getattr(config, key, None)
        if value not in (None, neutral, [], {}):
            unusual.append(key)
    return unusual


def _ids(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _step(model: nn.Module, decoder: Decoder) -> torch.Tensor:
    """The next token of every row after ``decoder.token``: the forward over the cache, then the argmax."""
    logits = model(input_ids=decoder.token, position_ids=decoder.position, attention_mask=decoder.mask,
                   **decoder.cached(decoder.slot)).logits  # fmt: skip
    return logits[:, -1].argmax(-1)


class Decoder:
    """A static KV cache for ``batch`` rows of at most ``length`` tokens, the step's static inputs, and the step.

    The step's inputs (the last token, its position, its cache slot and the attention mask) live at fixed
    addresses and are updated in place between calls, so a CUDA graph replays with no copies; the cache's tensors
    are static addresses already (transformers marks them)."""

    def __init__(self, model: nn.Module, batch: int, length: int, device: torch.device, compile: bool) -> None:
        from transformers import StaticCache

        self.length, self.device = length, device
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.step = _step
        if compile:
            for t in (self.token, self.position, self.slot, self.mask):
                torch._dynamo.mark_static_address(t)
            self.step = torch.compile(_step, **COMPILE)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes arguments on
        names = inspect.signature(inner.forward).parameters
        self.keep = "logits_to_keep" in names
        # transformers 5.24 names the cache ``cache`` and tracks positions in it; earlier 5.x take
        # ``past_key_values`` and the tokens' cache slots (``cache_position``)
        self.cache_name = "cache" if "cache" in names else "past_key_values"
        self.slots = "cache_position" in names

    def cached(self, slots: torch.Tensor) -> dict:
        """The forward's cache arguments for tokens going to cache ``slots``."""
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self.slots:
            kwargs["cache_position"] = slots
        return kwargs

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int, eos: list[int], pad: int) -> torch.Tensor:  # fmt: skip
        rows, prompt = input_ids.shape
        device = input_ids.device
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :prompt] = 1 if attention_mask is None else attention_mask
        # transformers' positions: real tokens count from 0 after any left padding; padding sits at 1 (masked)
        positions = self.mask[:, :prompt].cumsum(-1) - 1
        positions.masked_fill_(self.mask[:, :prompt] == 0, 1)
        extra = {"logits_to_keep": 1} if self.keep else {}
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=self.mask[:, :prompt],
                       **self.cached(torch.arange(prompt, device=device)), **extra).logits  # fmt: skip
        nxt = logits[:, -1].argmax(-1)
        out = torch.full((rows, prompt + max_new_tokens), pad, dtype=torch.long, device=device)
        out[:, :prompt] = input_ids
        ends = torch.tensor(eos, dtype=torch.long, device=device)
        running = torch.ones(rows, dtype=torch.bool, device=device)
        self.position.copy_(positions[:, -1:])
        done = max_new_tokens
        for i in range(max_new_tokens):
            nxt = torch.where(running, nxt, pad)
            out[:, prompt + i] = nxt
            if eos:
                running &= ~torch.isin(nxt, ends)
            if i + 1 == max_new_tokens or (eos and (i + 1) % CHECK_EVERY == 0 and not bool(running.any())):
                done = i + 1
                break
            self.token.copy_(nxt[:, None])
            self.position += 1
            self.slot.fill_(prompt + i)
            self.mask[:, prompt + i] = 1
            nxt = self.step(model, self)
        new = out[:, prompt : prompt + done]
        if eos:  # ``generate`` stops at the token that ends the last row: cut what ran past it
            hit = torch.isin(new, ends)
            if bool(hit.any(1).all()):
                done = int(hit.int().argmax(1).max()) + 1
        return out[:, : prompt + done]


@torch.no_grad()
def greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (left-padded when ``attention_mask`` has zeros), prompt included: the
    tokens ``model.generate(..., do_sample=False, cache_implementation="static")`` returns.
    ``eos_token_id``/``pad_token_id`` default to the model's generation config; ``compile`` (default: on CUDA)
    compiles the step with CUDA graphs, whose kernels may round differently from eager ones and so flip a near tie.

    A model whose generation config asks for more than an argmax (a repetition penalty, banned words, ...) is
    decoded by ``generate`` instead, with a note on stderr: its tokens then stay what the model's config asks for.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    config = getattr(model, "generation_config", None)
    eos = _ids(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    unusual = processors(model)
    if unusual:
        print(f"lowbit: note: the model's generation config sets {', '.join(unusual)}: decoding with transformers' "
              "generate", file=sys.stderr)  # fmt: skip
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=eos or None, pad_token_id=pad,
                              cache_implementation="static")  # fmt: skip
    device = input_ids.device
    compile = device.type == "cuda" if compile is None else compile
    rows, need = input_ids.shape[0], input_ids.shape[1] + max_new_tokens
    kept = _decoders.setdefault(model, {})
    decoder = kept.get((rows, compile))
    if decoder is None or decoder.length < need or decoder.device != device:
        kept.pop((rows, compile), None)
        decoder = None  # the old cache goes before the new one is allocated
        decoder = kept[rows, compile] = Decoder(model, rows, -(-need // LENGTH_STEP) * LENGTH_STEP, device, compile)
    return decoder(model, input_ids, attention_mask, max_new_tokens, eos, pad)
