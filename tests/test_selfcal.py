"""Self-calibration (lowbit.selfcal): windows sampled by the model itself -- their start, determinism, the prefix
property held-out windows rely on, the loop filter, and ``lowbit quantize --calib self`` end to end."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, save_tiny, tiny_model, tiny_tokenizer
from lowbit.cli import _calib_windows, main
from lowbit.data import sample_windows, text_windows
from lowbit.errors import LowbitError
from lowbit.selfcal import is_degenerate, sample_batch, self_calibration


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_windows_start_with_bos_never_end_and_are_deterministic(arch: str) -> None:
    model, tok = tiny_model(arch), tiny_tokenizer()
    wins = self_calibration(model, tok, 5, 24, seed=3, progress=False)
    assert wins.shape == (5, 24) and wins.dtype == torch.long
    assert (wins[:, 0] == tok.bos_token_id).all()
    assert not (wins[:, 1:] == tok.eos_token_id).any() and not (wins[:, 1:] == tok.pad_token_id).any()
    assert int(wins.max()) < VOCAB and len({tuple(w.tolist()) for w in wins}) == 5
    assert torch.equal(wins, self_calibration(model, tok, 5, 24, seed=3, progress=False))
    assert not torch.equal(wins, self_calibration(model, tok, 5, 24, seed=4, progress=False))


def test_more_windows_extend_the_draw_and_batches_do_not_change_it() -> None:
    """Held-out windows are drawn after the calibration windows without changing them, as for text."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    few = self_calibration(model, tok, 3, 16, seed=0, batch_size=3, progress=False)
    more = self_calibration(model, tok, 6, 16, seed=0, batch_size=4, progress=False)
    assert torch.equal(more[:3], few)


def test_sampling_follows_the_temperature() -> None:
    """At a very low temperature the draw is the greedy continuation (end of text banned); at 1 it is not."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    banned = [tok.eos_token_id, tok.pad_token_id]
    cold = sample_batch(model, tok.bos_token_id, [0], 12, seed=0, temperature=1e-4, banned=banned)[0]
    warm = sample_batch(model, tok.bos_token_id, [0], 12, seed=0, temperature=1.0, banned=banned)[0]
    ids = cold[:1][None]
    with torch.no_grad():
        for _ in range(11):
            logits = model(ids).logits[0, -1]
            logits[banned] = float("-inf")
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert torch.equal(cold, ids[0]) and not torch.equal(warm, cold)


def test_loop_detection() -> None:
    assert is_degenerate(torch.tensor([5, 6, 7] * 20))
    assert not is_degenerate(torch.arange(60))


def test_loops_and_duplicates_are_drawn_again_and_endless_loops_are_a_clear_error(monkeypatch) -> None:
    import lowbit.selfcal as selfcal

    good = {i: torch.randperm(VOCAB, generator=torch.Generator().manual_seed(i))[:20] for i in range(100)}
    good[3] = good[1]  # a duplicate of window 1
    loop = torch.tensor([5, 6] * 10)

    def fake(model, start, indices, seqlen, seed, temperature, banned):
        return torch.stack([loop if i in (0, 2) else good[i] for i in indices])

    monkeypatch.setattr(selfcal, "sample_batch", fake)
    wins = self_calibration(tiny_model("llama"), tiny_tokenizer(), 3, 20, batch_size=2, progress=False)
    assert [w.tolist() for w in wins] == [good[i].tolist() for i in (1, 4, 5)]
    monkeypatch.setattr(selfcal, "sample_batch", lambda model, start, indices, *a: loop.expand(len(indices), 20))
    with pytest.raises(
        LowbitError,
        match=r"samples loop: 0 of 2 usable windows after 12 draws; calibrate on text instead \(--calib ptb",
    ):
        self_calibration(tiny_model("llama"), tiny_tokenizer(), 2, 20, progress=False)


def test_cli_quantize_with_self_calibration(tmp_path: Path, capsys) -> None:
    folder = save_tiny(tmp_path / "fp")
    out = tmp_path / "q"
    args = ["quantize", str(folder), "--bits", "2", "--group-size", "32", "--init", "gptq", "--calib", "self",
            "--calib-windows", "4", "--calib-seqlen", "32", "--holdout-windows", "2", "--out", str(out),
            "--json"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["options"]["calib"] == "self" and result["options"]["calib_temperature"] == 1.0
    recorded = json.loads((out / "config.json").read_text())["quantization_config"]
    assert recorded["options"]["calib"] == "self"
    code = main(["quantize", str(folder), "--init", "gptq", "--calib", "self", "--calib-temperature", "0",
                 "--out", str(tmp_path / "bad")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--calib-temperature must be positive, got 0.0" in err and err.count("\n") == 1, err


def test_a_mixture_alternates_text_and_self_sampled_windows(tmp_path: Path, capsys) -> None:
    """``--calib FILE,self``: even windows are the file's own draw, odd ones the model's own samples, both with the
    calibration seed; the mixture is recorded in the checkpoint, and export (which may not self-sample) refuses it."""
    folder = save_tiny(tmp_path / "fp")
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    tok = tiny_tokenizer()
    args = argparse.Namespace(calib=f"{text},self", calib_seqlen=16, calib_seed=2, calib_temperature=1.0, device="cpu")
    wins = _calib_windows(args, folder, tok, 5)
    assert torch.equal(wins[0::2], sample_windows(text_windows(str(text), tok, 16, split="train"), 3, 2))
    assert torch.equal(wins[1::2], self_calibration(tiny_model("llama"), tok, 2, 16, seed=2, progress=False))
    with pytest.raises(LowbitError, match="not self"):
        _calib_windows(args, folder, tok, 4, export=True)
    out = tmp_path / "q"
    code = main(["quantize", str(folder), "--bits", "2", "--group-size", "32", "--init", "gptq", "--calib",
                 f"{text},self", "--calib-windows", "3", "--calib-seqlen", "16", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / "config.json").read_text())["quantization_config"]["options"]
    assert recorded["calib"] == f"{text},self" and recorded["calib_temperature"] == 1.0
