"""Tests for fastft::linear_cross_entropy (chunked projection + cross-entropy whose forward
computes the gradients; run through Triton's interpreter when there is no GPU)."""
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastft.kernels.linear_cross_entropy as lce
from fastft.kernels.launch import cdiv
from fastft.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_forward,
    linear_cross_entropy_reference,
)

# Tolerances against the reference run with autograd.
#   fp32: both compute fp32 logits with fp32 accumulation; the differences are fp32 ulps of
#     exp / log / the order of the sums: ~1e-6 relative on the loss, a few 1e-6 on the grads.
#   bf16 / fp16: both round the logits to the 16-bit dtype (the fused op chunk by chunk, so a
#     GPU's GEMM may sum in another order and flip a rare logit by one ulp) and the logits'
#     gradient once to it; dW is rounded once per chunk instead of once. Several chunks cost
#     dW a few ulps (measured on CPU with 1 to 5 rows a chunk: 3.8e-3 of the largest element and
#     2.7e-3 in rel L2 for bf16; dh, db and the one-chunk cases equal the reference). bf16 gets
#     1e-2 (relative to the largest element, so that tiny entries are not judged on their own
#     ulps) and 5e-3 rel L2, fp16 eight times less (its ulp is).
#   The rel L2 bound of a gradient summed over k chunks grows as sqrt(k): k roundings of the
#     running sum (600 random bf16 cases with 1 to 20 chunks, CPU: at most 2.5e-3 sqrt(k)). It
#     is a statistic over elements, checked from L2_MIN_ELEMENTS on: one bf16 ulp is 2^-8 to
#     2^-7 of a value, so a 2-element dW whose two chunks round each element by one or two ulps
#     has a rel L2 of up to 1.1e-2 (measured); the per-element bound above still holds there.
TOL = {
    torch.float32: dict(loss=1e-5, grad=1e-4, l2=1e-5),
    torch.bfloat16: dict(loss=1e-3, grad=1e-2, l2=5e-3),
    torch.float16: dict(loss=1.25e-4, grad=1.25e-3, l2=6.25e-4),
}
L2_MIN_ELEMENTS = 32
OP = torch.ops.fastft.linear_cross_entropy


def _randn(shape, dtype, device, seed=0, scale=1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _labels(n: int, v: int, device, seed=0, ignored=(), ignore_index=-100, dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed + 100)
    y = torch.randint(0, v, (n,), generator=gen)
    for i in ignored:
        y[i] = ignore_index
    return y.to(device=device, dtype=dtype)


def _problem(n, h, v, dtype, device, seed=0, bias=False):
    # Logits of a few units, as a trained model's: hidden ~ N(0, 1), weight ~ N(0, 1 / H) * 3.
    hidden = _randn((n, h), dtype, device, seed)
    weight = _randn((v, h), dtype, device, seed + 1, scale=3.0 / h ** 0.5)
    b = _randn((v,), dtype, device, seed + 2, scale=0.5) if bias else None
    return hidden, weight, b


def _close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], dtype: torch.dtype, kind: str,
           chunks: int = 1) -> None:
    """chunks: how many chunks' products the gradient sums (dW's roundings; 1 for the rest)."""
    assert (actual is None) == (expected is None)
    if actual is None:
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.double(), expected.double()
    tol = TOL[dtype][kind]
    finite = e[e.isfinite()]
    scale = max(finite.abs().max().item(), 1e-30) if finite.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, equal_nan=True)
    if kind == "grad" and e.numel() >= L2_MIN_ELEMENTS and e.norm() > 0:
        assert ((a - e).norm() / e.norm()).item() <= TOL[dtype]["l2"] * chunks ** 0.5


def _run(fn, hidden, weight, bias, labels, args, grads=(True, True, True), grad_output=1.0):
    """fn(...) with fresh leaves; returns (loss, hidden.grad, weight.grad, bias.grad)."""
    h = hidden.detach().clone().requires_grad_(grads[0])
    w = weight.detach().clone().requires_grad_(grads[1])
    b = bias.detach().clone().requires_grad_(grads[2]) if bias is not None else None
    loss = fn(h, w, b, labels, *args)
    if loss.requires_grad:
        (loss * grad_output).backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _check(hidden, weight, bias, labels, ignore_index=-100, softcap=None, logit_scale=1.0, reduction="mean",
           normalizer=None, grads=(True, True, True), grad_output=1.0) -> tuple:
    args = (ignore_index, softcap, logit_scale, reduction, normalizer)
    have = _run(OP, hidden, weight, bias, labels, args, grads, grad_output)
    want = _run(linear_cross_entropy_reference, hidden, weight, bias, labels, args, grads, grad_output)
    assert have[0].dtype == torch.float32 and have[0].shape == ()
    _close(have[0], want[0], hidden.dtype, "loss")
    for k, r in zip(have[1:], want[1:]):
        _close(k, r, hidden.dtype, "grad")
    return have


