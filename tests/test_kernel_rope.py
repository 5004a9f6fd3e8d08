"""Tests for the fastft::rope Triton kernels (run through the interpreter when there is no GPU)."""
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft.kernels.rope import rope_backward, rope_forward, rope_reference

# Tolerances when round_dtype is None (the op computes in fp32 and rounds once, to out_dtype; the
# reference does the same ops in fp32). The only possible difference is an fp32 fused multiply-add
# the GPU compiler may form for `a*c - b*s`, worth an fp32 ulp or so; it matters only where the
# value is then rounded to a 16-bit out dtype, where it can flip the last bit:
#   fp32 -> 1e-5 (a few fp32 ulps of O(1) values); bf16 (8-bit mantissa, ulp 2^-8 relative) ->
#   2e-2; fp16 (11-bit mantissa, ulp 2^-11) -> 5e-3. Values here are O(1)-O(10).
# When round_dtype is set, every product and sum is rounded to it exactly as eager does (each
# product of two 16-bit values is exact in fp32, so there is no double rounding): the outputs
# and gradients must be bit-identical to the reference, on the interpreter and on a GPU.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(*dtypes: Optional[torch.dtype]) -> dict:
    return max((TOL[d] for d in dtypes if d is not None), key=lambda t: t["atol"])


def _close(actual: torch.Tensor, expected: torch.Tensor, exact: bool, *dtypes: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if exact:
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), **_tol(*dtypes))


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _inputs(q_shape, k_shape, cs_shape, dtype, device, cs_dtype=None, seed=0):
    # cos/sin are independent random values, not real cos/sin: a wrong column pairing or a
    # wrong broadcast index cannot hide behind c[j] == c[j + h] or cos^2 + sin^2 = 1.
    gen = torch.Generator().manual_seed(seed)
    q = _randn(q_shape, dtype, device, gen, 2.0)
    k = _randn(k_shape, dtype, device, gen, 2.0)
    cos = _randn(cs_shape, cs_dtype or dtype, device, gen)
    sin = _randn(cs_shape, cs_dtype or dtype, device, gen)
    return q, k, cos, sin


def _expected_strides(x: torch.Tensor) -> tuple:
    """The op's output layout: x's strides where x is dense with unit column stride (as eager
    elementwise results), else contiguous."""
    expect = 1  # dense: the strides, smallest first, are the running products of the sizes
    for i in sorted(range(x.dim()), key=x.stride):
        if x.shape[i] != 1:
            if x.stride(i) != expect:
                return torch.empty(x.shape).stride()
            expect *= x.shape[i]
    return x.stride() if x.stride(-1) == 1 or x.shape[-1] == 1 else torch.empty(x.shape).stride()


def _check(q, k, cos, sin, interleaved, round_dtype, out_dtype, q_grad=True, k_grad=True, seed=0) -> None:
    """Forward and backward of the op against the reference run with autograd, same inputs/dout."""
    qk, kk = q.detach().clone().requires_grad_(q_grad), k.detach().clone().requires_grad_(k_grad)
    qr, kr = q.detach().clone().requires_grad_(q_grad), k.detach().clone().requires_grad_(k_grad)
    qo, ko = torch.ops.fastft.rope(qk, kk, cos, sin, interleaved, round_dtype, out_dtype)
    qo_ref, ko_ref = rope_reference(qr, kr, cos, sin, interleaved, round_dtype, out_dtype)
    # round_dtype fp32 means no 16-bit rounding: fp32 math, where a GPU may fuse a*c - b*s.
    exact = round_dtype in (torch.bfloat16, torch.float16)
    assert qo.stride() == _expected_strides(qk) and ko.stride() == _expected_strides(kk)
    _close(qo, qo_ref, exact, out_dtype, round_dtype)
    _close(ko, ko_ref, exact, out_dtype, round_dtype)

    if not (q_grad or k_grad):
        return
    gen = torch.Generator().manual_seed(seed + 1)
    dq_out = _randn(q.shape, out_dtype, q.device, gen)
    dk_out = _randn(k.shape, out_dtype, k.device, gen)
    for outs in ((qo, ko), (qo_ref, ko_ref)):
        pairs = [(o, g) for o, g in zip(outs, (dq_out, dk_out)) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    for t, t_ref, grad in ((qk, qr, q_grad), (kk, kr, k_grad)):
        if grad:
            _close(t.grad, t_ref.grad, exact, t.dtype, out_dtype, round_dtype)
        else:
            assert t.grad is None


ROTARY = {"full_d64": (64, 64), "partial_d80_r32": (80, 32), "tiny_d6_r4": (6, 4)}


# round_dtype None vs the inputs' dtype (for fp32 inputs the two are the same computation).
DTYPE_ROUND = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
               (torch.float16, False), (torch.float16, True)]


