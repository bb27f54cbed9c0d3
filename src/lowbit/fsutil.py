"""Atomic writes: outputs appear complete or not at all.

Everything lowbit writes goes to a temporary sibling first and is renamed into place on success, so a crash, a
kill or a user error never leaves a half-written checkpoint, and an existing output is replaced only when the
user asked for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def check_output_dir(out: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that would lose data: a non-empty folder without ``overwrite``, a file, or an input."""
    out = Path(out)
    resolved = out.resolve()
    for p in protected:
        p = Path(p).resolve()
        if resolved == p or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise LowbitError(
                f"output {out} overlaps the input {p}: choose a different --out; inputs are never modified"
            )
    if out.is_file():
        raise LowbitError(f"output {out} is a file: choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"output folder {out} exists and is not empty: choose another --out or pass --overwrite")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(finished: Path, out: Path) -> None:
    """Move a finished folder to ``out`` (replacing what is there) by renames, with default permissions."""
    default_permissions(finished)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    finished.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def default_permissions(folder: Path) -> None:
    """Give a finished output the permissions a plain ``mkdir``/``open`` would (mkstemp/mkdtemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def work_dir(out: Path) -> Path:
    """Where an unfinished run towards ``out`` keeps its progress (a hidden sibling, renamed or removed at the end)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
