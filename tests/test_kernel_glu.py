"""Tests for the fastft::glu / fastft::glu_packed Triton kernels (run through the interpreter when
there is no GPU)."""
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft.kernels.glu import (
    ACTIVATIONS,
    as_rows,
    glu_backward,
    glu_backward_and_output,
    glu_forward,
    glu_packed_backward,
    glu_packed_forward,
    glu_reference,
)

# The kernels and the reference round at the same points (to round_dtype after the activation,
# the product and each gradient op; to the output / input dtypes at the end), so the only
# differences are fp32 ulps of exp / erf / division, which the interpreter (numpy) and PyTorch
# compute differently. They matter only when a value then gets rounded to a 16-bit dtype, where
# they can flip the rounding by 1 ulp (and a flipped intermediate can move a later product by
# another ulp):
#   bf16 (8-bit mantissa, ulp 2^-8 relative) -> 2e-2; fp16 (11-bit, 2^-11) -> 5e-3 forward and
#   1e-2 for grads (two chained roundings: da then dgate); fp32 stays within a few fp32 ulps
#   (1e-5), its grads multiply two such values (1e-4).
# A comparison uses the loosest dtype that rounded the compared value.
TOL = {
    torch.float32: {"fwd": dict(atol=1e-5, rtol=1e-5), "grad": dict(atol=1e-4, rtol=1e-4)},
    torch.bfloat16: {"fwd": dict(atol=2e-2, rtol=2e-2), "grad": dict(atol=2e-2, rtol=2e-2)},
    torch.float16: {"fwd": dict(atol=5e-3, rtol=5e-3), "grad": dict(atol=1e-2, rtol=1e-2)},
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = list(ACTIVATIONS)


def _tol(kind: str, *dtypes: Optional[torch.dtype]) -> dict:
    return max((TOL[d][kind] for d in dtypes if d is not None), key=lambda t: t["atol"])


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def _randn(shape, dtype, device, seed=0, scale=2.0, shift=0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)


def _leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _check(gate, up, act, round_dtype, out_dtype, g_grad=True, u_grad=True, seed=0) -> None:
    """Forward and backward of fastft::glu against the reference run with autograd, same dout."""
    gk, uk = _leaf(gate, g_grad), _leaf(up, u_grad)
    gr, ur = _leaf(gate, g_grad), _leaf(up, u_grad)
    out = torch.ops.fastft.glu(gk, uk, act, round_dtype, out_dtype)
    ref = glu_reference(gr, ur, act, round_dtype, out_dtype)
    assert out.is_contiguous()
    _close(out, ref, _tol("fwd", out_dtype, round_dtype))
    if not (g_grad or u_grad):
        return
    dout = _randn(out.shape, out_dtype, out.device, seed=seed + 1, scale=1.0, shift=0.0)
    out.backward(dout)
    ref.backward(dout)
    for k, r, wanted in ((gk, gr, g_grad), (uk, ur, u_grad)):
        if wanted:
            _close(k.grad, r.grad, _tol("grad", k.dtype, round_dtype))
        else:
            assert k.grad is None


# (shape, round_dtype: None / "x" = the input dtype / a dtype, out dtype: None = input's / "other")
CASES = {
    "one_row": ((1, 64), None, None),
    "i1": ((5, 1), "x", None),
    "i3_round": ((7, 3), "x", None),
    "i17": ((16, 17), None, None),
    "i100_round": ((6, 100), "x", None),
    "i1000": ((2, 1000), "x", None),
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
    _check(_randn(shape, dtype, device), _randn(shape, dtype, device, seed=1), act, round_dtype, out_dtype)


@pytest.mark.parametrize("act", ACTS)
def test_matches_eager_16bit(act: str, device: str) -> None:
    """round_dtype = out_dtype = bf16 is what a model computing ``act(g) * u`` in bf16 does:
    at most 2 bf16 ulps apart (a flipped activation rounding moves the product by one more), and
    nearly always bit-identical, forward and gradients."""
    eager = {
        "silu": lambda g, u: F.silu(g) * u,
        "gelu_erf": lambda g, u: F.gelu(g) * u,
        "gelu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
    }[act]
    b = torch.bfloat16
    g, u = _randn((16, 256), b, device, scale=1.0, shift=0.0), _randn((16, 256), b, device, seed=1, scale=1.0, shift=0.0)
    dout = _randn((16, 256), b, device, seed=2, scale=1.0, shift=0.0)
    gk, uk, ge, ue = _leaf(g), _leaf(u), _leaf(g), _leaf(u)
    out = torch.ops.fastft.glu(gk, uk, act, b, b)
    ref = eager(ge, ue)
    out.backward(dout)
    ref.backward(dout)
    for k, r in ((out, ref), (gk.grad, ge.grad), (uk.grad, ue.grad)):
        assert k.dtype == r.dtype == b
        ulp = torch.finfo(b).eps * r.float().abs()
        assert ((k.float() - r.float()).abs() <= 2 * ulp + 1e-6).all()
        assert (k == r).float().mean().item() >= 0.99


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    "dtype,round_dtype,out_dtype",
    [
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float16, torch.bfloat16),
        (torch.float32, torch.float16, torch.float32),
    ],
    ids=str,
)
def test_rounding_points(dtype, round_dtype, out_dtype, act: str, device: str) -> None:
    """The tolerances above cannot see a missing rounding (it moves a value by < 1 ulp); here
    every output is compared per element: within 2 ulps of round_dtype and nearly always
    bit-identical to the reference, which needs the inputs, the fp32 dout, the activation, the
    product and each gradient rounded where autograd rounds them."""
    shape = (8, 128)
    g, u = _randn(shape, dtype, device, scale=1.0, shift=0.0), _randn(shape, dtype, device, seed=1, scale=1.0, shift=0.0)
    dout = _randn(shape, torch.float32, device, seed=2, scale=1.0, shift=0.0).to(out_dtype)
    gk, uk, gr, ur = _leaf(g), _leaf(u), _leaf(g), _leaf(u)
    out = torch.ops.fastft.glu(gk, uk, act, round_dtype, out_dtype)
    ref = glu_reference(gr, ur, act, round_dtype, out_dtype)
    out.backward(dout)
    ref.backward(dout)
    eps = max(torch.finfo(round_dtype).eps, torch.finfo(out_dtype).eps)
    for k, r in ((out, ref), (gk.grad, gr.grad), (uk.grad, ur.grad)):
        assert k.dtype == r.dtype
        assert ((k.float() - r.float()).abs() <= 2 * eps * r.float().abs() + 1e-6).all()
        assert (k == r).float().mean().item() >= 0.98


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("split", ["chunk", "slice"])
def test_views_of_packed_tensor(split: str, act: str, device: str) -> None:
    """gate / up as the two halves of one [..., 2I] tensor: read in place (row stride 2I, no
    copy) and their gradients flow back into the packed tensor."""
    i = 20
    gu = _randn((2, 3, 2 * i), torch.bfloat16, device)
    dout = _randn((2, 3, i), torch.bfloat16, device, seed=1)
    results = []
    for fn in (torch.ops.fastft.glu, glu_reference):
        p = _leaf(gu)
        g, u = p.chunk(2, -1) if split == "chunk" else (p[..., :i], p[..., i:])
        if fn is torch.ops.fastft.glu:
            for v in (g, u):
                assert not v.is_contiguous()
                r = as_rows(v)  # what the launcher hands the kernel: a view, not a copy
                assert r.data_ptr() == v.data_ptr() and r.stride() == (2 * i, 1) and r.shape == (6, i)
        out = fn(g, u, act, torch.bfloat16, torch.bfloat16)
        out.backward(dout)
        results.append((out, p.grad))
    (out, grad), (out_ref, grad_ref) = results
    _close(out, out_ref, TOL[torch.bfloat16]["fwd"])
    _close(grad, grad_ref, TOL[torch.bfloat16]["grad"])


