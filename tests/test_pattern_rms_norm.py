"""The RMSNorm pattern on hand-written modules: every spelling of the math, the variants that
change the numbers, and the near misses that must be left alone (with the reason reported)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastft

from helpers import DEVICE


class Net(nn.Module):
    """Linear -> norm -> linear, so the norm sits between trainable ops like in a real layer."""

    def __init__(self, norm: nn.Module, width: int = 24, dtype=torch.float32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width, dtype=dtype)
        self.norm = norm
        self.out = nn.Linear(width, 4, dtype=dtype)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).float().pow(2).mean()


class CastBeforeWeight(nn.Module):  # the most common layout: round to input dtype, then weight
    def __init__(self, width, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class OnePlusWeight(nn.Module):  # weight stored as an offset from 1, product in float32
    def __init__(self, width, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, dtype=dtype) * 0.1)
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class OtherSpelling(nn.Module):  # x*x, 1/sqrt, torch.mean with dim=, eps first
    def __init__(self, width, eps=1e-5, dtype=torch.float32):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        ms = torch.mean(h * h, dim=-1, keepdim=True)
        return (h / torch.sqrt(self.eps + ms)).to(x.dtype) * self.scale


class NoWeight(nn.Module):
    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class NoUpcast(nn.Module):  # squares and means in bf16: the kernel (fp32) would not match it
    def __init__(self, width, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class WrongDim(nn.Module):  # mean over the first dim: not an RMSNorm
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))


def _optimise_and_run(model, x):
    fastft.optimize(model)
    model(x).backward()
    return fastft.report(model)


@pytest.mark.parametrize("norm_cls", [CastBeforeWeight, OnePlusWeight, OtherSpelling])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_are_rewritten_and_equivalent(norm_cls, dtype):
    torch.manual_seed(0)
    model = Net(norm_cls(24, dtype=dtype), dtype=dtype).to(DEVICE)
    x = torch.randn(3, 5, 8, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1}, report
    assert report.rewrites[0].module_path == "norm"
    result = fastft.check(model, (x,))
    assert result.ok, result
    assert result.regions_checked == 1


def test_no_weight_variant():
    torch.manual_seed(0)
    model = Net(NoWeight()).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    assert _optimise_and_run(model, x).counts() == {"rms_norm": 1}
    assert fastft.check(model, (x,)).ok


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.25])
def test_eps_is_read_from_the_graph(eps):
    torch.manual_seed(0)
    model = Net(CastBeforeWeight(24, eps=eps)).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    _optimise_and_run(model, x)
    fused = [n for g in fastft.optimize(model)._fastft_state.graphs.values()
             for n in g.gm.graph.nodes if n.target is torch.ops.fastft.rms_norm.default]
    assert len(fused) == 1 and fused[0].args[2] == pytest.approx(eps)
    assert fastft.check(model, (x,)).ok


def test_no_upcast_is_a_near_miss_with_reason():
    torch.manual_seed(0)
    model = Net(NoUpcast(24, torch.bfloat16), dtype=torch.bfloat16).to(DEVICE)
    report = _optimise_and_run(model, torch.randn(4, 8, dtype=torch.bfloat16, device=DEVICE))
    assert report.counts() == {}
    assert len(report.near_misses) == 1
    miss = report.near_misses[0]
    assert miss.pattern == "rms_norm" and "norm" in miss.region
    assert "bfloat16" in miss.reason and "float32" in miss.reason


def test_reduction_over_the_wrong_dim_is_left_alone():
    torch.manual_seed(0)
    model = Net(WrongDim(24)).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {}
    assert report.near_misses and "dims" in report.near_misses[0].reason
    assert fastft.check(model, (x,)).ok  # unoptimised there, still trains correctly


def test_frozen_weight_gets_no_gradient_and_input_still_does():
    torch.manual_seed(0)
    model = Net(CastBeforeWeight(24)).to(DEVICE)
    model.norm.weight.requires_grad_(False)
    x = torch.randn(4, 8, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1}
    assert model.norm.weight.grad is None
    assert model.inp.weight.grad is not None
    assert fastft.check(model, (x,)).ok


class Branchy(nn.Module):
    """A norm inside both branches of torch.cond: control-flow bodies are nested graphs too."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.norm = CastBeforeWeight(24)

    def forward(self, x):
        h = self.inp(x)
        h = torch.cond(h.sum() > 0, lambda t: self.norm(t) * 2, lambda t: self.norm(t) - 1, (h,))
        return h.pow(2).mean()


def test_norms_inside_control_flow_bodies_are_rewritten():
    torch.manual_seed(0)
    model = Branchy().to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    fastft.optimize(model)
    model(x).backward()
    state = model._fastft_state
    fused = [n for g in state.graphs.values() for sub in g.gm.modules() if isinstance(sub, torch.fx.GraphModule)
             for n in sub.graph.nodes if n.target is torch.ops.fastft.rms_norm.default]
    assert len(fused) == 2  # one per branch
    assert not fastft.report(model).capture_failures
    result = fastft.check(model, (x,))
    assert result.ok, str(result)
    assert result.regions_checked == 1  # the branch the data took
