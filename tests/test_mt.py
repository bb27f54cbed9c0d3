"""Language adaptation (P3): loaders on local fixture files, the prompt format, the metric wiring, translate/eval
commands and the resumable adapt pipeline on a tiny model."""

import json
from pathlib import Path

import pytest
import torch

import lowbit
import lowbit.parallel as parallel
from conftest import ARCHS, VOCAB, save_tiny, tiny_model, tiny_text, tiny_tokenizer
from lowbit import decode
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.parallel import Pair, VerseRef, clean_verse, p3_split, read_monolingual, read_pairs
from lowbit.translate import cache_kwargs, padded, prompt, score, sft_record, shared_length, translate

# Verse markup as the installed SWORD modules return it (clean=False), shortened.
WEB_JOHN_3_16 = (
    '<q marker="" who="Jesus"><w lemma="strong:G1063">For</w> <w lemma="strong:G2316">God</w> '
    '<w lemma="strong:G3439">only</w> born</q><note placement="foot"><reference type="annotateRef">3:16 </reference>'
    'The phrase “only born” is from the Greek word.</note><q marker="" who="Jesus"><w lemma="strong:G5207">Son</w>, '
    '<w lemma="strong:G2443">that</w> <w lemma="strong:G3588">whoever</w> believes.</q>'
)
KJV_JOHN_3_16 = (
    '<div type="x-milestone" subType="x-preverse" sID="pv5746"/><div sID="gen8359" type="x-p"/> '
    '<q marker="" who="Jesus">¶ <w lemma="strong:G1063">For</w> <w lemma="strong:G2316">God</w> so loved the '
    "world, that he gave his only begotten Son &amp; more. </q>"
)


def test_clean_verse_keeps_words_apart_and_drops_notes() -> None:
    assert clean_verse(WEB_JOHN_3_16) == "For God only born Son, that whoever believes."
    assert clean_verse(KJV_JOHN_3_16) == "For God so loved the world, that he gave his only begotten Son & more."
    assert clean_verse('<title type="psalm">A Psalm.</title><w>EN</w> el principio .') == "EN el principio."


@pytest.mark.parametrize("ref", ["John 3:16", "1 John 4:8", "Song of Solomon 2:1"])
def test_verse_refs_round_trip(ref: str) -> None:
    assert str(VerseRef.parse(ref)) == ref


def test_bible_pairs_read_both_modules(monkeypatch) -> None:
    texts = {("engWEB2015eb", "John", 3, 16): WEB_JOHN_3_16, ("spaRV1909eb", "John", 3, 16): "<w>Porque</w> de tal"}

    class FakeBible:
        def __init__(self, module: str) -> None:
            self.module = module

        def get(self, books, chapters, verses, clean):
            assert not clean  # lowbit cleans the markup itself
            return texts.get((self.module, books[0], chapters[0], verses[0]), "")

    monkeypatch.setattr(parallel, "_open", lambda module, sword_dir: FakeBible(module))
    [pair] = parallel.bible_pairs(["John 3:16"])
    assert pair == Pair("For God only born Son, that whoever believes.", "Porque de tal", "John 3:16")
    with pytest.raises(LowbitError, match="John 3:17 is empty"):
        parallel.bible_pairs(["John 3:17"])


