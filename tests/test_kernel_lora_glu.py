"""The GLU kernels with LoRA corrections (kernels/lora_glu.py), forward and backward, against the
unfused ops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.adapter_grads import Tiles, sum_partials
from fastft.kernels.lora_glu import (lora_glu_backward, lora_glu_backward_reference, lora_glu_forward,
                                     lora_glu_reference)

from helpers import DEVICE

# Elementwise (atol, rtol). Kernel and reference round the same values the same way; only the
# order of the depth-r sums may differ, which can move a 16-bit result by one ulp.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _inputs(rows, width, rank_g, rank_u, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    stacked = rand(rows, rank_g + rank_u)  # x A^T of gate and up side by side, as the MLP op keeps it
    return (rand(rows, width), rand(rows, width), stacked[:, :rank_g], stacked[:, rank_g:],
            rand(width, rank_g, scale=rank_g ** -0.5), rand(width, rank_u, scale=rank_u ** -0.5))


def _close(have, want, dtype):
    atol, rtol = TOL[dtype]
    assert have.dtype == want.dtype and have.shape == want.shape
    torch.testing.assert_close(have.float(), want.float(), atol=atol, rtol=rtol)


def _check(inputs, scales, activation, round_dtype, out_dtype, tiles=None):
    gate, up, xa_gate, xa_up, b_gate, b_up = inputs
    want = lora_glu_reference(*inputs, *scales, activation, round_dtype, out_dtype)
    want_g = torch.addmm(gate, xa_gate, b_gate.t(), alpha=scales[0])
    want_u = torch.addmm(up, xa_up, b_up.t(), alpha=scales[1])
    g, u = gate.clone(), up.clone()
    out = lora_glu_forward(g, u, xa_gate, xa_up, b_gate, b_up, *scales, activation, round_dtype, out_dtype, tiles)
    dtype = gate.dtype
    _close(out, want, dtype if out_dtype == dtype else out_dtype)
    _close(g, want_g, dtype)  # corrected in place: the backward reads these
    _close(u, want_u, dtype)


@pytest.mark.parametrize("dtype,round_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, None), (torch.float16, torch.float16)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu_erf"])
def test_matches_the_unfused_ops(dtype, round_dtype, activation):
    # rows and width not multiples of a tile; the two ranks differ
    _check(_inputs(70, 300, 16, 8, dtype), (0.5, 2.0), activation, round_dtype, dtype)


def test_float32_result_of_bfloat16_inputs():
    _check(_inputs(9, 40, 4, 4, torch.bfloat16), (1.0, 1.0), "silu", None, torch.float32)


def test_small_tiles_and_ranks_deeper_than_one_block():
    """Ranks above 64 take several depth blocks of the dot; small tiles, many programs."""
    _check(_inputs(20, 40, 80, 130, torch.float32, seed=3), (1.0, -0.25), "silu", None, torch.float32,
           tiles=dict(BLOCK_ROWS=16, BLOCK_N=16))


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 70), rank_g=st.integers(1, 20), rank_u=st.integers(1, 20),
       scale=st.floats(-3, 3, allow_nan=False), seed=st.integers(0, 2 ** 16))
def test_odd_shapes_float32(rows, width, rank_g, rank_u, scale, seed):
    _check(_inputs(rows, width, rank_g, rank_u, torch.float32, seed), (scale, 1.5), "gelu_tanh", None, torch.float32)


def test_corrections_change_the_result():
    """The corrections are not dropped: zero B gives the plain GLU, non-zero B a different one."""
    gate, up, xa_gate, xa_up, b_gate, b_up = _inputs(16, 32, 4, 4, torch.float32)
    with_b = lora_glu_forward(gate.clone(), up.clone(), xa_gate, xa_up, b_gate, b_up, 0.5, 2.0, "silu", None,
                              torch.float32)
    without_b = lora_glu_forward(gate.clone(), up.clone(), xa_gate, xa_up, torch.zeros_like(b_gate),
                                 torch.zeros_like(b_up), 0.5, 2.0, "silu", None, torch.float32)
    torch.testing.assert_close(without_b, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)
    assert (with_b - without_b).abs().max() > 1e-2


@pytest.mark.parametrize("change,message", [
    (1, r"up must be \[16, 32\]"),
    (4, "B_gate is torch.bfloat16 but should be torch.float32"),
    (0, "unit column stride"),
    (3, "unsupported dtype torch.float64"),
])
def test_bad_inputs_are_refused(change, message):
    inputs = list(_inputs(16, 32, 4, 4, torch.float32))
    t = inputs[change]
    inputs[change] = {1: lambda: t[:, :-1], 4: lambda: t.to(torch.bfloat16), 0: lambda: t.t().contiguous().t(),
                      3: lambda: t.double()}[change]()
    with pytest.raises(ValueError, match=message):
        lora_glu_forward(*inputs, 0.5, 2.0, "silu", None, torch.float32)


# --- the backward with the adapters' products (lora_glu_backward) ----------------------------
# Per output (atol, rtol) on values of order one: dg, du, dyb in the inputs' dtype (a 16-bit one
# may land one ulp apart where the fp32 sums' order differs), dB and dA in fp32 from fp32 sums.
BACKWARD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
NAMES = ("dg", "du", "dyb_gate", "dyb_up", "dB_gate", "dB_up", "dA_down")


def _backward_inputs(rows, width, rank_g, rank_u, rank_d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    stacked = rand(rows, rank_g + rank_u)
    return (rand(rows, width), rand(rows, width), rand(rows, width), stacked[:, :rank_g], stacked[:, rank_g:],
            rand(width, rank_g, scale=rank_g ** -0.5), rand(width, rank_u, scale=rank_u ** -0.5),
            rand(rows, rank_d, scale=0.5))


def _check_backward(inputs, scales, activation, round_dtype, tiles=None, products=True, dg_over_dh=False):
    dh, g, u, xa_gate, xa_up, b_gate, b_up, dyb_down = inputs
    dtype = g.dtype
    want = lora_glu_backward_reference(*inputs, *scales, activation, round_dtype, dtype)
    dyb = dh.new_full((dh.shape[0], xa_gate.shape[1] + xa_up.shape[1]), float("nan")) if products else None
    pending = []
    dh_in = dh.clone()
    res = lora_glu_backward(dh_in, g, u, xa_gate, xa_up, b_gate, b_up, dyb_down, *scales, activation, round_dtype,
                            dtype, dyb, pending, dg_over_dh=dg_over_dh, tiles=tiles)
    sum_partials(pending)
    assert (res.dg.data_ptr() == dh_in.data_ptr()) == dg_over_dh
    have = [res.dg, res.du, None, None, res.db_gate, res.db_up, res.da_down]
    if products:
        rank_g = xa_gate.shape[1]
        have[2:4] = dyb[:, :rank_g], dyb[:, rank_g:]
    else:
        assert res.db_gate is None and res.db_up is None and len(pending) == 1  # dA alone
    for name, h, w in zip(NAMES, have, want):
        if h is None:
            continue
        atol, rtol = BACKWARD_TOL[h.dtype if h.dtype != torch.float32 else dtype]
        assert h.dtype == w.dtype and h.shape == w.shape, name
        torch.testing.assert_close(h.float(), w.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype,round_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, None), (torch.float16, torch.float16)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu_erf"])
def test_backward_matches_the_unfused_ops(dtype, round_dtype, activation):
    # rows and width not multiples of a tile; the three ranks differ
    _check_backward(_backward_inputs(70, 300, 16, 8, 5, dtype), (0.5, 2.0), activation, round_dtype)


@pytest.mark.parametrize("tiles", [Tiles(16, 32, 4, 1, 1, True), Tiles(64, 16, 4, 1, 1, False),
                                   Tiles(16, 128, 4, 1, 1, False)])
def test_backward_tiles_either_way_of_accumulating_give_the_same_products(tiles):
    _check_backward(_backward_inputs(50, 90, 3, 9, 17, torch.bfloat16, seed=1), (1.0, -0.5), "silu",
                    torch.bfloat16, tiles=tiles, dg_over_dh=True)


def test_backward_without_the_gate_and_up_products_gives_dg_du_and_da():
    _check_backward(_backward_inputs(33, 40, 4, 4, 4, torch.bfloat16), (1.0, 1.0), "silu", torch.bfloat16,
                    products=False)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 70), rank_g=st.integers(1, 20), rank_u=st.integers(1, 20),
       rank_d=st.integers(1, 20), scale=st.floats(-3, 3, allow_nan=False), seed=st.integers(0, 2 ** 16))
def test_backward_odd_shapes_float32(rows, width, rank_g, rank_u, rank_d, scale, seed):
    _check_backward(_backward_inputs(rows, width, rank_g, rank_u, rank_d, torch.float32, seed), (scale, 1.5),
                    "gelu_erf", None)


def test_backward_refuses_ranks_above_its_block_and_a_misfit_buffer():
    inputs = list(_backward_inputs(8, 16, 4, 4, 4, torch.float32))
    with pytest.raises(ValueError, match="ranks up to 64"):
        big = _backward_inputs(8, 16, 4, 4, 65, torch.float32)
        lora_glu_backward(*big, 1.0, 1.0, "silu", None, torch.float32, torch.empty(8, 8), [])
    with pytest.raises(ValueError, match=r"dyb_out must be \[8, 8\]"):
        lora_glu_backward(*inputs, 1.0, 1.0, "silu", None, torch.float32, torch.empty(8, 7), [])
    with pytest.raises(ValueError, match="dh is torch.bfloat16 but should be torch.float32"):
        inputs[0] = inputs[0].to(torch.bfloat16)
        lora_glu_backward(*inputs, 1.0, 1.0, "silu", None, torch.float32, torch.empty(8, 8), [])
