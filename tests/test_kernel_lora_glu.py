"""The GLU kernel with LoRA corrections (kernels/lora_glu.py) against the unfused ops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.lora_glu import lora_glu_forward, lora_glu_reference

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
