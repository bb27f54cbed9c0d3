"""Fine-tuning of a packed low-bit checkpoint (LoRA, PaFi or HiWi): exact resume, multi-process through accelerate.

Only the adapter trains: the LoRA factors, or with ``method`` pafi/hiwi the weight-space adapter of
:mod:`lowbit.adapters` (a LoRA start the checkpoint has then stays frozen, as part of the base). The base stays
packed: every :class:`~lowbit.layers.QuantLinear` rebuilds its weight for its own matmul and again in backward, so
at most one layer's full-precision weight exists at a time; a PaFi/HiWi layer's merged weight is likewise rebuilt
in backward rather than kept (:class:`lowbit.adapters.MergedLinear`).

The data order is a pure function of ``(seed, epoch, step)``: each epoch shuffles the examples with its own seeded
generator, and step ``s`` takes the next ``batch_size`` of them. With ``P`` processes (``accelerate launch`` or
``torchrun``: DDP on the existing stack, nothing home-made) rank ``r`` takes its share of each step's examples.
Each micro-batch's loss is its summed token NLL divided by the token count of the *whole step* (every rank holds
the full, deterministic dataset, so it knows that count without communication); DDP averages gradients over
ranks, so one process and ``P`` processes take the same optimizer steps up to float summation order.

Every ``save_every`` steps the adapter, AdamW state, scheduler, step, metrics and each rank's RNG state are
written atomically to ``.OUT.partial/state``. Running the same command again after a crash (even ``kill -9``)
checks that data, settings and base checkpoint are unchanged and continues from there; the final adapter equals
an uninterrupted run's (bit for bit on the CPU, tested; on CUDA expect last-bit differences, as between two
uninterrupted runs: attention's backward adds partial gradients with atomics there, and fine-tuning does not pay for
deterministic mode). The result is a complete lowbit checkpoint (packed base + PEFT adapter) in ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.adapters import HiWi, PaFi, check_settings, is_adapter_tensor, select_layers
from lowbit.checkpoint import load_checkpoint, save_checkpoint, save_weight_adapter, write_extra
from lowbit.data import IGNORE, Example, clm_examples, collate, sample_windows, sft_examples, text_windows
from lowbit.device import PRECISIONS, resolve_device, uses_bf16
from lowbit.errors import LowbitError
from lowbit.fsutil import (
    atomic_dir,
    check_output_dir,
    claim_work_dir,
    content_fingerprint,
    remove_work_dir,
    resume_work_dir,
    run_fingerprint,
    with_output_lock,
    work_dir,
    write_text,
)
from lowbit.layers import AdaptedLinear, adapter_layers, quant_layers, set_module, train_only_adapter
from lowbit.models import is_lowbit_checkpoint, load_pretrained, resolve_model_path

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

STATE = "state"
METRICS_LOG = "metrics.jsonl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# ``torch.compile`` options of ``--compile`` (inductor's default mode: no CUDA graphs, which would pin a training
# step's activations in their pool; tests trace with another backend on the CPU).
COMPILE: dict = {}
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
    compile: bool = False  # torch.compile the model's forward and backward (see _prepare_model)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16
    lora_dtype: str = "fp32"  # storage of the trained adapter (and so of AdamW's state): fp32 or bf16
    rank: int = 8  # LoRA added when the checkpoint has no adapter (init none)
    alpha: float = 16.0
    method: str = "lora"  # lora, pafi or hiwi (lowbit.adapters)
    pafi_fraction: float = 0.005  # PaFi: fraction of each layer's weights (the smallest |W|) that trains
    hiwi_dim: int = 8  # HiWi: bottleneck width of the adapter on the weights
    hiwi_target: str = "weight"  # HiWi: the layer tensor it reads and changes, weight or bias (the paper's variant)
    adapter_layers: str = ""  # PaFi/HiWi: regular expression selecting the quantized layers (searched); "": all

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise LowbitError(f"unknown task {self.task!r}: choose clm (plain text) or sft (prompt/response JSONL)")
        if self.precision not in PRECISIONS:
            raise LowbitError(f"unknown precision {self.precision!r}: choose {', '.join(PRECISIONS)}")
        if self.lora_dtype not in DTYPES:
            raise LowbitError(f"unknown --lora-dtype {self.lora_dtype!r}: choose {' or '.join(DTYPES)}")
        for name in ("epochs", "batch_size", "micro_batch", "seqlen"):
            if getattr(self, name) < 1:
                raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LowbitError(f"--lr must be positive, got {self.lr}")
        check_settings(self.method, self.pafi_fraction, self.hiwi_dim, self.hiwi_target, self.adapter_layers)


# Settings added after runs were already being resumed, with the value they had before they existed: a setting at
# that value is left out of a run's fingerprint, so a run interrupted by an earlier release still resumes.
ADDED_SETTINGS = {"compile": False}


def fingerprinted(config: TrainConfig) -> dict:
    """The settings that identify a run (see :data:`ADDED_SETTINGS`)."""
    return {k: v for k, v in asdict(config).items() if k not in ADDED_SETTINGS or v != ADDED_SETTINGS[k]}


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


def load_base(path: Path, config: TrainConfig) -> tuple[nn.Module, object | None]:
    """The model to fine-tune: a lowbit checkpoint as saved, or -- for PaFi and HiWi, which merge into the weights --
    a full-precision model (a Hugging Face folder or GGUF file, as ``lowbit quantize`` takes) with its decoder
    blocks' linear layers wrapped in :class:`~lowbit.layers.AdaptedLinear`."""
    if is_lowbit_checkpoint(path):
        return load_checkpoint(path)
    if config.method == "lora":
        raise LowbitError(f"{path} is not a lowbit checkpoint: lowbit's LoRA trains a quantized base (make one with "
                          f"`lowbit quantize {path} --out DIR`), while --method pafi|hiwi also train a "
                          "full-precision model as it is")  # fmt: skip
    from lowbit.arch import target_linears

    model, tokenizer = load_pretrained(path)
    for name, layer in target_linears(model).items():
        set_module(model, name, AdaptedLinear(layer))
    return model, tokenizer


