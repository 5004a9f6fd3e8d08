"""The rotary-embedding pattern on hand-written attention inputs: rotate-half and pairwise
layouts, full and partial rotary, both head layouts, q and k grouped into one call, near misses."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastft

from helpers import DEVICE


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class Rotary(nn.Module):
    """Projects to q and k, rotates them, returns a score-like scalar of both."""

    def __init__(self, interleaved=False, rotary=16, head_dim=16, heads_first=True, upcast=False,
                 rotate_k=True, dtype=torch.float32):
        super().__init__()
        self.q = nn.Linear(32, 4 * head_dim, bias=False, dtype=dtype)
        self.k = nn.Linear(32, 2 * head_dim, bias=False, dtype=dtype)
        self.interleaved, self.rotary, self.head_dim = interleaved, rotary, head_dim
        self.heads_first, self.upcast, self.rotate_k = heads_first, upcast, rotate_k
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary))

    def cos_sin(self, seq, dtype):
        freqs = torch.arange(seq, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x, cos, sin):
        dtype = x.dtype
        if self.upcast == "after_rotation" and self.rotary == self.head_dim:
            # upcast the rotated copy separately, after rotating it
            turned = rotate_pairs(x) if self.interleaved else rotate_half(x)
            return (x.float() * cos + turned.float() * sin).to(dtype)
        if self.upcast:
            x = x.float()
        rot, rest = x[..., : self.rotary], x[..., self.rotary:]
        turned = rotate_pairs(rot) if self.interleaved else rotate_half(rot)
        out = rot * cos + turned * sin
        if self.rotary < self.head_dim:
            out = torch.cat((out, rest), dim=-1)
        return out.to(dtype)

    def forward(self, h):
        b, s, _ = h.shape
        q = self.q(h).view(b, s, 4, self.head_dim)
        k = self.k(h).view(b, s, 2, self.head_dim)
        cos, sin = self.cos_sin(s, torch.float32 if self.upcast else h.dtype)
        if self.heads_first:
            q, k, cos, sin = q.transpose(1, 2), k.transpose(1, 2), cos[None, None], sin[None, None]
        else:
            cos, sin = cos[None, :, None], sin[None, :, None]
        q = self.apply(q, cos, sin)
        k = self.apply(k, cos, sin) if self.rotate_k else k
        return q.float().pow(2).mean() + k.float().mean()


def _run(model, x):
    fastft.optimize(model)
    model(x).backward()
    return fastft.report(model)


def _fused(model):
    return [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
            if n.target is torch.ops.fastft.rope.default]


VARIANTS = {
    "rotate_half": dict(),
    "pairwise_upcast": dict(interleaved=True, upcast=True),
    "partial": dict(rotary=8, head_dim=20),
    "partial_pairwise": dict(rotary=8, head_dim=12, interleaved=True),
    "heads_last": dict(heads_first=False),
    "pairwise_cast_after_rotation": dict(interleaved=True, upcast="after_rotation"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_rotate_q_and_k_in_one_call(variant, dtype):
    torch.manual_seed(0)
    model = Rotary(**VARIANTS[variant], dtype=dtype).to(DEVICE)
    x = torch.randn(2, 6, 32, dtype=dtype, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"rope": 1}, report  # one call for q and k
    assert report.near_misses == [], report
    (fused,) = _fused(model)
    assert fused.args[4] == VARIANTS[variant].get("interleaved", False)
    # In bf16 without an upcast the products round as eager's do; with fp32 math, no rounding.
    rounds = dtype == torch.bfloat16 and not VARIANTS[variant].get("upcast", False)
    assert fused.args[5] == (torch.bfloat16 if rounds else None)
    result = fastft.check(model, (x,))
    assert result.ok, result
    assert result.regions_checked == 1


def test_a_lone_rotation_gets_a_call_of_its_own():
    torch.manual_seed(0)
    model = Rotary(rotate_k=False).to(DEVICE)
    x = torch.randn(2, 6, 32, device=DEVICE)
    assert _run(model, x).counts() == {"rope": 1}
    assert fastft.check(model, (x,)).ok


class LearnedAngles(Rotary):  # cos/sin carry a gradient: the kernel gives none for them
    def __init__(self):
        super().__init__()
        self.angles = nn.Parameter(torch.randn(6, 16))

    def cos_sin(self, seq, dtype):
        return self.angles[:seq].cos(), self.angles[:seq].sin()


class WrongHalves(Rotary):  # splits at a quarter: not a rotation
    def apply(self, x, cos, sin):
        quarter = x.shape[-1] // 4
        return x * cos + torch.cat((-x[..., quarter:], x[..., :quarter]), dim=-1) * sin


@pytest.mark.parametrize("model_cls, reason", [(LearnedAngles, "requires a gradient"),
                                               (WrongHalves, "rotate-half takes columns")])
def test_near_misses_are_left_alone_with_the_reason(model_cls, reason):
    torch.manual_seed(0)
    model = model_cls().to(DEVICE)
    x = torch.randn(2, 6, 32, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {}, report
    assert report.near_misses and all(m.pattern == "rope" for m in report.near_misses)
    assert reason in report.near_misses[0].reason, report
    assert fastft.check(model, (x,)).ok


class ComplexRotary(Rotary):
    """The rotation written with complex numbers: pairs of columns times e^{i t}."""

    def forward(self, h):
        b, s, _ = h.shape
        q = self.q(h).view(b, s, 4, self.head_dim)
        k = self.k(h).view(b, s, 2, self.head_dim)
        angles = torch.arange(s, device=h.device).float()[:, None] * self.inv_freq[None, :]
        freqs = torch.polar(torch.ones_like(angles), angles)[None]
        q_ = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        k_ = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
        q = torch.view_as_real(q_ * freqs[:, :, None, :]).flatten(3).type_as(q)
        k = torch.view_as_real(k_ * freqs[:, :, None, :]).flatten(3).type_as(k)
        return q.float().pow(2).mean() + k.float().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_form_is_the_same_family(dtype):
    torch.manual_seed(0)
    model = ComplexRotary(dtype=dtype).to(DEVICE)
    x = torch.randn(2, 6, 32, dtype=dtype, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"rope": 1}, report  # q and k in one call (the two freqs views merged)
    assert [r.kernel for r in report.rewrites] == ["fastft::rope_polar"]
    assert report.near_misses == [], report
    assert fastft.check(model, (x,)).ok


class ViewAfterRotation(Rotary):
    """Heads-first q and k (transposed views) rotated partially, the original ending in a cat
    (a contiguous result) that the code after it reshapes with ``view``."""

    def __init__(self, dtype=torch.float32):
        super().__init__(rotary=8, head_dim=20, dtype=dtype)

    def forward(self, h):
        b, s, _ = h.shape
        q = self.q(h).view(b, s, 4, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, s, 2, self.head_dim).transpose(1, 2)
        cos, sin = self.cos_sin(s, h.dtype)
        q, k = self.apply(q, cos[None, None], sin[None, None]), self.apply(k, cos[None, None], sin[None, None])
        return q.view(b * 4, s, self.head_dim).float().pow(2).mean() + k.view(b * 2, s, -1).float().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rotation_read_by_view_keeps_the_original_layout(dtype):
    torch.manual_seed(0)
    model = ViewAfterRotation(dtype=dtype).to(DEVICE)
    for seq in (6, 9):  # the second length recompiles with symbolic sizes
        x = torch.randn(2, seq, 32, dtype=dtype, device=DEVICE)
        assert _run(model, x).counts() == {"rope": 1}
        assert fastft.check(model, (x,)).ok


class FlippedRotary(Rotary):
    """rotate-half written cat(x2, -x1): the rotation by -sin."""

    def apply(self, x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], -x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_flipped_rotate_half_is_the_rotation_by_minus_sin(dtype):
    torch.manual_seed(0)
    model = FlippedRotary(dtype=dtype).to(DEVICE)
    x = torch.randn(2, 6, 32, dtype=dtype, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"rope": 1} and not report.near_misses, report
    (fused,) = _fused(model)
    assert fused.args[7] is True  # negate_sin
    result = fastft.check(model, (x,))
    assert result.ok and result.regions_checked == 1, result
