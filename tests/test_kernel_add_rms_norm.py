"""fastft::add_rms_norm (a residual add and the RMSNorm of its sum in one kernel) and the
backward's ``grad_add`` (a second gradient of x added in the norm's backward kernel).

Both stand for an add next to fastft::rms_norm, so each is checked bit for bit against that add
and fastft::rms_norm run apart, and the norm also against the PyTorch reference."""
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft.kernels.rms_norm import add_rms_norm_forward, rms_norm_backward, rms_norm_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
# Against the reference: fp32 summation order and rsqrt ulps, then one 16-bit rounding.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _randn(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype)


def _apart(x, r, w, offset, norm_dtype, out_dtype, dy, dh):
    """The add and fastft::rms_norm as separate ops, with autograd: (h, y, dx, dr, dw)."""
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    w = w.clone().requires_grad_() if w is not None else None
    h = x + r
    y = torch.ops.fastft.rms_norm(h, w, EPS, offset, norm_dtype, out_dtype)
    torch.autograd.backward([y, h], [dy, dh])
    return h, y, x.grad, r.grad, (w.grad if w is not None else None)


def _joined(x, r, w, offset, norm_dtype, out_dtype, dy, dh):
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    w = w.clone().requires_grad_() if w is not None else None
    h, y = torch.ops.fastft.add_rms_norm(x, r, w, EPS, offset, norm_dtype, out_dtype)
    torch.autograd.backward([y, h], [dy, dh])
    return h, y, x.grad, r.grad, (w.grad if w is not None else None)


def _case(shape, dtype, device, has_weight=True, offset=0.0, round_norm=False, out_dtype=None, seed=0):
    out_dtype = out_dtype or dtype
    x, r = _randn(shape, dtype, device, seed), _randn(shape, dtype, device, seed + 1)
    w = (1 + 0.3 * _randn(shape[-1:], torch.float32, device, seed + 2)).to(dtype) if has_weight else None
    dy, dh = _randn(shape, out_dtype, device, seed + 3), _randn(shape, dtype, device, seed + 4)
    args = (x, r, w, offset, dtype if round_norm else None, out_dtype, dy, dh)
    joined, apart = _joined(*args), _apart(*args)
    for name, a, b in zip(("h", "y", "dx", "dr", "dw"), joined, apart):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().max()}"
    # And the norm is the reference's (so the pair above is not merely wrong the same way).
    y_ref = rms_norm_reference(x + r, w, EPS, offset, dtype if round_norm else None, out_dtype)
    loosest = max(dtype, out_dtype, key=lambda d: TOL[d]["atol"])
    torch.testing.assert_close(joined[1].float(), y_ref.float(), **TOL[loosest])
    return joined


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,has_weight,offset,round_norm", [
    ((1, 64), True, 0.0, False), ((7, 3), True, 1.0, True), ((16, 17), False, 0.0, False),
    ((2, 5, 48), True, 0.0, True), ((33, 100), True, 1.0, False)], ids=str)
def test_joined_equals_the_add_and_the_norm_apart(shape, has_weight, offset, round_norm, dtype, device):
    _case(shape, dtype, device, has_weight, offset, round_norm)


def test_out_dtype_other_than_the_sum(device):
    h, y, *_ = _case((6, 40), torch.bfloat16, device, out_dtype=torch.float32)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32


def test_the_sum_is_rounded_before_it_is_normalised(device):
    # Addends whose exact sum is not a bf16 value: normalising the unrounded sum would differ.
    x = torch.full((4, 32), 1.0, dtype=torch.bfloat16, device=device)
    r = torch.full((4, 32), 2.0 ** -9, dtype=torch.bfloat16, device=device)
    r[:, ::2] = 3.0
    h, y = add_rms_norm_forward(x, r, None, EPS)
    assert torch.equal(h, x + r)
    assert torch.equal(y, torch.ops.fastft.rms_norm(x + r, None, EPS, 0.0, None, torch.bfloat16))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), n=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       has_weight=st.booleans(), round_norm=st.booleans(), seed=st.integers(0, 1000))
