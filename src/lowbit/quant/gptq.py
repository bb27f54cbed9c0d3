"""GPTQ / OPTQ rounding (Frantar et al., 2023): quantize a weight so the layer's *outputs* stay close.

Round-to-nearest makes each weight's error as small as it can, but what matters is ``||X (W - Q)^T||`` over the
inputs the layer really sees. GPTQ rounds one input column at a time and pushes that column's rounding error onto
the columns not yet rounded, weighted by the inverse Gram matrix ``H = X^T X``, so later columns absorb what
earlier ones lost. Here the grid (each group's scale and zero point, or NF absmax) is fixed before rounding
starts -- GPTQ's "static groups" -- which keeps the stored format exactly lowbit's and lets the columns be visited
in any order: by default in decreasing ``H_jj`` ("act-order"), the columns whose inputs are largest first.

With ``H`` diagonal no error can be moved anywhere, and the result is round-to-nearest on the same grid (tested).
Pure tensor math: the Gram matrix comes from the caller.
"""

from __future__ import annotations

import torch

from lowbit.quant import QuantizedWeight, QuantSpec
from lowbit.quant.normalfloat import codebook, nearest


def _grid_round(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None):
    """Codes and values of the column(s) ``x`` on a fixed per-row grid (``scale``/``zero`` shaped like ``x``)."""
    if spec.format == "nf":
        cb = codebook(spec.bits).to(x.device, x.dtype)
        codes = nearest(torch.clamp(x / scale, -1.0, 1.0), cb)
        return codes, cb[codes] * scale
    codes = torch.clamp(torch.round(x / scale) + zero, 0, (1 << spec.bits) - 1)
    return codes, (codes - zero) * scale


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    gram: torch.Tensor,
    grid: QuantizedWeight,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> QuantizedWeight:
    """Codes for ``w`` ``[out, in]`` on ``grid``'s scales/zeros minimizing ``||X (w - Q)^T||`` with ``gram = X^T X``.

    ``damp`` adds that fraction of the mean diagonal to ``gram`` (inputs the calibration never excited must not
    make the inverse blow up). Columns are processed in blocks of ``block_size`` with the error of a finished
    block applied to the rest in one matrix product (the paper's lazy batch update); same result, fewer passes.
    """
    out, cols = w.shape
    group = cols if spec.group_size == -1 else spec.group_size
    column_group = torch.arange(cols, device=w.device) // group
    scale = grid.scales.float()[:, column_group]
    if spec.format == "nf":
        zero = None
    elif grid.zeros is None:  # symmetric integers: the fixed middle code
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        zero = grid.zeros.float()[:, column_group]
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-12))
    h.diagonal()[h.diagonal() <= 0] = 1.0  # a column no input ever reached: rounding it costs nothing
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols, device=w.device)
    h = h[order][:, order]
    # Upper Cholesky factor of H^{-1}: row i holds how column i's error spreads to the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    work = w.float()[:, order].clone()
    scale = scale[:, order]
    zero = None if zero is None else zero[:, order]
    codes = torch.empty(out, cols, dtype=torch.uint8, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        errors = torch.empty(out, i2 - i1, device=w.device)
        for i in range(i1, i2):
            column = work[:, i]
            code, value = _grid_round(column, spec, scale[:, i], None if zero is None else zero[:, i])
            codes[:, i] = code.to(torch.uint8)
            err = (column - value) / hinv[i, i]
            work[:, i:i2] -= err.unsqueeze(1) * hinv[i, i:i2].unsqueeze(0)
            errors[:, i - i1] = err
        work[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return QuantizedWeight(codes[:, torch.argsort(order)], grid.scales, grid.zeros)