# name -> (N, H, V, bias, ignored rows, softcap, logit_scale, reduction, normalizer)
CASES = {
    "plain_mean": (13, 24, 100, False, (), None, 1.0, "mean", None),
    "bias_sum_ignored": (17, 40, 257, True, (0, 5, 16), None, 1.0, "sum", None),
    "softcap": (13, 24, 257, False, (2,), 30.0, 1.0, "mean", None),
    "softcap_tight_scaled": (9, 40, 100, True, (), 2.0, 0.37, "mean", None),
    "logit_scale": (11, 24, 100, False, (1, 3), None, 2.5, "sum", None),
    "normalizer": (13, 24, 257, True, (4,), 30.0, 1.0, "sum", 23.0),
}


# fp16 on two cases is enough: the same code as bf16 with another rounding.
MATRIX = [(c, d) for d in (torch.float32, torch.bfloat16) for c in CASES] + [
    ("plain_mean", torch.float16), ("softcap", torch.float16)]


@pytest.mark.parametrize("case,dtype", MATRIX, ids=[f"{c}-{str(d)[6:]}" for c, d in MATRIX])
def test_matches_reference(case: str, dtype: torch.dtype, device: str) -> None:
    n, h, v, bias, ignored, softcap, scale, reduction, norm = CASES[case]
    hidden, weight, b = _problem(n, h, v, dtype, device, bias=bias)
    labels = _labels(n, v, device, ignored=ignored)
    normalizer = torch.tensor(norm, device=device) if norm is not None else None
    _check(hidden, weight, b, labels, -100, softcap, scale, reduction, normalizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_rows,block_v", [(4, 64), (5, 32), (13, 128), (1, 256)])
def test_chunks_and_blocks(chunk_rows: int, block_v: int, dtype: torch.dtype, device: str) -> None:
    """Several chunks (4 and 5 do not divide 13; 1 row per chunk) and several vocabulary blocks
    per row with a partial last one (V = 257): the same loss and gradients as the reference."""
    n, h, v = 13, 24, 257
    hidden, weight, b = _problem(n, h, v, dtype, device, seed=3, bias=True)
    labels = _labels(n, v, device, seed=3, ignored=(0, 7))
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, (-100, 10.0, 1.0, "mean", None))
    loss, dh, dw, db = linear_cross_entropy_forward(
        hidden, weight, b, labels, -100, 10.0, 1.0, "mean", None, chunk_rows=chunk_rows, block_v=block_v)
    chunks = cdiv(n, chunk_rows)
    for have, ref, kind, k in zip((loss, dh, dw, db), want, ("loss", "grad", "grad", "grad"), (1, 1, chunks, 1)):
        _close(have, ref, dtype, kind, k)


