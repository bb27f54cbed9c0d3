"""Issue 17 items 8-14: one-line errors instead of tracebacks, and a first run that respects the user.

Each test failed on the code before the fix: a traceback or a silent wrong answer where a user needs one line,
a demo that rewrote tracked results, progress switched off by ``--json``, data cut to the benchmark's 128 examples,
float32 copies of 16-bit tensors, a GGUF cache keyed by path, and small untrue messages.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import tiny_text
from lowbit.cli import build_parser, main
from lowbit.fsutil import work_dir
from test_cli import _expect_error, run

ROOT = Path(__file__).resolve().parent.parent


def _text(tmp_path: Path, n_words: int = 800) -> Path:
    path = tmp_path / "t.txt"
    path.write_text(tiny_text(n_words))
    return path


def _sft(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"prompt": f"w{i} w{i + 1}", "response": f" w{i + 2} w{i + 3}"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----- item 8: one-line errors ------------------------------------------------------------------------------------
def test_non_utf8_jsonl_for_eval_is_one_line(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"text": "caf\u00e9 w1 w2"}, ensure_ascii=False).encode("latin-1") + b"\n")
    _expect_error(capsys, ["eval", tiny_folder, "--ppl", bad], r"latin1.jsonl.*not UTF-8.*convert it to UTF-8")


def test_non_utf8_jsonl_for_sft_is_one_line(ckpt: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"prompt": "a\u00f1o", "response": "w1"}, ensure_ascii=False).encode("latin-1"))
    out = tmp_path / "ft"
    _expect_error(capsys, ["finetune", ckpt, "--task", "sft", "--data", bad, "--out", out], r"not UTF-8")
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_max_new_tokens_checked_before_loading(n: str, tmp_path: Path, capsys) -> None:
    # The model path does not exist: the flag must be refused before any loading is tried.
    _expect_error(capsys, ["generate", tmp_path / "no-model", "hi", "--max-new-tokens", n], r"--max-new-tokens.*1")


def test_edited_bits_in_config_is_one_line(ckpt: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["bits"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    _expect_error(capsys, ["eval", ckpt, "--ppl", _text(tmp_path), "--seqlen", "32"], r"does not match its config")


def test_loftq_bad_iterations_is_one_line_and_writes_nothing(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    argv = ["quantize", tiny_folder, "--group-size", "32", "--init", "loftq", "--loftq-iters", "0", "--out", out]
    _expect_error(capsys, argv, r"--loftq-iters must be at least 1")
    assert not out.exists() and not work_dir(out).exists()


# ----- item 9: the demo does not rewrite tracked results, and shows rows as they come ------------------------------
def _import_p1(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import p1

    return p1


def test_demo_writes_results_outside_the_repository(monkeypatch) -> None:
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    match = re.search(r"--results\s+(\S+)", recipe)
    assert match, f"the demo writes the tracked bench/results/p1.json: {recipe}"
    target = match.group(1)
    assert not target.startswith("bench/results")
    ignored = subprocess.run(["git", "check-ignore", "-q", target], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{target} is not git-ignored"


def test_p1_results_path_and_rows_printed_as_they_finish(monkeypatch, tmp_path: Path, capsys) -> None:
    p1 = _import_p1(monkeypatch)
    tracked = p1.RESULTS.read_bytes() if p1.RESULTS.is_file() else None
    seen_before: dict[str, str] = {}

    def fake_measure(name: str, windows: int, keep, bible_column: bool = True) -> dict:
        seen_before[name] = capsys.readouterr().out
        bits = 32.0 if name == "fp32" else 4.3125
        return {"row": name, "label": p1.ROWS[name][0], "ppl": 50.0 + len(name), "seconds": 1.0,
                "peak_rss_mb": 10.0, "bits_per_weight": bits}  # fmt: skip

    monkeypatch.setattr(p1, "measure", fake_measure)
    results = tmp_path / "runs" / "p1.json"
    p1.main(["--rows", "fp32,rtn4", "--results", str(results)])
    assert "| FP32 reference |" in seen_before["rtn4"]  # the first row was shown before the second ran
    first = json.loads(results.read_text())
    assert set(first["rows"]) == {"fp32", "rtn4"} and "superseded" not in first
    p1.main(["--rows", "rtn4", "--results", str(results)])  # a rerun keeps the earlier result on record
    again = json.loads(results.read_text())
    assert again["superseded"] == [first["rows"]["rtn4"]] and again["rows"]["fp32"] == first["rows"]["fp32"]
    assert (p1.RESULTS.read_bytes() if p1.RESULTS.is_file() else None) == tracked


# ----- item 10: progress under --json, per-step training metrics during the run -----------------------------------
def test_json_keeps_progress_on_stderr(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    argv = ["quantize", tiny_folder, "--group-size", "32", "--out", tmp_path / "q", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and json.loads(out)["out"] == str(tmp_path / "q")
    assert "block" in err  # the engine's per-block progress bar


def test_training_metrics_logged_each_step(ckpt: Path, tmp_path: Path) -> None:
    from lowbit.finetune import TrainConfig, finetune

    out = tmp_path / "ft"
    seen = []

    def look(step: int) -> None:
        lines = (work_dir(out) / "metrics.jsonl").read_text().splitlines()
        seen.append([json.loads(line)["step"] for line in lines])

    config = TrainConfig(data=str(_text(tmp_path, 3000)), seqlen=32, samples=12, batch_size=4, seed=1)
    result = finetune(ckpt, out, config, progress=False, on_step=look)
    assert seen == [[1], [1, 2], [1, 2, 3]]
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in final] == pytest.approx(result["losses"])


def test_training_metrics_log_after_resume_reads_like_one_run(ckpt: Path, tmp_path: Path) -> None:
    from lowbit.finetune import TrainConfig, finetune

    out = tmp_path / "ft"
    config = TrainConfig(data=str(_text(tmp_path, 3000)), seqlen=32, samples=16, batch_size=4, seed=1, save_every=2)

    def crash(step: int) -> None:
        if step == 3:  # logged step 3, saved state at step 2: the rerun redoes step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(ckpt, out, config, progress=False, on_step=crash)
    result = finetune(ckpt, out, config, progress=False)
    assert result["resumed_from_step"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ----- item 11: finetune takes all of the user's data by default --------------------------------------------------
def test_finetune_defaults_to_all_examples(ckpt: Path, tmp_path: Path, capsys) -> None:
    data = _sft(tmp_path, 6)
    argv = ["finetune", ckpt, "--task", "sft", "--data", data, "--seqlen", "32", "--out", tmp_path / "ft", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["examples"] == 6


def test_benches_keep_the_protocol_sample_count() -> None:
    """Every bench that fine-tunes passes P2's sample count (TrainConfig's own default is all of the data)."""
    for bench in ("p2.py", "export.py"):
        assert re.search(r"TrainConfig\([^)]*samples=benchlib\.P2_SAMPLES", (ROOT / "bench" / bench).read_text())
    p2_samples = re.search(r"^P2_SAMPLES = (\d+)", (ROOT / "bench" / "benchlib.py").read_text(), re.M)
    assert p2_samples and int(p2_samples.group(1)) == 128


# ----- item 12: 16-bit sources stay 16-bit; a content-keyed GGUF cache you can list and clear ---------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpoint_keeps_the_source_dtype(dtype, tmp_path: Path, capsys) -> None:
    from conftest import tiny_model, tiny_tokenizer

    src = tmp_path / "src"
    tiny_model("llama").to(dtype).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    q = tmp_path / "q"
    code, _, err = run(capsys, "quantize", src, "--group-size", "32", "--out", q)
    assert code == 0, err
    name = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    stored = {}
    for shard in q.glob("model-*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})  # noqa: SIM118
    untouched = {k: v for k, v in stored.items() if k.rsplit(".", 1)[-1] not in ("qweight", "scales", "qzeros")}
    assert untouched and set(untouched.values()) == {name}, untouched
    # Loading still works, and the untouched tensors come back with the source's values.
    import lowbit

    model, _ = lowbit.load(q)
    with safe_open(src / "model.safetensors", "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model.get_input_embeddings().weight.detach().to(dtype), embed)
    code, out, err = run(capsys, "eval", q, "--ppl", _text(tmp_path), "--seqlen", "32", "--json")
    assert code == 0 and np.isfinite(json.loads(out)["ppl"]), err
    # Fine-tuning the checkpoint does not inflate it either.
    ft = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", q, "--data", _text(tmp_path), "--seqlen", "32", "--batch-size", "4",
                       "--samples", "4", "--out", ft)  # fmt: skip
    assert code == 0, err
    with safe_open(ft / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == name


def _fake_gguf(path: Path, quantized: bool) -> Path:
    """A small GGUF file (header and tensors only; conversion is stubbed in these tests)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    data = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 100
    if quantized:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor("blk.0.attn_q.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def stub_conversion(monkeypatch, tmp_path: Path) -> list[Path]:
    """Replace the slow transformers conversion by a stub that records each call."""
    import lowbit.models as models

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(gguf: Path, folder: Path) -> None:
        calls.append(gguf)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_gguf_cache_is_keyed_by_content(stub_conversion: list[Path], tmp_path: Path, capsys) -> None:
    from lowbit.models import resolve_model_path

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    a = _fake_gguf(tmp_path / "a" / "m.gguf", quantized=False)
    b = tmp_path / "b" / "m.gguf"
    b.write_bytes(a.read_bytes())
    assert resolve_model_path(a) == resolve_model_path(b)  # same content, another clone or venv
    assert len(stub_conversion) == 1
    code, out, _ = run(capsys, "cache", "list", "--json")
    entries = json.loads(out)["entries"]
    assert code == 0 and len(entries) == 1 and entries[0]["bytes"] > 0
    assert str(a.resolve()) in entries[0]["sources"] and str(b.resolve()) in entries[0]["sources"]

    with b.open("r+b") as f:  # another model at the same path converts again
        f.seek(-1, 2)
        f.write(b"\x01")
    assert resolve_model_path(b) != resolve_model_path(a)
    assert len(stub_conversion) == 2

    code, out, _ = run(capsys, "cache", "clear", "--json")
    assert code == 0 and json.loads(out)["removed"] == 2
    code, out, _ = run(capsys, "cache", "list", "--json")
    assert json.loads(out)["entries"] == []


# ----- item 13: say when a GGUF source is itself quantized --------------------------------------------------------
@pytest.mark.parametrize("quantized", [True, False])
def test_quantized_gguf_source_is_announced(quantized: bool, stub_conversion, tmp_path: Path, capsys) -> None:
    from lowbit.models import resolve_model_path

    path = _fake_gguf(tmp_path / "m.gguf", quantized=quantized)
    resolve_model_path(path)
    err = capsys.readouterr().err
    if quantized:
        assert re.search(r"m.gguf is itself quantized \(Q8_0\).*another grid", err), err
    else:
        assert "quantized" not in err


def test_readme_says_the_fp32_reference_is_the_dequantized_gguf() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"FP32 reference[^.]*dequantized[^.]*Q4_1", readme, re.S)