def test_make_split_uses_verses_both_modules_have(monkeypatch) -> None:
    from types import SimpleNamespace

    books = {  # English has Tobit (deuterocanonical), Spanish does not; John 1:2 is empty in Spanish
        "engWEB2015eb": [SimpleNamespace(name="Tobit", num_chapters=1, chapter_lengths=[3]),
                         SimpleNamespace(name="John", num_chapters=2, chapter_lengths=[4, 3])],
        "spaRV1909eb": [SimpleNamespace(name="John", num_chapters=2, chapter_lengths=[4, 3])],
    }  # fmt: skip

    class FakeBible:
        def __init__(self, module: str) -> None:
            self.module = module

        def get_structure(self):
            return SimpleNamespace(get_books=lambda: {"nt": books[self.module]})

        def get(self, books, chapters, verses, clean):
            if self.module == "spaRV1909eb" and (books[0], chapters[0], verses[0]) == ("John", 1, 2):
                return " "
            return f"<w>{books[0]}</w> {chapters[0]}:{verses[0]} "

    monkeypatch.setattr(parallel, "_open", lambda module, sword_dir: FakeBible(module))
    monkeypatch.setattr(parallel, "SPLIT_SIZES", {"test": 2, "train": 3})
    split = parallel.make_split(seed=0)
    assert split["verses"] == 6 and len(split["test"]) == 2 and len(split["train"]) == 3
    assert not {"John 1:2", "Tobit 1:1"} & set(split["test"] + split["train"])
    assert parallel.make_split(seed=0) == split and parallel.make_split(seed=1) != split


def test_missing_sword_modules_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="apt-get install sword-text-web"):
        parallel._bible("engWEB2015eb", tmp_path)


def test_shipped_p3_split_is_fixed_and_disjoint() -> None:
    split = p3_split()
    sizes = {k: len(split[k]) for k in parallel.SPLIT_SIZES}
    assert sizes == parallel.SPLIT_SIZES
    refs = [r for k in parallel.SPLIT_SIZES for r in split[k]]
    assert len(set(refs)) == len(refs)  # test, validation, monolingual and training verses never overlap
    assert all(str(VerseRef.parse(r)) == r for r in refs)
    assert (split["source"], split["target"], split["seed"]) == ("engWEB2015eb", "spaRV1909eb", 0)


def test_read_pairs_tsv_and_jsonl(tmp_path: Path) -> None:
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Hello .\tHola .\n\nGood day\tBuen día\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"source": "Hello .", "target": "Hola ."}\n{"source": "Good day", "target": "Buen día"}\n')
    a, b = read_pairs(tsv), read_pairs(jsonl)
    assert (
        [(p.source, p.target) for p in a]
        == [(p.source, p.target) for p in b]
        == [
            ("Hello .", "Hola ."),
            ("Good day", "Buen día"),
        ]
    )
    assert a[1].ref == f"{tsv}:3"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.tsv", "one\ttwo\nonly one field\n", r"bad.tsv:2: expected `source<TAB>target`"),
        ("bad.tsv", "one\t\n", r"bad.tsv:1: expected `source<TAB>target` with both non-empty"),
        ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"\n', r"bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"source": "a", "tgt": "b"}\n', r"bad.jsonl:1: expected \{\"source\""),
        ("empty.tsv", "\n\n", r"empty.tsv has no pairs"),
        ("pairs.csv", "a,b\n", r"pair files are .tsv"),
    ],
)
def test_read_pairs_errors_name_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LowbitError, match=message):
        read_pairs(path)


def test_read_monolingual(tmp_path: Path) -> None:
    path = tmp_path / "es.txt"
    path.write_text("  Uno dos.\n\nTres.\n")
    assert read_monolingual(path) == ["Uno dos.", "Tres."]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(LowbitError, match="has no text"):
        read_monolingual(tmp_path / "blank.txt")


def test_prompt_format_is_fixed() -> None:
    shots = [Pair("Good day", "Buen día")]
    assert prompt("Hello.") == "Translate English to Spanish.\nEnglish: Hello.\nSpanish:"
    assert prompt("Hello.", shots=shots) == (
        "Translate English to Spanish.\nEnglish: Good day\nSpanish: Buen día\nEnglish: Hello.\nSpanish:"
    )
    record = sft_record(Pair("Hello.", "Hola."))
    assert record == {"prompt": prompt("Hello."), "response": " Hola."}
    # the training sequence is exactly the zero-shot prompt followed by the target: train and test agree
    assert prompt("x", "es", "en") == "Translate Spanish to English.\nSpanish: x\nEnglish:"