def test_chunks_through_the_op(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 3-row logits budget (below the minimum chunk, which it overrides): 13 rows go in 5
    # chunks of 3 (the last one has 1).
    n, h, v = 13, 24, 100
    assert lce._chunk_rows(n, v, torch.device(device), None) == n  # default: one chunk here
    monkeypatch.setitem(lce.CHUNK_BYTES, torch.device(device).type, 3 * v * 4)
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 4)
    assert lce._chunk_rows(n, v, torch.device(device), None) == 3
    hidden, weight, b = _problem(n, h, v, torch.float32, device, seed=4, bias=True)
    _check(hidden, weight, b, _labels(n, v, device, seed=4, ignored=(12,)), softcap=5.0, logit_scale=0.8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_label_ignored(reduction: str, dtype: torch.dtype, device: str) -> None:
    hidden, weight, b = _problem(6, 24, 100, dtype, device, bias=True)
    labels = torch.full((6,), -100, device=device)
    loss, dh, dw, db = _check(hidden, weight, b, labels, reduction=reduction)
    if reduction == "mean":
        assert loss.isnan()  # 0 / 0, as F.cross_entropy gives
    else:
        assert loss.item() == 0.0
    for g in (dh, dw, db):
        assert torch.equal(g, torch.zeros_like(g))
    # a normalizer with nothing to count: 0 / 23
    loss, dh, _, _ = _check(hidden, weight, b, labels, reduction="sum", normalizer=torch.tensor(23, device=device))
    assert loss.item() == 0.0 and not dh.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_weight(dtype: torch.dtype, device: str) -> None:
    """The adapter case: the projection is frozen, only the hidden states need a gradient (and
    no dW is computed: the launcher returns None for it)."""
    hidden, weight, b = _problem(13, 40, 257, dtype, device, seed=5, bias=True)
    labels = _labels(13, 257, device, seed=5, ignored=(3,))
    loss, dh, dw, db = _check(hidden, weight, b, labels, softcap=30.0, grads=(True, False, False))
    assert dh is not None and dw is None and db is None
    _, dh, dw, db = linear_cross_entropy_forward(hidden, weight, b, labels, need_dweight=False, need_dbias=False)
    assert dh is not None and dw is None and db is None


def test_which_grads(device: str) -> None:
    hidden, weight, b = _problem(9, 24, 100, torch.float32, device, seed=6, bias=True)
    labels = _labels(9, 100, device, seed=6, ignored=(8,))
    # hidden does not require grad: weight and bias gradients only
    _, dh, dw, db = _check(hidden, weight, b, labels, reduction="sum", grads=(False, True, True))
    assert dh is None and dw is not None and db is not None
    # bias only (weight and hidden frozen)
    _, dh, dw, db = _check(hidden, weight, b, labels, logit_scale=0.5, grads=(False, False, True))
    assert dh is None and dw is None and db is not None
    # nothing requires grad, and under no_grad: just the loss
    loss, *_ = _check(hidden, weight, b, labels, grads=(False, False, False))
    with torch.no_grad():
        h = hidden.clone().requires_grad_()
        out = OP(h, weight, b, labels, -100, None, 1.0, "mean", None)
    assert not out.requires_grad
    # the same math, but another kernel specialisation (no gradient pass): compiled for a GPU,
    # its fp32 rounding may differ by an ulp
    torch.testing.assert_close(out, loss, rtol=1e-6, atol=0)
    _, dh, dw, db = linear_cross_entropy_forward(hidden, weight, b, labels, need_dhidden=False,
                                                 need_dweight=False, need_dbias=False)
    assert dh is None and dw is None and db is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_output_scales(dtype: torch.dtype, device: str) -> None:
    hidden, weight, b = _problem(13, 24, 100, dtype, device, seed=7, bias=True)
    labels = _labels(13, 100, device, seed=7, ignored=(2,))
    _check(hidden, weight, b, labels, softcap=4.0, grad_output=3.0)
    _check(hidden, weight, b, labels, reduction="sum", normalizer=torch.tensor(40.0, device=device), grad_output=-0.25)


def test_gradients_accumulate(device: str) -> None:
    """Two steps into the same .grad (gradient accumulation), with a second grad_output."""
    hidden, weight, b = _problem(10, 24, 100, torch.float32, device, seed=8)
    y1, y2 = _labels(10, 100, device, seed=8), _labels(10, 100, device, seed=9, ignored=(0,))
    grads = []
    for fn in (OP, linear_cross_entropy_reference):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fn(h, w, None, y1, -100, None, 1.0, "mean", None).backward()
        (2.0 * fn(h, w, None, y2, -100, 30.0, 1.0, "sum", None)).backward()
        grads.append((h.grad, w.grad))
    for k, r in zip(*grads):
        _close(k, r, torch.float32, "grad")


def test_leading_dims_and_label_forms(device: str) -> None:
    """hidden [B, T, H] with labels [B, T] or flat [B*T]; int32 labels; dh keeps hidden's shape."""
    hidden, weight, _ = _problem(12, 24, 100, torch.float32, device, seed=10)
    hidden = hidden.view(3, 4, 24)
    labels = _labels(12, 100, device, seed=10, ignored=(5,))
    _, dh, _, _ = _check(hidden, weight, None, labels.view(3, 4))
    assert dh.shape == (3, 4, 24)
    _check(hidden, weight, None, labels)
    have = _run(OP, hidden, weight, None, labels.int(), (-100, None, 1.0, "mean", None))
    want = _run(linear_cross_entropy_reference, hidden, weight, None, labels, (-100, None, 1.0, "mean", None))
    for k, r, kind in zip(have, want, ("loss", "grad", "grad", "grad")):
        _close(k, r, torch.float32, kind)
    # a non-contiguous hidden (a strided view) and another ignore_index
    wide = _randn((12, 48), torch.float32, device, seed=11)
    _check(wide[:, ::2], weight, None, _labels(12, 100, device, seed=11, ignored=(0, 1), ignore_index=7),
           ignore_index=7)


def test_normalizer_forms(device: str) -> None:
    """The normalizer as an int64 tensor (a count of items) or a 1-element fp32 tensor."""
    hidden, weight, b = _problem(13, 24, 100, torch.float32, device, seed=12, bias=True)
    labels = _labels(13, 100, device, seed=12, ignored=(1,))
    _check(hidden, weight, b, labels, reduction="sum", normalizer=torch.tensor(31, device=device))
    args = (-100, None, 1.0, "sum")
    have = _run(OP, hidden, weight, b, labels, args + (torch.tensor([7.5], device=device),))
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, args + (torch.tensor(7.5, device=device),))
    assert have[0].shape == ()  # the loss is 0-d whatever the normalizer's shape
    for k, r, kind in zip(have, want, ("loss", "grad", "grad", "grad")):
        _close(k, r, torch.float32, kind)


