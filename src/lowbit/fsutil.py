"""Output folders: atomic writes, guarded paths, one run at a time, lowbit's own work folders.

Everything lowbit writes goes to a temporary sibling first and is renamed into place on success, so a crash, a
kill or a user error never leaves a half-written checkpoint, and an existing output is replaced only when the
user asked for it. Every command checks its whole output path before any work (see :func:`check_output_dir`),
holds an exclusive lock on it for the whole run (:func:`output_lock`), and deletes only folders that carry
lowbit's marker (:func:`remove_work_dir`), never one the user made.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError

WORK_MARKER = ".lowbit-work"  # inside every work folder lowbit makes; only folders with it are ever deleted


def check_output_path(out: Path) -> None:
    """Refuse an output path that no run may write, whatever ``--overwrite`` says.

    The current folder, its parents and the home folder would be deleted by ``--overwrite`` (and a run's hidden
    work folder would sit inside its own output); a symbolic link would be replaced by a folder, or, dangling,
    fail only after the whole run; a parent that is a file or read-only would also fail only at the end.
    """
    out = Path(out)
    if out.is_symlink():
        dangling = "" if out.exists() else ", which does not exist"
        raise LowbitError(f"output {out} is a symbolic link to {os.readlink(out)}{dangling}: give a real folder "
                          "path as --out")  # fmt: skip
    resolved, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if cwd.is_relative_to(resolved) or home.is_relative_to(resolved):
        where = "the current folder or one of its parents" if cwd.is_relative_to(resolved) else "the home folder"
        raise LowbitError(f"output {out} is {where}: choose a new folder for --out, e.g. {out / 'lowbit-out'}")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"output {out} cannot be created: {parent} is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"output {out} cannot be created: {parent} is not writable; choose another --out")


def check_output_dir(out: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that would lose data, before any work: a bad path (:func:`check_output_path`), a
    non-empty folder without ``overwrite``, a file, an input, or a foreign folder where the work folder goes."""
    out = Path(out)
    check_output_path(out)
    resolved = out.resolve()
    for p in protected:
        p = Path(p).resolve()
        if resolved == p or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise LowbitError(
                f"output {out} overlaps the input {p}: choose a different --out; inputs are never modified"
            )
    if out.is_file():
        raise LowbitError(f"output {out} is a file: choose a folder path for --out")
    work = work_dir(out)
    check_work_dir(work)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        kept = f" (the interrupted run in {work} is kept for the rerun)" if work.is_dir() else ""
        raise LowbitError(f"output folder {out} exists and is not empty: choose another --out, move its files away, "
                          f"or pass --overwrite{kept}")  # fmt: skip


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


def check_work_dir(work: Path) -> None:
    """Refuse a non-empty folder at ``work`` that lowbit did not make: the user's data, never reused or deleted."""
    work = Path(work)
    foreign = work.is_dir() and not (work / WORK_MARKER).is_file() and any(work.iterdir())
    if work.is_symlink() or work.is_file() or foreign:
        raise LowbitError(f"{work} exists but was not made by lowbit (it has no {WORK_MARKER} marker): move or rename "
                          "it; lowbit keeps an unfinished run's work under that name")  # fmt: skip


def claim_work_dir(work: Path) -> Path:
    """Create the work folder ``work`` with lowbit's marker (or check that an existing one is lowbit's); returns it."""
    work = Path(work)
    check_work_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).touch()
    return work


def remove_work_dir(work: Path) -> None:
    """Delete the work folder ``work`` if there is one, refusing a folder lowbit did not make."""
    work = Path(work)
    check_work_dir(work)
    shutil.rmtree(work, ignore_errors=True)


