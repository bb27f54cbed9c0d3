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

A :class:`Decoder` (its cache, static inputs and compiled step) is kept per model and reused while its batch size,
precision and device are the call's and its cache is long enough, so repeated ``generate`` calls compile once and
``translate`` (which fills its last batch up to the others' size) compiles once. The prompt runs uncompiled: its
length varies from call to call, and it runs once.

Sliding-window attention (Mistral, Gemma-2/3) is decoded with full-length cache layers (:func:`_unslide`):
transformers' sliding cache layers count their tokens in a Python int, which a compiled step reads as a constant, so
CUDA graphs would be recorded again at every token. A full layer counts in a tensor, and the model still builds its
sliding-window mask from its config, which keeps every query to its window; the price is memory, those layers
holding the whole length rather than the window. Chunked attention (Llama-4), whose mask counts from the chunk's
start in the cache, decodes uncompiled, with a note.
"""

from __future__ import annotations

import inspect
import sys
import types
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, StaticCache

# Tokens between two checks of whether every row has ended (a device-to-host sync each); at most this many steps
# run past the end, and their tokens are cut.
CHECK_EVERY = 16
# Cache lengths are rounded up to a multiple of this, so that calls with somewhat longer prompts reuse a decoder.
LENGTH_STEP = 256

# How the step is compiled: CUDA graphs, static shapes (a decoder's shapes never change), and an error rather than a
# silent graph break, which :meth:`Decoder.run` turns into eager steps with a note (tests trace it with another
# backend on the CPU).
COMPILE: dict = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
# Settings of a generation config that make transformers' greedy search differ from a plain argmax, with the values
# that do nothing; a model whose config sets one is decoded by ``generate`` (see :func:`processors`). Left out: what
# only sampling reads (temperature, top-k/p, ...) and what cannot change an argmax (``renormalize_logits``).
_NEUTRAL: dict[str, tuple] = {
    "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,), "no_repeat_ngram_size": (0,),
    "bad_words_ids": (), "suppress_tokens": (), "begin_suppress_tokens": (), "forced_bos_token_id": (),
    "forced_eos_token_id": (), "sequence_bias": (), "min_length": (0,), "min_new_tokens": (0,),
    "exponential_decay_length_penalty": (), "guidance_scale": (1.0,), "watermarking_config": (),
    "remove_invalid_values": (False,), "num_beams": (1,), "constraints": (), "force_words_ids": (),
    "penalty_alpha": (0.0,), "custom_generate": (), "dola_layers": (), "stop_strings": (), "max_time": (),
}  # fmt: skip

# Each model's decoder (one: a static cache is the size of the batch times the length, so one is kept at a time;
# :func:`release` frees it). A decoder holds no reference to its model, which is passed to every call.
_decoders: weakref.WeakKeyDictionary[nn.Module, Decoder] = weakref.WeakKeyDictionary()


def processors(model: nn.Module) -> list[str]:
    """The settings of ``model``'s generation config that the plain argmax here would ignore (empty: none)."""
    config = getattr(model, "generation_config", None)
    unusual = []
    for key, neutral in _NEUTRAL.items():
        value = getattr(config, key, None)
        if isinstance(value, torch.Tensor) or value not in (None, [], {}, *neutral):
            unusual.append(key)
    return unusual


def release(model: nn.Module) -> None:
    """Free the static cache (and compiled step) kept for ``model``: the next decoding builds them again."""
    _decoders.pop(model, None)


def _ids(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's own config: a multimodal model's text part, else ``config`` itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def forward_parameters(model: nn.Module) -> set[str]:
    """The names the model's forward takes (a PEFT or compiled wrapper's inner model's: they pass arguments on)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(getattr(inner, "_orig_mod", inner).forward).parameters)


def cache_argument(names: set[str]) -> str:
    """The keyword a forward (and ``generate``) with parameters ``names`` takes its KV cache by: transformers 5.24
    names it ``cache``, earlier 5.x releases ``past_key_values``."""
    return "cache" if "cache" in names else "past_key_values"


def _step(model: nn.Module, decoder: Decoder) -> torch.Tensor:
    """The next token of every row after ``decoder.token``: the forward over the cache, then the argmax."""
    logits = model(input_ids=decoder.token, position_ids=decoder.position, attention_mask=decoder.mask,
                   **decoder.cached(decoder.slot)).logits  # fmt: skip
    return logits[:, -1].argmax(-1)


def _state(model: nn.Module, rows: int, device: torch.device, compile: bool) -> tuple:
    """What a decoder's cache and step are made for: rows, device, whether compiled, the dtype the keys and values
    come in (the autocast dtype, else the model's), and inference mode (whose tensors a later call could not reset)."""
    from lowbit.kernels import input_weight

    weight = input_weight(model)
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return rows, device, compile, autocast or (weight.dtype if weight is not None else None), \
        torch.is_inference_mode_enabled()  # fmt: skip


class Decoder:
    """A static KV cache for ``state``'s rows of at most ``length`` tokens, the step's static inputs, and the step.

    The step's inputs (the last token, its position, its cache slot and the attention mask) live at fixed
    addresses and are updated in place between calls, so a CUDA graph replays with no copies; the cache's tensors
    are static addresses already (transformers marks them). The compiled step is a code object of the decoder's
    own, so its compilations (and dynamo's limit on them) live and go with the decoder."""

    def __init__(self, model: nn.Module, state: tuple, length: int) -> None:
        from transformers import StaticCache

        batch, device, compile = state[:3]
        self.state, self.length = state, length
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        names = forward_parameters(model)
        self.keep = "logits_to_keep" in names
        self.cache_name = cache_argument(names)
        self.slots = "cache_position" in names  # a release whose forward takes the tokens' cache slots gets them
        self.step = _step
        compiled = compile and _unslide(self.cache, model.config, length)
        if compile and not compiled:
            _note("the model has chunked attention layers, whose cache the compiled step would re-record at every "
                  "token: decoding without CUDA graphs")  # fmt: skip
        elif compiled:
            for t in (self.token, self.position, self.slot, self.mask):
                torch._dynamo.mark_static_address(t)
            own = types.FunctionType(_step.__code__.replace(), _step.__globals__, _step.__name__)
            self.step = torch.compile(own, **COMPILE)

    def cached(self, slots: torch.Tensor) -> dict:
        """The forward's cache arguments for tokens going to cache ``slots``."""
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self.slots:
            kwargs["cache_position"] = slots
        return kwargs

    def run(self, model: nn.Module) -> torch.Tensor:
        """One step; a step that cannot be compiled (a graph break, dynamo's limit on recompilations, a backend
        failure: nothing of the step has run then) is run eagerly from then on, with a note."""
        try:
            return self.step(model, self)
        except Exception as exc:
            if self.step is _step or not isinstance(exc, _compile_errors()):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _note(f"the decoding step could not be compiled ({first[:200]}): decoding without CUDA graphs")
            self.step = _step
            return _step(model, self)

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int, eos: list[int], pad: int) -> torch.Tensor:  # fmt: skip
        rows, prompt = input_ids.shape
        device = input_ids.device
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :prompt] = 1 if attention_mask is None else attention_mask
        # transformers' positions: real tokens count from 0 after any left padding; padding sits at 0 (masked)
        real = self.mask[:, :prompt]
        positions = (real.cumsum(-1) - 1).masked_fill_(real == 0, 0)
        extra = {"logits_to_keep": 1} if self.keep else {}
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=real,
                       **self.cached(torch.arange(prompt, device=device)), **extra).logits  # fmt: skip
        nxt = logits[:, -1].argmax(-1)
        out = torch.full((rows, prompt + max_new_tokens), pad, dtype=torch.long, device=device)
        out[:, :prompt] = input_ids
        ends = torch.tensor(eos, dtype=torch.long, device=device)
        running = torch.ones(rows, dtype=torch.bool, device=device)
        self.position.copy_(real.sum(-1, keepdim=True) - 1)  # the last real token's
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
            if self.slots:
                self.slot.fill_(prompt + i)
            self.mask[:, prompt + i] = 1
            nxt = self.run(model)
        new = out[:, prompt : prompt + done]
        if eos:  # ``generate`` stops at the token that ends the last row: cut what ran past it
            hit = torch.isin(new, ends)
            if bool(hit.any(1).all()):
                done = int(hit.int().argmax(1).max()) + 1
        return out[:, : prompt + done]


