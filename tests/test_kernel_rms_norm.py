"""Tests for the fastft::rms_norm Triton kernels (run through the interpreter when there is no GPU)."""
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft.kernels.rms_norm import rms_norm_backward, rms_norm_forward, rms_norm_reference

# Both sides compute in fp32 (the reference upcasts first, its autograd then runs in fp32 too), so
# the only differences are fp32 summation order / rsqrt ulps. They matter only when a value then
# gets rounded to a 16-bit dtype, where they can flip the rounding by 1 ulp:
#   bf16 (8-bit mantissa, ulp 2^-8 relative) -> 2e-2; fp16 (11-bit) -> 5e-3 fwd, 1e-2 for grads
#   (grads add a cancelling reduction); fp32 stays within a few fp32 ulps.
# A comparison uses the loosest dtype that rounded the compared value.
TOL = {
    torch.float32: {"fwd": dict(atol=1e-5, rtol=1e-5), "grad": dict(atol=1e-4, rtol=1e-4)},
    torch.bfloat16: {"fwd": dict(atol=2e-2, rtol=2e-2), "grad": dict(atol=2e-2, rtol=2e-2)},
    torch.float16: {"fwd": dict(atol=5e-3, rtol=5e-3), "grad": dict(atol=1e-2, rtol=1e-2)},
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


def _tol(kind: str, *dtypes: Optional[torch.dtype]) -> dict:
    return max((TOL[d][kind] for d in dtypes if d is not None), key=lambda t: t["atol"])


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def _check(x, weight, offset, norm_dtype, out_dtype, x_grad=True, w_grad=True, seed=0,
           sum_of_squares=False) -> None:
    """Forward and backward of the op against the reference run with autograd, same inputs/dy."""
    w_grad = w_grad and weight is not None
    xk = x.detach().clone().requires_grad_(x_grad)
    xr = x.detach().clone().requires_grad_(x_grad)
    wk = weight.detach().clone().requires_grad_(w_grad) if weight is not None else None
    wr = weight.detach().clone().requires_grad_(w_grad) if weight is not None else None

    y = torch.ops.fastft.rms_norm(xk, wk, EPS, offset, norm_dtype, out_dtype, sum_of_squares)
    y_ref = rms_norm_reference(xr, wr, EPS, offset, norm_dtype, out_dtype, sum_of_squares)
    _close(y, y_ref, _tol("fwd", out_dtype, norm_dtype))

    if not (x_grad or w_grad):
        return
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=out_dtype)
    y.backward(dy)
    y_ref.backward(dy)
    if x_grad:
        _close(xk.grad, xr.grad, _tol("grad", x.dtype))
    else:
        assert xk.grad is None
    if w_grad:
        _close(wk.grad, wr.grad, _tol("grad", weight.dtype, norm_dtype))
    elif wk is not None:
        assert wk.grad is None


