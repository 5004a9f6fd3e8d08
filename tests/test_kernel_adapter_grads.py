"""kernels/adapter_grads.py: dY (s B) and s dY^T (X A^T) from one pass over dY, against the two
GEMMs it replaces; and the LoRA ops' backward with the fused pass forced on, against the same ops
without it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels import adapter_grads as ag
from fastft.kernels.lora import lora_glu_mlp, lora_linear, lora_linear_x3
from fastft.kernels.lora_glu import lora_glu_backward

from helpers import DEVICE

# (atol, rtol) against float64 products of the same operands. fp32: the summation order alone.
# 16-bit: dyb is rounded once to the dtype, as the GEMM's output is (half an ulp: 2^-9 relative
# for bf16); dB stays fp32.
DYB_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 8e-3), torch.float16: (2e-3, 1e-3)}
DB_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-5), torch.float16: (1e-4, 1e-5)}


def _inputs(rows, n, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    b = (torch.randn(n, rank, generator=g) * rank ** -0.5).to(DEVICE, dtype)
    xa = torch.randn(rows, rank, generator=g).to(DEVICE, dtype)
    return dy, b, xa


def _exact(dy, b, xa, scale):
    return dy.double() @ b.double(), (dy.double().t() @ xa.double()) * scale


def _check(dy, b, xa, scale, dyb, db, dtype):
    want_dyb, want_db = _exact(dy, b, xa, scale)
    assert dyb.dtype == dtype and db.dtype == torch.float32
    torch.testing.assert_close(dyb.double(), want_dyb, atol=DYB_TOL[dtype][0], rtol=DYB_TOL[dtype][1])
    # dB sums over the rows: scale the absolute tolerance with their count
    torch.testing.assert_close(db.double(), want_db, atol=DB_TOL[dtype][0] * dy.shape[0], rtol=DB_TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,rank", [(300, 500, 16), (64, 16, 8), (1000, 700, 48), (129, 257, 1)])
def test_matches_the_two_gemms(dtype, rows, n, rank):
    dy, b, xa = _inputs(rows, n, rank, dtype)
    dyb, db = ag.adapter_grads(dy, b, xa, 0.5, db_dtype=torch.float32)
    _check(dy, b, xa, 0.5, dyb, db, dtype)
    ref_dyb, ref_db = ag.adapter_grads_reference(dy, b, xa, 0.5, torch.float32)
    # the reference rounds the same fp32 products once: at most one ulp apart
    torch.testing.assert_close(dyb.float(), ref_dyb.float(), atol=DYB_TOL[dtype][0], rtol=DYB_TOL[dtype][1])


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 200), n=st.integers(1, 300), rank=st.integers(1, 64), seed=st.integers(0, 2 ** 16),
       scale=st.floats(0.1, 4.0))
def test_odd_shapes_float32(rows, n, rank, seed, scale):
    dy, b, xa = _inputs(rows, n, rank, torch.float32, seed)
    dyb, db = ag.adapter_grads(dy, b, xa, scale, db_dtype=torch.float32)
    _check(dy, b, xa, scale, dyb, db, torch.float32)


def test_writes_into_a_column_slice_and_returns_db_in_the_asked_dtype():
    dy, b, xa_wide = _inputs(96, 80, 12, torch.bfloat16)
    xa = xa_wide[:, 4:10]  # a column slice, as a group's stacked X A^T gives it
    b = b[:, :6].contiguous()
    out = torch.full((96, 20), 7.0, dtype=torch.bfloat16, device=DEVICE)
    dyb, db = ag.adapter_grads(dy, b, xa, 2.0, dyb_out=out[:, 3:9], db_dtype=torch.bfloat16)
    assert dyb.data_ptr() == out[:, 3:9].data_ptr() and db.dtype == torch.bfloat16
    assert (out[:, :3] == 7).all() and (out[:, 9:] == 7).all()  # nothing written beside the slice
    want_dyb, want_db = _exact(dy, b, xa, 2.0)
    torch.testing.assert_close(out[:, 3:9].double(), want_dyb, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(db.double(), want_db, atol=1e-2, rtol=8e-3)  # one bf16 rounding


def test_without_db_and_with_no_rows():
    dy, b, xa = _inputs(40, 33, 4, torch.float32)
    dyb, db = ag.adapter_grads(dy, b, xa, 1.0, need_db=False)
    assert db is None
    torch.testing.assert_close(dyb.double(), _exact(dy, b, xa, 1.0)[0], atol=1e-5, rtol=1e-5)
    dyb, db = ag.adapter_grads(dy[:0], b, xa[:0], 1.0)
    assert dyb.shape == (0, 4) and db.shape == (33, 4) and (db == 0).all()


def test_pending_sums_of_several_linears_in_shared_launches_give_the_same_bits():
    """Seven linears' sums (two launches of SUM_JOBS), mixed dtypes, ranks and row strides, left
    pending and summed together: the same values, bit for bit, as each call summing its own."""
    cases = [(70, 50, 4, torch.float32, torch.float32), (70, 33, 16, torch.bfloat16, torch.float32),
             (70, 260, 3, torch.bfloat16, torch.bfloat16), (70, 9, 1, torch.float16, torch.float32),
             (70, 128, 16, torch.float32, torch.float32), (70, 300, 8, torch.bfloat16, torch.float32),
             (70, 17, 2, torch.float32, torch.float32)]
    alone, pending, together = [], [], []
    wide = torch.full((70, sum(c[2] for c in cases)), 5.0, device=DEVICE)  # the fp32 dybs side by side
    start = 0
    for seed, (rows, n, rank, dtype, db_dtype) in enumerate(cases):
        dy, b, xa = _inputs(rows, n, rank, dtype, seed)
        alone.append(ag.adapter_grads(dy, b, xa, 0.75 + seed, db_dtype=db_dtype))
        out = wide[:, start:start + rank] if dtype == torch.float32 else None
        together.append(ag.adapter_grads(dy, b, xa, 0.75 + seed, dyb_out=out, db_dtype=db_dtype,
                                         need_db=seed != 4, pending=pending))
        start += rank
    assert len(pending) == 2 * len(cases) - 1  # linear 4 has no dB to sum
    ag.sum_partials(pending)
    for i, ((dyb, db), (dyb_p, db_p)) in enumerate(zip(alone, together)):
        assert torch.equal(dyb, dyb_p), f"linear {i}: dyb"
        assert db_p is None if i == 4 else torch.equal(db, db_p), f"linear {i}: dB"


def test_pending_sums_launch_once_per_six(monkeypatch):
    launches = []
    real = ag._sum_launch
    monkeypatch.setattr(ag, "_sum_launch", lambda jobs: launches.append(len(jobs)) or real(jobs))
    pending = []
    for seed in range(4):
        ag.adapter_grads(*_inputs(20, 30, 4, torch.float32, seed), 1.0, pending=pending)
    ag.sum_partials(pending)
    assert launches == [6, 2]
    ag.sum_partials([])
    assert launches == [6, 2]


@pytest.mark.parametrize("bad,message", [
    (lambda dy, b, xa: (dy.t(), b, xa), "unit column stride"),
    (lambda dy, b, xa: (dy, b[:-1], xa), "do not fit"),
    (lambda dy, b, xa: (dy, b.double(), xa), "must share"),
    (lambda dy, b, xa: (dy, torch.zeros(dy.shape[1], 65, device=DEVICE), torch.zeros(dy.shape[0], 65, device=DEVICE)),
     "rank 65"),
])
def test_rejects_bad_inputs(bad, message):
    dy, b, xa = _inputs(16, 24, 4, torch.float32)
    with pytest.raises(ValueError, match=message):
        ag.adapter_grads(*bad(dy, b, xa), 1.0)


def test_pays_only_for_large_unit_stride_gradients():
    big = torch.empty(0, device=DEVICE).new_empty((2, ag.FUSED_MIN_ELEMENTS // 2), dtype=torch.bfloat16)
    assert ag.adapter_grads_pays(big, 16)
    assert not ag.adapter_grads_pays(big[:, :-1], 16)  # too few elements
    assert not ag.adapter_grads_pays(big, ag.FUSED_MAX_RANK + 1)
    assert not ag.adapter_grads_pays(big.t(), 16)


# --- the LoRA ops, with the fused pass forced on for every dY --------------------------------
def _params(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(DEVICE, dtype)


def _grads_both_ways(monkeypatch, run, inputs):
    """The gradients of ``run()`` with the GEMMs, then with the fused pass for every dY."""
    out = run()
    grad_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3 + i)).to(o) for i, o in enumerate(out)]
    want = torch.autograd.grad(out, inputs, grad_out)
    monkeypatch.setattr(ag, "FUSED_MIN_ELEMENTS", 0)
    calls = []
    real = ag.adapter_grads
    monkeypatch.setattr("fastft.kernels.lora.adapter_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    have = torch.autograd.grad(run(), inputs, grad_out)
    return want, have, len(calls)


def _assert_close_grads(want, have, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(have, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert rel <= tol, f"grad {i}: rel_l2 {rel:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_x3_backward_with_the_fused_pass(monkeypatch, dtype):
    x = _params((3, 7, 24), dtype, 0).requires_grad_()
    projections = []
    for seed, out_features, rank in ((1, 40, 4), (2, 16, 2), (3, 16, 3)):
        w = _params((out_features, 24), dtype, seed)
        a = _params((rank, 24), torch.float32, seed + 10).requires_grad_()
        b = _params((out_features, rank), torch.float32, seed + 20).requires_grad_()
        projections.append((w, a, b, 0.5 * seed))
    inputs = [x] + [t for _, a, b, _ in projections for t in (a, b)]
    want, have, calls = _grads_both_ways(
        monkeypatch, lambda: lora_linear_x3(x, *[t for p in projections for t in p], dtype), inputs)
    assert calls == 3
    _assert_close_grads(want, have, dtype)


@pytest.mark.parametrize("dtype,rank", [(torch.float32, 4), (torch.bfloat16, 4), (torch.bfloat16, 17)])
def test_lora_glu_mlp_backward_with_the_fused_pass(monkeypatch, dtype, rank):
    x = _params((2, 9, 16), dtype, 0).requires_grad_()
    proj = []
    for seed, (out_f, in_f) in enumerate(((48, 16), (48, 16), (16, 48))):
        proj.append((_params((out_f, in_f), dtype, seed),
                     _params((rank, in_f), torch.float32, seed + 10).requires_grad_(),
                     _params((out_f, rank), torch.float32, seed + 20).requires_grad_(), 2.0))
    inputs = [x] + [t for _, a, b, _ in proj for t in (a, b)]
    round_dtype = None if dtype == torch.float32 else dtype
    glu_passes = []
    real = lora_glu_backward
    monkeypatch.setattr("fastft.kernels.lora.lora_glu_backward", lambda *a, **k: glu_passes.append(1) or real(*a, **k))
    want, have, calls = _grads_both_ways(
        monkeypatch, lambda: (lora_glu_mlp(x, *proj[0], *proj[1], *proj[2], "silu", round_dtype),), inputs)
    # down's dY through adapter_grads; dg and du through the GLU backward's own pass where it was
    # measured to pay (16-bit gradients, ranks up to 16), else through adapter_grads too
    assert (calls, len(glu_passes)) == ((1, 1) if dtype == torch.bfloat16 and rank <= 16 else (3, 0))
    _assert_close_grads(want, have, dtype)


def test_lora_linear_backward_with_the_fused_pass_and_a_bf16_adapter(monkeypatch):
    x = _params((33, 20), torch.bfloat16, 0).requires_grad_()
    w = _params((24, 20), torch.bfloat16, 1)
    a = _params((5, 20), torch.bfloat16, 2).requires_grad_()
    b = _params((24, 5), torch.bfloat16, 3).requires_grad_()
    want, have, calls = _grads_both_ways(monkeypatch, lambda: (lora_linear(x, w, None, a, b, 0.25, torch.bfloat16),),
                                         [x, a, b])
    assert calls == 1
    _assert_close_grads(want, have, torch.bfloat16)


@pytest.mark.parametrize("tiles", [ag.Tiles(16, 32, 4, 1, 1), ag.Tiles(32, 16, 4, 1, 1), ag.Tiles(128, 64, 4, 1, 1),
                                   ag.Tiles(32, 64, 4, 1, 1, True)])
def test_other_tiles_give_the_same_products(tiles):
    dy, b, xa = _inputs(150, 90, 16, torch.float32, seed=5)
    dyb, db = ag.adapter_grads(dy, b, xa, 1.5, db_dtype=torch.float32, tiles=tiles)
    _check(dy, b, xa, 1.5, dyb, db, torch.float32)


def test_gpu_sum_blocks_follow_the_largest_sum(monkeypatch):
    """A shared sum launch sizes its blocks on its largest job, as a launch of that job alone
    would: q, k and v's six sums at 8,192 tokens get the 32-line blocks of one 8,192-line sum."""
    monkeypatch.setattr(ag, "device_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert ag._sum_block_lines([8192], cuda) == 32
    assert ag._sum_block_lines([8192, 2048, 8192, 512, 8192, 512], cuda) == 32
    assert ag._sum_block_lines([2048, 512], cuda) == 16  # 8 lines would give two programs an SM: at least 16
    assert ag._sum_block_lines([128256], cuda) == 256  # at most 256
    assert ag._sum_block_lines([300, 70], torch.device("cpu")) == 512  # the interpreter: one program a job


def test_gpu_grids_fill_whole_waves(monkeypatch):
    """Column blocks x row segments stay within one wave of resident programs (132 SMs, per_sm
    programs each) where the column blocks allow, and the segments cover the rows."""
    monkeypatch.setattr(ag, "device_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    wide, narrow = ag.gpu_tiles(8192), ag.gpu_tiles(512)
    assert wide.block_n == 256 and narrow.block_n == 128 and ag.gpu_tiles(ag.NARROW_MAX_COLUMNS + 1) == wide
    assert ag._grid(cuda, 8192, 8192, wide) == (32, 8)
    assert ag._grid(cuda, 8192, 2048, wide) == (8, 33)
    assert ag._grid(cuda, 2048, 14336, wide) == (56, 4)
    assert ag._grid(cuda, 8192, 512, narrow) == (4, 99)  # three programs an SM
    assert ag._grid(cuda, 100, 512, narrow) == (4, 2)  # no more segments than row blocks
    assert ag._grid(cuda, 8192, 128256, wide) == (501, 1)  # wider than a wave: one segment