@pytest.mark.parametrize("rotary", list(ROTARY), ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype,round_x", DTYPE_ROUND,
                         ids=[f"{d}-{'round_x' if r else 'fp32_math'}" for d, r in DTYPE_ROUND])
def test_matches_reference(dtype, round_x, interleaved, rotary, device) -> None:
    # q [B, Hq, S, D] and k [B, Hk, S, D] with Hq != Hk, cos [B, 1, S, R] broadcast over heads.
    d, r = ROTARY[rotary]
    q, k, cos, sin = _inputs((2, 3, 2, d), (2, 2, 2, d), (2, 1, 2, r), dtype, device)
    _check(q, k, cos, sin, interleaved, dtype if round_x else None, dtype)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize(
    "q_shape,k_shape,cs_shape",
    [
        ((2, 3, 3, 16), (2, 3, 1, 16), (2, 3, 1, 8)),  # [B, S, H, D] with cos [B, S, 1, R]
        ((1, 3, 4, 16), (1, 2, 4, 16), (4, 16)),  # cos [S, R]
        ((2, 2, 3, 16), (2, 1, 3, 16), (1, 1, 3, 16)),  # cos [1, 1, S, R]
        ((2, 3, 16), (2, 3, 16), (2, 3, 12)),  # rank 3, cos varies along every axis (no reuse)
        ((2, 2, 3, 10), (2, 2, 3, 10), (2, 2, 3, 4)),  # rank 4, cos as large as q
        ((10,), (6, 10), (6,)),  # rank 1 q with a rank 2 k, cos [R]
        ((3, 1, 2, 8), (3, 4, 1, 8), (3, 1, 1, 8)),  # q and k broadcast differently
    ],
    ids=["bshd", "cos_sr", "cos_11sr", "rank3_full_cos", "rank4_full_cos", "rank1", "mixed"],
)
def test_layouts_and_broadcasts(q_shape, k_shape, cs_shape, interleaved, device) -> None:
    # Rounded math: bit-exact, so an index or broadcast slip cannot hide inside a tolerance.
    q, k, cos, sin = _inputs(q_shape, k_shape, cs_shape, torch.bfloat16, device)
    _check(q, k, cos, sin, interleaved, torch.bfloat16, torch.bfloat16)


def test_cos_fp32_with_16bit_inputs_and_other_out_dtype(device) -> None:
    # fp32 cos/sin with bf16 q/k: round_dtype bf16 also rounds cos/sin (eager casts them first);
    # out_dtype differs from the inputs (fp32 out of bf16 math, bf16 out of fp16 inputs).
    q, k, cos, sin = _inputs((1, 2, 3, 24), (1, 1, 3, 24), (1, 1, 3, 16), torch.bfloat16, device, torch.float32)
    _check(q, k, cos, sin, False, torch.bfloat16, torch.float32)
    _check(q, k, cos, sin, True, None, torch.float32)
    q, k, cos, sin = _inputs((1, 2, 3, 24), (1, 1, 3, 24), (1, 1, 3, 16), torch.float16, device, torch.float32)
    _check(q, k, cos, sin, False, None, torch.bfloat16)
    _check(q, k, cos, sin, True, torch.bfloat16, torch.float16)  # fp16 inputs rounded to bf16


def test_fp32_inputs_with_16bit_rounding(device) -> None:
    # round_dtype narrower than the inputs: q/k/cos/sin are rounded to it first, as `.to()` does.
    q, k, cos, sin = _inputs((1, 2, 3, 20), (1, 2, 3, 20), (3, 12), torch.float32, device)
    _check(q, k, cos, sin, False, torch.bfloat16, torch.float32)
    _check(q, k, cos, sin, True, torch.float16, torch.float32)