def _inputs(shape, dtype, device, w_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(device=device, dtype=w_dtype or dtype)
    return x, w


# (shape, has_weight, weight_offset, norm_dtype "x" = x's dtype, weight dtype, out dtype)
CASES = {
    "one_row": ((1, 64), True, 0.0, None, None, None),
    "n3_offset1_norm": ((7, 3), True, 1.0, "x", None, None),
    "n17_no_weight": ((16, 17), False, 0.0, None, None, None),
    "n100_norm": ((24, 100), True, 0.0, "x", None, None),
    "3d_offset1": ((2, 5, 48), True, 1.0, None, None, None),
    "fp32_weight_norm": ((9, 100), True, 0.0, "x", torch.float32, None),
    "out_dtype_differs": ((12, 40), True, 1.0, "x", None, "other"),
    "no_weight_norm_n1": ((5, 1), False, 0.0, "x", None, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(case: str, dtype: torch.dtype, device: str) -> None:
    shape, has_w, offset, norm, w_dtype, out = CASES[case]
    x, w = _inputs(shape, dtype, device, w_dtype)
    norm_dtype = dtype if norm == "x" else None
    out_dtype = (torch.bfloat16 if dtype == torch.float32 else torch.float32) if out == "other" else dtype
    _check(x, w if has_w else None, offset, norm_dtype, out_dtype)


def test_non_contiguous_input(device: str) -> None:
    x, w = _inputs((40, 6), torch.bfloat16, device)
    x = x.t()  # (6, 40), rows are strided
    assert not x.is_contiguous()
    _check(x, torch.ones(40, device=device, dtype=torch.bfloat16) + 0.1, 0.0, torch.bfloat16, torch.bfloat16)


def test_weight_grad_only_when_required(device: str) -> None:
    x, w = _inputs((10, 33), torch.bfloat16, device)
    _check(x, w, 1.0, torch.bfloat16, torch.bfloat16, x_grad=True, w_grad=False)
    _check(x, w, 1.0, torch.bfloat16, torch.bfloat16, x_grad=False, w_grad=True)


@pytest.mark.parametrize("block_rows,num_programs", [(1, 1), (4, 3), (2, None)])
def test_backward_tiling(block_rows: int, num_programs: Optional[int], device: str) -> None:
    # Several row tiles per program, a partially filled last tile and a wholly masked one.
    x, w = _inputs((29, 33), torch.float32, device)
    dy = _inputs((29, 33), torch.float32, device, seed=1)[0]
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    y_ref = rms_norm_reference(xr, wr, EPS, 1.0, torch.bfloat16)
    y_ref.backward(dy)
    y = rms_norm_forward(x, w, EPS, 1.0, torch.bfloat16, block_rows=block_rows)
    dx, dw = rms_norm_backward(dy, x, w, EPS, 1.0, torch.bfloat16, block_rows=block_rows, num_programs=num_programs)
    _close(y, y_ref, TOL[torch.bfloat16]["fwd"])
    _close(dx, xr.grad, TOL[torch.float32]["grad"])
    _close(dw, wr.grad, TOL[torch.bfloat16]["grad"])


def test_bf16_rounding_matches_reference(device: str) -> None:
    # norm_dtype = out_dtype = bf16 is the usual module rounding: expect at most 1 bf16 ulp apart,
    # and nearly always bit-identical (a flip needs an fp32 value within an ulp of a rounding tie).
    x, w = _inputs((32, 256), torch.bfloat16, device)
    y = torch.ops.fastft.rms_norm(x, w, EPS, 0.0, torch.bfloat16, torch.bfloat16)
    y_ref = rms_norm_reference(x, w, EPS, 0.0, torch.bfloat16, torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * y_ref.float().abs().clamp_min(1e-30)
    assert ((y.float() - y_ref.float()).abs() <= ulp).all()
    assert (y == y_ref).float().mean().item() >= 0.99


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    n=st.integers(1, 130),
    dtype=st.sampled_from(DTYPES),
    offset=st.sampled_from([0.0, 1.0]),
    has_weight=st.booleans(),
    round_norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(rows, n, dtype, offset, has_weight, round_norm, seed, device: str) -> None:
    x, w = _inputs((rows, n), dtype, device, seed=seed)
    _check(x, w if has_weight else None, offset, dtype if round_norm else None, dtype, seed=seed)


@pytest.mark.parametrize("bad", [torch.float64, torch.int32])
def test_rejects_unsupported_x_dtype(bad: torch.dtype, device: str) -> None:
    x = torch.ones(4, 8, device=device).to(bad)
    with pytest.raises(ValueError, match=r"fastft::rms_norm: x has unsupported dtype") as info:
        torch.ops.fastft.rms_norm(x, None, EPS, 0.0, None, torch.float32)
    assert str(bad) in str(info.value) and "torch.bfloat16" in str(info.value)


def test_rejects_bad_weight(device: str) -> None:
    x = torch.ones(4, 8, device=device)
    for w in (torch.ones(7, device=device), torch.ones(1, 8, device=device)):
        with pytest.raises(ValueError, match=r"weight must be 1-D of size N=8.*shape"):
            torch.ops.fastft.rms_norm(x, w, EPS, 0.0, None, torch.float32)
    with pytest.raises(ValueError, match=r"weight.*dtype torch.float64"):
        torch.ops.fastft.rms_norm(x, torch.ones(8, device=device, dtype=torch.float64), EPS, 0.0, None, x.dtype)


def test_rejects_too_wide_rows(device: str) -> None:
    with pytest.raises(ValueError, match="last dim"):
        torch.ops.fastft.rms_norm(torch.ones(1, 65537, device=device), None, EPS, 0.0, None, torch.float32)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_zero_rows(shape, device: str) -> None:
    x = torch.ones(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(16, device=device, dtype=torch.float32, requires_grad=True)
    y = torch.ops.fastft.rms_norm(x, w, EPS, 0.0, None, torch.float32)
    assert y.shape == shape and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend: str, device: str) -> None:
    torch._dynamo.reset()
    fn = torch.compile(
        lambda x, w: torch.ops.fastft.rms_norm(x, w, 1e-6, 0.0, None, x.dtype), backend=backend, fullgraph=True
    )
    x, w = _inputs((6, 40), torch.bfloat16, device)
    dy = _inputs((6, 40), torch.bfloat16, device, seed=1)[0]
    grads = []
    for f in (fn, lambda x, w: torch.ops.fastft.rms_norm(x, w, 1e-6, 0.0, None, x.dtype)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = f(xi, wi)
        y.backward(dy)
        grads.append((y, xi.grad, wi.grad))
    for compiled, eager in zip(*grads):
        assert torch.equal(compiled, eager)  # same kernels either way


def test_opcheck(device: str) -> None:
    x, w = _inputs((3, 5, 24), torch.bfloat16, device, w_dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastft.rms_norm.default, (x, w, EPS, 1.0, torch.bfloat16, torch.float32), test_utils=tests)
    torch.library.opcheck(torch.ops.fastft.rms_norm.default, (x, None, EPS, 0.0, None, torch.bfloat16), test_utils=tests)
    dy = torch.randn(3, 5, 24, device=device)
    bwd_tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.fastft.rms_norm_backward.default,
        (dy, x.detach(), w.detach(), EPS, 1.0, torch.bfloat16, True, True),
        test_utils=bwd_tests,
    )
    torch.library.opcheck(
        torch.ops.fastft.rms_norm_backward.default,
        (dy, x.detach(), w.detach(), EPS, 0.0, None, False, True),
        test_utils=bwd_tests,
    )


@pytest.mark.parametrize("shape", [(3, 1), (5, 7), (2, 3, 96), (4, 130)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_weight", [False, True])
def test_sum_of_squares_is_an_l2_normalisation(device, shape, dtype, has_weight):
    x, w = _inputs(shape, dtype, device, seed=3)
    _check(x, w if has_weight else None, 0.0, None, dtype, sum_of_squares=True, seed=4)
    # Not the mean's result: x / ||x|| is sqrt(N) times smaller than the RMSNorm when N > 1.
    l2 = torch.ops.fastft.rms_norm(x, None, EPS, 0.0, None, torch.float32, True)
    want = x.float() / torch.sqrt(x.float().pow(2).sum(-1, keepdim=True) + EPS)
    torch.testing.assert_close(l2, want, **_tol("fwd", dtype))
