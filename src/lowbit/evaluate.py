"""Perplexity: ``exp(mean next-token NLL)`` over every predicted token of every window (protocol P1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on token windows ``[n, seqlen]``; NaN or inf logits raise with the window index."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    bar = tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False)
    for start in bar:
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        if not torch.isfinite(logits).all():
            raise LowbitError(f"the model produced NaN or inf logits on window {start}: the checkpoint is broken")
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
        bar.set_postfix(ppl=f"{math.exp(total / count):.2f}", refresh=False)  # the running value: a first answer
    nll = total / count
    return Perplexity(math.exp(nll), nll, count)