def test_chrf_and_bleu_known_answers() -> None:
    # chrF (sacrebleu defaults: character n-grams 1..6, beta 2, whitespace ignored) of "abc" against "abd":
    # 1-grams P = R = 2/3, 2-grams P = R = 1/2, 3-grams 0; higher orders have no n-grams and do not count,
    # so chrF = 100 * (2/3 + 1/2 + 0) / 3.
    assert score(["abc"], ["abd"]).chrf == pytest.approx(100 * (2 / 3 + 1 / 2) / 3, abs=0.01)
    perfect = score(["El principio de todo ."], ["El principio de todo ."])
    assert perfect.chrf == pytest.approx(100) and perfect.bleu == pytest.approx(100)
    assert score(["nada"], ["El principio de todo ."]).bleu == pytest.approx(0)
    with pytest.raises(LowbitError, match="2 hypotheses for 1 references"):
        score(["a", "b"], ["a"])


def test_translate_is_batch_invariant_and_one_line() -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sources = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10", "w11 w12"]
    one = translate(model, tok, sources, batch_size=1, max_new_tokens=6)
    many = translate(model, tok, sources, batch_size=3, max_new_tokens=6)
    assert one == many and len(one) == 4  # left padding: a batch gives each segment's own greedy output
    assert all(isinstance(h, str) and "\n" not in h for h in one)
    assert tok.padding_side == "right"  # left as it was


SHOTS_4 = [Pair(f"w{i} w{i + 1} w{i + 2}", f"w{i + 3} w{i + 4}") for i in range(20, 60, 10)]


@pytest.mark.parametrize("arch", ARCHS)
def test_translate_runs_the_shared_shots_once_with_the_same_translations(arch: str, monkeypatch) -> None:
    """Few-shot prompts share their instruction and shots: those run once, at one row, and every batch -- rows of
    different lengths, padded after the shared tokens -- continues from a copy of their cache, with the logits of
    every step (recorded from ``generate``) and the translations of the left-padded full prompts, one at a time or
    batched (every architecture; also quantized W4 with a trained LoRA, where the rows' own tokens may now run on
    the decoding kernel, bf16 inside: hence its tolerance)."""
    import lowbit.translate as mt

    model, tok = tiny_model(arch), tiny_tokenizer()
    tolerance = {}
    if arch == "llama":
        lowbit.quantize(model, lowbit.QuantConfig(bits=4, group_size=32, init="qlora"), progress=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        tolerance = {"atol": 0.05, "rtol": 0.05}
    scores: list[torch.Tensor] = []
    real_generate = model.generate

    def recorded(*args, **kwargs):
        out = real_generate(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores))
        return out.sequences

    monkeypatch.setattr(model, "generate", recorded)
    sources = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10", "w11 w12", "w13"]
    prefixes = []
    real = mt._prefix_cache
    monkeypatch.setattr(mt, "_prefix_cache", lambda *a: prefixes.append(len(a[1])) or real(*a))
    shared = translate(model, tok, sources, shots=SHOTS_4, batch_size=2, max_new_tokens=6)
    encoded = tok([prompt(s, shots=SHOTS_4) for s in sources])["input_ids"]
    assert prefixes == [mt.shared_length(encoded)] and prefixes[0] >= mt.MIN_SHARED
    shared_scores, scores[:] = list(scores), []
    monkeypatch.setattr(mt, "MIN_SHARED", 10**6)  # no sharing: every row runs its whole prompt
    assert translate(model, tok, sources, shots=SHOTS_4, batch_size=2, max_new_tokens=6) == shared
    assert len(prefixes) == 1 and len(scores) == len(shared_scores) == 3
    for got, want in zip(shared_scores, scores, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    assert translate(model, tok, sources, shots=SHOTS_4, batch_size=1, max_new_tokens=6) == shared


def test_translate_shares_no_prefix_where_padding_after_it_would_change_attention(monkeypatch) -> None:
    """A sliding window counts padding: with padding after the shared tokens a row would see fewer real tokens, so a
    model whose window is shorter than a prompt runs whole prompts (and still translates as one row at a time); so
    do model types not known to see middle padding as left padding (GPT-Neo's local windows go by another name), a
    generation config asking for its own cache, short shared beginnings and beam search."""
    import transformers as tf

    import lowbit.translate as mt

    calls = []
    monkeypatch.setattr(mt, "_prefix_cache", lambda *a: calls.append(a) or pytest.fail("no prefix expected"))
    tok = tiny_tokenizer()
    sources = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10"]
    windowed = tiny_model("mistral")
    windowed.config.sliding_window = 16
    neo = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                               attention_types=[[["global", "local"], 1]], window_size=8,
                                               bos_token_id=1, eos_token_id=2)).eval()  # fmt: skip
    own_cache = tiny_model("llama")
    own_cache.generation_config.cache_implementation = "static"
    for model in (windowed, neo, own_cache):
        one = translate(model, tok, sources, shots=SHOTS_4, batch_size=1, max_new_tokens=4)
        assert translate(model, tok, sources, shots=SHOTS_4, batch_size=2, max_new_tokens=4) == one
    llama = tiny_model("llama")
    assert mt.shares_prefix(llama, 10**4) and not mt.shares_prefix(windowed, 17) and mt.shares_prefix(windowed, 16)
    translate(llama, tok, sources, batch_size=2, max_new_tokens=4)  # zero-shot: a few shared tokens only
    translate(llama, tok, sources, shots=SHOTS_4, batch_size=2, beams=2, max_new_tokens=4)
    assert not calls


