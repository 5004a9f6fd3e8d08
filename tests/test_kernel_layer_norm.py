"""Tests for the fastft::layer_norm Triton kernels (run through the interpreter when there is no GPU)."""
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft.kernels.layer_norm import (
    MAX_N,
    layer_norm_backward,
    layer_norm_forward,
    layer_norm_reference,
)

# Both sides compute in fp32 (the reference upcasts first, its autograd then runs in fp32 too), so
# the only differences are fp32 summation order / rsqrt ulps and the closed-form dx against
# autograd's chain through mean and variance. They matter only when a value then gets rounded to a
# 16-bit dtype, where they can flip the rounding by 1 ulp:
#   bf16 (8-bit mantissa, ulp 2^-8 relative) -> 2e-2; fp16 (11-bit) -> 5e-3 fwd, 1e-2 for grads
#   (grads add cancelling reductions); fp32 stays within a few fp32 ulps.
# A comparison uses the loosest dtype that rounded the compared value.
TOL = {
    torch.float32: {"fwd": dict(atol=1e-5, rtol=1e-5), "grad": dict(atol=1e-4, rtol=1e-4)},
    torch.bfloat16: {"fwd": dict(atol=2e-2, rtol=2e-2), "grad": dict(atol=2e-2, rtol=2e-2)},
    torch.float16: {"fwd": dict(atol=5e-3, rtol=5e-3), "grad": dict(atol=1e-2, rtol=1e-2)},
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def _tol(kind: str, *dtypes: Optional[torch.dtype]) -> dict:
    return max((TOL[d][kind] for d in dtypes if d is not None), key=lambda t: t["atol"])


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def _leaf(t: Optional[torch.Tensor], grad: bool) -> Optional[torch.Tensor]:
    return t.detach().clone().requires_grad_(grad) if t is not None else None


def _check(x, weight, bias, norm_dtype, out_dtype, x_grad=True, w_grad=True, b_grad=True, seed=0) -> None:
    """Forward and backward of the op against the reference run with autograd, same inputs/dy."""
    w_grad = w_grad and weight is not None
    b_grad = b_grad and bias is not None
    xk, xr = _leaf(x, x_grad), _leaf(x, x_grad)
    wk, wr = _leaf(weight, w_grad), _leaf(weight, w_grad)
    bk, br = _leaf(bias, b_grad), _leaf(bias, b_grad)

    y = torch.ops.fastft.layer_norm(xk, wk, bk, EPS, norm_dtype, out_dtype)
    y_ref = layer_norm_reference(xr, wr, br, EPS, norm_dtype, out_dtype)
    _close(y, y_ref, _tol("fwd", out_dtype, norm_dtype))

    if not (x_grad or w_grad or b_grad):
        assert not y.requires_grad
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
    if b_grad:
        _close(bk.grad, br.grad, _tol("grad", bias.dtype))
    elif bk is not None:
        assert bk.grad is None


def _inputs(shape, dtype, device, w_dtype=None, b_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # A non-zero mean and scale so centring and the variance both matter.
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(device=device, dtype=w_dtype or dtype)
    b = (0.5 * torch.randn(shape[-1], generator=gen)).to(device=device, dtype=b_dtype or dtype)
    return x, w, b


# (shape, has_weight, has_bias, norm_dtype "x" = x's dtype, weight dtype, bias dtype, out dtype)
CASES = {
    "one_row": ((1, 64), True, True, None, None, None, None),
    "n1_norm": ((5, 1), True, True, "x", None, None, None),
    "n3_norm": ((7, 3), True, True, "x", None, None, None),
    "n17_no_weight": ((16, 17), False, True, None, None, None, None),
    "n17_no_bias_norm": ((16, 17), True, False, "x", None, None, None),
    "n100_no_affine_norm": ((24, 100), False, False, "x", None, None, None),
    "3d": ((2, 5, 48), True, True, None, None, None, None),
    "fp32_weight_norm": ((9, 100), True, True, "x", torch.float32, torch.float32, None),
    "mixed_param_dtypes": ((6, 40), True, True, None, torch.float32, torch.bfloat16, None),
    "out_dtype_differs": ((12, 40), True, True, "x", None, None, "other"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(case: str, dtype: torch.dtype, device: str) -> None:
    shape, has_w, has_b, norm, w_dtype, b_dtype, out = CASES[case]
    x, w, b = _inputs(shape, dtype, device, w_dtype, b_dtype)
    norm_dtype = dtype if norm == "x" else None
    out_dtype = (torch.bfloat16 if dtype == torch.float32 else torch.float32) if out == "other" else dtype
    _check(x, w if has_w else None, b if has_b else None, norm_dtype, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("round_norm", [False, True], ids=["norm_none", "norm_x"])
@pytest.mark.parametrize("has_w,has_b", [(True, True), (True, False), (False, True), (False, False)])
def test_affine_combinations(dtype: torch.dtype, round_norm: bool, has_w: bool, has_b: bool, device: str) -> None:
    x, w, b = _inputs((10, 24), dtype, device)
    _check(x, w if has_w else None, b if has_b else None, dtype if round_norm else None, dtype)


# (x, weight, bias) requires_grad; the grads not asked for must stay None.
@pytest.mark.parametrize(
    "grads",
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True),
     (True, True, False), (True, False, True), (False, False, False)],
    ids=lambda g: "".join(n for n, on in zip("xwb", g) if on) or "none",
)
def test_requires_grad_combinations(grads: tuple, device: str) -> None:
    x, w, b = _inputs((10, 33), torch.bfloat16, device, w_dtype=torch.float32)
    _check(x, w, b, torch.bfloat16, torch.bfloat16, *grads)


def test_bias_grad_without_weight(device: str) -> None:
    x, _, b = _inputs((8, 20), torch.float16, device)
    _check(x, None, b, torch.float16, torch.float16, x_grad=False, b_grad=True)


def test_non_contiguous_input(device: str) -> None:
    x, _, _ = _inputs((40, 6), torch.bfloat16, device)
    x = x.t()  # (6, 40), rows are strided
    assert not x.is_contiguous()
    _, w, b = _inputs((6, 40), torch.bfloat16, device, seed=1)
    _check(x, w, b, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("block_rows,num_programs", [(1, 1), (4, 3), (2, None)])
def test_backward_tiling(block_rows: int, num_programs: Optional[int], device: str) -> None:
    # Several row tiles per program, a partially filled last tile and a wholly masked one.
    x, w, b = _inputs((29, 33), torch.float32, device)
    dy = _inputs((29, 33), torch.float32, device, seed=1)[0]
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y_ref = layer_norm_reference(xr, wr, br, EPS, torch.bfloat16)
    y_ref.backward(dy)
    y = layer_norm_forward(x, w, b, EPS, torch.bfloat16, block_rows=block_rows)
    dx, dw, db = layer_norm_backward(
        dy, x, w, b, EPS, torch.bfloat16, block_rows=block_rows, num_programs=num_programs
    )
    _close(y, y_ref, TOL[torch.bfloat16]["fwd"])
    _close(dx, xr.grad, TOL[torch.float32]["grad"])
    _close(dw, wr.grad, TOL[torch.bfloat16]["grad"])
    _close(db, br.grad, TOL[torch.float32]["grad"])


def test_bf16_rounding_matches_reference(device: str) -> None:
    # norm_dtype = out_dtype = bf16: expect at most 1 bf16 ulp apart, and nearly always
    # bit-identical (a flip needs an fp32 value within an ulp of a rounding tie).
    x, w, b = _inputs((32, 256), torch.bfloat16, device)
    y = torch.ops.fastft.layer_norm(x, w, b, EPS, torch.bfloat16, torch.bfloat16)
    y_ref = layer_norm_reference(x, w, b, EPS, torch.bfloat16, torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * y_ref.float().abs().clamp_min(1e-30)
    assert ((y.float() - y_ref.float()).abs() <= ulp).all()
    assert (y == y_ref).float().mean().item() >= 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_functional_layer_norm(dtype: torch.dtype, device: str) -> None:
    # With norm_dtype None the op is F.layer_norm (fp32 inside, one rounding): forward and grads.
    x, w, b = _inputs((2, 7, 96), dtype, device)
    dy = _inputs((2, 7, 96), dtype, device, seed=1)[0]
    outs = []
    for f in (lambda x, w, b: torch.ops.fastft.layer_norm(x, w, b, EPS, None, x.dtype),
              lambda x, w, b: F.layer_norm(x, (96,), w, b, EPS)):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = f(xi, wi, bi)
        y.backward(dy)
        outs.append((y, xi.grad, wi.grad, bi.grad))
    (y, dx, dw, db), (y_f, dx_f, dw_f, db_f) = outs
    _close(y, y_f, TOL[dtype]["fwd"])
    for a, e in ((dx, dx_f), (dw, dw_f), (db, db_f)):
        tol = dict(TOL[dtype]["grad"])
        if dtype != torch.float32:
            # PyTorch's CPU backward for 16-bit layer_norm keeps some partial sums in 16 bits (it is
            # the less accurate side: against fp64 its dbias is ~2.5 bf16 ulps off, the op's within
            # one), so allow a few ulps of the largest value for the column sums.
            tol["atol"] = max(tol["atol"], 4 * torch.finfo(dtype).eps * e.float().abs().max().item())
        _close(a, e, tol)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    n=st.integers(1, 130),
    dtype=st.sampled_from(DTYPES),
    param_dtype=st.sampled_from([None, torch.float32]),  # None: x's dtype
    has_weight=st.booleans(),
    has_bias=st.booleans(),
    round_norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(rows, n, dtype, param_dtype, has_weight, has_bias, round_norm, seed, device: str) -> None:
    x, w, b = _inputs((rows, n), dtype, device, param_dtype, param_dtype, seed=seed)
    _check(x, w if has_weight else None, b if has_bias else None, dtype if round_norm else None, dtype, seed=seed)


@pytest.mark.parametrize("bad", [torch.float64, torch.int32])
def test_rejects_unsupported_x_dtype(bad: torch.dtype, device: str) -> None:
    x = torch.ones(4, 8, device=device).to(bad)
    with pytest.raises(ValueError, match=r"fastft::layer_norm: x has unsupported dtype") as info:
        torch.ops.fastft.layer_norm(x, None, None, EPS, None, torch.float32)
    assert str(bad) in str(info.value) and "torch.bfloat16" in str(info.value)


def test_rejects_bad_params(device: str) -> None:
    x = torch.ones(4, 8, device=device)
    ok = torch.ones(8, device=device)
    for bad in (torch.ones(7, device=device), torch.ones(1, 8, device=device)):
        with pytest.raises(ValueError, match=r"fastft::layer_norm: weight must be 1-D of size N=8.*shape"):
            torch.ops.fastft.layer_norm(x, bad, ok, EPS, None, torch.float32)
        with pytest.raises(ValueError, match=r"fastft::layer_norm: bias must be 1-D of size N=8.*shape"):
            torch.ops.fastft.layer_norm(x, ok, bad, EPS, None, torch.float32)
    f64 = torch.ones(8, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight.*dtype torch.float64"):
        torch.ops.fastft.layer_norm(x, f64, None, EPS, None, x.dtype)
    with pytest.raises(ValueError, match=r"bias.*dtype torch.float64"):
        torch.ops.fastft.layer_norm(x, None, f64, EPS, None, x.dtype)
    with pytest.raises(ValueError, match=r"out_dtype.*dtype torch.float64"):
        torch.ops.fastft.layer_norm(x, None, None, EPS, None, torch.float64)
    with pytest.raises(ValueError, match=r"norm_dtype.*dtype torch.int8"):
        torch.ops.fastft.layer_norm(x, None, None, EPS, torch.int8, x.dtype)


def test_rejects_bad_x_shape(device: str) -> None:
    with pytest.raises(ValueError, match="last dim"):
        torch.ops.fastft.layer_norm(torch.ones(1, MAX_N + 1, device=device), None, None, EPS, None, torch.float32)
    with pytest.raises(ValueError, match="last dim"):
        torch.ops.fastft.layer_norm(torch.ones(3, 0, device=device), None, None, EPS, None, torch.float32)
    with pytest.raises(ValueError, match="0-d"):
        torch.ops.fastft.layer_norm(torch.tensor(1.0, device=device), None, None, EPS, None, torch.float32)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_zero_rows(shape, device: str) -> None:
    x = torch.ones(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(16, device=device, dtype=torch.float32, requires_grad=True)
    b = torch.ones(16, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = torch.ops.fastft.layer_norm(x, w, b, EPS, None, torch.float32)
    assert y.shape == shape and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend: str, device: str) -> None:
    torch._dynamo.reset()

    def op(x, w, b):
        return torch.ops.fastft.layer_norm(x, w, b, EPS, None, x.dtype)

    fn = torch.compile(op, backend=backend, fullgraph=True)
    x, w, b = _inputs((6, 40), torch.bfloat16, device)
    dy = _inputs((6, 40), torch.bfloat16, device, seed=1)[0]
    grads = []
    for f in (fn, op):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = f(xi, wi, bi)
        y.backward(dy)
        grads.append((y, xi.grad, wi.grad, bi.grad))
    for compiled, eager in zip(*grads):
        assert torch.equal(compiled, eager)  # same kernels either way


def test_opcheck(device: str) -> None:
    x, w, b = _inputs((3, 5, 24), torch.bfloat16, device, w_dtype=torch.float32)
    for t in (x, w, b):
        t.requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    op = torch.ops.fastft.layer_norm.default
    torch.library.opcheck(op, (x, w, b, EPS, torch.bfloat16, torch.float32), test_utils=tests)
    torch.library.opcheck(op, (x, None, b, EPS, None, torch.bfloat16), test_utils=tests)
    dy = torch.randn(3, 5, 24, device=device)
    bwd_tests = ("test_schema", "test_faketensor")
    bwd = torch.ops.fastft.layer_norm_backward.default
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    torch.library.opcheck(bwd, (dy, xd, wd, bd, EPS, torch.bfloat16, True, True, True), test_utils=bwd_tests)
    torch.library.opcheck(bwd, (dy, xd, None, bd, EPS, None, False, False, True), test_utils=bwd_tests)