def _unslide(cache: StaticCache, config: PretrainedConfig, length: int) -> bool:
    """Give ``cache`` a full static layer of ``length`` tokens in place of each sliding-window layer (see the module
    docstring); False, with the cache left as it was, where a layer is chunked rather than sliding, whose mask a
    full layer would not give. A full layer's slots are the tokens' positions, so the sliding mask, which the model
    makes from its config's window and the cache's slots, hides what falls out of each window: the keys a query
    attends to are the sliding layer's."""
    from transformers.cache_utils import StaticLayer

    text = text_config(config)
    if getattr(text, "attention_chunk_size", None) is not None or "chunked_attention" in (
        getattr(text, "layer_types", None) or ()
    ):
        return not any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    cache.layers = [
        StaticLayer(max_cache_len=length) if getattr(layer, "is_sliding", False) else layer for layer in cache.layers
    ]
    return True


def _compile_errors() -> tuple[type[Exception], ...]:
    """What dynamo raises for a step it cannot compile (``FailOnRecompileLimitHit`` is not one of its exceptions)."""
    names = ("TorchDynamoException", "FailOnRecompileLimitHit")
    return tuple(e for e in (getattr(torch._dynamo.exc, n, None) for n in names) if e is not None)


def _note(text: str) -> None:
    print(f"lowbit: note: {text}", file=sys.stderr)


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
    """Greedy continuation of ``input_ids`` (padded where ``attention_mask`` has zeros; every token is real without
    one), prompt included: the tokens ``model.generate(..., do_sample=False, cache_implementation="static")``
    returns. ``eos_token_id``/``pad_token_id`` default to the model's generation config; ``compile`` (default: on
    CUDA) compiles the step with CUDA graphs, whose kernels may round differently from eager ones and so flip a near
    tie. On the CPU ``compile=True`` builds inductor's C++ kernels (a C++ compiler needed): for the default model at
    W4, batch 1, 1.7x the uncompiled step's tokens/s after 38-128 s of compiling, so it pays from about a thousand
    tokens decoded in one process, and nothing at batch 8 over few-shot prompts (``bench/cpu_int4.py``'s
    ``decode-compiled-w4``); hence not the default there, nor what the CLI asks for.

    A model whose generation config asks for more than an argmax (a repetition penalty, banned words, beams, ...) is
    decoded by ``generate`` instead, with a note on stderr: its tokens then stay what the model's config asks for.
    The model keeps its decoder (static cache and compiled step) for the next call with the same batch size,
    precision and device, and a long enough cache; :func:`release` frees it.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    config = getattr(model, "generation_config", None)
    eos = _ids(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    unusual = processors(model)
    if unusual:
        _note(f"the model's generation config sets {', '.join(unusual)}: decoding with transformers' generate")
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=eos or None, pad_token_id=pad,
                              cache_implementation="static")  # fmt: skip
    device = input_ids.device
    state = _state(model, input_ids.shape[0], device, device.type == "cuda" if compile is None else compile)
    from lowbit.kernels import keep_lora_copies, steady

    if state[3] is not None:  # the decoding kernel's LoRA copies, current before a step that may be compiled
        keep_lora_copies(model, state[3])
    need = input_ids.shape[1] + max_new_tokens
    decoder = _decoders.get(model)
    if decoder is None or decoder.state != state or decoder.length < need:
        release(model)
        decoder = None  # the old cache goes before the new one is allocated
        decoder = _decoders[model] = Decoder(model, state, -(-need // LENGTH_STEP) * LENGTH_STEP)
    with steady():  # eager steps check each layer's kernel state once, not every token (compiled ones never do)
        return decoder(model, input_ids, attention_mask, max_new_tokens, eos, pad)