def test_padded_rows_and_shared_length() -> None:
    """Rows sharing their first tokens are padded right after them (left-padded without any), and the shared length
    leaves every row a token of its own."""
    ids, mask = padded([[5, 6, 7, 8], [5, 6, 9]], pad=0, shared=2)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 6, 0, 9]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    ids, mask = padded([[5, 6, 7, 8], [5, 6]], pad=0)
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 5, 6]] and mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert shared_length([[5, 6, 7, 8], [5, 6, 9]]) == 2
    assert shared_length([[5, 6, 7], [5, 6, 7, 8]]) == 2  # the shorter row keeps its last token
    assert shared_length([[4, 6], [5, 6]]) == 0


def test_translate_prepares_each_batch_for_its_own_rows(monkeypatch) -> None:
    """The kernel copies are made per batch for that batch's decoding rows (segments x beams): a short last batch
    may decode on a kernel that a full one would not."""
    from lowbit import kernels

    seen = []
    monkeypatch.setattr(kernels, "prepare_decoding", lambda model, rows=1: seen.append(rows) or (0, 0))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    translate(model, tok, ["w1 w2", "w3", "w4 w5"], batch_size=2, beams=2, max_new_tokens=2)
    assert seen == [4, 2]


def test_static_cache_gives_the_same_translations_on_a_quantized_model() -> None:
    """The static KV cache (compiled into CUDA graphs on a GPU) changes speed, not tokens -- through QuantLinear."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lowbit.quantize(model, lowbit.QuantConfig(bits=3, group_size=32, init="qlora"), progress=False)
    sources = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10"]
    dynamic = translate(model, tok, sources, batch_size=2, max_new_tokens=6)
    assert translate(model, tok, sources, batch_size=2, max_new_tokens=6, static_cache=True) == dynamic
    assert decode._decoders[model].state[0] == 2  # the short last batch was filled up: one decoder for all
    assert cache_kwargs(True) == {"cache_implementation": "static"} and cache_kwargs(False) == {}


def _files(tmp_path: Path) -> dict[str, Path]:
    words = tiny_text(600, seed=5).split()
    pairs = [(" ".join(words[i : i + 4]), " ".join(words[i + 4 : i + 8])) for i in range(0, 480, 8)]
    files = {"mono": tmp_path / "mono.txt", "pairs": tmp_path / "pairs.tsv", "test": tmp_path / "test.tsv"}
    files["mono"].write_text("\n".join(tiny_text(40, seed=s) for s in range(40)) + "\n")
    files["pairs"].write_text("".join(f"{a}\t{b}\n" for a, b in pairs[:50]))
    files["test"].write_text("".join(f"{a}\t{b}\n" for a, b in pairs[50:]))
    return files


def test_translate_and_eval_mt_commands(tmp_path: Path, capsys) -> None:
    folder = save_tiny(tmp_path / "m")
    files = _files(tmp_path)
    (tmp_path / "in.txt").write_text("w1 w2\n\nw3\n")
    assert main(["translate", str(folder), "--input", str(tmp_path / "in.txt"), "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["segments"] == 2 and len(out["translations"]) == 2
    argv = ["eval", str(folder), "--mt", str(files["test"]), "--max-new-tokens", "4", "--batch-size", "4"]
    assert main([*argv, "--shots", str(files["pairs"]), "--num-shots", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["segments"] == 10 and result["shots"] == 2 and 0 <= result["chrf"] <= 100 and result["ppl"] > 1
    assert result["kernel"] == "default"
    assert main([*argv, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--kernel", "torch-int4", "--json"]) == 0  # a float model: nothing runs on it
    pinned = json.loads(capsys.readouterr().out)
    assert pinned["kernel"] == "torch-int4" and pinned["hypotheses"] == plain["hypotheses"]
    assert main(["translate", str(folder), "--input", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_text("a\tb\nc\n")
    assert main(["eval", str(folder), "--mt", str(tmp_path / "bad.tsv")]) == 2
    assert "bad.tsv:2" in capsys.readouterr().err
    assert main([*argv, "--shots", str(files["test"]), "--num-shots", "50"]) == 2
    assert "--num-shots 50" in capsys.readouterr().err


def test_adapt_runs_every_stage_and_resumes(tmp_path: Path, capsys) -> None:
    folder = save_tiny(tmp_path / "m")
    files = _files(tmp_path)
    out = tmp_path / "run"
    argv = ["adapt", str(folder), "--out", str(out), "--bits", "2", "--group-size", "32", "--init", "apiq-bw",
            "--epochs", "1", "--rank", "4", "--calib-windows", "4", "--calib-seqlen", "32", "--batch-size", "4",
            "--micro-batch", "2", "--save-every", "1",
            "--max-new-tokens", "4", *[f"--{k}={v}" for k, v in files.items()], "--json"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    for stage in ("data/train.jsonl", "quantized/config.json", "cpt/config.json", "sft/config.json", "eval.json"):
        assert (out / stage).is_file(), stage
    assert first["segments"] == 10
    record = json.loads((out / "data" / "train.jsonl").read_text().splitlines()[0])
    assert record["prompt"].startswith("Translate English to Spanish.\nEnglish: ")
    # SFT trained the adapter further than CPT left it
    cpt = json.loads((out / "cpt" / "training.json").read_text())
    sft = json.loads((out / "sft" / "training.json").read_text())
    assert cpt["adapter_sha256"] != sft["adapter_sha256"]
    for stage in (cpt, sft):  # micro-batches and per-step checkpoints reach both fine-tuning stages
        assert (stage["config"]["micro_batch"], stage["config"]["save_every"]) == (2, 1)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "adapt.json"}
    assert main(argv) == 0  # a rerun finds every stage finished and recomputes nothing
    assert json.loads(capsys.readouterr().out)["chrf"] == first["chrf"]
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "adapt.json"}
    other = [a if a != "--epochs" else "--warm-start" for a in argv]
    other[other.index("--warm-start") + 1] = "wsvd"
    assert main(other) == 2
    assert "other settings" in capsys.readouterr().err