# ----- item 14: small lies and litter -----------------------------------------------------------------------------
def test_eval_says_when_fewer_windows_than_asked(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "eval", tiny_folder, "--ppl", _text(tmp_path), "--seqlen", "64", "--windows", "100",
                         "--json")  # fmt: skip
    windows = json.loads(out)["windows"]
    assert code == 0 and windows < 100
    assert re.search(rf"only {windows} windows.*--windows 100", err), err


def test_report_on_a_file_records_no_ptb_split(ckpt: Path, tiny_folder: Path, tmp_path: Path, capsys) -> None:
    text = _text(tmp_path)
    code, out, err = run(capsys, "report", ckpt, "--base", tiny_folder, "--data", text, "--seqlen", "32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data"] == str(text) and report["split"] is None


def test_rejected_group_size_leaves_no_work_folder(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    _expect_error(capsys, ["quantize", tiny_folder, "--group-size", "48", "--out", out], "does not divide")
    assert not out.exists() and not work_dir(out).exists()


def test_readme_storage_figures_match_the_formula() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"\(([\d.]+) / ([\d.]+) / ([\d.]+) for W4 / W3 / W2", readme)
    assert match
    assert [float(x) for x in match.groups()] == [round(b + (16 + b) / 64, 2) for b in (4, 3, 2)]


def test_calibration_help_names_every_data_driven_init(capsys) -> None:
    from lowbit.config import INITIALIZERS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    title = re.search(r"^calibration \(([^)]*)\)", capsys.readouterr().out, re.M).group(1)
    assert {n.strip() for n in title.split(",")} == {n for n, i in INITIALIZERS.items() if i.needs_data}


def test_ctrl_c_says_the_work_is_kept(tiny_folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import lowbit.calibrate

    out = tmp_path / "o"

    def interrupted(*args, **kwargs):
        work_dir(out).mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit.calibrate, "calibrate", interrupted)
    code = main(["quantize", str(tiny_folder), "--group-size", "32", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130
    assert "nothing was written" not in err and re.search(r"run the same command again to resume", err), err
    assert str(work_dir(out).name) in err


def test_ctrl_c_without_work_says_nothing_was_written(tiny_folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import lowbit.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit.evaluate, "perplexity", interrupted)
    code = main(["eval", str(tiny_folder), "--ppl", str(_text(tmp_path)), "--seqlen", "32"])
    assert code == 130 and "nothing was written" in capsys.readouterr().err
