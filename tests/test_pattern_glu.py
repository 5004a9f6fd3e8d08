"""The gated-unit pattern on hand-written MLPs: every activation spelling, separate and packed
gate/up projections, and the near misses that must be left alone."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastft

from helpers import DEVICE


def _gelu_tanh_written(g):
    return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * torch.pow(g, 3.0))))


def _gelu_erf_written(g):
    return g * 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0)))


ACTIVATIONS = {
    "silu": (F.silu, "silu"),
    "silu_module": (nn.SiLU(), "silu"),
    "silu_written": (lambda g: g * torch.sigmoid(g), "silu"),
    "gelu": (F.gelu, "gelu_erf"),
    "gelu_tanh": (lambda g: F.gelu(g, approximate="tanh"), "gelu_tanh"),
    "gelu_tanh_written": (_gelu_tanh_written, "gelu_tanh"),
    "gelu_erf_written": (_gelu_erf_written, "gelu_erf"),
}


class GatedMLP(nn.Module):
    def __init__(self, act, packed=False, split="chunk", hidden=16, width=24, dtype=torch.float32):
        super().__init__()
        self.act, self.packed, self.split = act, packed, split
        if packed:
            self.gate_up = nn.Linear(hidden, 2 * width, bias=False, dtype=dtype)
        else:
            self.gate = nn.Linear(hidden, width, bias=False, dtype=dtype)
            self.up = nn.Linear(hidden, width, bias=False, dtype=dtype)
        self.down = nn.Linear(width, hidden, bias=False, dtype=dtype)

    def forward(self, x):
        if not self.packed:
            return self.down(self.act(self.gate(x)) * self.up(x))
        h = self.gate_up(x)
        if self.split == "chunk":
            g, u = h.chunk(2, dim=-1)
        elif self.split == "split":
            g, u = torch.split(h, h.shape[-1] // 2, dim=-1)
        else:
            g, u = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        return self.down(u * self.act(g))


def _run(model, x):
    fastft.optimize(model)
    model(x).float().pow(2).mean().backward()
    return fastft.report(model)


def _fused(model):
    return [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
            if getattr(n.target, "_schema", None) is not None and n.target._schema.name.startswith("fastft::glu")]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_are_rewritten_and_equivalent(activation, dtype):
    act, kind = ACTIVATIONS[activation]
    torch.manual_seed(0)
    model = GatedMLP(act, dtype=dtype).to(DEVICE)
    x = torch.randn(3, 5, 16, dtype=dtype, device=DEVICE)
    report = _run(model, x)
    if activation.endswith("_written") and dtype == torch.bfloat16:
        # Written out in bf16, every step rounds: the fp32 kernel would not reproduce it.
        assert report.counts() == {}, report
        (miss,) = report.near_misses
        assert miss.pattern == "glu" and "written out in torch.bfloat16" in miss.reason
    else:
        assert report.counts() == {"glu_mlp": 1}, report
        (fused,) = _fused(model)
        assert fused.args[-3] == kind
        assert report.near_misses == [], report
    result = fastft.check(model, (x,), loss_fn=lambda out: out.float().pow(2).mean())
    assert result.ok, result


@pytest.mark.parametrize("split", ["chunk", "split", "slices"])
def test_packed_gate_up_uses_the_packed_op(split):
    torch.manual_seed(0)
    model = GatedMLP(F.silu, packed=True, split=split).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"glu_mlp": 1}, report
    assert [r.kernel for r in report.rewrites] == ["fastft::glu_packed"]
    assert fastft.check(model, (x,), loss_fn=lambda out: out.pow(2).mean()).ok


class UpFirst(GatedMLP):  # the activation applies to the second half: the plain op on both views
    def forward(self, x):
        u, g = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(g) * u)


def test_gate_in_the_second_half_reads_the_views():
    torch.manual_seed(0)
    model = UpFirst(F.silu, packed=True).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    report = _run(model, x)
    assert [r.kernel for r in report.rewrites] == ["fastft::glu"], report
    assert fastft.check(model, (x,), loss_fn=lambda out: out.pow(2).mean()).ok


class Broadcast(nn.Module):  # act(gate) * a per-channel scale: not a gated unit of two tensors
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 24)
        self.scale = nn.Parameter(torch.randn(24))

    def forward(self, x):
        return F.silu(self.gate(x)) * self.scale


def test_broadcast_product_is_a_near_miss_with_reason():
    model = Broadcast().to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {}
    (miss,) = report.near_misses
    assert miss.pattern == "glu" and "broadcast" in miss.reason


class PlainMLP(nn.Module):  # no gate at all: not a GLU near miss either
    def __init__(self):
        super().__init__()
        self.fc, self.proj = nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def test_ungated_activation_is_not_a_glu():
    model = PlainMLP().to(DEVICE)
    report = _run(model, torch.randn(2, 3, 16, device=DEVICE))
    assert _fused(model) == [] and report.near_misses == []
    assert report.counts() == {"mlp_act": 1}  # the ungated activation's own family (test_pattern_activation.py)


class HalfPacked(nn.Module):  # gate is a slice of a wider projection, up a linear of its own
    def __init__(self):
        super().__init__()
        self.wide, self.up, self.down = nn.Linear(16, 48), nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        gate = self.wide(x)[..., :24]
        return self.down(F.silu(gate) * self.up(x))


def test_gate_slice_with_an_unpacked_up_uses_the_plain_op():
    model = HalfPacked().to(DEVICE)
    x = torch.randn(2, 3, 16, device=DEVICE)
    report = _run(model, x)
    assert [r.kernel for r in report.rewrites] == ["fastft::glu"], report
    assert not report.capture_failures
    assert fastft.check(model, (x,), loss_fn=lambda out: out.pow(2).mean()).ok
