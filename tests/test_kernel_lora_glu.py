"""The GLU kernels with LoRA corrections (kernels/lora_glu.py) against the unfused ops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.lora_glu import lora_glu_backward, lora_glu_forward, lora_glu_reference

from helpers import DEVICE

# Elementwise (atol, rtol). Kernel and reference round the same values the same way; only the
# order of the depth-r sums may differ, which can move a 16-bit result by one ulp.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _inputs(rows, width, rank_g, rank_u, rank_d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    stacked = rand(rows, rank_g + rank_u)  # x A^T of gate and up side by side, as the MLP op keeps it
    return dict(gate=rand(rows, width), up=rand(rows, width), xa_gate=stacked[:, :rank_g], xa_up=stacked[:, rank_g:],
                b_gate=rand(width, rank_g, scale=rank_g ** -0.5), b_up=rand(width, rank_u, scale=rank_u ** -0.5),
                dh=rand(rows, width), dyb=rand(rows, rank_d), a_down=rand(rank_d, width, scale=rank_d ** -0.5))


def _forward(t, activation, round_dtype, scales=(0.5, 2.0)):
    args = (t["gate"], t["up"], t["xa_gate"], t["xa_up"], t["b_gate"], t["b_up"], *scales)
    out = lora_glu_forward(*args, activation, round_dtype, t["gate"].dtype)
    return out, lora_glu_reference(*args, activation, round_dtype, t["gate"].dtype)


def _backward(t, activation, round_dtype, scales=(0.5, 2.0)):
    have = lora_glu_backward(t["dh"], t["dyb"], t["a_down"], t["gate"], t["up"], t["xa_gate"], t["xa_up"],
                             t["b_gate"], t["b_up"], *scales, activation, round_dtype)
    # Reference: the corrected gate and up as leaves, the corrected dh as the output gradient.
    g = torch.addmm(t["gate"], t["xa_gate"], t["b_gate"].t(), alpha=scales[0]).requires_grad_()
    u = torch.addmm(t["up"], t["xa_up"], t["b_up"].t(), alpha=scales[1]).requires_grad_()
    from fastft.kernels.glu import glu_reference

    out = glu_reference(g, u, activation, round_dtype, g.dtype)
    want = torch.autograd.grad(out, (g, u), torch.addmm(t["dh"], t["dyb"], t["a_down"]))
    return have, want


def _close(have, want, dtype):
    atol, rtol = TOL[dtype]
    assert have.dtype == want.dtype and have.shape == want.shape
    torch.testing.assert_close(have.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,round_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, None), (torch.float16, torch.float16)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu_erf"])
def test_forward_and_backward_match_the_unfused_ops(dtype, round_dtype, activation):
    t = _inputs(70, 300, 16, 8, 12, dtype)  # rows and width not multiples of a tile; ranks differ
    out, ref = _forward(t, activation, round_dtype)
    _close(out, ref, dtype)
    (dg, du), (dg_ref, du_ref) = _backward(t, activation, round_dtype)
    _close(dg, dg_ref, dtype)
    _close(du, du_ref, dtype)


def test_ranks_deeper_than_one_block():
    """Ranks above 64 take several depth blocks of the dot."""
    t = _inputs(20, 40, 80, 130, 70, torch.float32, seed=3)
    out, ref = _forward(t, "silu", None, scales=(1.0, -0.25))
    _close(out, ref, torch.float32)
    (dg, du), (dg_ref, du_ref) = _backward(t, "silu", None, scales=(1.0, -0.25))
    _close(dg, dg_ref, torch.float32)
    _close(du, du_ref, torch.float32)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 70), rank_g=st.integers(1, 20), rank_u=st.integers(1, 20),
       rank_d=st.integers(1, 20), scale=st.floats(-3, 3, allow_nan=False), seed=st.integers(0, 2 ** 16))
def test_odd_shapes_float32(rows, width, rank_g, rank_u, rank_d, scale, seed):
    t = _inputs(rows, width, rank_g, rank_u, rank_d, torch.float32, seed)
    out, ref = _forward(t, "gelu_tanh", None, scales=(scale, 1.5))
    _close(out, ref, torch.float32)
    (dg, du), (dg_ref, du_ref) = _backward(t, "gelu_tanh", None, scales=(scale, 1.5))
    _close(dg, dg_ref, torch.float32)
    _close(du, du_ref, torch.float32)


def test_corrections_change_the_result():
    """The corrections are not dropped: zero B gives the plain GLU, non-zero B a different one."""
    t = _inputs(16, 32, 4, 4, 4, torch.float32)
    with_b, _ = _forward(t, "silu", None)
    t["b_gate"], t["b_up"] = torch.zeros_like(t["b_gate"]), torch.zeros_like(t["b_up"])
    without_b, _ = _forward(t, "silu", None)
    plain = torch.nn.functional.silu(t["gate"]) * t["up"]
    torch.testing.assert_close(without_b, plain, atol=1e-6, rtol=1e-6)
    assert (with_b - without_b).abs().max() > 1e-2


@pytest.mark.parametrize("change,message", [
    (dict(up=lambda t: t["up"][:, :-1]), r"up must be \[16, 32\]"),
    (dict(b_gate=lambda t: t["b_gate"].to(torch.bfloat16)), "B_gate is torch.bfloat16 but should be torch.float32"),
    (dict(gate=lambda t: t["gate"].t().contiguous().t()), "unit column stride"),
    (dict(xa_up=lambda t: t["xa_up"].double()), "unsupported dtype torch.float64"),
])
def test_bad_inputs_are_refused(change, message):
    t = _inputs(16, 32, 4, 4, 4, torch.float32)
    for name, make in change.items():
        t[name] = make(t)
    with pytest.raises(ValueError, match=message):
        _forward(t, "silu", None)