def is_full_precision(model: nn.Module) -> bool:
    """Whether ``model`` is a full-precision base (see :func:`load_base`), saved merged rather than as a checkpoint."""
    return not hasattr(model, "lowbit_config")


def save_merged_model(model: nn.Module, out: Path, tokenizer, overwrite: bool, extra: dict[str, object]) -> None:
    """Save a fine-tuned full-precision base as a plain Hugging Face model with the adapter merged, so it runs at
    the base model's speed as it is, plus the adapter's own files (``weight_adapter.*``) and ``extra``."""
    model.cpu()  # after a GPU run the frozen weights are back as their host copies; the adapter must join them
    with atomic_dir(out, overwrite) as tmp:
        save_weight_adapter(model, tmp)
        for name, layer in adapter_layers(model).items():
            set_module(model, name, layer.merged())
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extra(tmp, extra)


def ensure_adapter(model: nn.Module, config: TrainConfig) -> None:
    """Give every quantized layer the adapter of ``config.method`` when the checkpoint has none: LoRA (seeded PEFT
    start) or a weight-space adapter (:func:`ensure_weight_adapter`)."""
    layers = quant_layers(model)
    if config.method != "lora":
        ensure_weight_adapter(model, config)
        return
    trained = sorted({m.adapter.method for m in layers.values() if m.adapter is not None})
    if trained:
        raise LowbitError(f"the checkpoint has a {trained[0]} adapter: fine-tune it with --method {trained[0]}, "
                          "or export --requantize it first")  # fmt: skip
    if all(m.lora_A is not None for m in layers.values()):
        return
    g = torch.Generator().manual_seed(config.seed)
    for m in layers.values():
        if m.lora_A is None:
            m.add_lora(config.rank, config.alpha, generator=g)
    model.lowbit_config.init = "qlora"
    model.lowbit_config.rank, model.lowbit_config.alpha = config.rank, config.alpha


