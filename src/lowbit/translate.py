"""Machine translation with a causal LM: one fixed prompt, batched greedy or beam decoding, chrF and BLEU.

The prompt is plain text (no chat template), so the same string serves zero-shot, few-shot (the shots are earlier
lines in the same format) and supervised fine-tuning (the prompt is the SFT prompt, the target the response)::

    Translate English to Spanish.
    English: <source>
    Spanish: <target>

Generation stops at the end of the line (or EOS) and at most ``max_new_tokens`` tokens; the hypothesis is the
first line of the continuation, stripped.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from lowbit import kernels
from lowbit.decode import cache_argument, forward_parameters, greedy, text_config
from lowbit.errors import LowbitError
from lowbit.parallel import Pair

LANGUAGES = {"en": "English", "es": "Spanish", "fr": "French", "de": "German", "pt": "Portuguese", "it": "Italian"}


def language(code: str) -> str:
    """The English name of a language code, as the prompt writes it (unknown codes are used as given)."""
    return LANGUAGES.get(code, code)


def prompt(source: str, src: str = "en", tgt: str = "es", shots: Sequence[Pair] = ()) -> str:
    """The prompt for ``source``; its continuation is `` <target>``. ``shots`` are solved examples put first."""
    head = f"Translate {language(src)} to {language(tgt)}.\n"
    solved = "".join(f"{language(src)}: {p.source}\n{language(tgt)}: {p.target}\n" for p in shots)
    return f"{head}{solved}{language(src)}: {source}\n{language(tgt)}:"


def sft_record(pair: Pair, src: str = "en", tgt: str = "es") -> dict[str, str]:
    """One JSONL record for ``lowbit finetune --task sft``: loss only on `` <target>`` (and EOS)."""
    return {"prompt": prompt(pair.source, src, tgt), "response": f" {pair.target}"}


@cache
def _line_end_ids(tokenizer) -> tuple[int, ...]:
    """Every token whose text contains a newline (generation ends at any of them) plus EOS."""
    ids = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


# Prompts that share at least this many leading tokens (few-shot prompts share their shots) run them once per call,
# not once per row of every batch: at the default model's 5 shots, 377 of a verse's 396-430 prompt tokens.
MIN_SHARED = 32


@torch.no_grad()
def translate(
    model: nn.Module,
    tokenizer,
    sources: Sequence[str],
    src: str = "en",
    tgt: str = "es",
    shots: Sequence[Pair] = (),
    batch_size: int = 8,
    beams: int = 1,
    max_new_tokens: int = 128,
    progress: bool = False,
    static_cache: bool = False,
) -> list[str]:
    """Translations of ``sources``, in order (greedy when ``beams`` is 1). ``static_cache``: greedy decoding runs
    lowbit's own loop (:func:`lowbit.decode.greedy`, CUDA graphs on a GPU), beam search transformers' with a static
    cache (:func:`cache_kwargs`).

    Greedy decoding without a static cache runs the prompts' shared beginning (the instruction and the shots: at
    least :data:`MIN_SHARED` tokens) once, and each batch continues from a copy of its KV cache, its rows padded
    between that beginning and their own tokens: the same tokens up to rounding (the shared tokens run at one row
    instead of a batch's), in a fraction of the prefill (``bench/cpu_int4.py``'s ``mt-w4``); where
    :func:`shares_prefix` allows it."""
    if tokenizer is None:
        raise LowbitError("the model has no tokenizer files: copy the tokenizer into the model folder")
    if batch_size < 1 or beams < 1:
        raise LowbitError("--batch-size and --beams must be at least 1")
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    ends = list(_line_end_ids(tokenizer))
    device = next(model.parameters()).device
    texts = [prompt(s, src, tgt, shots) for s in sources]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    names = forward_parameters(model)
    shared = 0
    if beams == 1 and not static_cache and encoded:
        shared = shared_length(encoded)
        longest = max(map(len, encoded)) + max_new_tokens
        if shared < MIN_SHARED or not shares_prefix(model, longest):
            shared = 0
    prefix = _prefix_cache(model, encoded[0][:shared], device, names) if shared else None
    out: list[str] = []
    # a steady block: the kernels check each layer's state at its first call, not at every token (kernels.steady)
    with tqdm(total=len(sources), desc="translating", unit="seg", disable=not progress) as bar, kernels.steady():
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start : start + batch_size]
            # lowbit's loop: a short last batch is filled up with copies of its last row, so that one decoder (one
            # compiled step) serves every batch; the copies' translations are dropped
            fill = batch_size - len(rows) if static_cache and beams == 1 and len(sources) > batch_size else 0
            # kernel copies for this batch's decoding steps, made while they fit rather than inside a compiled step
            kernels.prepare_decoding(model, rows=(len(rows) + fill) * beams)
            ids, mask = (t.to(device) for t in padded([*rows, *[rows[-1]] * fill], pad, shared))
            if static_cache and beams == 1:
                gen = greedy(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=ends,
                             pad_token_id=pad)[: len(rows)]  # fmt: skip
            else:
                extra = {}
                if prefix is not None:
                    cache = copy.deepcopy(prefix)
                    cache.batch_repeat_interleave(len(rows))
                    extra[cache_argument(names)] = cache
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=beams, eos_token_id=ends, pad_token_id=pad,
                                     **cache_kwargs(static_cache), **extra)  # fmt: skip
            for row in gen[:, ids.shape[1] :]:
                out.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
            bar.update(len(rows))
    return out


def shared_length(encoded: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``encoded`` share, leaving each row at least one of its own (the one that
    ``generate`` runs first)."""
    first, n = encoded[0], 0
    limit = min(map(len, encoded)) - 1
    while n < limit and all(row[n] == first[n] for row in encoded):
        n += 1
    return n


