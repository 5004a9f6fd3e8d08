"""Tests for the fastft::activation Triton kernel (the ungated MLP's activation; run through the
interpreter when there is no GPU)."""
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft.kernels.activation import (
    ACTIVATIONS,
    activation_backward,
    activation_forward,
    activation_reference,
)

# The kernel and the reference round at the same points (the input and the result to round_dtype,
# then to out_dtype; the gradient once), so the only differences are fp32 ulps of exp / erf /
# division, which the interpreter (numpy) and PyTorch compute differently. They show when the
# value is then rounded to a 16-bit dtype, where they can flip the rounding by one ulp:
#   bf16 (8-bit mantissa, ulp up to 2^-7 relative) -> 1e-2; fp16 (11-bit, up to 2^-10) -> 2e-3;
#   fp32 stays within a few fp32 ulps of the value (1e-5), its gradients multiply two such
#   values and act' is computed by another formula than PyTorch's (1e-4 relative).
# The atol covers the tails (gelu(x) for x << 0), where the value is tiny and both sides lose
# precision to the cancellation in 1 + erf.
TOL = {
    torch.float32: {"fwd": dict(atol=1e-5, rtol=1e-5), "grad": dict(atol=1e-5, rtol=1e-4)},
    torch.bfloat16: {"fwd": dict(atol=1e-2, rtol=1e-2), "grad": dict(atol=1e-2, rtol=1e-2)},
    torch.float16: {"fwd": dict(atol=2e-3, rtol=2e-3), "grad": dict(atol=2e-3, rtol=2e-3)},
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = list(ACTIVATIONS)
EAGER = {
    "silu": F.silu,
    "gelu_erf": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _tol(kind: str, *dtypes: Optional[torch.dtype]) -> dict:
    return max((TOL[d][kind] for d in dtypes if d is not None), key=lambda t: t["atol"])


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def _randn(shape, dtype, device, seed=0, scale=2.0, shift=0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _check(x, act, round_dtype, out_dtype, seed=0) -> None:
    """Forward and backward of fastft::activation against the reference run with autograd, same dout."""
    xk, xr = _leaf(x), _leaf(x)
    out = torch.ops.fastft.activation(xk, act, round_dtype, out_dtype)
    ref = activation_reference(xr, act, round_dtype, out_dtype)
    assert out.is_contiguous()
    _close(out, ref, _tol("fwd", out_dtype, round_dtype))
    dout = _randn(out.shape, out_dtype, out.device, seed=seed + 1, scale=1.0, shift=0.0)
    out.backward(dout)
    ref.backward(dout)
    _close(xk.grad, xr.grad, _tol("grad", x.dtype, round_dtype))


# (shape, round_dtype: None / "x" = the input dtype / a dtype, out dtype: None = input's / "other")
CASES = {
    "one_row": ((1, 64), None, None),
    "one_col": ((5, 1), "x", None),
    "n3_round": ((7, 3), "x", None),
    "n17": ((16, 17), None, None),
    "n100_round": ((6, 100), "x", None),
    "n1000": ((2, 1000), "x", None),
    "1d": ((37,), "x", None),
    "0d": ((), "x", None),
    "3d_round": ((2, 3, 48), "x", None),
    "out_dtype_differs": ((4, 40), "x", "other"),
    "round_bf16": ((3, 24), torch.bfloat16, "other"),
}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(case: str, dtype: torch.dtype, act: str, device: str) -> None:
    shape, rnd, out = CASES[case]
    round_dtype = dtype if rnd == "x" else rnd
    out_dtype = (torch.bfloat16 if dtype == torch.float32 else torch.float32) if out == "other" else dtype
    _check(_randn(shape, dtype, device), act, round_dtype, out_dtype)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_eager_16bit(dtype: torch.dtype, act: str, device: str) -> None:
    """round_dtype = out_dtype = the input's 16-bit dtype is what a model computing ``act(x)`` in
    that dtype does: each value rounded once, so at most one ulp apart and nearly always
    bit-identical, forward and gradient."""
    x = _randn((16, 256), dtype, device, scale=1.0, shift=0.0)
    dout = _randn((16, 256), dtype, device, seed=2, scale=1.0, shift=0.0)
    xk, xe = _leaf(x), _leaf(x)
    out = torch.ops.fastft.activation(xk, act, dtype, dtype)
    ref = EAGER[act](xe)
    out.backward(dout)
    ref.backward(dout)
    for k, r in ((out, ref), (xk.grad, xe.grad)):
        assert k.dtype == r.dtype == dtype
        ulp = torch.finfo(dtype).eps * r.float().abs()
        assert ((k.float() - r.float()).abs() <= ulp + 1e-6).all()
        assert (k == r).float().mean().item() >= 0.99


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    "dtype,round_dtype,out_dtype",
    [
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float16, torch.bfloat16),
        (torch.float32, torch.float16, torch.float32),
        (torch.bfloat16, None, torch.bfloat16),
    ],
    ids=str,
)
def test_rounding_points(dtype, round_dtype, out_dtype, act: str, device: str) -> None:
    """The tolerances above cannot see a missing rounding (it moves a value by < 1 ulp); here every
    output is compared per element: within one ulp of the coarsest dtype and nearly always
    bit-identical to the reference, which needs the input, the dout, the activation and the
    gradient rounded where autograd rounds them."""
    shape = (8, 128)
    x = _randn(shape, dtype, device, scale=1.0, shift=0.0)
    dout = _randn(shape, torch.float32, device, seed=2, scale=1.0, shift=0.0).to(out_dtype)
    xk, xr = _leaf(x), _leaf(x)
    out = torch.ops.fastft.activation(xk, act, round_dtype, out_dtype)
    ref = activation_reference(xr, act, round_dtype, out_dtype)
    out.backward(dout)
    ref.backward(dout)
    eps = max(torch.finfo(d).eps for d in (round_dtype, out_dtype, dtype) if d is not None)
    for k, r in ((out, ref), (xk.grad, xr.grad)):
        assert k.dtype == r.dtype
        assert ((k.float() - r.float()).abs() <= eps * r.float().abs() + 1e-6).all()
        assert (k == r).float().mean().item() >= 0.98


def test_rounds_where_eager_rounds(device: str) -> None:
    """The same fp32 input gives different results for round_dtype None and bf16 (the rounding is
    really applied), and with bf16 exactly what rounding the input and the fp32 result gives."""
    x = _randn((4, 64), torch.float32, device, scale=1.0, shift=0.0)
    plain = torch.ops.fastft.activation(x, "silu", None, torch.float32)
    rounded = torch.ops.fastft.activation(x, "silu", torch.bfloat16, torch.float32)
    assert not torch.equal(plain, rounded)
    assert torch.equal(rounded.to(torch.bfloat16).float(), rounded)  # representable in bf16
    _close(rounded, F.silu(x.to(torch.bfloat16)).float(), dict(atol=0, rtol=torch.finfo(torch.bfloat16).eps))


def test_saves_only_the_input(device: str) -> None:
    """The forward keeps x for the backward and nothing else (the output is recomputed)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = _leaf(_randn((6, 40), torch.bfloat16, device))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.ops.fastft.activation(x, "gelu_tanh", torch.bfloat16, torch.bfloat16)
    assert len(saved) == 1 and saved[0] is x
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_strided_inputs(device: str) -> None:
    # Leading dims that do not merge into one row stride, a last dim that is not unit-stride, one
    # half of a packed tensor (row stride 2N, read in place) and a broadcast (stride-0) input: the
    # same values as their contiguous copies, and gradients flow back into the base tensor.
    base = _randn((4, 6, 2, 16), torch.float32, device)
    views = {
        "leading": lambda t: t[:, ::2, 0],
        "transposed": lambda t: t[0, :, 0].t(),
        "half": lambda t: t.reshape(4, 6, 32)[..., 16:],
        "broadcast": lambda t: t[:1, :1, 0].expand(3, 5, 16),
    }
    dtype = torch.bfloat16
    for name, view in views.items():
        pk, pr = _leaf(base.to(dtype)), _leaf(base.to(dtype))
        xk, xr = view(pk), view(pr)
        assert not xk.is_contiguous(), name
        out = torch.ops.fastft.activation(xk, "gelu_erf", dtype, dtype)
        ref = activation_reference(xr, "gelu_erf", dtype, dtype)
        _close(out, ref, TOL[dtype]["fwd"])
        out.float().pow(2).sum().backward()
        ref.float().pow(2).sum().backward()
        _close(pk.grad, pr.grad, TOL[dtype]["grad"])
        assert pk.grad.abs().sum() > 0, name


@pytest.mark.parametrize("block_rows,block_n", [(1, 16), (2, 32), (4, 8)])
def test_tiling(block_rows: int, block_n: int, device: str) -> None:
    # Several column blocks per row, a partial last column block and a partial last row tile
    # (the default tiles cover a whole row up to 2048 wide, so small tests never split rows).
    x = _randn((7, 37), torch.float32, device)
    dout = _randn((7, 37), torch.float32, device, seed=1)
    xr = _leaf(x)
    ref = activation_reference(xr, "gelu_tanh", torch.bfloat16, torch.float32)
    ref.backward(dout)
    kw = dict(block_rows=block_rows, block_n=block_n)
    out = activation_forward(x, "gelu_tanh", torch.bfloat16, torch.float32, **kw)
    dx = activation_backward(dout, x, "gelu_tanh", torch.bfloat16, **kw)
    _close(out, ref, TOL[torch.bfloat16]["fwd"])
    _close(dx, xr.grad, TOL[torch.bfloat16]["grad"])
    assert torch.equal(out, activation_forward(x, "gelu_tanh", torch.bfloat16, torch.float32))
    assert torch.equal(dx, activation_backward(dout, x, "gelu_tanh", torch.bfloat16))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    n=st.integers(1, 130),
    act=st.sampled_from(ACTS),
    dtype=st.sampled_from(DTYPES),
    round_input=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(lead, n, act, dtype, round_input, seed, device: str) -> None:
    round_dtype = dtype if round_input else None
    _check(_randn(tuple(lead) + (n,), dtype, device, seed), act, round_dtype, dtype, seed=seed)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)])
def test_empty(shape, device: str) -> None:
    x = torch.ones(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = torch.ops.fastft.activation(x, "silu", None, torch.float32)
    assert out.shape == shape and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == shape and x.grad.dtype == torch.bfloat16


def test_no_grad_input(device: str) -> None:
    x = _randn((3, 8), torch.float32, device)
    out = torch.ops.fastft.activation(x, "silu", None, torch.float32)
    assert not out.requires_grad
    _close(out, F.silu(x), TOL[torch.float32]["fwd"])


def test_rejects_bad_inputs(device: str) -> None:
    x = torch.ones(4, 8, device=device)
    op = torch.ops.fastft.activation
    with pytest.raises(ValueError, match=r"fastft::activation: x has unsupported dtype torch.float64") as info:
        op(x.double(), "silu", None, torch.float32)
    assert "torch.bfloat16" in str(info.value)
    with pytest.raises(ValueError, match=r"fastft::activation: x has unsupported dtype torch.int32"):
        op(x.int(), "silu", None, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::activation: round_dtype has unsupported dtype torch.float64"):
        op(x, "silu", torch.float64, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::activation: out_dtype has unsupported dtype torch.float64"):
        op(x, "silu", None, torch.float64)
    with pytest.raises(ValueError, match=r"fastft::activation: unknown activation 'relu'; allowed: silu, gelu_erf, "
                                         r"gelu_tanh"):
        op(x, "relu", None, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::activation: dout shape \(4, 6\) != x shape \(4, 8\)"):
        activation_backward(x[:, :6], x, "silu")
    with pytest.raises(ValueError, match=r"fastft::activation: dout has unsupported dtype torch.float64"):
        activation_backward(x.double(), x, "silu")
    with pytest.raises(ValueError, match=r"fastft::activation: block_n must be a power of two, got 12"):
        activation_forward(x, "silu", block_n=12)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend: str, device: str) -> None:
    torch._dynamo.reset()
    b = torch.bfloat16

    def f(x):
        return torch.ops.fastft.activation(x, "gelu_tanh", b, b) * 2

    x = _randn((2, 3, 24), b, device)
    dout = _randn((2, 3, 24), b, device, seed=1)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    runs = []
    for fn in (compiled, f):
        xl = _leaf(x)
        out = fn(xl)
        out.backward(dout)
        runs.append((out, xl.grad))
    for c, e in zip(*runs):
        assert torch.equal(c, e)  # same kernels either way


def test_opcheck(device: str) -> None:
    b = torch.bfloat16
    x = _randn((3, 5, 24), b, device).requires_grad_()
    xf = _randn((3, 5, 24), torch.float32, device).requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    op = torch.ops.fastft.activation.default
    torch.library.opcheck(op, (x, "silu", b, b), test_utils=tests)
    torch.library.opcheck(op, (x, "gelu_erf", None, torch.float32), test_utils=tests)
    torch.library.opcheck(op, (xf, "gelu_tanh", torch.float16, torch.bfloat16), test_utils=tests)
    dout = _randn((3, 5, 24), b, device, seed=2)
    bwd_tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastft.activation_backward.default, (dout, x.detach(), "silu", b),
                          test_utils=bwd_tests)
    torch.library.opcheck(torch.ops.fastft.activation_backward.default, (dout, xf.detach(), "gelu_tanh", None),
                          test_utils=bwd_tests)
