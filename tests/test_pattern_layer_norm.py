"""The LayerNorm pattern on hand-written modules: the library op with and without affine
parameters, upcast-then-cast-back, the written-out mean/variance forms, and near misses."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastft

from helpers import DEVICE, assert_norm_before_a_foreign_cast


class Net(nn.Module):
    def __init__(self, norm: nn.Module, width: int = 24, dtype=torch.float32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width, dtype=dtype)
        self.norm = norm
        self.out = nn.Linear(width, 4, dtype=dtype)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).float().pow(2).mean()


class UpcastNoAffine(nn.Module):  # fp32 inside, no parameters, cast back
    def forward(self, x):
        return F.layer_norm(x.to(torch.float32), (x.shape[-1],), None, None, eps=1e-5).to(x.dtype)


class WeightOnly(nn.Module):
    def __init__(self, width, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, 1e-6)


class WrittenOut(nn.Module):  # mean, centred twice, pow/mean, rsqrt, fp32 weight, cast back
    def __init__(self, width, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width, dtype=dtype))
        self.eps = 1e-5

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        variance = (h - mean).pow(2).mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(variance + self.eps)
        return (self.weight.to(torch.float32) * h).to(dtype)


class WrittenWithVar(nn.Module):  # torch.var (biased), division by sqrt, weight and bias
    def __init__(self, width, dtype=torch.float32):
        super().__init__()
        self.gamma = nn.Parameter(1 + 0.1 * torch.randn(width, dtype=dtype))
        self.beta = nn.Parameter(0.1 * torch.randn(width, dtype=dtype))

    def forward(self, x):
        h = x.float()
        mu = h.mean(dim=-1, keepdim=True)
        var = h.var(dim=-1, keepdim=True, unbiased=False)
        return (self.gamma.float() * ((h - mu) / torch.sqrt(var + 1e-5)) + self.beta.float()).type_as(x)


class UnbiasedVariance(nn.Module):  # var with Bessel's correction: not a LayerNorm
    def forward(self, x):
        h = x.float()
        return ((h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True) + 1e-5)).type_as(x)


class TwoDims(nn.Module):  # normalised over the last two dims: the kernel normalises one
    def forward(self, x):
        return F.layer_norm(x, tuple(x.shape[-2:]))


class BiasAfterRounding(nn.Module):  # weight product rounded to bf16, then the bias: two roundings
    def __init__(self, width, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(width, dtype=dtype))

    def forward(self, x):
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * h.to(x.dtype) + self.bias


def _optimise_and_run(model, x):
    fastft.optimize(model)
    model(x).backward()
    return fastft.report(model)


@pytest.mark.parametrize("norm", ["library", "upcast_no_affine", "weight_only", "written", "written_var"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_are_rewritten_and_equivalent(norm, dtype):
    torch.manual_seed(0)
    modules = {"library": lambda: nn.LayerNorm(24, dtype=dtype), "upcast_no_affine": UpcastNoAffine,
               "weight_only": lambda: WeightOnly(24, dtype), "written": lambda: WrittenOut(24, dtype),
               "written_var": lambda: WrittenWithVar(24, dtype)}
    model = Net(modules[norm](), dtype=dtype).to(DEVICE)
    x = torch.randn(3, 5, 8, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"layer_norm": 1}, report
    assert report.rewrites[0].module_path == "norm"
    assert report.near_misses == [], report
    result = fastft.check(model, (x,))
    assert result.ok, result
    assert result.regions_checked == 1


class NormToBytes(nn.Module):
    """A LayerNorm read only through a cast to uint8, which the kernel does not write."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.out = nn.Linear(24, 4)

    def forward(self, x):
        h = self.inp(x)
        codes = F.layer_norm(h, (24,), eps=1e-5).to(torch.uint8).float()
        return self.out(h).pow(2).mean() + codes.mean()


def test_a_cast_to_a_dtype_the_kernel_does_not_write_stays_the_models():
    torch.manual_seed(0)
    assert_norm_before_a_foreign_cast(NormToBytes().to(DEVICE), torch.randn(4, 8, device=DEVICE) * 4, "layer_norm")


def test_eps_and_parameters_are_read_from_the_graph():
    torch.manual_seed(0)
    model = Net(nn.LayerNorm(24, eps=0.125)).to(DEVICE)
    model.norm.weight.requires_grad_(False)  # frozen: no gradient for it, the bias still gets one
    x = torch.randn(4, 8, device=DEVICE)
    _optimise_and_run(model, x)
    fused = [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
             if n.target is torch.ops.fastft.layer_norm.default]
    assert len(fused) == 1 and fused[0].args[3] == pytest.approx(0.125)
    assert model.norm.weight.grad is None and model.norm.bias.grad is not None
    assert fastft.check(model, (x,)).ok


def test_bias_added_after_a_rounding_stays_outside_the_fused_op():
    # (norm * weight) is rounded to bf16 before the bias is added: the kernel rounds once, so the
    # region it takes ends at the product, and the bf16 bias add stays as it was.
    torch.manual_seed(0)
    model = Net(BiasAfterRounding(24, torch.bfloat16), dtype=torch.bfloat16).to(DEVICE)
    x = torch.randn(4, 8, dtype=torch.bfloat16, device=DEVICE)
    assert _optimise_and_run(model, x).counts() == {"layer_norm": 1}
    fused = [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
             if n.target is torch.ops.fastft.layer_norm.default]
    assert fused[0].args[2] is None  # no bias inside
    assert fastft.check(model, (x,)).ok


@pytest.mark.parametrize("module, reason", [(UnbiasedVariance(), "correction"), (TwoDims(), "shape")])
def test_near_misses_are_left_alone_with_the_reason(module, reason):
    torch.manual_seed(0)
    dtype = next(module.parameters(), torch.empty(0)).dtype
    model = Net(module, dtype=dtype).to(DEVICE)
    x = torch.randn(4, 8, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert "layer_norm" not in report.counts(), report
    misses = [m for m in report.near_misses if m.pattern == "layer_norm"]
    assert misses and reason in misses[0].reason, report
    assert fastft.check(model, (x,)).ok  # left alone, still the same function