def test_strided_inputs(device: str) -> None:
    # Leading dims that do not merge into one row stride, and a last dim that is not unit-stride:
    # both still give the right result (copied to contiguous rows first).
    base = _randn((4, 6, 2, 16), torch.float32, device)
    g = base[:, ::2, 0]  # (4, 3, 16), strides (192, 64, 1): leading dims do not merge
    u = base[:, 1::2, 1]
    _check(g, u, "silu", None, torch.float32)
    gt = _randn((16, 5), torch.bfloat16, device).t()  # (5, 16), last-dim stride 5
    _check(gt, _randn((5, 16), torch.bfloat16, device, seed=1), "gelu_erf", torch.bfloat16, torch.bfloat16)
    # A broadcast (stride-0) up is read in place too.
    ub = _randn((1, 16), torch.float32, device, seed=2).expand(5, 16)
    _check(_randn((5, 16), torch.float32, device), ub, "gelu_tanh", None, torch.float32, u_grad=False)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("round_dtype", [None, torch.bfloat16])
def test_packed_matches_halves(act: str, round_dtype, device: str) -> None:
    """glu_packed == glu on the two halves, forward and gradient (cat(dgate, dup)) bit for bit:
    same kernels, same math."""
    i = 33
    gu = _randn((3, 2, 2 * i), torch.bfloat16, device)
    dout = _randn((3, 2, i), torch.float32, device, seed=1)
    p = _leaf(gu)
    out_p = torch.ops.fastft.glu_packed(p, act, round_dtype, torch.float32)
    out_p.backward(dout)
    g, u = _leaf(gu[..., :i]), _leaf(gu[..., i:])
    out_h = torch.ops.fastft.glu(g, u, act, round_dtype, torch.float32)
    out_h.backward(dout)
    assert out_p.shape == (3, 2, i) and out_p.dtype == torch.float32 and out_p.is_contiguous()
    assert torch.equal(out_p, out_h)
    assert p.grad.shape == gu.shape and p.grad.dtype == gu.dtype
    assert torch.equal(p.grad, torch.cat([g.grad, u.grad], -1))
    # and against the reference
    pr = _leaf(gu)
    ref = glu_reference(pr[..., :i], pr[..., i:], act, round_dtype, torch.float32)
    ref.backward(dout)
    _close(out_p, ref, TOL[torch.bfloat16]["fwd"])
    _close(p.grad, pr.grad, TOL[torch.bfloat16]["grad"])


