"""Never lose a user's file or silently build a wrong model (issue 17, items 1-7).

Output folders are checked completely before any work, locked for the whole run, and only lowbit's own work
folders are ever deleted; resume compares the inputs' content; checkpoints carry digests checked on load; a
sharded index may only name files inside its own folder.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit
from conftest import run_until_killed, save_tiny, tiny_model, tiny_tokenizer
from lowbit.calibrate import calibrate
from lowbit.checkpoint import ADAPTER_CONFIG, INDEX, load_checkpoint
from lowbit.cli import main
from lowbit.engine import EngineOptions
from lowbit.errors import LowbitError
from lowbit.finetune import finetune
from test_finetune import Crash, crash_at, quantized, small, text_file

QLORA = lowbit.QuantConfig(bits=4, group_size=32, init="qlora", rank=4)
QUIET = EngineOptions(progress=False)


def _cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit code, its stderr)."""
    capsys.readouterr()  # drop what earlier steps printed
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(capsys, argv: list, pattern: str) -> None:
    code, err = _cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def _quantize_argv(folder: Path, out) -> list:
    return ["quantize", folder, "--bits", "4", "--group-size", "32", "--out", out]


def _stop_after(block: int, done: list[int]):
    """An ``on_block`` callback that records the finished blocks and crashes after ``block``."""

    def hook(i: int) -> None:
        done.append(i)
        if i == block:
            raise Crash

    return hook


# ----- 1. a resumed finetune keeps a non-empty --out ----------------------------------------------------------------
def test_resumed_finetune_refuses_a_non_empty_out_and_keeps_its_state(tmp_path: Path) -> None:
    ckpt = quantized(tmp_path)
    config = small(text_file(tmp_path), save_every=2)
    with pytest.raises(Crash):
        finetune(ckpt, tmp_path / "ft", config, progress=False, on_step=crash_at(5))  # saved at step 4
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match=r"ft exists and is not empty.*--overwrite.*interrupted run .* is kept"):
        finetune(ckpt, tmp_path / "ft", config, progress=False)
    assert (tmp_path / "ft" / "notes.txt").read_text() == "mine"
    assert (tmp_path / ".ft.partial" / "state" / "trainer.json").is_file()
    result = finetune(ckpt, tmp_path / "ft", config, overwrite=True, progress=False)  # asked for: replaced
    assert result["resumed_from_step"] == 4 and not (tmp_path / "ft" / "notes.txt").exists()


