"""Tensor quantizers: stored codes equal the differentiable path, gradients reach clipping, NF tables are right."""

import pytest
import torch

from lowbit.quant import (
    QuantSpec,
    dequantize_weight,
    fake_quantize_weight,
    normalfloat,
    quantize_weight,
    search_clip,
    uniform,
)
from lowbit.quant.gptq import gptq_quantize

SPECS = [QuantSpec(b, g, "int", sym) for b in (2, 3, 4, 8) for g in (16, 32) for sym in (False, True)] + [
    QuantSpec(b, 16, "nf") for b in (2, 3, 4)
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name + ("s" if s.symmetric else ""))
def test_fake_quantize_equals_stored(spec: QuantSpec) -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    clip = torch.rand(24, spec.groups(64), generator=g) * 0.5 + 0.5
    for clip_hi, clip_lo in ((None, None), (clip, clip.flip(0))):
        if spec.format == "nf":
            clip_lo = None
        q = quantize_weight(w, spec, clip_hi, clip_lo)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 1 << spec.bits
        assert q.scales.dtype == torch.float16
        assert (q.zeros is not None) == spec.has_zeros
        assert torch.equal(dequantize_weight(q, spec), fake_quantize_weight(w, spec, clip_hi, clip_lo))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_shrinks_with_bits_and_is_bounded(bits: int) -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits, 32)
    err = (fake_quantize_weight(w, spec) - w).abs()
    step = (uniform.group_view(w, 32).amax(-1) - uniform.group_view(w, 32).amin(-1)) / ((1 << bits) - 1)
    err, step = err.view(32, 4, 32), step.unsqueeze(-1)
    # Round-to-nearest: inside the grid the error is at most half a step; the rounded zero point can move the grid
    # by half a step and the fp16 scale by 2^-11 of the range, so the extremes may be off by up to one step.
    assert torch.all(err <= step * (1 + 2**-11 * (1 << bits)) + 1e-6)
    assert (err / step).mean() < 0.3  # uniform rounding error averages a quarter step


def test_errors_order_by_bits() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errs = [(fake_quantize_weight(w, QuantSpec(b, 64)) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("spec", [QuantSpec(3, 16), QuantSpec(2, 16, symmetric=True), QuantSpec(4, 16, "nf")])
def test_gradients_reach_weight_and_clipping(spec: QuantSpec) -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logits_hi = torch.full((8, 2), 4.0, requires_grad=True)
    logits_lo = torch.full((8, 2), 4.0, requires_grad=True)
    hi = uniform.clip_factors(logits_hi)
    lo = None if spec.format == "nf" or spec.symmetric else uniform.clip_factors(logits_lo)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    loss = (x @ fake_quantize_weight(w, spec, hi, lo).t()).pow(2).sum()
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert logits_hi.grad is not None and logits_hi.grad.abs().sum() > 0
    if lo is not None:
        assert logits_lo.grad is not None and logits_lo.grad.abs().sum() > 0


def test_clip_factors_sigmoid() -> None:
    assert torch.allclose(uniform.clip_factors(torch.tensor([0.0, 4.0])), torch.tensor([0.5, 0.98201379]))


def test_nf4_codebook_matches_qlora() -> None:
    # The NF4 table published with QLoRA (bitsandbytes' functional.py).
    nf4 = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]  # fmt: skip
    assert torch.allclose(normalfloat.codebook(4), torch.tensor(nf4), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebooks_shape(bits: int) -> None:
    cb = normalfloat.codebook(bits)
    assert cb.numel() == 1 << bits
    assert cb.min() == -1 and cb.max() == 1 and (cb == 0).any()
    assert torch.all(cb[1:] > cb[:-1])


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 48), QuantSpec(4, 32))
    # -1 means one group per row
    q = quantize_weight(torch.randn(4, 48), QuantSpec(4, -1))
    assert q.scales.shape == (4, 1)


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        QuantSpec(5)
    with pytest.raises(ValueError):
        QuantSpec(8, format="nf")
    with pytest.raises(ValueError):
        QuantSpec(4, 0)
    assert QuantSpec(3, 64).name == "W3g64" and QuantSpec(4, 64, "nf").name == "NF4g64"


def test_constant_group_does_not_divide_by_zero() -> None:
    w = torch.zeros(2, 32)
    for spec in (QuantSpec(2, 16), QuantSpec(4, 16, symmetric=True), QuantSpec(4, 16, "nf")):
        out = fake_quantize_weight(w, spec)
        assert torch.isfinite(out).all() and torch.equal(out, w)


@pytest.mark.parametrize("spec", [QuantSpec(2, 16), QuantSpec(3, 16, symmetric=True), QuantSpec(2, 16, "nf")])
def test_search_clip_picks_each_groups_best_candidate(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[:, 5] *= 8  # outliers that dominate min-max ranges
    importance = torch.rand(64, generator=g)
    importance[5] = 1e-3  # ... in a column whose activations are tiny
    candidates = [1.0, 0.9, 0.75, 0.6, 0.5]
    best = search_clip(w, spec, importance, candidates)
    assert best.shape == (6, 4) and best[:, 0].lt(1.0).any()  # outlier groups get clipped
    for c in candidates:  # no candidate beats the chosen one in any group
        f = torch.full_like(best, c)
        chosen = fake_quantize_weight(w, spec, best, best if spec.has_zeros else None)
        other = fake_quantize_weight(w, spec, f, f if spec.has_zeros else None)
        err = lambda q: ((q - w).square() * importance).view(6, 4, 16).sum(-1)  # noqa: E731
        assert (err(chosen) <= err(other) + 1e-6).all()


GPTQ_SPECS = [QuantSpec(2, 16), QuantSpec(3, 16, symmetric=True), QuantSpec(4, -1), QuantSpec(3, 16, "nf")]


@pytest.mark.parametrize("spec", GPTQ_SPECS, ids=lambda s: s.name + ("s" if s.symmetric else ""))
def test_gptq_with_a_diagonal_gram_is_round_to_nearest(spec: QuantSpec) -> None:
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    grid = quantize_weight(w, spec)
    gram = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.1)
    q = gptq_quantize(w, spec, gram, grid)
    assert torch.equal(q.codes, grid.codes) and q.scales is grid.scales and q.zeros is grid.zeros


@pytest.mark.parametrize("spec", GPTQ_SPECS, ids=lambda s: s.name + ("s" if s.symmetric else ""))
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_cuts_output_error_on_correlated_inputs(spec: QuantSpec, act_order: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64).unsqueeze(0)
    x = torch.randn(2048, 64, generator=g) @ mix + 0.1 * torch.randn(2048, 64, generator=g)
    grid = quantize_weight(w, spec)
    q = gptq_quantize(w, spec, x.t() @ x, grid, act_order=act_order, block_size=24)  # blocks not dividing 64
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 1 << spec.bits
    out_err = lambda qw: (x @ (w - dequantize_weight(qw, spec)).t()).square().sum()  # noqa: E731
    assert out_err(q) < 0.7 * out_err(grid)