def test_packed_non_unit_last_stride(device: str) -> None:
    gu = _randn((10, 4), torch.float32, device).t()  # (4, 10), last-dim stride 4
    p, pr = _leaf(gu), _leaf(gu)
    out = torch.ops.fastft.glu_packed(p, "silu", None, torch.float32)
    ref = glu_reference(pr[..., :5], pr[..., 5:], "silu")
    _close(out, ref, TOL[torch.float32]["fwd"])
    out.sum().backward()
    ref.sum().backward()
    _close(p.grad, pr.grad, TOL[torch.float32]["grad"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grad_only_for_inputs_that_require_it(dtype: torch.dtype, device: str) -> None:
    g, u = _randn((6, 40), dtype, device), _randn((6, 40), dtype, device, seed=1)
    _check(g, u, "silu", dtype, dtype, g_grad=True, u_grad=False)
    _check(g, u, "gelu_tanh", None, dtype, g_grad=False, u_grad=True)
    _check(g, u, "gelu_erf", None, dtype, g_grad=False, u_grad=False)
    dgate, dup = glu_backward(g, g, u, "silu", None, need_dgate=False, need_dup=True)
    assert dgate is None and dup.shape == u.shape


@pytest.mark.parametrize("block_rows,block_n", [(1, 16), (2, 32), (4, 8)])
def test_tiling(block_rows: int, block_n: int, device: str) -> None:
    # Several column blocks per row, a partial last column block and a partial last row tile
    # (the default tiles cover a whole row up to 2048 wide, so small tests never split rows).
    i = 37
    gu = _randn((7, 2 * i), torch.float32, device)
    dout = _randn((7, i), torch.float32, device, seed=1)
    g, u = gu[:, :i], gu[:, i:]
    pr = _leaf(gu)
    ref = glu_reference(pr[:, :i], pr[:, i:], "gelu_erf", torch.bfloat16, torch.float32)
    ref.backward(dout)
    kw = dict(block_rows=block_rows, block_n=block_n)
    out = glu_forward(g, u, "gelu_erf", torch.bfloat16, torch.float32, **kw)
    out_p = glu_packed_forward(gu, "gelu_erf", torch.bfloat16, torch.float32, **kw)
    dgate, dup = glu_backward(dout, g, u, "gelu_erf", torch.bfloat16, **kw)
    d = glu_packed_backward(dout, gu, "gelu_erf", torch.bfloat16, **kw)
    _close(out, ref, TOL[torch.bfloat16]["fwd"])
    assert torch.equal(out_p, out)
    _close(torch.cat([dgate, dup], -1), pr.grad, TOL[torch.bfloat16]["grad"])
    assert torch.equal(d, torch.cat([dgate, dup], -1))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    i=st.integers(1, 130),
    act=st.sampled_from(ACTS),
    dtype=st.sampled_from(DTYPES),
    round_input=st.booleans(),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(lead, i, act, dtype, round_input, packed, seed, device: str) -> None:
    round_dtype = dtype if round_input else None
    if not packed:
        shape = tuple(lead) + (i,)
        _check(_randn(shape, dtype, device, seed), _randn(shape, dtype, device, seed + 1), act, round_dtype, dtype, seed=seed)
        return
    gu = _randn(tuple(lead) + (2 * i,), dtype, device, seed)
    p, pr = _leaf(gu), _leaf(gu)
    out = torch.ops.fastft.glu_packed(p, act, round_dtype, dtype)
    ref = glu_reference(pr[..., :i], pr[..., i:], act, round_dtype, dtype)
    _close(out, ref, _tol("fwd", dtype))
    dout = _randn(out.shape, dtype, device, seed + 2, scale=1.0, shift=0.0)
    out.backward(dout)
    ref.backward(dout)
    _close(p.grad, pr.grad, _tol("grad", dtype))


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)])
def test_empty(shape, device: str) -> None:
    g = torch.ones(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    u = torch.ones(shape, device=device, dtype=torch.float32, requires_grad=True)
    out = torch.ops.fastft.glu(g, u, "silu", None, torch.float32)
    assert out.shape == shape and out.dtype == torch.float32
    out.sum().backward()
    assert g.grad.shape == shape and u.grad.shape == shape
    p = torch.ones(shape[:-1] + (2 * shape[-1],), device=device, requires_grad=True)
    torch.ops.fastft.glu_packed(p, "silu", None, torch.float32).sum().backward()
    assert p.grad.shape == p.shape


def test_rejects_bad_inputs(device: str) -> None:
    x = torch.ones(4, 8, device=device)
    ops = torch.ops.fastft
    with pytest.raises(ValueError, match=r"fastft::glu: gate has unsupported dtype torch.float64") as info:
        ops.glu(x.double(), x, "silu", None, torch.float32)
    assert "torch.bfloat16" in str(info.value)
    with pytest.raises(ValueError, match=r"fastft::glu: up has unsupported dtype torch.int32"):
        ops.glu(x, x.int(), "silu", None, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::glu: gate_up has unsupported dtype torch.float64"):
        ops.glu_packed(x.double(), "silu", None, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::glu: round_dtype has unsupported dtype torch.float64"):
        ops.glu(x, x, "silu", torch.float64, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::glu: out_dtype has unsupported dtype torch.float64"):
        ops.glu_packed(x, "silu", None, torch.float64)
    for op_args in ((ops.glu, (x, x)), (ops.glu_packed, (x,))):
        op, args = op_args
        with pytest.raises(ValueError, match=r"fastft::glu: unknown activation 'relu'; allowed: silu, gelu_erf, gelu_tanh"):
            op(*args, "relu", None, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::glu: gate shape \(4, 8\) != up shape \(4, 6\)"):
        ops.glu(x, x[:, :6], "silu", None, torch.float32)
    with pytest.raises(ValueError, match=r"fastft::glu: the last dim of gate_up must be even.*got 7"):
        ops.glu_packed(x[:, :7], "silu", None, torch.float32)
    with pytest.raises(ValueError, match=r"at least 1 dimension"):
        ops.glu(x[0, 0], x[0, 0], "silu", None, torch.float32)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend: str, device: str) -> None:
    torch._dynamo.reset()
    b = torch.bfloat16

    def f_glu(g, u):
        return torch.ops.fastft.glu(g, u, "gelu_tanh", b, b)

    def f_packed(gu):
        return torch.ops.fastft.glu_packed(gu, "silu", b, b)

    def f_glu_gate_only(g, u):  # up does not require grad: the backward asks for dgate only
        return torch.ops.fastft.glu(g, u.detach(), "gelu_erf", None, torch.float32)

    gu = _randn((2, 3, 48), b, device)
    dout = _randn((2, 3, 24), b, device, seed=1)
    for fn in (f_glu, f_packed):
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        split = fn is f_glu
        runs = []
        for f in (compiled, fn):
            p = _leaf(gu)
            out = f(*(p.chunk(2, -1) if split else (p,)))
            out.backward(dout)
            runs.append((out, p.grad))
        for c, e in zip(*runs):
            assert torch.equal(c, e)  # same kernels either way
    compiled = torch.compile(f_glu_gate_only, backend=backend, fullgraph=True)
    g, u = _leaf(gu[..., :24]), _leaf(gu[..., 24:])
    compiled(g, u).backward(dout.float())
    assert g.grad is not None and u.grad is None


def test_opcheck(device: str) -> None:
    b = torch.bfloat16
    g = _randn((3, 5, 24), b, device).requires_grad_()
    u = _randn((3, 5, 24), b, device, seed=1).requires_grad_()
    gu = _randn((3, 5, 48), torch.float32, device).requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastft.glu.default, (g, u, "silu", b, b), test_utils=tests)
    torch.library.opcheck(torch.ops.fastft.glu.default, (g, u, "gelu_erf", None, torch.float32), test_utils=tests)
    torch.library.opcheck(torch.ops.fastft.glu_packed.default, (gu, "gelu_tanh", b, b), test_utils=tests)
    dout = _randn((3, 5, 24), b, device, seed=2)
    bwd_tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.fastft.glu_backward.default, (dout, g.detach(), u.detach(), "silu", b, True, True), test_utils=bwd_tests
    )
    torch.library.opcheck(
        torch.ops.fastft.glu_backward.default, (dout, g.detach(), u.detach(), "silu", None, False, True), test_utils=bwd_tests
    )
    torch.library.opcheck(
        torch.ops.fastft.glu_packed_backward.default, (dout, gu.detach(), "gelu_tanh", None), test_utils=bwd_tests
    )


@pytest.mark.parametrize("act", ["silu", "gelu_erf", "gelu_tanh"])
@pytest.mark.parametrize("dtype,round_dtype,out_dtype", [
    (torch.float32, None, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, None, torch.bfloat16), (torch.float16, torch.float16, torch.float32)])
def test_backward_and_output_gives_the_forward_bit_for_bit(act, dtype, round_dtype, out_dtype, device: str) -> None:
    """The backward pass that also writes h (for a backward that needs it whole) gives exactly
    what the forward kernel gave, and exactly the plain backward's gradients."""
    gate, up, dout = (_randn((37, 300), dtype, device, seed=s) for s in (1, 2, 3))
    dgate, dup, h = glu_backward_and_output(dout, gate, up, act, round_dtype, out_dtype, block_rows=8, block_n=64)
    want_dgate, want_dup = glu_backward(dout, gate, up, act, round_dtype)
    assert h.dtype == out_dtype
    assert torch.equal(h, glu_forward(gate, up, act, round_dtype, out_dtype))
    assert torch.equal(dgate, want_dgate) and torch.equal(dup, want_dup)


def test_backward_and_output_over_dout(device: str) -> None:
    """h written over dout: the gradients are those of the dout that was there."""
    gate, up, dout = (_randn((19, 70), torch.bfloat16, device, seed=s) for s in (4, 5, 6))
    want_dgate, want_dup = glu_backward(dout, gate, up, "silu", torch.bfloat16)
    buffer = dout.clone()
    dgate, dup, h = glu_backward_and_output(buffer, gate, up, "silu", torch.bfloat16, torch.bfloat16,
                                            block_rows=4, block_n=32, h_over_dout=True)
    assert h.data_ptr() == buffer.data_ptr()
    assert torch.equal(h, glu_forward(gate, up, "silu", torch.bfloat16, torch.bfloat16))
    assert torch.equal(dgate, want_dgate) and torch.equal(dup, want_dup)