def ensure_weight_adapter(model: nn.Module, config: TrainConfig) -> None:
    """Give the selected quantized layers (``config.adapter_layers``) a PaFi or HiWi adapter over their frozen
    effective weight (or bias: HiWi's bias variant, on the selected layers that have one); a LoRA start stays in the
    base and stops training. A checkpoint that has this method's adapter keeps it (and PaFi its mask); flags that
    would have made it differently are named on stderr, since they change nothing."""
    layers = adapter_layers(model)
    present = {m.adapter.method for m in layers.values() if m.adapter is not None}
    if present and present != {config.method}:
        raise LowbitError(f"the checkpoint has a {sorted(present)[0]} adapter, not {config.method}: fine-tune it "
                          f"with --method {sorted(present)[0]}, or export --requantize it first")  # fmt: skip
    if present:
        note_unused_settings(layers, config)
        return
    chosen = select_layers(list(layers), config.adapter_layers)
    if config.method == "hiwi" and config.hiwi_target == "bias":
        chosen = [n for n in chosen if layers[n].bias is not None]
        if not chosen:
            raise LowbitError("--hiwi-target bias adapts layer biases, and none of the selected layers has one "
                              "(Llama, Mistral and Gemma linears have none; GPT-2's and Qwen2's q/k/v have): use "
                              "--hiwi-target weight, or select layers with a bias with --adapter-layers")  # fmt: skip
        if all(not layers[n].bias.any() for n in chosen):  # relu(0 D) U = 0 and no gradient: it would never train
            raise LowbitError("--hiwi-target bias reads the layer biases, and those of the selected layers are all "
                              "zero (an untrained model?): the adapter would get no input and never train; use "
                              "--hiwi-target weight")  # fmt: skip
    g = torch.Generator().manual_seed(config.seed)
    for name in chosen:
        m = layers[name]
        if config.method == "pafi":
            m.adapter = PaFi.from_weight(m.base_weight(), config.pafi_fraction)
        else:
            features = m.in_features if config.hiwi_target == "weight" else m.out_features
            m.adapter = HiWi(features, config.hiwi_dim, config.hiwi_target, generator=g)
    train_only_adapter(model)  # a LoRA start freezes into the base; a full-precision base freezes whole


def note_unused_settings(layers: dict[str, nn.Module], config: TrainConfig) -> None:
    """One stderr line naming the flags that differ from the checkpoint's existing adapter (it is trained on as
    it is: its mask, width and layers were fixed when it was made)."""
    adapted = [n for n, m in layers.items() if m.adapter is not None]
    stored = layers[adapted[0]].adapter.settings()
    flags = {"pafi": {"fraction": ("--pafi-fraction", config.pafi_fraction)},
             "hiwi": {"dim": ("--hiwi-dim", config.hiwi_dim),
                      "target": ("--hiwi-target", config.hiwi_target)}}  # fmt: skip
    unused = [f"{name} {value}" for key, (name, value) in flags[config.method].items() if stored[key] != value]
    if config.adapter_layers:
        wanted = select_layers(list(layers), config.adapter_layers)
        if stored.get("target") == "bias":  # the bias variant adapts only the selected layers with a bias
            wanted = [n for n in wanted if layers[n].bias is not None]
        if wanted != adapted:
            unused.append(f"--adapter-layers {config.adapter_layers!r}")
    if unused:
        kept = ", ".join(f"{k} {v}" for k, v in stored.items() if k != "method")
        print(f"lowbit: note: the checkpoint's {config.method} adapter ({kept}, {len(adapted)} layers) is trained "
              f"further as it is; {', '.join(unused)} not used", file=sys.stderr)  # fmt: skip


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


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA factors, PaFi/HiWi tensors), as a resume state holds them."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_adapter_tensor(k)}


