"""Parallel (source, target) and monolingual text for language adaptation (protocol P3).

Three sources of pairs: the aligned Bible verses of the Debian SWORD modules (English WEB or KJV, Spanish
Reina-Valera 1909, read with ``pysword``), and any ``.tsv`` (``source<TAB>target`` per line) or ``.jsonl``
(``{"source": ..., "target": ...}`` per line) file. Monolingual text is a ``.txt`` file, one segment per line.

The P3 split is stored in the package as verse *references* (``resources/p3_split.json``), never as text, so the
test set is fixed whatever the installed module versions print; :func:`make_split` documents (and can redo) how
it was drawn: seed 0 over the verses all three modules have.
"""

from __future__ import annotations

import html
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from lowbit.data import read_utf8
from lowbit.errors import LowbitError

SWORD_DIR = Path("/usr/share/sword")
MODULES = {"en": "engWEB2015eb", "en-kjv": "engKJV2006eb", "es": "spaRV1909eb"}
DEBIAN_PACKAGES = {
    "engWEB2015eb": "sword-text-web",
    "engKJV2006eb": "sword-text-kjv",
    "spaRV1909eb": "sword-text-sparv",
}
# P3 sizes (../shared/BENCHMARK.md): test, validation, monolingual continued pre-training, translation fine-tuning.
SPLIT_SIZES = {"test": 200, "valid": 100, "mono": 1000, "train": 2000}


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    ref: str = ""  # where it came from: a verse reference or ``file:line``


# ----- cleaning ---------------------------------------------------------------------------------------------------
_DROPPED = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.S)  # footnotes and headings are not verse text
_TAG = re.compile(r"<[^>]+>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?»)\]])")


def clean_verse(markup: str) -> str:
    """Verse text from OSIS markup: footnotes and headings dropped, tags removed, whitespace normalized.

    A dropped note becomes a space, not nothing: the WEB puts notes between words (``born<note>..</note>Son``),
    and the stock cleaner runs those words together (``bornSon``). Pilcrows (KJV paragraph marks) go too.
    """
    text = _DROPPED.sub(" ", markup)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("¶", " ")
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


# ----- the Bible ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerseRef:
    book: str  # OSIS-ish book name as pysword knows it (e.g. "John")
    chapter: int
    verse: int

    def __str__(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"

    @classmethod
    def parse(cls, text: str) -> VerseRef:
        book, _, cv = text.rpartition(" ")
        chapter, _, verse = cv.partition(":")
        return cls(book, int(chapter), int(verse))


def _bible(module: str, sword_dir: Path):
    try:
        from pysword.modules import SwordModules
    except ImportError as exc:
        raise LowbitError(
            "the Bible data needs pysword: run `pip install 'lowbit[mt]'` (or `pip install pysword`)"
        ) from exc
    package = DEBIAN_PACKAGES.get(module, "the SWORD module")
    if not (sword_dir / "mods.d").is_dir():
        raise LowbitError(f"no SWORD modules in {sword_dir}: run `apt-get install {package}` (Debian/Ubuntu)")
    modules = SwordModules(str(sword_dir))
    found = modules.parse_modules()
    if module not in found:
        raise LowbitError(f"SWORD module {module} is not installed in {sword_dir}: run `apt-get install {package}`")
    return modules.get_bible_from_module(module)


@cache
def _open(module: str, sword_dir: Path):
    return _bible(module, sword_dir)


def verse(module: str, ref: str, sword_dir: Path = SWORD_DIR) -> str:
    """The cleaned text of one verse ("" where the module leaves it out)."""
    r = VerseRef.parse(ref)
    try:
        raw = _open(module, sword_dir).get(books=[r.book], chapters=[r.chapter], verses=[r.verse], clean=False)
    except (ValueError, IndexError, KeyError) as exc:
        raise LowbitError(f"{module} has no verse {ref}") from exc
    return clean_verse(raw)


def all_refs(module: str, sword_dir: Path = SWORD_DIR) -> list[str]:
    """Every verse reference of a module, in canonical order."""
    books = _open(module, sword_dir).get_structure().get_books()
    return [str(VerseRef(b.name, c, v)) for t in books.values() for b in t
            for c in range(1, b.num_chapters + 1) for v in range(1, b.chapter_lengths[c - 1] + 1)]  # fmt: skip


def bible_pairs(refs: list[str], source: str = "en", target: str = "es", sword_dir: Path = SWORD_DIR) -> list[Pair]:
    """Aligned verses for ``refs`` (``"John 3:16"``), from the modules named by language in :data:`MODULES`."""
    pairs = []
    for ref in refs:
        src, tgt = (verse(MODULES[lang], ref, sword_dir) for lang in (source, target))
        if not src or not tgt:
            raise LowbitError(f"verse {ref} is empty in the installed modules: use the shipped split")
        pairs.append(Pair(src, tgt, ref))
    return pairs


def make_split(source: str = "en", target: str = "es", seed: int = 0, sword_dir: Path = SWORD_DIR) -> dict:
    """Draw the P3 split: references whose verse is non-empty in both modules, shuffled with ``seed``, cut into
    :data:`SPLIT_SIZES` (a few minutes: every verse of both modules is read)."""
    src, tgt = MODULES[source], MODULES[target]
    in_target = set(all_refs(tgt, sword_dir))  # the English WEB has deuterocanonical books the RV 1909 lacks
    refs = [r for r in all_refs(src, sword_dir) if r in in_target]
    common = [r for r in refs if verse(src, r, sword_dir) and verse(tgt, r, sword_dir)]
    random.Random(seed).shuffle(common)
    split, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        split[name] = common[start : start + size]
        start += size
    return {"source": src, "target": tgt, "seed": seed, "verses": len(common), **split}


def p3_split() -> dict:
    """The fixed P3 split shipped with lowbit (references only)."""
    return json.loads(resources.files("lowbit").joinpath("resources/p3_split.json").read_text(encoding="utf-8"))


# ----- files ----------------------------------------------------------------------------------------------------------
def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a ``.tsv`` (``source<TAB>target``) or ``.jsonl`` (``source``/``target`` fields) file."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"pair file {path} does not exist: give a .tsv (source<TAB>target) or .jsonl file")
    if path.suffix not in (".tsv", ".jsonl"):
        raise LowbitError(f"{path}: pair files are .tsv (source<TAB>target) or .jsonl (source/target fields)")
    pairs = []
    with read_utf8(path) as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                cells = line.rstrip("\n").split("\t")
                if len(cells) != 2 or not all(c.strip() for c in cells):
                    raise LowbitError(f"{where}: expected `source<TAB>target` with both non-empty, got {len(cells)} "
                                      "field(s)")  # fmt: skip
                src, tgt = cells
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LowbitError(f"{where}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not all(
                    isinstance(record.get(k), str) for k in ("source", "target")
                ):
                    raise LowbitError(f'{where}: expected {{"source": "...", "target": "..."}}')
                src, tgt = record["source"], record["target"]
            pairs.append(Pair(src.strip(), tgt.strip(), where))
    if not pairs:
        raise LowbitError(f"{path} has no pairs")
    return pairs


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    """A ``.tsv`` of pairs (tabs and newlines inside a segment become spaces)."""
    from lowbit.fsutil import write_text

    write_text(path, "".join(f"{_one_line(p.source)}\t{_one_line(p.target)}\n" for p in pairs))


def read_monolingual(path: str | Path) -> list[str]:
    """Non-empty lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"text file {path} does not exist")
    lines = [line.strip() for line in read_utf8(path).read().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise LowbitError(f"{path} has no text")
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())
