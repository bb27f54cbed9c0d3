"""``lowbit adapt``: teach a low-bit model a new language, in resumable stages (protocol P3).

Stages, each writing its own output under ``OUT`` and skipped on a rerun once finished (an interrupted stage
resumes from its own checkpoint: calibration per block, fine-tuning every ``save_every`` optimizer steps):

1. ``data/`` -- ``mono.txt`` (target-language text), ``train.jsonl`` (SFT records with the fixed translation
   prompt), ``test.tsv``, ``valid.tsv`` and ``shots.tsv``; from the shipped P3 Bible split unless files are given;
2. ``quantized/`` -- calibration (ApiQ by default) on target-language windows of ``mono.txt``;
3. ``cpt/`` -- continued pre-training of the LoRA factors on ``mono.txt``;
4. ``sft/`` -- translation fine-tuning on ``train.jsonl`` (loss on the target side only);
5. ``eval.json`` -- chrF/BLEU of greedy translations of ``test.tsv`` and perplexity on its target side.

The same stages are plain commands (``lowbit quantize``/``finetune``/``eval --mt``); this module only chains them
with P3's settings and keeps the bookkeeping, so a recipe change is one place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.fsutil import with_output_lock, write_json, write_text
from lowbit.parallel import Pair, bible_pairs, p3_split, read_monolingual, read_pairs, write_pairs
from lowbit.translate import score, sft_record, translate

SHOTS = 5
WARM = {"warm_start": "wsvd", "epochs": 2}  # ApiQ-bw's start in P3: the P1 warm recipe


@dataclass
class AdaptConfig:
    """One adaptation run; the defaults are protocol P3 (../shared/BENCHMARK.md)."""

    quant: QuantConfig = field(default_factory=lambda: QuantConfig(bits=2, init="apiq-bw", options=dict(WARM)))
    src: str = "en"
    tgt: str = "es"
    mono: str | None = None  # target-language .txt (one segment per line); None: the P3 Bible split
    pairs: str | None = None  # training pairs .tsv/.jsonl; None: the P3 Bible split
    test: str | None = None  # test pairs .tsv/.jsonl; None: the P3 Bible split
    calib_windows: int = 32
    calib_seqlen: int = 512
    cpt_epochs: int = 1
    sft_epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 8
    micro_batch: int = 8  # examples per forward pass: same steps and loss, far fewer per-layer dequantizations
    seed: int = 1
    max_new_tokens: int = 128
    translate_batch: int = 16
    test_limit: int = 0  # 0: every test pair

    def to_dict(self) -> dict:
        return {**asdict(self), "quant": self.quant.to_dict()}


def write_data(folder: Path, config: AdaptConfig) -> dict[str, int]:
    """Stage 1: the data files every later stage reads (so a run can be inspected and reproduced from them)."""
    if config.mono is None or config.pairs is None or config.test is None:
        split = p3_split()
    mono = read_monolingual(config.mono) if config.mono else [p.target for p in bible_pairs(split["mono"])]
    train = read_pairs(config.pairs) if config.pairs else bible_pairs(split["train"])
    test = read_pairs(config.test) if config.test else bible_pairs(split["test"])
    valid = bible_pairs(split["valid"]) if config.test is None else []
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "mono.txt", "".join(f"{line}\n" for line in mono))
    write_text(folder / "train.jsonl", "".join(json.dumps(sft_record(p, config.src, config.tgt),
                                                          ensure_ascii=False) + "\n" for p in train))  # fmt: skip
    write_pairs(folder / "test.tsv", test)
    write_pairs(folder / "shots.tsv", train[:SHOTS])
    if valid:
        write_pairs(folder / "valid.tsv", valid)
    return {"mono": len(mono), "train": len(train), "test": len(test), "valid": len(valid)}


def target_text_ppl(model, tokenizer, pairs: list[Pair], seqlen: int = 512) -> float:
    """Perplexity on the target side of ``pairs`` (one line each, cut into windows): the language-model view."""
    from lowbit.data import tokenize, windows
    from lowbit.evaluate import perplexity

    ids = tokenize("\n".join(p.target for p in pairs), tokenizer)
    return perplexity(model, windows(ids, min(seqlen, ids.numel())), progress=False).ppl


def evaluate_mt(
    model, tokenizer, test: list[Pair], config: AdaptConfig, shots: list[Pair] = (), progress=False
) -> dict:
    """chrF/BLEU of greedy translations of ``test`` and target-side perplexity."""
    start = time.perf_counter()
    sources = [p.source for p in test]
    hyps = translate(model, tokenizer, sources, config.src, config.tgt, shots, batch_size=config.translate_batch,
                     max_new_tokens=config.max_new_tokens, progress=progress)  # fmt: skip
    seconds = time.perf_counter() - start
    scores = score(hyps, [p.target for p in test]).as_dict()
    return {**scores, "ppl": round(target_text_ppl(model, tokenizer, test), 3),
            "translate_seconds": round(seconds, 1), "hypotheses": hyps}  # fmt: skip


@with_output_lock
def adapt(
    model: str | None,
    out: Path,
    config: AdaptConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    save_every: int = 20,
    device: str | torch.device | None = "auto",
) -> dict:
    """Run the stages that are not finished yet; returns ``eval.json``'s content.

    ``save_every`` (optimizer steps between fine-tuning checkpoints) only decides how much a crash can cost: a
    resumed stage ends exactly where an uninterrupted one would, so it is not part of the recorded settings.
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is where every stage computes; like ``save_every`` it is
    not recorded, so a run can move between machines.
    """
    from lowbit.api import load_model
    from lowbit.calibrate import calibrate
    from lowbit.config import INITIALIZERS
    from lowbit.data import sample_windows, text_windows
    from lowbit.engine import EngineOptions
    from lowbit.finetune import TrainConfig, finetune
    from lowbit.models import load_tokenizer, resolve_model_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "adapt.json"
    settings = config.to_dict()
    if recorded.is_file() and json.loads(recorded.read_text())["config"] != settings:
        raise LowbitError(f"{out} holds an adaptation run with other settings: choose another --out or delete it")
    write_json(recorded, {"config": settings, "model": model})
    data, quantized, cpt, sft = out / "data", out / "quantized", out / "cpt", out / "sft"

    if not (data / "test.tsv").is_file():
        log(f"[adapt] data -> {data}: {write_data(data, config)}")
    if not (quantized / "config.json").is_file():
        source = resolve_model_path(model)
        tokenizer = load_tokenizer(source)
        calib = None
        q = config.quant
        if INITIALIZERS[q.init].needs_data:
            wins = text_windows(str(data / "mono.txt"), tokenizer, config.calib_seqlen)
            calib = sample_windows(wins, min(config.calib_windows, wins.shape[0]), q.seed)
        log(f"[adapt] quantize ({q.spec.name}, init {q.init}) on {config.tgt} text -> {quantized}")
        torch.manual_seed(q.seed)
        calibrate(source, q, quantized, calib, tokenizer, engine=EngineOptions(progress=progress, device=device))
    common = dict(lr=config.lr, batch_size=config.batch_size, micro_batch=config.micro_batch, seed=config.seed,
                  samples=0, save_every=save_every)  # fmt: skip
    if not (cpt / "config.json").is_file():
        log(f"[adapt] continued pre-training on {data / 'mono.txt'} -> {cpt}")
        finetune(quantized, cpt, TrainConfig(data=str(data / "mono.txt"), task="clm", epochs=config.cpt_epochs,
                                             **common), progress=progress, device=device)  # fmt: skip
    if not (sft / "config.json").is_file():
        log(f"[adapt] translation fine-tuning on {data / 'train.jsonl'} -> {sft}")
        finetune(cpt, sft, TrainConfig(data=str(data / "train.jsonl"), task="sft", epochs=config.sft_epochs,
                                       **common), progress=progress, device=device)  # fmt: skip
    result_path = out / "eval.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    log(f"[adapt] evaluating {sft} on {data / 'test.tsv'}")
    m, tokenizer = load_model(sft, device=device)
    test = read_pairs(data / "test.tsv")
    if config.test_limit:
        test = test[: config.test_limit]
    result = evaluate_mt(m, tokenizer, test, config, progress=progress)
    write_json(result_path, result)
    return result