def padded(rows: Sequence[Sequence[int]], pad: int, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[rows, longest]`` for ``rows``, which share their first ``shared`` tokens:
    the padding goes right after those (before everything else without them), so the rows end together, where
    generation continues, and the shared tokens sit at the same positions in every row."""
    width = max(map(len, rows))
    ids = [[*r[:shared], *[pad] * (width - len(r)), *r[shared:]] for r in rows]
    mask = [[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


# The model types whose attention sees a shared prefix and padding after it as it sees left padding: positions from
# the mask (rotary or learned), nothing counted in cache slots but a sliding window, which :func:`shares_prefix`
# checks. Tested on each (tests/test_mt.py); elsewhere -- slot-based biases such as ALiBi (MPT, Bloom), local
# windows under other names (GPT-Neo), recurrent layers (hybrid linear-attention models) -- prompts run whole.
PREFIX_TYPES = frozenset({"llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"})


def shares_prefix(model: nn.Module, length: int) -> bool:
    """Whether greedy translation may run the prompts' shared beginning once for ``model``, with rows of at most
    ``length`` tokens (prompt and new tokens): a model type of :data:`PREFIX_TYPES`, whose cache is made of plain
    attention layers, every sliding window (which counts cache slots, padding included, so padding in the middle
    of a row would leave it fewer real tokens) holding the whole row, and no cache implementation of its own asked
    for by its generation config (``generate`` takes no cache beside one)."""
    from transformers import DynamicCache

    config = model.config
    text = text_config(config)
    asked = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if text.model_type not in PREFIX_TYPES or asked not in (None, "hybrid"):
        return False
    if getattr(text, "attention_chunk_size", None) is not None:
        return False
    for layer in DynamicCache(config=config).layers:
        if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            return False
        window = getattr(layer, "sliding_window", None)
        if window is not None and window < length:
            return False
    return True


def _prefix_cache(model: nn.Module, ids: Sequence[int], device: torch.device, names: set[str]):
    """The KV cache of ``ids`` run at one row (the logits of the last token only, where the model can)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in names else {}
    model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **{cache_argument(names): cache},
          **keep)  # fmt: skip
    return cache


def cache_kwargs(static: bool) -> dict[str, str]:
    """``generate`` keyword arguments for a static KV cache (or none): beam search's, as greedy decoding with a
    static cache runs :func:`lowbit.decode.greedy`.

    With fixed-size cache buffers every decoding step has the same shapes, so on a CUDA GPU transformers compiles
    the step (``torch.compile``, CUDA graphs) and replays it: Python and kernel-launch overhead, most of a low-bit
    model's decoding time when eager (P4: a 1.1B W4 model decodes 17 tokens/s eager, 123 with graphs), is gone,
    at the price of a compilation up front. Elsewhere the cache is static and nothing is compiled, and the tokens
    are the same; compiled kernels may round differently, which can flip a near tie.
    """
    return {"cache_implementation": "static"} if static else {}


@dataclass(frozen=True)
class MTScores:
    chrf: float
    bleu: float
    segments: int

    def as_dict(self) -> dict[str, float | int]:
        return {"chrf": self.chrf, "bleu": self.bleu, "segments": self.segments}


def score(hypotheses: Sequence[str], references: Sequence[str]) -> MTScores:
    """Corpus chrF and BLEU with sacrebleu's defaults (chrF: character 6-grams, beta 2; BLEU: 13a, 4-grams)."""
    if len(hypotheses) != len(references):
        raise LowbitError(f"{len(hypotheses)} hypotheses for {len(references)} references: give one per line")
    if not references:
        raise LowbitError("nothing to score: no references")
    try:
        import sacrebleu
    except ImportError as exc:
        raise LowbitError("chrF/BLEU need sacrebleu: run `pip install 'lowbit[mt]'`") from exc
    refs = [list(references)]
    chrf = sacrebleu.corpus_chrf(list(hypotheses), refs).score
    bleu = sacrebleu.corpus_bleu(list(hypotheses), refs).score
    return MTScores(round(chrf, 2), round(bleu, 2), len(references))