def test_non_contiguous_inputs(device) -> None:
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 2, 3, 4, 16
    proj = _randn((b, s, h * d + 8), torch.bfloat16, device, gen)  # a padded projection output
    q = proj[..., : h * d].view(b, s, h, d).transpose(1, 2)  # [B, H, S, D], rows strided
    assert not q.is_contiguous() and q.stride(-1) == 1
    k = _randn((b, 2, d, s), torch.bfloat16, device, gen).transpose(-1, -2)  # stride(-1) != 1
    cos = _randn((b, s, d), torch.bfloat16, device, gen).unsqueeze(1)
    sin = _randn((s, 2 * d), torch.bfloat16, device, gen)[:, ::2]  # a strided cos/sin too
    _check(q, k, cos, sin, False, torch.bfloat16, torch.bfloat16)
    _check(q, k, cos, sin, True, None, torch.bfloat16)
    # Output gradients that are non-contiguous / expanded (stride 0 everywhere).
    qk = q.detach().requires_grad_()
    qo, ko = torch.ops.fastft.rope(qk, k, cos, sin, False, None, torch.float32)
    qo.sum().backward()
    qr = q.detach().requires_grad_()
    rope_reference(qr, k, cos, sin, False, None, torch.float32)[0].sum().backward()
    _close(qk.grad, qr.grad, False, torch.bfloat16)


def test_layout_follows_a_transposed_projection(device) -> None:
    """q and k as attention makes them, [B, S, H, D] views transposed to [B, H, S, D]: the
    outputs keep that layout, the gradients keep the incoming gradient's, and the gradient of
    the untransposed projection output is contiguous (its reshape back needs no copy)."""
    gen = torch.Generator().manual_seed(5)
    b, s, h, d = 2, 5, 4, 16
    q_proj = _randn((b, s, h, d), torch.bfloat16, device, gen).requires_grad_()
    k_proj = _randn((b, s, 2, d), torch.bfloat16, device, gen).requires_grad_()
    cos = _randn((b, 1, s, d), torch.bfloat16, device, gen)
    sin = _randn((b, 1, s, d), torch.bfloat16, device, gen)
    q, k = q_proj.transpose(1, 2), k_proj.transpose(1, 2)
    qo, ko = torch.ops.fastft.rope(q, k, cos, sin, False, torch.bfloat16, torch.bfloat16)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    # an upstream gradient in the outputs' layout, as attention's backward gives it
    dq_out = _randn((b, s, h, d), torch.bfloat16, device, gen).transpose(1, 2)
    dk_out = _randn((b, s, 2, d), torch.bfloat16, device, gen).transpose(1, 2)
    torch.autograd.backward((qo, ko), (dq_out, dk_out))
    assert q_proj.grad.is_contiguous() and k_proj.grad.is_contiguous()
    qr, kr = q_proj.detach().clone().requires_grad_(), k_proj.detach().clone().requires_grad_()
    ref = rope_reference(qr.transpose(1, 2), kr.transpose(1, 2), cos, sin, False, torch.bfloat16, torch.bfloat16)
    torch.autograd.backward(ref, (dq_out, dk_out))
    assert torch.equal(q_proj.grad, qr.grad) and torch.equal(k_proj.grad, kr.grad)


def test_only_q_requires_grad(device) -> None:
    q, k, cos, sin = _inputs((1, 2, 3, 12), (1, 1, 3, 12), (1, 1, 3, 8), torch.bfloat16, device)
    _check(q, k, cos, sin, False, torch.bfloat16, torch.bfloat16, q_grad=True, k_grad=False)
    _check(q, k, cos, sin, True, torch.bfloat16, torch.bfloat16, q_grad=False, k_grad=True)
    _check(q, k, cos, sin, True, None, torch.bfloat16, q_grad=False, k_grad=False)
    # Only one output used: the other gets no gradient, which stands for zeros.
    qk, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, _ = torch.ops.fastft.rope(qk, kk, cos, sin, False, torch.bfloat16, torch.bfloat16)
    qo.float().sum().backward()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    rope_reference(qr, kr, cos, sin, False, torch.bfloat16, torch.bfloat16)[0].float().sum().backward()
    _close(qk.grad, qr.grad, True)
    assert kk.grad is None or torch.equal(kk.grad, torch.zeros_like(kk))


