"""`lowbit report`: per-block / per-layer activation error against the full-precision model, JSON and PNG."""

import json
from pathlib import Path

from conftest import save_tiny, tiny_text
from lowbit.cli import main


def test_report_shows_error_by_depth(tmp_path: Path, capsys) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    text = tmp_path / "t.txt"
    text.write_text(tiny_text(2000))
    common = ["--bits", "2", "--group-size", "32", "--rank", "4", "--calib", str(text), "--calib-windows", "6",
              "--calib-seqlen", "32", "--json"]  # fmt: skip
    for init in ("qlora", "wsvd"):
        assert main(["quantize", str(folder), "--init", init, "--out", str(tmp_path / init), *common]) == 0
    capsys.readouterr()
    outputs = ["--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--json"]
    data = ["--data", str(text), "--seqlen", "32", "--windows", "4"]
    code = main(["report", str(tmp_path / "qlora"), str(tmp_path / "wsvd"), *data, *outputs])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["base"] == str(folder.resolve())  # the source recorded in the checkpoints
    rtn, wsvd = (report["checkpoints"][k] for k in sorted(report["checkpoints"]))  # "qlora (...)" < "wsvd (...)"
    assert len(rtn["blocks"]) == len(wsvd["blocks"]) == 3 and len(rtn["layers"]) == 21
    assert all(e > 0 for e in rtn["blocks"])
    assert wsvd["blocks"][-1] < rtn["blocks"][-1]  # activation-aware start drifts less by the last block
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