def test_large_logits_are_stable(device: str) -> None:
    # Logits in the thousands: exp would overflow without the running max.
    hidden, weight, _ = _problem(8, 24, 100, torch.float32, device, seed=13)
    hidden = hidden * 500.0
    loss, dh, _, _ = _check(hidden, weight, None, _labels(8, 100, device, seed=13))
    assert torch.isfinite(loss) and loss.item() > 100 and torch.isfinite(dh).all()


def test_label_out_of_range_gives_nan(device: str) -> None:
    # torch raises (or asserts on the device); the kernel cannot, and must not hide it.
    hidden, weight, _ = _problem(4, 24, 100, torch.float32, device)
    labels = torch.tensor([1, 100, 2, -100], device=device)
    loss, dh, dw, _ = linear_cross_entropy_forward(hidden, weight, None, labels)
    assert loss.isnan() and dh[1].isnan().all() and not dh[0].isnan().any() and not dh[3].any()


def test_empty(device: str) -> None:
    hidden = torch.zeros((0, 24), device=device, requires_grad=True)
    weight = torch.ones((100, 24), device=device, requires_grad=True)
    labels = torch.zeros((0,), dtype=torch.int64, device=device)
    loss = OP(hidden, weight, None, labels, -100, None, 1.0, "sum", None)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 24) and not weight.grad.any()
    assert OP(hidden, weight, None, labels, -100, None, 1.0, "mean", None).isnan()