def resume_work_dir(work: Path, state: str, key: str, overwrite: bool, what: str, main: bool = True) -> dict | None:
    """Open the work folder ``work`` of a job whose fingerprint (:func:`run_fingerprint`) is ``key``: returns the
    progress saved in its JSON file ``state`` to resume from, or None to start afresh.

    An interrupted run of another job (``what`` says how it differs) is refused, so that rerunning its own command
    still resumes it, unless ``overwrite`` discards it. On a fresh start the main process (``main``; the other
    ranks of a multi-process launch only read) empties the folder of an earlier attempt's leftovers; it claims it
    either way.
    """
    work = Path(work)
    path = work / state
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None and saved.get("fingerprint") != key:
        if not overwrite:
            raise LowbitError(f"{work} holds an interrupted {what}: rerun that command to resume it, or pass "
                              "--overwrite to discard it")  # fmt: skip
        saved = None
    if main:
        if saved is None:
            remove_work_dir(work)
        claim_work_dir(work)
    return saved


def lock_path(out: Path) -> Path:
    """The lock file of the output ``out``: a sibling, since ``out`` itself is replaced by a rename at the end."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.lock"


_HELD: dict[Path, int] = {}  # locks this process holds, with their nesting depth (export -> calibrate)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output ``out`` for the duration; a second run towards ``out`` is refused.

    The lock is ``flock`` on the file :func:`lock_path`, which records the holder's pid and host for the message.
    The kernel drops the lock when its process dies, even by ``kill -9``, so a lock file left behind by a dead
    run is stale by construction and the next run takes it over. The same process may take the lock again
    (nested commands); under a multi-process launch (``RANK`` set) only rank 0 takes it, the others follow it.
    """
    check_output_path(out)
    lock = lock_path(out)
    if os.environ.get("RANK", "0") != "0" or lock in _HELD:
        _HELD[lock] = _HELD.get(lock, 0) + 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
            if not _HELD[lock]:
                del _HELD[lock]
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, out)
    _HELD[lock] = 1
    try:
        yield
    finally:
        del _HELD[lock]
        lock.unlink(missing_ok=True)  # before closing: a waiter that opened this file sees it gone and retries
        os.close(fd)


def _acquire(lock: Path, out: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                who = "pid {pid} on {host}".format(**json.loads(holder))
            except (ValueError, KeyError, TypeError):
                who = "a process that is still starting"
            raise LowbitError(f"output {out} is in use by another lowbit run ({who}): wait for it to finish or choose "
                              "another --out") from None  # fmt: skip
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            return fd
        os.close(fd)  # the holder released and removed it between our open and our lock: take the new one


def with_output_lock(fn: Callable) -> Callable:
    """Decorate a command whose parameter ``out`` is its output: it holds :func:`output_lock` for the whole call."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with output_lock(Path(signature.bind(*args, **kwargs).arguments["out"])):
            return fn(*args, **kwargs)

    return locked


def sha256_files(paths: list[Path]) -> dict[str, str]:
    """SHA-256 hex digests of ``paths`` (files of one folder) by file name, hashed on threads (hashlib and reads
    release the GIL, so a sharded checkpoint hashes on several cores)."""
    paths = sorted(Path(p) for p in paths)

    def digest(path: Path) -> str:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip([p.name for p in paths], pool.map(digest, paths), strict=True))


def content_fingerprint(paths: list[Path]) -> list[list]:
    """``[name, size, sha256]`` of each file: the identity a resumed run checks its input folder against.

    Full-content digests rather than path, size or times: another model of the same size copied over the input
    (even with its times kept) must not be mixed into a half-finished run, and a folder that was only moved
    still resumes. Cost: one read of the input at each start, about 22 s for a 7B model's 13 GB at the 0.6 GB/s
    measured on one busy CPU core (shards hash in parallel), next to hours of calibration.
    """
    digests = sha256_files(paths)
    return [[p.name, p.stat().st_size, digests[p.name]] for p in sorted(Path(p) for p in paths)]


def run_fingerprint(settings: list, data: Iterable[bytes] = ()) -> str:
    """The identity of one job, which a resumed run must match: its settings and input identity (JSON, e.g. with
    :func:`content_fingerprint`), lowbit's version (another version may compute differently), and the bytes of
    its training or calibration data."""
    from lowbit import __version__

    h = hashlib.sha256(json.dumps([*settings, __version__]).encode())
    for chunk in data:
        h.update(chunk)
    return h.hexdigest()


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