@pytest.mark.parametrize("which", ["cos", "sin"])
def test_cos_sin_grad_is_an_error(which, device) -> None:
    q, k, cos, sin = _inputs((1, 2, 3, 8), (1, 1, 3, 8), (3, 8), torch.float32, device)
    q.requires_grad_()
    (cos if which == "cos" else sin).requires_grad_()
    qo, ko = torch.ops.fastft.rope(q, k, cos, sin, False, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"fastft::rope: no gradient for cos/sin"):
        (qo.sum() + ko.sum()).backward()


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("block_h,rows_per_program", [(1, 2), (2, 4), (4, 4)])
def test_tiling(block_h, rows_per_program, interleaved, device) -> None:
    # Several row tiles per program, several programs per (i0, i1), partial and masked tiles.
    q, k, cos, sin = _inputs((1, 7, 2, 20), (1, 3, 2, 20), (1, 1, 2, 12), torch.float16, device)
    qo_ref, ko_ref = rope_reference(q, k, cos, sin, interleaved, torch.float16, torch.float16)
    qo, ko = rope_forward(q, k, cos, sin, interleaved, torch.float16, torch.float16, block_h, rows_per_program)
    _close(qo, qo_ref, True)
    _close(ko, ko_ref, True)
    dq, dk = rope_backward(qo, ko, cos, sin, interleaved, torch.float16, torch.float16, torch.float16,
                           block_h, rows_per_program)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    torch.autograd.backward(rope_reference(qr, kr, cos, sin, interleaved, torch.float16, torch.float16), [qo, ko])
    _close(dq, qr.grad, True)
    _close(dk, kr.grad, True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    k_heads=st.integers(1, 3),
    half=st.integers(1, 12),
    extra=st.integers(0, 9),
    cs_mask=st.lists(st.booleans(), min_size=3, max_size=3),
    dtype=st.sampled_from(DTYPES),
    interleaved=st.booleans(),
    round_x=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(lead, k_heads, half, extra, cs_mask, dtype, interleaved, round_x, seed, device) -> None:
    r = 2 * half
    d = r + extra
    q_shape = (*lead, d)
    k_shape = (*lead[:-1], k_heads, d) if lead else (d,)
    # cos keeps some leading dims of q and is 1 (broadcast) along the others, trailing-aligned.
    cs_lead = tuple(n if (keep and n == m) else 1
                    for n, m, keep in zip(lead, (*lead[:-1], k_heads), cs_mask))
    q, k, cos, sin = _inputs(q_shape, k_shape, (*cs_lead, r), dtype, device, seed=seed)
    _check(q, k, cos, sin, interleaved, dtype if round_x else None, dtype, seed=seed)


def _inv_freq_cos_sin(s, r, device, interleaved, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)  # [S, R/2]
    if interleaved:
        emb = angles.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((angles, angles), dim=-1)
    return angles.to(device), emb.cos().to(device), emb.sin().to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equals_rotate_half_formula(dtype, device) -> None:
    # The familiar eager form: q*cos + rotate_half(q)*sin with cos = cat(freqs, freqs).
    b, h, s, d = 1, 2, 5, 32
    _, cos, sin = _inv_freq_cos_sin(s, d, device, interleaved=False)
    cos, sin = cos.to(dtype)[None, None], sin.to(dtype)[None, None]
    gen = torch.Generator().manual_seed(7)
    q, k = _randn((b, h, s, d), dtype, device, gen), _randn((b, 1, s, d), dtype, device, gen)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    qo, ko = torch.ops.fastft.rope(q, k, cos, sin, False, None if dtype == torch.float32 else dtype, dtype)
    for out, x in ((qo, q), (ko, k)):
        _close(out, x * cos + rotate_half(x) * sin, dtype != torch.float32, dtype)


def test_equals_complex_rotation(device) -> None:
    # The interleaved form is a complex multiplication of consecutive pairs by e^(i * angle).
    b, s, h, d, r = 2, 5, 3, 24, 16  # partial rotary: the last 8 columns pass through
    angles, cos, sin = _inv_freq_cos_sin(s, r, device, interleaved=True)
    gen = torch.Generator().manual_seed(8)
    q = _randn((b, s, h, d), torch.float32, device, gen)
    k = _randn((b, s, 1, d), torch.float32, device, gen)
    qo, ko = torch.ops.fastft.rope(q, k, cos[:, None], sin[:, None], True, None, torch.float32)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]  # [S, 1, R/2]
    for out, x in ((qo, q), (ko, k)):
        xc = torch.view_as_complex(x[..., :r].float().reshape(*x.shape[:-1], -1, 2))
        want = torch.cat((torch.view_as_real(xc * rot).flatten(-2), x[..., r:]), dim=-1)
        torch.testing.assert_close(out, want, **TOL[torch.float32])