def summary_writer() -> type:
    """TensorBoard's event writer, or a one-line error naming the install when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise LowbitError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
    return SummaryWriter


class MetricsLog:
    """Per-step training metrics as JSON lines in the work folder, appended as the run goes (``tail -f`` or plot it
    during training; ``training.json`` only comes at the end) and kept in the finished checkpoint; the same scalars
    also go to TensorBoard event files in ``board`` when one is given.

    A resumed run first drops the lines of the steps it will redo (and a line cut short by a kill), and has
    TensorBoard hide their events (``purge_step``), so both read like one uninterrupted run. ``path`` None (a rank
    other than the main one) writes nothing.
    """

    def __init__(self, path: Path | None, resumed_at: int, board: Path | None = None) -> None:
        self.path = path
        self.board = None
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
        if board is not None:
            self.board = summary_writer()(str(board), purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, **record: float) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for name, value in record.items():
                if name != "step":
                    self.board.add_scalar(name, value, record["step"])
            self.board.flush()  # on disk at once, like the JSON line: a running TensorBoard shows the step

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _mixed_precision(precision: str, device: torch.device) -> str:
    """accelerate's name for ``precision`` on ``device``."""
    return "bf16" if uses_bf16(precision, device) else "no"


def _prepare_model(
    model: nn.Module, config: TrainConfig, accelerator: Accelerator
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Make the loaded model trainable on the accelerator's device; returns the model as trained (DDP-wrapped
    under a multi-process launch) and the float32 originals of the frozen weights moved to the GPU in bf16."""
    if config.grad_checkpointing:
        # transformers 5 renamed gradient checkpointing to activation checkpointing; accept both spellings.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        if config.method != "lora":
            print(f"lowbit: note: --compile with --method {config.method} compiles in pieces: its layers' backward "
                  "calls torch.autograd.grad, which torch.compile cannot trace, so the graph breaks at every "
                  "adapted layer and little host time is saved", file=sys.stderr)  # fmt: skip
        # On a GPU a LoRA step of a small model is bound by the host: Python, autograd and kernel launches (P4: the
        # GPU busy 14-17% of a 1.1B model's step). Compiled, the forward and backward run as generated code that
        # fuses the elementwise work; lowbit's kernels are torch.library ops that the graph calls. In place, so the
        # module's names and state dict stay the model's own; evaluation compiles its own graph.
        model.compile(**COMPILE)
    model.train()
    lora_dtype = DTYPES[config.lora_dtype]
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(lora_dtype)
    originals = {}
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda":
        originals = frozen_to(model, torch.bfloat16, accelerator.device)
    return accelerator.prepare(model), originals  # device placement, DDP wrapping under a multi-process launch


@dataclass
class Trainer:
    """One fine-tuning run in the parts :func:`finetune` drives: :meth:`setup` builds a fresh run, :meth:`resume`
    restores an interrupted one into it, :meth:`step` takes one optimizer step, :meth:`save_state` writes what a
    resume needs and :meth:`save` the finished checkpoint.

    Exact resume rests on the order kept here: everything is built and seeded as in a fresh run first, then the
    saved adapter, optimizer, schedule and RNG state overwrite it in place.
    """

    config: TrainConfig
    checkpoint: Path
    work: Path  # the work folder: resumable state and the metrics log
    key: str  # the run's fingerprint: base checkpoint content, settings, data
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    truncated: int  # SFT examples cut to --seqlen
    eval_examples: list[Example]
    pad_id: int
    accelerator: Accelerator
    model: nn.Module  # the model itself: evaluated and saved
    ddp: nn.Module  # the model as trained (DDP-wrapped under a multi-process launch)
    originals: dict[str, torch.Tensor]  # frozen float32 weights that train as bf16 copies (see frozen_to)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_rank: int  # examples per step on one process
    steps_per_epoch: int
    metrics: dict = field(default_factory=lambda: {"losses": [], "eval": [], "tokens": 0, "seconds": 0.0})
    start_step: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @classmethod
    def setup(cls, checkpoint: Path, work: Path, config: TrainConfig, target: torch.device) -> Trainer:
        """Load the checkpoint and the data and build a fresh run (model, optimizer, schedule, seeded RNG);
        every user mistake is refused here, before the work folder is touched."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        from transformers import get_cosine_schedule_with_warmup

        model, tokenizer = load_base(checkpoint, config)
        if tokenizer is None:
            raise LowbitError(f"{checkpoint} has no tokenizer files: copy the tokenizer into the checkpoint folder")
        ensure_adapter(model, config)
        examples, truncated = training_examples(config, tokenizer)
        steps_per_epoch = len(examples) // config.batch_size
        if steps_per_epoch == 0:
            raise LowbitError(f"{config.data} gives {len(examples)} examples, fewer than one batch of "
                              f"{config.batch_size}: use more data or a smaller --batch-size")  # fmt: skip
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
        world = accelerator.num_processes
        per_rank = config.batch_size // world
        if per_rank * world != config.batch_size or per_rank % config.micro_batch:
            raise LowbitError(f"--batch-size {config.batch_size} must split evenly over {world} processes and then "
                              f"into micro-batches of {config.micro_batch}: adjust --batch-size or "
                              "--micro-batch")  # fmt: skip
        ident = content_fingerprint([p for p in checkpoint.iterdir() if p.is_file()])
        key = run_fingerprint(
            [fingerprinted(config), ident], (t.numpy().tobytes() for e in examples for t in (e.ids, e.labels))
        )

        ddp, originals = _prepare_model(model, config, accelerator)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        total_steps = steps_per_epoch * config.epochs
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup * total_steps), total_steps)
        torch.manual_seed(config.seed * 1_000_003 + accelerator.process_index)  # dropout differs across ranks
        return cls(
            config, checkpoint, work, key, tokenizer, examples, truncated, eval_examples, pad_id, accelerator,
            accelerator.unwrap_model(ddp), ddp, originals, params, optimizer, scheduler, per_rank, steps_per_epoch,
        )  # fmt: skip

    def resume(self, overwrite: bool) -> None:
        """Continue the interrupted run of this job from its work folder, or start afresh there (see
        :func:`~lowbit.fsutil.resume_work_dir`: another job's state is refused unless ``overwrite``)."""
        what = "fine-tuning run with a different base checkpoint, data or settings"
        main = self.accelerator.is_main_process
        saved = resume_work_dir(self.work, f"{STATE}/trainer.json", self.key, overwrite, what, main=main)
        self.accelerator.wait_for_everyone()
        if saved is None:
            return
        self.model.load_state_dict(load_file(self.work / STATE / "adapter.safetensors"), strict=False)
        extra = torch.load(self.work / STATE / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if len(extra["rng"]) == self.accelerator.num_processes:
            torch.set_rng_state(extra["rng"][self.accelerator.process_index])
        self.metrics, self.start_step = saved["metrics"], saved["step"]

    def step(self, step: int) -> dict[str, float]:
        """Take optimizer step ``step`` (0-based) on its share of the step's batch; returns the metrics log's record.

        Each micro-batch's loss is its summed token NLL over the token count of the whole step, so any split over
        processes and micro-batches adds up to the same gradient.
        """
        t0 = time.perf_counter()
        config, accelerator, device = self.config, self.accelerator, self.accelerator.device
        world, rank = accelerator.num_processes, accelerator.process_index
        epoch, s = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.examples), config.seed, epoch)
        batch = [self.examples[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
        step_targets = sum(targets(e) for e in batch)
        mine = batch[rank * self.per_rank : (rank + 1) * self.per_rank]
        accum = self.per_rank // config.micro_batch
        nll_sum = torch.zeros((), dtype=torch.float64)
        for m in range(accum):
            micro = mine[m * config.micro_batch : (m + 1) * config.micro_batch]
            ids, mask, labels = (t.to(device) for t in collate(micro, self.pad_id))
            with accelerator.no_sync(self.ddp) if m < accum - 1 else nullcontext():
                logits = self.ddp(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll = token_nll(logits, labels)
                if not torch.isfinite(nll):
                    raise LowbitError(f"the training loss became {nll.item()} at step {step + 1}: lower --lr or "
                                      "check the data")  # fmt: skip
                accelerator.backward(nll * world / step_targets)
            nll_sum += nll.detach().double().cpu()
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if world > 1:
            nll_sum = accelerator.reduce(nll_sum.to(device), "sum").cpu()
        loss = float(nll_sum) / step_targets
        metrics = self.metrics
        metrics["losses"].append(loss)
        metrics["tokens"] += sum(int(e.ids.numel()) for e in batch)
        metrics["seconds"] += time.perf_counter() - t0
        tokens, seconds = metrics["tokens"], metrics["seconds"]
        lr = self.scheduler.get_last_lr()[0]
        tokens_per_s = tokens / max(seconds, 1e-9)
        return dict(
            step=step + 1, epoch=epoch, loss=loss, lr=lr, tokens=tokens, tokens_per_s=tokens_per_s, seconds=seconds
        )

    def evaluate(self, step: int, log: MetricsLog) -> None:
        """Perplexity on the evaluation data after ``step`` steps (main process), into the metrics and the log."""
        if self.eval_examples and self.accelerator.is_main_process:
            ppl = eval_perplexity(self.model, self.eval_examples, self.pad_id, self.accelerator.device)
            self.metrics["eval"].append({"step": step, "ppl": ppl})
            log.write(step=step, eval_ppl=ppl)
        self.accelerator.wait_for_everyone()

    def save_state(self, step: int) -> None:
        """Write what a resume after ``step`` steps needs (adapter, AdamW, schedule, every rank's RNG, metrics) to
        the work folder, replacing the previous state in one rename: a kill leaves one complete state or the other."""
        from accelerate.utils import gather_object

        rng = gather_object([torch.get_rng_state()]) if self.accelerator.num_processes > 1 else [torch.get_rng_state()]
        if self.accelerator.is_main_process:
            claim_work_dir(self.work)
            with atomic_dir(self.work / STATE, overwrite=True) as tmp:
                save_file(adapter_state(self.model), tmp / "adapter.safetensors")
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "rng": rng}, tmp / "optimizer.pt")  # fmt: skip
                state = {"fingerprint": self.key, "step": step, "metrics": self.metrics}
                (tmp / "trainer.json").write_text(json.dumps(state))
        self.accelerator.wait_for_everyone()

    def save(self, out: Path, overwrite: bool, files: dict[str, Path]) -> dict:
        """Write the finished checkpoint ``out`` (packed base, trained adapter, ``training.json`` and ``files``
        copied from the work folder), then delete the work folder; returns the run's summary."""
        metrics, world = self.metrics, self.accelerator.num_processes
        result = {
            "out": str(out),
            "steps": self.total_steps,
            "examples": len(self.examples),
            "truncated": self.truncated,
            "world_size": world,
            "resumed_from_step": self.start_step,
            "final_loss": metrics["losses"][-1],
            "eval_ppl": metrics["eval"][-1]["ppl"] if metrics["eval"] else None,
            "tokens": metrics["tokens"],
            "seconds": round(metrics["seconds"], 2),
            "tokens_per_s": metrics["tokens"] / max(metrics["seconds"], 1e-9),
            "losses": metrics["losses"],
            "eval": metrics["eval"],
            "config": asdict(self.config),
            "base": str(self.checkpoint),
        }
        # Every rank reports the digest of its own adapter: equal digests show that the ranks stayed in lock-step.
        digest = hashlib.sha256()
        for name, tensor in sorted(adapter_state(self.model).items()):
            digest.update(name.encode() + tensor.float().numpy().tobytes())
        result["adapter_sha256"] = digest.hexdigest()
        if self.accelerator.is_main_process:
            final = self.model
            if self.config.grad_checkpointing:
                (getattr(final, "activation_checkpointing_disable", None) or final.gradient_checkpointing_disable)()
            for name, p in final.named_parameters():  # the frozen weights as loaded, not their bf16 copies
                if name in self.originals:
                    p.data = self.originals[name]
            extra = {"training.json": result, **files}
            if is_full_precision(final):
                save_merged_model(final.eval(), out, self.tokenizer, overwrite, extra)
            else:
                save_checkpoint(final.eval(), out, self.tokenizer, overwrite=overwrite, extra=extra)
            remove_work_dir(self.work)
        self.accelerator.wait_for_everyone()
        return result


def _board_dir(tensorboard: bool | str | Path, out: Path, checkpoint: Path) -> Path | None:
    """Where the TensorBoard events go (None: nowhere), checked before any work. The default is beside
    ``metrics.jsonl``: the work folder during the run, kept as ``OUT/tensorboard``."""
    if not tensorboard:
        return None
    summary_writer()  # a missing package is refused before the model loads
    if tensorboard is True:
        return work_dir(out) / "tensorboard"
    board = Path(tensorboard)
    if board.is_file():
        raise LowbitError(f"--tensorboard {board} is a file: give a folder for the event files")
    for inside, why in ((out, "replaced with --out at the end"), (checkpoint, "an input, never modified")):
        if board.resolve().is_relative_to(Path(inside).resolve()):
            raise LowbitError(f"--tensorboard {board} is inside {inside} ({why}): give a folder outside it, or "
                              "--tensorboard alone to keep the events in OUT/tensorboard")  # fmt: skip
    return board


@with_output_lock
def finetune(
    checkpoint: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | None = "auto",
    tensorboard: bool | str | Path = False,
) -> dict:
    """Fine-tune the adapter (``config.method``) of the lowbit ``checkpoint`` into the checkpoint ``out``; returns
    the metrics. With PaFi or HiWi, ``checkpoint`` may also be a full-precision model (folder or GGUF file): ``out``
    is then that model with the adapter merged, a plain Hugging Face folder (see :func:`save_merged_model`).

    ``on_step(step)`` is called after each optimizer step (and its save), for callers that watch progress.
    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (a multi-process launch gives each
    process its own GPU instead). It is not part of the resume fingerprint, so a run can continue elsewhere.
    On CUDA with bf16 precision the frozen full-precision weights are kept in bf16 there (see :func:`frozen_to`).
    ``tensorboard``: also write the metrics log's scalars as TensorBoard events, to that folder, or (True) to
    ``tensorboard`` in the work folder, kept as ``OUT/tensorboard``; like ``device``, not part of the fingerprint.
    """
    config = config or TrainConfig()
    checkpoint, out = Path(checkpoint), Path(out)
    if config.method != "lora" and not is_lowbit_checkpoint(checkpoint):
        checkpoint = resolve_model_path(checkpoint)  # a full-precision base: a model folder, or a GGUF file converted
    work = work_dir(out)
    # Before any loading, and also when resuming: a non-empty --out is never replaced without --overwrite.
    check_output_dir(out, overwrite, (checkpoint,))
    board = _board_dir(tensorboard, out, checkpoint)
    trainer = Trainer.setup(checkpoint, work, config, resolve_device(device))
    trainer.resume(overwrite)
    main, total = trainer.accelerator.is_main_process, trainer.total_steps
    log = MetricsLog(work / METRICS_LOG if main else None, trainer.start_step, board if main else None)
    try:
        bar = tqdm(total=total, initial=trainer.start_step, desc="finetune", disable=not progress or not main)
        for step in range(trainer.start_step, total):
            record = trainer.step(step)
            log.write(**record)
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done < total:
                trainer.evaluate(done, log)
            if config.save_every and done % config.save_every == 0 and done < total:
                trainer.save_state(done)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if on_step is not None:
                on_step(done)
        bar.close()
        trainer.evaluate(total, log)
    finally:
        log.close()
    files = {METRICS_LOG: work / METRICS_LOG}
    if board == work / "tensorboard":
        files["tensorboard"] = board
    return trainer.save(out, overwrite, files)