def test_backward_allocates_no_gradient_sized_tensor(device: str) -> None:
    """The backward only scales the stored gradients: no op in it may create a tensor of a
    gradient's size (autograd's zero-filled gradients for the stored-gradient outputs once did:
    a dW-sized allocation, gigabytes on a real vocabulary)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    created: list[tuple[str, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and func is not torch.ops.aten.detach.default:
                    created.append((str(func), t.numel()))
            return out

    hidden, weight, b = _problem(16, 24, 100, torch.bfloat16, device, bias=True)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    loss = OP(h, w, bb, _labels(16, 100, device), -100, None, 1.0, "mean", None)
    with Record():
        loss.backward()
    assert h.grad is not None and w.grad is not None and bb.grad is not None
    assert [c for c in created if c[1] >= b.numel()] == [], created


def test_second_backward_raises(device: str) -> None:
    """The backward scales the stored gradients in place: a second backward through the same
    graph must fail loudly rather than scale them twice."""
    hidden, weight, _ = _problem(6, 24, 100, torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss = OP(h, weight, None, _labels(6, 100, device), -100, None, 1.0, "mean", None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 20),
    h=st.integers(1, 48),
    v=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 3.0, 30.0]),
    logit_scale=st.sampled_from([1.0, 0.5, 1.7]),
    reduction=st.sampled_from(["mean", "sum", "normalizer"]),
    ignored_frac=st.sampled_from([0.0, 0.3, 1.0]),
    chunk_rows=st.one_of(st.none(), st.integers(1, 8)),
    grads=st.sampled_from([(True, True, True), (True, False, False), (False, True, True)]),
    seed=st.integers(0, 2**16),
)
# two chunks, each rounding both elements of a 2-element bf16 dW (once failed the rel L2 bound)
@example(n=2, h=1, v=2, dtype=torch.bfloat16, bias=False, softcap=None, logit_scale=1.0, reduction="mean",
         ignored_frac=0.0, chunk_rows=1, grads=(True, True, True), seed=0)
# twenty chunks of one row: twenty roundings of dW (rel L2 7.0e-3, over 5e-3)
@example(n=20, h=1, v=277, dtype=torch.bfloat16, bias=False, softcap=None, logit_scale=1.0, reduction="mean",
         ignored_frac=0.0, chunk_rows=1, grads=(True, True, True), seed=28)
def test_random(n, h, v, dtype, bias, softcap, logit_scale, reduction, ignored_frac, chunk_rows, grads, seed,
                device: str) -> None:
    hidden, weight, b = _problem(n, h, v, dtype, device, seed=seed, bias=bias)
    gen = torch.Generator().manual_seed(seed)
    ignored = [i for i in range(n) if torch.rand((), generator=gen).item() < ignored_frac]
    labels = _labels(n, v, device, seed=seed, ignored=ignored)
    normalizer = torch.tensor(n + 3.0, device=device) if reduction == "normalizer" else None
    reduction = "sum" if reduction == "normalizer" else reduction
    args = (-100, softcap, logit_scale, reduction, normalizer)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, args, grads)
    if chunk_rows is None:
        have = _run(OP, hidden, weight, b, labels, args, grads)
    else:  # the launcher with forced chunks
        loss, dh, dw, db = linear_cross_entropy_forward(hidden, weight, b, labels, *args, *grads, chunk_rows=chunk_rows)
        have = (loss, dh, dw, db if b is not None and grads[2] else None)
    chunks = 1 if chunk_rows is None else cdiv(n, chunk_rows)
    for k, r, kind, c in zip(have, want, ("loss", "grad", "grad", "grad"), (1, 1, chunks, 1)):
        _close(k, r, dtype, kind, c)


def test_rejects_bad_inputs(device: str) -> None:
    h = torch.ones(4, 8, device=device)
    w = torch.ones(10, 8, device=device)
    y = torch.zeros(4, dtype=torch.int64, device=device)

    def call(hidden=h, weight=w, bias=None, labels=y, reduction="mean", normalizer=None, softcap=None):
        return OP(hidden, weight, bias, labels, -100, softcap, 1.0, reduction, normalizer)

    with pytest.raises(ValueError, match=r"^fastft::linear_cross_entropy: labels must be integer class indices.*float32"):
        call(labels=y.float())
    with pytest.raises(ValueError, match=r"^fastft::linear_cross_entropy: reduction must be 'mean' or 'sum', got 'none'"):
        call(reduction="none")
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 8.*got shape \(10, 6\)"):
        call(weight=w[:, :6])
    with pytest.raises(ValueError, match=r"labels must have hidden's leading shape \(4,\).*got shape \(3,\)"):
        call(labels=y[:3])
    with pytest.raises(ValueError, match=r"bias must be \[V\] with V = 10, got shape \(9,\)"):
        call(bias=torch.zeros(9, device=device))
    with pytest.raises(ValueError, match=r"hidden has unsupported dtype torch.float64"):
        call(hidden=h.double(), weight=w.double())
    with pytest.raises(ValueError, match=r"must share one dtype.*hidden torch.bfloat16, weight torch.float32"):
        call(hidden=h.bfloat16())
    with pytest.raises(ValueError, match=r"a normalizer divides the summed loss: reduction must be 'sum'"):
        call(normalizer=torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"normalizer must hold one number"):
        call(reduction="sum", normalizer=torch.ones(2))
    with pytest.raises(ValueError, match=r"softcap must be a positive finite number"):
        call(softcap=0.0)
    with pytest.raises(ValueError, match=r"chunk_rows must be >= 1"):
        linear_cross_entropy_forward(h, w, None, y, chunk_rows=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend: str, device: str) -> None:
    torch._dynamo.reset()

    def step(h, w, b, y, norm):
        return 2.0 * torch.ops.fastft.linear_cross_entropy(h, w, b, y, -100, 30.0, 1.0, "sum", norm)

    hidden, weight, b = _problem(2 * 6, 24, 100, torch.bfloat16, device, seed=14, bias=True)
    hidden = hidden.view(2, 6, 24)
    labels = _labels(12, 100, device, seed=14, ignored=(0, 6))
    norm = torch.tensor(10, device=device)
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for grads in ((True, True, True), (True, False, False)):  # trainable, then frozen projection
        runs = [_run(lambda *a, f=f: f(*a[:4], norm), hidden, weight, b, labels, (), grads)
                for f in (compiled, step)]
        for c, e in zip(*runs):
            assert (c is None) == (e is None)
            if c is not None:
                assert torch.equal(c, e)  # same kernels either way
    assert runs[0][2] is None


def test_opcheck(device: str) -> None:
    hidden, weight, b = _problem(6, 24, 100, torch.float32, device, seed=15, bias=True)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    y = _labels(6, 100, device, seed=15, ignored=(2,))
    full = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    ops = torch.ops.fastft
    torch.library.opcheck(ops.linear_cross_entropy.default, (h, w, bb, y, -100, 30.0, 1.0, "mean", None), test_utils=full)
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          (h, weight, None, y, -100, None, 0.5, "sum", torch.tensor(9, device=device)), test_utils=full)
    # The inner op's stored gradients are mutated by its backward: returned to a caller (as
    # opcheck's AOT test does) they would be, so that test is for the public op only.
    torch.library.opcheck(ops.linear_cross_entropy_with_grads.default,
                          (h, w, bb, y, -100, 30.0, 1.0, "mean", None, True, True, True), test_utils=full[:3])
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (torch.tensor(2.0, device=device), hidden.clone(), weight.clone(), torch.empty(0, device=device)),
                          test_utils=("test_schema", "test_faketensor"))


def test_python_wrapper_defaults(device: str) -> None:
    hidden, weight, _ = _problem(5, 24, 100, torch.float32, device, seed=16)
    labels = _labels(5, 100, device, seed=16, ignored=(4,))
    assert torch.equal(linear_cross_entropy(hidden, weight, None, labels),
                       OP(hidden, weight, None, labels, -100, None, 1.0, "mean", None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap,bias,per_entry", [(None, False, True), (5.0, True, True), (None, True, False)])
def test_column_scale(softcap, bias, per_entry, dtype: torch.dtype, device: str) -> None:
    """A frozen per-vocabulary scale (or one number as a tensor) multiplies each logit."""
    n, h, v = 11, 24, 100
    hidden, weight, b = _problem(n, h, v, dtype, device, seed=21, bias=bias)
    labels = _labels(n, v, device, seed=21, ignored=(3,))
    scale = (_randn((v,), torch.float32, device, seed=22).abs() + 0.5) if per_entry else torch.tensor(1.7, device=device)
    args = (-100, softcap, 0.8, "mean", None, scale)
    have = _run(OP, hidden, weight, b, labels, args)
    want = _run(linear_cross_entropy_reference, hidden, weight, b, labels, args)
    _close(have[0], want[0], dtype, "loss")
    for k, r in zip(have[1:], want[1:]):
        _close(k, r, dtype, "grad")
    plain = _run(OP, hidden, weight, b, labels, args[:-1])
    assert not torch.allclose(have[0], plain[0])  # the scale is not dropped


def test_column_scale_refused_when_trainable_or_misshapen(device: str) -> None:
    hidden, weight, _ = _problem(4, 24, 100, torch.float32, device, seed=23)
    labels = _labels(4, 100, device, seed=23)
    trainable = torch.ones(100, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="column_scale requires grad"):
        linear_cross_entropy(hidden, weight, None, labels, column_scale=trainable)
    with torch.no_grad():  # without gradients it is only a number per entry
        linear_cross_entropy(hidden, weight, None, labels, column_scale=trainable)
    with pytest.raises(ValueError, match=r"column_scale must be a floating-point \[V\] tensor"):
        linear_cross_entropy(hidden, weight, None, labels, column_scale=torch.ones(99, device=device))


def test_opcheck_with_column_scale(device: str) -> None:
    hidden, weight, b = _problem(6, 24, 100, torch.float32, device, seed=24, bias=True)
    h, w = (t.clone().requires_grad_() for t in (hidden, weight))
    y = _labels(6, 100, device, seed=24, ignored=(1,))
    scale = torch.linspace(0.5, 2.0, 100, device=device)
    torch.library.opcheck(torch.ops.fastft.linear_cross_entropy.default,
                          (h, w, b, y, -100, 3.0, 1.0, "mean", None, scale),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
