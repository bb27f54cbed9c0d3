"""The command line: every command's --json output, and a one-line error with nothing written for bad input."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_text
from lowbit.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_quantize_info_eval_generate_json(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    before = _digest(tiny_folder)
    out_dir = tmp_path / "q"
    code, out, _ = run(capsys, "quantize", tiny_folder, "--bits", "2", "--group-size", "32", "--out", out_dir, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["out"] == str(out_dir) and result["seconds"] >= 0 and result["peak_rss_mb"] > 0
    assert _digest(tiny_folder) == before  # the input model is never modified

    code, out, _ = run(capsys, "info", out_dir, "--json")
    info = json.loads(out)
    assert (info["bits"], info["group_size"], info["format"]) == (2, 32, "int")
    assert (
        info["bits_per_weight"] == 2 + (16 + 2) / 32 and info["quantized_params"] > 0 and info["checkpoint_bytes"] > 0
    )

    text = tmp_path / "t.txt"
    text.write_text(tiny_text(800))
    code, out, _ = run(capsys, "eval", out_dir, "--ppl", text, "--seqlen", "64", "--json")
    ev = json.loads(out)
    assert code == 0 and ev["tokens"] == ev["windows"] * 63 and ev["seqlen"] == 64 and ev["ppl"] > 1
    assert ev["model"] == str(out_dir) and ev["data"] == str(text) and ev["kernel"] == "default"
    code, out, _ = run(capsys, "eval", out_dir, "--ppl", text, "--seqlen", "64", "--kernel", "reference", "--json")
    assert code == 0 and json.loads(out)["kernel"] == "reference" and json.loads(out)["ppl"] == ev["ppl"]

    code, out, _ = run(capsys, "generate", out_dir, "w1 w2 w3", "--max-new-tokens", "5", "--json")
    gen = json.loads(out)
    assert code == 0 and gen["new_tokens"] <= 5 and isinstance(gen["completion"], str)
    code, out, _ = run(capsys, "generate", out_dir, "w1 w2 w3", "--max-new-tokens", "5", "--static-cache", "--json")
    assert code == 0 and json.loads(out) == gen  # a static cache changes speed, not tokens (nothing compiled here)
    reference = ["generate", out_dir, "w1 w2 w3", "--max-new-tokens", "5", "--kernel", "reference", "--json"]
    outputs = [run(capsys, *reference) for _ in range(2)]
    assert outputs[0][0] == outputs[1][0] == 0 and outputs[0][1] == outputs[1][1]  # float32 decoding, deterministic


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="torch-int4 needs torch 2.6+")
def test_generate_on_the_cpu_int4_kernel(tiny_folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """On the CPU a W4 checkpoint's layers decode on PyTorch's int4 op by default and with ``--kernel torch-int4``
    (checked by a spy: the op is called), never with ``--kernel reference``; an unknown kernel is a one-line usage
    error."""
    out_dir = tmp_path / "w4"
    assert run(capsys, "quantize", tiny_folder, "--bits", "4", "--group-size", "32", "--out", out_dir, "--json")[0] == 0
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or real(*a))
    args = ["generate", out_dir, "w1 w2 w3", "--max-new-tokens", "4", "--json"]
    for kernel, used in (([], True), (["--kernel", "reference"], False), (["--kernel", "torch-int4"], True)):
        calls.clear()
        code, out, _ = run(capsys, *args, *kernel)
        assert code == 0 and json.loads(out)["new_tokens"] <= 4 and bool(calls) == used, kernel
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args] + ["--kernel", "fastest"])
    assert exc.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


def test_generate_precision(ckpt: Path, capsys, monkeypatch) -> None:
    """``--precision``: auto keeps float32 on the CPU (exact results there); bf16 puts the model's float32
    parameters in bf16 and decodes under bf16 autocast, as ``auto`` does on a CUDA GPU; a GPU's auto is bf16."""
    from types import SimpleNamespace

    import lowbit.cli
    from lowbit.device import inference_precision, uses_bf16

    seen = []

    def spy(model, rows=1):
        seen.append((model.get_input_embeddings().weight.dtype, torch.is_autocast_enabled("cpu")))
        return 0, 0

    monkeypatch.setattr(lowbit.cli, "prepare_decoding", spy)
    for flags, expected in (([], (torch.float32, False)), (["--precision", "bf16"], (torch.bfloat16, True))):
        code, out, _ = run(capsys, "generate", ckpt, "w1 w2 w3", "--max-new-tokens", "3", "--json", *flags)
        assert code == 0 and json.loads(out)["new_tokens"] <= 3 and seen[-1] == expected, flags
    assert not uses_bf16("auto", torch.device("cpu")) and uses_bf16("bf16", torch.device("cpu"))
    for major, expected in ((8, True), (9, True), (7, False)):  # torch only emulates bf16 before Ampere
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, m=major: SimpleNamespace(major=m))
        assert uses_bf16("auto", torch.device("cuda")) == expected and not uses_bf16("fp32", torch.device("cuda"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with inference_precision(model, "bf16"):  # bf16 inside, the float32 parameters back afterwards
        assert model[0].weight.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert model[0].weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(ckpt), "w1", "--precision", "fp16"])
    assert exc.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_jsonl_data(ckpt: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": tiny_text(200, seed=i)}) for i in range(4)) + "\n")
    code, out, _ = run(capsys, "eval", ckpt, "--ppl", data, "--seqlen", "32", "--json")
    assert code == 0 and json.loads(out)["windows"] >= 20


def test_overwrite_replaces(ckpt: Path, tiny_folder: Path, capsys) -> None:
    code, _, _ = run(capsys, "quantize", tiny_folder, "--bits", "4", "--group-size", "32", "--out", ckpt, "--overwrite")
    assert code == 0
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert not _leftovers(ckpt.parent)


# ----- bad input: one line naming problem and fix, exit 2, nothing written ----------------------------------------
def _expect_error(capsys, argv: list, pattern: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def test_missing_model_path(tmp_path: Path, capsys) -> None:
    _expect_error(capsys, ["quantize", tmp_path / "nope", "--out", tmp_path / "o"], "does not exist")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path: Path, capsys) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    _expect_error(
        capsys, ["quantize", tmp_path / "junk", "--out", tmp_path / "o"], "not a model folder.*expected config.json"
    )
    _expect_error(capsys, ["info", tmp_path / "junk"], "not a lowbit checkpoint")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--bits", "5"], "bits.*choose --bits 2, 3, 4 or 8"),
        (["--bits", "8", "--format", "nf"], "nf format supports bits"),
        (["--format", "nf4", "--bits", "3"], "drop one of them"),
        (["--group-size", "0"], "group size must be positive"),
        (["--rank", "0"], "rank must be positive"),
    ],
)
def test_unsupported_settings(argv: list, pattern: str, tiny_folder: Path, tmp_path: Path, capsys) -> None:
    _expect_error(capsys, ["quantize", tiny_folder, "--out", tmp_path / "o", *argv], pattern)
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_group_size_not_dividing(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    _expect_error(
        capsys,
        ["quantize", tiny_folder, "--group-size", "48", "--out", tmp_path / "o"],
        r"does not divide the input width 64.*--group-size 64",
    )
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_existing_output_refused_without_overwrite(ckpt: Path, tiny_folder: Path, capsys) -> None:
    before = _digest(ckpt)
    _expect_error(capsys, ["quantize", tiny_folder, "--out", ckpt], "exists and is not empty.*--overwrite")
    assert _digest(ckpt) == before


def test_output_inside_input_refused(tiny_folder: Path, capsys) -> None:
    before = _digest(tiny_folder)
    _expect_error(capsys, ["quantize", tiny_folder, "--out", tiny_folder, "--overwrite"], "overlaps the input")
    assert _digest(tiny_folder) == before


def test_truncated_checkpoint(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    weights = ckpt / "model-block-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _expect_error(capsys, ["eval", ckpt, "--ppl", "ptb"], "does not match its recorded SHA-256.*re-create")
    monkeypatch.setenv("LOWBIT_VERIFY", "1")  # restored after the test: --no-verify sets it for the process
    _expect_error(capsys, ["eval", ckpt, "--ppl", "ptb", "--no-verify"], "truncated or corrupt.*re-create")
    _expect_error(capsys, ["info", ckpt], "truncated or corrupt")


def test_corrupt_input_model(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 10)
    _expect_error(capsys, ["quantize", tiny_folder, "--out", tmp_path / "o"], "cannot load the model")
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_empty_data_file(ckpt: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _expect_error(capsys, ["eval", ckpt, "--ppl", empty], "is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{oops\n')
    _expect_error(capsys, ["eval", ckpt, "--ppl", bad], r"bad.jsonl:2: not valid JSON")
    _expect_error(capsys, ["eval", ckpt, "--ppl", tmp_path / "missing.txt"], "does not exist")


def test_text_shorter_than_a_window(ckpt: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    _expect_error(capsys, ["eval", ckpt, "--ppl", short, "--seqlen", "64"], "fewer than one window")


def test_quantizing_a_checkpoint_again(ckpt: Path, tmp_path: Path, capsys) -> None:
    _expect_error(capsys, ["quantize", ckpt, "--out", tmp_path / "again"], "already a lowbit checkpoint")
    assert not (tmp_path / "again").exists()