# ----- 2. resume fingerprints content ------------------------------------------------------------------------------
def test_resumed_quantization_refuses_a_source_replaced_by_another_of_the_same_size(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    with pytest.raises(Crash):
        calibrate(folder, QLORA, tmp_path / "q", engine=QUIET, on_block=_stop_after(1, []))
    other = tmp_path / "other"
    tiny_model("llama", layers=3, seed=1).save_pretrained(other)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    assert (other / "model.safetensors").stat().st_size == stat.st_size
    shutil.copyfile(other / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old times kept
    with pytest.raises(LowbitError, match="different settings, model or calibration data"):
        calibrate(folder, QLORA, tmp_path / "q", engine=QUIET)


def test_resumed_finetune_refuses_a_base_replaced_by_another_of_the_same_size(tmp_path: Path) -> None:
    first = quantized(tmp_path, name="q1")
    fp = tmp_path / "q2-fp"
    tiny_model("llama", seed=1).save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    calibrate(fp, QLORA, tmp_path / "q2", engine=QUIET)
    config = small(text_file(tmp_path), save_every=2)
    with pytest.raises(Crash):
        finetune(first, tmp_path / "ft", config, progress=False, on_step=crash_at(3))
    for src in (tmp_path / "q2").iterdir():  # same names and sizes, other weights (and their matching digests)
        if src.suffix == ".safetensors" or src.name == "checksums.sha256":
            assert src.stat().st_size == (first / src.name).stat().st_size
            shutil.copyfile(src, first / src.name)
    with pytest.raises(LowbitError, match="different base checkpoint"):
        finetune(first, tmp_path / "ft", config, progress=False)


# ----- 3. one run per output folder --------------------------------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path: Path, capsys) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=2)
    out, ready, go = tmp_path / "q", tmp_path / "ready", tmp_path / "go"
    script = tmp_path / "first.py"
    script.write_text(
        textwrap.dedent(f"""
        import time
        from pathlib import Path
        import lowbit
        from lowbit.calibrate import calibrate
        from lowbit.engine import EngineOptions

        def hold(i):
            if i == 0:
                Path({str(ready)!r}).touch()
                while not Path({str(go)!r}).exists():
                    time.sleep(0.05)

        config = lowbit.QuantConfig(bits=4, group_size=32, init="qlora", rank=4)
        calibrate({str(folder)!r}, config, {str(out)!r}, engine=EngineOptions(progress=False), on_block=hold)
        """)
    )
    first = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        with pytest.raises(LowbitError, match=rf"in use by another lowbit run \(pid {first.pid} on "):
            calibrate(folder, QLORA, out, engine=QUIET)
        _one_line_error(capsys, _quantize_argv(folder, out), rf"in use by another lowbit run \(pid {first.pid} on ")
        _one_line_error(capsys, [*_quantize_argv(folder, out), "--overwrite"], "in use by another lowbit run")
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, no work folder
    lowbit.load(out)
    assert sorted(p.name for p in out.glob("lora-*")) == []


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=2)
    out = tmp_path / "q"
    run_until_killed(
        tmp_path,
        f"""
        from pathlib import Path
        from lowbit.fsutil import output_lock

        with output_lock(Path({str(out)!r})):
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    lock = tmp_path / ".q.lock"
    assert json.loads(lock.read_text())["pid"] != os.getpid()  # left behind, naming the dead process
    calibrate(folder, QLORA, out, engine=QUIET)
    assert (out / "config.json").is_file() and not lock.exists()


# ----- 4. digests checked on load ----------------------------------------------------------------------------------
def _flip_payload_byte(path: Path) -> None:
    """Change one byte in the middle of the tensor data (the header stays valid, so the file still parses)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    data[middle] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(params=["save", "calibrate"])
def checkpoint(request, tmp_path: Path) -> Path:
    """A checkpoint written by ``lowbit.save`` (one file) or by streaming calibration (one shard per block)."""
    if request.param == "save":
        model = tiny_model("llama")
        lowbit.quantize(model, QLORA, progress=False)
        return lowbit.save(model, tmp_path / "ckpt", tiny_tokenizer())
    calibrate(save_tiny(tmp_path / "m"), QLORA, tmp_path / "ckpt", tokenizer=tiny_tokenizer(), engine=QUIET)
    return tmp_path / "ckpt"


def test_a_damaged_weight_file_is_refused_on_load_unless_asked(checkpoint: Path, capsys, monkeypatch) -> None:
    weights = next(iter(sorted(checkpoint.glob("model*.safetensors"))))
    _flip_payload_byte(weights)
    with pytest.raises(LowbitError, match=rf"{weights.name} does not match its recorded SHA-256.*--no-verify"):
        load_checkpoint(checkpoint)
    load_checkpoint(checkpoint, verify=False)
    monkeypatch.setenv("LOWBIT_VERIFY", "1")  # restored after the test: --no-verify sets it for the process
    _one_line_error(capsys, ["generate", checkpoint, "w1", "--max-new-tokens", "1"], "does not match its recorded")
    assert _cli(capsys, "generate", checkpoint, "w1", "--max-new-tokens", "1", "--no-verify")[0] == 0


def test_a_damaged_adapter_or_a_missing_adapter_config_is_an_error(checkpoint: Path) -> None:
    _flip_payload_byte(checkpoint / "adapter_model.safetensors")
    with pytest.raises(LowbitError, match=r"adapter_model\.safetensors does not match"):
        load_checkpoint(checkpoint)
    (checkpoint / ADAPTER_CONFIG).unlink()
    with pytest.raises(LowbitError, match=r"adapter weights .* but no adapter_config\.json"):
        load_checkpoint(checkpoint, verify=False)


def test_a_checkpoint_without_digests_loads_with_a_note(checkpoint: Path, capsys) -> None:
    reference = load_checkpoint(checkpoint)[0].state_dict()
    (checkpoint / "checksums.sha256").unlink(missing_ok=True)  # as written by an older lowbit
    loaded = load_checkpoint(checkpoint)[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    assert "has no checksums.sha256" in capsys.readouterr().err


# ----- 5. --overwrite never deletes the user's folders -------------------------------------------------------------
@pytest.mark.parametrize("where", ["dot", "cwd", "parent", "home", "root"])
def test_overwrite_refuses_the_current_folder_its_parents_home_and_root(
    where: str, tiny_folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    here, home = tmp_path / "here", tmp_path / "home"
    for folder in (here, home):
        folder.mkdir()
        (folder / "mine.txt").write_text("keep me")
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home))
    out = {"dot": ".", "cwd": here, "parent": "..", "home": home, "root": "/"}[where]
    _one_line_error(capsys, [*_quantize_argv(tiny_folder, out), "--overwrite"], "current folder|home folder")
    assert (here / "mine.txt").read_text() == (home / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "home", "tiny-llama"]


def test_a_partial_folder_the_user_made_is_never_deleted(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / ".q.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        _one_line_error(capsys, [*_quantize_argv(tiny_folder, tmp_path / "q"), *extra], r"\.q\.partial .*not made by")
    with pytest.raises(LowbitError, match="not made by lowbit"):
        calibrate(tiny_folder, QLORA, tmp_path / "q", engine=QUIET, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and not (tmp_path / "q").exists()


# ----- 6. the whole output path is checked before any work ---------------------------------------------------------
def test_out_dot_in_an_empty_folder_is_refused_before_any_work(tiny_folder: Path, tmp_path: Path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _one_line_error(capsys, _quantize_argv(tiny_folder, "."), "is the current folder")
    assert list(empty.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "tiny-llama"]


def test_a_dangling_symlink_as_out_is_refused_before_any_work(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    _one_line_error(capsys, _quantize_argv(tiny_folder, tmp_path / "link"), "symbolic link .*nowhere.*does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "tiny-llama"]


def test_resumed_quantization_refuses_a_non_empty_out_before_any_block_and_keeps_its_state(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    done: list[int] = []
    with pytest.raises(Crash):
        calibrate(folder, QLORA, tmp_path / "q", engine=QUIET, on_block=_stop_after(1, done))
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match="exists and is not empty"):
        calibrate(folder, QLORA, tmp_path / "q", engine=QUIET, on_block=done.append)
    assert done == [0, 1]  # no block was redone
    assert json.loads((tmp_path / ".q.partial" / "state.json").read_text())["next_block"] == 2
    summary = calibrate(folder, QLORA, tmp_path / "q", engine=QUIET, overwrite=True)
    assert summary["resumed_from"] == 2 and not (tmp_path / "q" / "notes.txt").exists()


# ----- 7. a sharded index may only name files inside its folder ----------------------------------------------------
def _point_index_at(folder: Path, shard: str) -> None:
    index = json.loads((folder / INDEX).read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard
    (folder / INDEX).write_text(json.dumps(index))


def _outside(kind: str, other: Path, name: str) -> str:
    """A shard name that leaves the folder: up and out, absolute, or a sibling folder's shard."""
    return {"parent": "../../x.safetensors", "absolute": str(other / name), "sibling": f"../{other.name}/{name}"}[kind]


@pytest.mark.parametrize("kind", ["parent", "absolute", "sibling"])
def test_a_checkpoint_index_naming_a_file_outside_is_refused(kind: str, tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m")
    for name in ("ckpt", "other"):
        calibrate(folder, QLORA, tmp_path / name, tokenizer=tiny_tokenizer(), engine=QUIET)
    _point_index_at(tmp_path / "ckpt", _outside(kind, tmp_path / "other", "model-base.safetensors"))
    (tmp_path / "ckpt" / "checksums.sha256").unlink(missing_ok=True)  # crafted: no digests, or matching ones
    with pytest.raises(LowbitError, match="not a plain file name inside"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("kind", ["parent", "absolute", "sibling"])
def test_a_source_index_naming_a_file_outside_is_refused(kind: str, tmp_path: Path) -> None:
    other = save_tiny(tmp_path / "other")
    with safe_open(other / "model.safetensors", "pt") as f:
        names = list(f.keys())
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(other / "config.json", source)
    shard = _outside(kind, other, "model.safetensors")
    (source / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    with pytest.raises(LowbitError, match="not a plain file name inside"):
        calibrate(source, QLORA, tmp_path / "q", engine=QUIET)