def _bad(q, k, cos, sin, match, round_dtype=None, out_dtype=torch.float32):
    with pytest.raises(ValueError, match=match):
        torch.ops.fastft.rope(q, k, cos, sin, False, round_dtype, out_dtype)


def test_validation_errors(device) -> None:
    q, k, cos, sin = _inputs((1, 2, 3, 8), (1, 1, 3, 8), (3, 8), torch.float32, device)
    _bad(q, k, cos[..., :5], sin[..., :5], r"fastft::rope: the rotary dim .* must be even.* got 5")
    big = torch.ones(3, 10, device=device)
    _bad(q, k, big, big, r"fastft::rope: the rotary dim .* \[2, D=8\], got 10")
    _bad(q.double(), k, cos, sin, r"fastft::rope: q has unsupported dtype torch.float64")
    _bad(q, k, cos.double(), sin, r"fastft::rope: cos has unsupported dtype torch.float64")
    _bad(q, k, cos, sin, r"fastft::rope: out_dtype has unsupported dtype", out_dtype=torch.float64)
    _bad(q, k, cos, sin, r"fastft::rope: round_dtype has unsupported dtype", round_dtype=torch.float64)
    _bad(q, k[..., :6], cos[..., :6], sin[..., :6], r"fastft::rope: q and k must share the last dim")
    _bad(q, k, cos, sin[..., :6], r"fastft::rope: cos and sin must share the last dim")
    _bad(q, k, torch.ones(4, 8, device=device), sin, r"fastft::rope: cos leading shape \(4,\) must broadcast")
    _bad(q[0], k[0], cos[None, None], sin[None, None], r"must broadcast to q.shape\[:-1\]")  # would grow q
    _bad(q[None], k, cos, sin, r"fastft::rope: q must have 1 to 4 dims")


@pytest.mark.parametrize("q_shape", [(0, 2, 3, 8), (1, 2, 0, 8)])
def test_zero_size(q_shape, device) -> None:
    q = torch.ones(q_shape, device=device, requires_grad=True)
    k = torch.ones(1, 1, 3, 8, device=device, requires_grad=True)
    cos = torch.ones(q_shape[2], 8, device=device)
    if q_shape[2] == 0:
        k = torch.ones(1, 1, 0, 8, device=device, requires_grad=True)
    qo, ko = torch.ops.fastft.rope(q, k, cos, cos, False, None, torch.bfloat16)
    assert qo.shape == q_shape and qo.dtype == torch.bfloat16
    (qo.float().sum() + ko.float().sum()).backward()
    assert q.grad.shape == q_shape and k.grad.shape == k.shape


def test_torch_compile(device) -> None:
    # aot_eager traces both ops through their fake impls (forward and backward graphs).
    torch._dynamo.reset()

    def f(q, k, cos, sin):
        return torch.ops.fastft.rope(q, k, cos, sin, False, torch.bfloat16, torch.bfloat16)

    fn = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, k, cos, sin = _inputs((1, 2, 3, 12), (1, 1, 3, 12), (1, 1, 3, 8), torch.bfloat16, device)
    results = []
    for g in (fn, f):
        qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko = g(qi, ki, cos, sin)
        (qo.float().square().sum() + ko.float().sum()).backward()
        results.append((qo, ko, qi.grad, ki.grad))
    for compiled, eager in zip(*results):
        assert torch.equal(compiled, eager)  # same kernels either way