def test_random_shapes(rows, n, dtype, has_weight, round_norm, seed, device):
    _case((rows, n), dtype, device, has_weight, 0.0, round_norm, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compute_dw", [False, True])
def test_backward_grad_add_equals_an_add_after_it(dtype, compute_dw, device):
    x, dy, g = (_randn((29, 33), dtype, device, s) for s in (0, 1, 2))
    w = 1 + 0.3 * _randn((33,), dtype, device, 3)
    dx, dw = rms_norm_backward(dy, x, w, EPS, 0.0, dtype, compute_dw=compute_dw)
    dx_sum, dw_sum = rms_norm_backward(dy, x, w, EPS, 0.0, dtype, compute_dw=compute_dw, grad_add=g)
    assert torch.equal(dx_sum, dx + g)
    assert (dw is None and dw_sum is None) or torch.equal(dw_sum, dw)
    # Through the op, as the lowered graphs call it.
    dx_op, _ = torch.ops.fastft.rms_norm_backward(dy, x, w, EPS, 0.0, dtype, True, False, False, g)
    assert torch.equal(dx_op, dx + g)


def test_only_the_sum_or_only_the_norm_has_a_gradient(device):
    x, r = _randn((5, 24), torch.bfloat16, device, 0), _randn((5, 24), torch.bfloat16, device, 1)
    w = torch.ones(24, dtype=torch.bfloat16, device=device)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    h, y = torch.ops.fastft.add_rms_norm(xa, ra, w, EPS, 0.0, None, torch.bfloat16)
    h.sum().backward()  # the norm's output unused: the sum's gradient alone
    assert torch.equal(xa.grad, torch.ones_like(x)) and torch.equal(ra.grad, torch.ones_like(r))
    xb = x.clone().requires_grad_()
    dy = _randn((5, 24), torch.bfloat16, device, 2)
    torch.ops.fastft.add_rms_norm(xb, r, w, EPS, 0.0, None, torch.bfloat16)[1].backward(dy)
    want, _ = rms_norm_backward(dy, x + r, w, EPS, 0.0, None, compute_dw=False)
    assert torch.equal(xb.grad, want)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_mismatched_addends_are_rejected(bad, device):
    x = _randn((4, 16), torch.bfloat16, device, 0)
    r = _randn((4, 8) if bad == "shape" else (4, 16), torch.float32 if bad == "dtype" else torch.bfloat16, device, 1)
    with pytest.raises(ValueError, match="add_rms_norm: residual"):
        add_rms_norm_forward(x, r, None, EPS)
    with pytest.raises(ValueError, match="grad_add"):
        rms_norm_backward(x, x, None, EPS, grad_add=r)


def test_grad_add_needs_dx(device):
    x = _randn((4, 16), torch.float32, device, 0)
    with pytest.raises(ValueError, match="needs compute_dx"):
        rms_norm_backward(x, x, torch.ones(16, device=device), EPS, compute_dx=False, grad_add=x)


def test_opcheck(device):
    x, r = _randn((3, 5, 24), torch.bfloat16, device, 0), _randn((3, 5, 24), torch.bfloat16, device, 1)
    w = (1 + 0.1 * _randn((24,), torch.float32, device, 2)).requires_grad_()
    x.requires_grad_()
    r.requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastft.add_rms_norm.default, (x, r, w, EPS, 1.0, torch.bfloat16, torch.float32),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.fastft.add_rms_norm.default, (x, r, None, EPS, 0.0, None, torch.bfloat16),
                          test_utils=tests)
    dy = _randn((3, 5, 24), torch.float32, device, 3)
    torch.library.opcheck(torch.ops.fastft.rms_norm_backward.default,
                          (dy, x.detach(), w.detach(), EPS, 1.0, torch.bfloat16, True, True, False, r.detach()),
                          test_utils=("test_schema", "test_faketensor"))
