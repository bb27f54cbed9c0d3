"""LoRA fine-tuning of a packed low-bit checkpoint: exact resume, and multi-process through accelerate.

Only the LoRA factors train. The base stays packed: every :class:`~lowbit.layers.QuantLinear` rebuilds its weight
for its own matmul and again in backward, so at most one layer's full-precision weight exists at a time.

The data order is a pure function of ``(seed, epoch, step)``: each epoch shuffles the examples with its own seeded
generator, and step ``s`` takes the next ``batch_size`` of them. With ``P`` processes (``accelerate launch`` or
``torchrun``: DDP on the existing stack, nothing home-made) rank ``r`` takes its share of each step's examples.
Each micro-batch's loss is its summed token NLL divided by the token count of the *whole step* (every rank holds
the full, deterministic dataset, so it knows that count without communication); DDP averages gradients over
ranks, so one process and ``P`` processes take the same optimizer steps up to float summation order.

Every ``save_every`` steps the adapter, AdamW state, scheduler, step, metrics and each rank's RNG state are
written atomically to ``.OUT.partial/state``. Running the same command again after a crash (even ``kill -9``)
checks that data, settings and base checkpoint are unchanged and continues from there; the final adapter equals
an uninterrupted run's. The result is a complete lowbit checkpoint (packed base + PEFT adapter) in ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.checkpoint import LORA_KEYS, load_checkpoint, save_checkpoint
from lowbit.data import IGNORE, Example, clm_examples, collate, sample_windows, sft_examples, text_windows
from lowbit.device import resolve_device
from lowbit.errors import LowbitError
from lowbit.fsutil import (
    atomic_dir,
    check_output_dir,
    claim_work_dir,
    content_fingerprint,
    remove_work_dir,
    with_output_lock,
    work_dir,
    write_text,
)
from lowbit.layers import quant_layers

STATE = "state"
METRICS_LOG = "metrics.jsonl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TASKS = ("clm", "sft")


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults are protocol P2's (../shared/BENCHMARK.md) except ``samples``: a user's run
    takes all of its data, where the benchmark draws 128 windows (bench/p2.py asks for them)."""

    data: str = "ptb"  # clm: ptb (train split), .txt or .jsonl text; sft: .jsonl with prompt/response or messages
    task: str = "clm"
    seqlen: int = 256  # clm: window length; sft: longest sequence kept
    samples: int = 0  # examples drawn (seeded, without replacement); 0 = all
    epochs: int = 1
    batch_size: int = 4  # effective batch: examples per optimizer step over all processes
    micro_batch: int = 1  # examples per forward pass on one process
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup: float = 0.03  # fraction of the steps with linear warm-up, then cosine decay to 0
    max_grad_norm: float = 0.0  # 0: no clipping
    seed: int = 1
    eval_data: str | None = None  # perplexity source (ptb: its valid split); None: no evaluation
    eval_every: int = 0  # 0: only at the end
    eval_windows: int = 16
    save_every: int = 0  # 0: no intermediate checkpoints
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16
    lora_dtype: str = "fp32"  # storage of the trained LoRA factors (and so of AdamW's state): fp32 or bf16
    rank: int = 8  # LoRA added when the checkpoint has no adapter (init none)
    alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise LowbitError(f"unknown task {self.task!r}: choose clm (plain text) or sft (prompt/response JSONL)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LowbitError(f"unknown precision {self.precision!r}: choose auto, fp32 or bf16")
        if self.lora_dtype not in DTYPES:
            raise LowbitError(f"unknown --lora-dtype {self.lora_dtype!r}: choose {' or '.join(DTYPES)}")
        for name in ("epochs", "batch_size", "micro_batch", "seqlen"):
            if getattr(self, name) < 1:
                raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LowbitError(f"--lr must be positive, got {self.lr}")


def training_examples(config: TrainConfig, tokenizer) -> tuple[list[Example], int]:
    """The examples one epoch goes through (seeded draw), and how many SFT examples were truncated."""
    if config.task == "sft":
        examples, truncated = sft_examples(config.data, tokenizer, config.seqlen)
        if config.samples:
            if config.samples > len(examples):
                raise LowbitError(f"--samples {config.samples} but {config.data} has only {len(examples)} examples")
            g = torch.Generator().manual_seed(config.seed)
            examples = [examples[i] for i in torch.randperm(len(examples), generator=g)[: config.samples].tolist()]
        return examples, truncated
    wins = text_windows(config.data, tokenizer, config.seqlen, split="train")
    if config.samples:
        wins = sample_windows(wins, config.samples, config.seed)
    return clm_examples(wins), 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example order of ``epoch`` (the first keeps the drawn order, later ones reshuffle with their own seed)."""
    if epoch == 0:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the labelled positions."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
        reduction="sum",
    )  # fmt: skip


def targets(example: Example) -> int:
    """Number of tokens of ``example`` that carry a loss (labelled, after the first position)."""
    return int((example.labels[1:] != IGNORE).sum())


@torch.no_grad()
def eval_perplexity(model: nn.Module, examples: list[Example], pad_id: int, device) -> float:
    """Perplexity over the labelled tokens of ``examples`` (exp of the mean NLL)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for e in examples:
        ids, mask, labels = (t.to(device) for t in collate([e], pad_id))
        total += token_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).item()
        count += targets(e)
    model.train(was_training)
    return math.exp(total / max(count, 1))