def test_opcheck(device) -> None:
    q, k, cos, sin = _inputs((1, 2, 3, 12), (1, 1, 3, 12), (1, 1, 3, 8), torch.bfloat16, device)
    q.requires_grad_()
    k.requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    op = torch.ops.fastft.rope.default
    torch.library.opcheck(op, (q, k, cos.float(), sin, True, torch.bfloat16, torch.float32), test_utils=tests)
    bwd = torch.ops.fastft.rope_backward.default
    dq, dk = torch.randn(q.shape, device=device), torch.randn(k.shape, device=device)
    bwd_tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(bwd, (dq, dk, cos, sin, False, None, torch.bfloat16, torch.bfloat16, True, True),
                          test_utils=bwd_tests)
    torch.library.opcheck(bwd, (dq, dk, cos, sin, True, torch.bfloat16, torch.float16, torch.float32, False, True),
                          test_utils=bwd_tests)


# ---- the complex-number form (fastft::rope_polar) ----
def _polar_inputs(dtype, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 5, 4, 16, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(2, 5, 2, 16, generator=gen).to(device=device, dtype=dtype)
    angles = torch.randn(5, 8, generator=gen) * 3
    freqs = torch.polar(torch.full_like(angles, scale), angles)[None, :, None, :].to(device)
    return q, k, freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.75])  # |freqs| != 1: a scaled rotation
def test_polar_matches_complex_reference(dtype, scale, device) -> None:
    from fastft.kernels.rope import rope_polar_reference

    q, k, freqs = _polar_inputs(dtype, device, scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, q, k)]
    have = torch.ops.fastft.rope_polar(leaves[0], leaves[1], freqs, dtype)
    want = rope_polar_reference(leaves[2], leaves[3], freqs)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=gen).to(device=device, dtype=dtype) for t in have]
    torch.autograd.backward(have, grads)
    torch.autograd.backward(want, grads)
    # Both compute in fp32 and round once to dtype; fp32 ulps of the products may flip that rounding.
    tol = _tol(dtype)
    for a, b in list(zip(have, want)) + [(leaves[0].grad, leaves[2].grad), (leaves[1].grad, leaves[3].grad)]:
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_polar_freqs_grad_is_an_error(device) -> None:
    q, k, freqs = _polar_inputs(torch.float32, device)
    q.requires_grad_()
    freqs = freqs.clone().requires_grad_()
    qo, ko = torch.ops.fastft.rope_polar(q, k, freqs, torch.float32)
    with pytest.raises(RuntimeError, match="no gradient for freqs"):
        (qo.sum() + ko.sum()).backward()


def test_polar_validation(device) -> None:
    q, k, freqs = _polar_inputs(torch.float32, device)
    with pytest.raises(ValueError, match="complex64"):
        torch.ops.fastft.rope_polar(q, k, torch.view_as_real(freqs).contiguous(), torch.float32)
    with pytest.raises(ValueError, match="pairs"):
        torch.ops.fastft.rope_polar(q, k, freqs[..., :4], torch.float32)


def _flipped_rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negated_sin_is_the_flipped_rotate_half(dtype, device) -> None:
    """q cos + cat(q2, -q1) sin, as some models write it, is the rotation by -sin: same values
    (a sign flip rounds nothing) and the same gradients."""
    q, k, cos, sin = _inputs((2, 3, 5, 16), (2, 1, 5, 16), (5, 16), dtype, device, seed=7)
    qk, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    round_dtype = None if dtype == torch.float32 else dtype
    qo, ko = torch.ops.fastft.rope(qk, kk, cos, sin, False, round_dtype, dtype, True)
    want_q, want_k = (x * cos + _flipped_rotate_half(x) * sin for x in (qr, kr))
    _close(qo, want_q, dtype == torch.float32, dtype)
    _close(ko, want_k, dtype == torch.float32, dtype)
    gen = torch.Generator().manual_seed(8)
    dq, dk = _randn(q.shape, dtype, device, gen), _randn(k.shape, dtype, device, gen)
    torch.autograd.backward((qo, ko), (dq, dk))
    torch.autograd.backward((want_q, want_k), (dq, dk))
    _close(qk.grad, qr.grad, False, dtype)
    _close(kk.grad, kr.grad, False, dtype)