def ensure_adapter(model: nn.Module, config: TrainConfig) -> None:
    """Give every quantized layer a LoRA adapter when the checkpoint has none (seeded PEFT start)."""
    layers = quant_layers(model)
    if all(m.lora_A is not None for m in layers.values()):
        return
    g = torch.Generator().manual_seed(config.seed)
    for m in layers.values():
        if m.lora_A is None:
            m.add_lora(config.rank, config.alpha, generator=g)
    model.lowbit_config.init = "qlora"
    model.lowbit_config.rank, model.lowbit_config.alpha = config.rank, config.alpha


def frozen_to(model: nn.Module, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Put the frozen float32 parameters (embeddings, head, norms, biases) on ``device`` in ``dtype``; return the
    float32 originals, which stay in host memory for the saved checkpoint.

    Under bf16 autocast every matmul reads them in bf16 anyway, so a float32 copy on the GPU costs memory (and a
    cast per step) and buys nothing -- PEFT + bitsandbytes keeps them in the model's bf16 too. Trained LoRA
    factors keep their dtype; buffers (rotary tables) stay float32.
    """
    originals = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            originals[name] = p.data
            p.data = p.data.to(device, dtype)
    return originals


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_KEYS
    }


def _fingerprint(config: TrainConfig, checkpoint: Path, examples: list[Example]) -> str:
    from lowbit import __version__

    ident = content_fingerprint([p for p in checkpoint.iterdir() if p.is_file()])
    h = hashlib.sha256(json.dumps([asdict(config), ident, __version__]).encode())
    for e in examples:
        h.update(e.ids.numpy().tobytes())
        h.update(e.labels.numpy().tobytes())
    return h.hexdigest()


class MetricsLog:
    """Per-step training metrics as JSON lines in the work folder, appended as the run goes (``tail -f`` or plot it
    during training; ``training.json`` only comes at the end) and kept in the finished checkpoint.

    A resumed run first drops the lines of the steps it will redo (and a line cut short by a kill), so the log
    reads like one uninterrupted run. ``path`` None (a rank other than the main one) writes nothing.
    """

    def __init__(self, path: Path | None, resumed_at: int) -> None:
        self.path = path
        if path is None:
            return
        kept = []
        for line in path.read_text().splitlines() if resumed_at and path.is_file() else []:
            try:
                if json.loads(line)["step"] <= resumed_at:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        write_text(path, "".join(f"{line}\n" for line in kept))

    def write(self, **record: object) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _mixed_precision(precision: str, device: torch.device) -> str:
    if precision == "bf16":
        return "bf16"
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


@with_output_lock
def finetune(
    checkpoint: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | None = "auto",
) -> dict:
    """Fine-tune the LoRA adapter of the lowbit ``checkpoint`` into the checkpoint ``out``; returns the metrics.

    ``on_step(step)`` is called after each optimizer step (and its save), for callers that watch progress.
    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (a multi-process launch gives each
    process its own GPU instead). It is not part of the resume fingerprint, so a run can continue elsewhere.
    On CUDA with bf16 precision the frozen full-precision weights are kept in bf16 there (see :func:`frozen_to`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object
    from transformers import get_cosine_schedule_with_warmup

    config = config or TrainConfig()
    target = resolve_device(device)
    checkpoint, out = Path(checkpoint), Path(out)
    work = work_dir(out)
    # Before any loading, and also when resuming: a non-empty --out is never replaced without --overwrite.
    check_output_dir(out, overwrite, (checkpoint,))
    model, tokenizer = load_checkpoint(checkpoint)
    if tokenizer is None:
        raise LowbitError(f"{checkpoint} has no tokenizer files: copy the tokenizer into the checkpoint folder")
    ensure_adapter(model, config)
    examples, truncated = training_examples(config, tokenizer)
    steps_per_epoch = len(examples) // config.batch_size
    if steps_per_epoch == 0:
        raise LowbitError(f"{config.data} gives {len(examples)} examples, fewer than one batch of {config.batch_size}:"
                          " use more data or a smaller --batch-size")  # fmt: skip
    total_steps = steps_per_epoch * config.epochs
    eval_examples = []
    if config.eval_data:
        split = "valid" if config.eval_data == "ptb" else "test"
        wins = text_windows(config.eval_data, tokenizer, config.seqlen, split=split, limit=config.eval_windows)
        eval_examples = clm_examples(wins)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    if target.type == "cuda":
        torch.cuda.set_device(target)  # Accelerate's one-process device is the current GPU (ranks get their own)
    accelerator = Accelerator(
        cpu=target.type == "cpu",
        mixed_precision=_mixed_precision(config.precision, target),
        # The packed codes never change and are identical on every rank: do not re-broadcast them every forward.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = config.batch_size // world
    if per_rank * world != config.batch_size or per_rank % config.micro_batch:
        raise LowbitError(f"--batch-size {config.batch_size} must split evenly over {world} processes and then into "
                          f"micro-batches of {config.micro_batch}: adjust --batch-size or --micro-batch")  # fmt: skip
    accum = per_rank // config.micro_batch

    key = _fingerprint(config, checkpoint, examples)
    saved = None
    if (work / STATE / "trainer.json").is_file():
        saved = json.loads((work / STATE / "trainer.json").read_text())
        if saved.get("fingerprint") != key:
            if not overwrite:
                raise LowbitError(f"{work} holds an interrupted fine-tuning run with a different base checkpoint, data "
                                  "or settings: rerun that command to resume it, or pass --overwrite to discard "
                                  "it")  # fmt: skip
            saved = None
    if saved is None and accelerator.is_main_process:
        remove_work_dir(work)
    accelerator.wait_for_everyone()

    if saved is not None:
        model.load_state_dict(load_file(work / STATE / "adapter.safetensors"), strict=False)
    if config.grad_checkpointing:
        # transformers 5 renamed gradient checkpointing to activation checkpointing; accept both spellings.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora_dtype = DTYPES[config.lora_dtype]
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(lora_dtype)
    originals = {}
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda":
        originals = frozen_to(model, torch.bfloat16, accelerator.device)
    ddp = accelerator.prepare(model)  # device placement, DDP wrapping under a multi-process launch
    device = accelerator.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    torch.manual_seed(config.seed * 1_000_003 + rank)  # dropout differs across ranks, reproducibly
    metrics = {"losses": [], "eval": [], "tokens": 0, "seconds": 0.0}
    start_step = 0
    if saved is not None:
        extra = torch.load(work / STATE / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if len(extra["rng"]) == world:
            torch.set_rng_state(extra["rng"][rank])
        metrics, start_step = saved["metrics"], saved["step"]
    log = MetricsLog(claim_work_dir(work) / METRICS_LOG if accelerator.is_main_process else None, start_step)

    def save_state(step: int) -> None:
        rng = gather_object([torch.get_rng_state()]) if world > 1 else [torch.get_rng_state()]
        if accelerator.is_main_process:
            claim_work_dir(work)
            with atomic_dir(work / STATE, overwrite=True) as tmp:
                save_file(lora_state(accelerator.unwrap_model(ddp)), tmp / "adapter.safetensors")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                           tmp / "optimizer.pt")  # fmt: skip
                (tmp / "trainer.json").write_text(json.dumps({"fingerprint": key, "step": step, "metrics": metrics}))
        accelerator.wait_for_everyone()

    def evaluate(step: int) -> None:
        if eval_examples and accelerator.is_main_process:
            ppl = eval_perplexity(accelerator.unwrap_model(ddp), eval_examples, pad_id, device)
            metrics["eval"].append({"step": step, "ppl": ppl})
            log.write(step=step, eval_ppl=ppl)
        accelerator.wait_for_everyone()

    bar = tqdm(
        total=total_steps, initial=start_step, desc="finetune", disable=not progress or not accelerator.is_main_process
    )
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, s = divmod(step, steps_per_epoch)
        order = epoch_order(len(examples), config.seed, epoch)
        batch = [examples[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
        step_targets = sum(targets(e) for e in batch)
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        nll_sum = torch.zeros((), dtype=torch.float64)
        for m in range(accum):
            micro = mine[m * config.micro_batch : (m + 1) * config.micro_batch]
            ids, mask, labels = (t.to(device) for t in collate(micro, pad_id))
            with accelerator.no_sync(ddp) if m < accum - 1 else nullcontext():
                logits = ddp(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll = token_nll(logits, labels)
                if not torch.isfinite(nll):
                    raise LowbitError(f"the training loss became {nll.item()} at step {step + 1}: lower --lr or "
                                      "check the data")  # fmt: skip
                accelerator.backward(nll * world / step_targets)
            nll_sum += nll.detach().double().cpu()
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            nll_sum = accelerator.reduce(nll_sum.to(device), "sum").cpu()
        loss = float(nll_sum) / step_targets
        metrics["losses"].append(loss)
        metrics["tokens"] += sum(int(e.ids.numel()) for e in batch)
        metrics["seconds"] += time.perf_counter() - t0
        done = step + 1
        tokens_per_s = metrics["tokens"] / max(metrics["seconds"], 1e-9)
        log.write(step=done, epoch=epoch, loss=loss, lr=scheduler.get_last_lr()[0], tokens=metrics["tokens"],
                  tokens_per_s=tokens_per_s, seconds=metrics["seconds"])  # fmt: skip
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:
            evaluate(done)
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            save_state(done)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
        if on_step is not None:
            on_step(done)
    bar.close()
    evaluate(total_steps)

    result = {
        "out": str(out),
        "steps": total_steps,
        "examples": len(examples),
        "truncated": truncated,
        "world_size": world,
        "resumed_from_step": start_step,
        "final_loss": metrics["losses"][-1],
        "eval_ppl": metrics["eval"][-1]["ppl"] if metrics["eval"] else None,
        "tokens": metrics["tokens"],
        "seconds": round(metrics["seconds"], 2),
        "tokens_per_s": metrics["tokens"] / max(metrics["seconds"], 1e-9),
        "losses": metrics["losses"],
        "eval": metrics["eval"],
        "config": asdict(config),
        "base": str(checkpoint),
    }
    final = accelerator.unwrap_model(ddp)
    # Every rank reports the digest of its own adapter: equal digests show that the ranks stayed in lock-step.
    digest = hashlib.sha256()
    for name, tensor in sorted(lora_state(final).items()):
        digest.update(name.encode() + tensor.float().numpy().tobytes())
    result["adapter_sha256"] = digest.hexdigest()
    if accelerator.is_main_process:
        if config.grad_checkpointing:
            (getattr(final, "activation_checkpointing_disable", None) or final.gradient_checkpointing_disable)()
        for name, p in final.named_parameters():  # the frozen weights as loaded, not their bf16 copies
            if name in originals:
                p.data = originals[name]
        extra = {"training.json": result, METRICS_LOG: work / METRICS_LOG}
        save_checkpoint(final.eval(), out, tokenizer, overwrite=overwrite, extra=extra)
        remove_work_dir(work)
    accelerator.wait_for_everyone()
    return result
