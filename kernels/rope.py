"""Rotary position embedding (RoPE) of q and k in one launch, registered as ``fastft::rope``.

With R = the rotary dim (last dim of cos/sin, even, R <= D), h = R / 2, and c, s the cos/sin row
that broadcasts onto a row of q (or k), each row is rotated pairwise:

  rotate-half layout (pairs (j, j + h), j < h):
      out[j]     = q[j]     * c[j]     - q[j + h] * s[j]
      out[j + h] = q[j + h] * c[j + h] + q[j]     * s[j + h]
  interleaved / pairwise layout (pairs (2i, 2i + 1), i < h):
      out[2i]     = q[2i]     * c[2i]     - q[2i + 1] * s[2i]
      out[2i + 1] = q[2i + 1] * c[2i + 1] + q[2i]     * s[2i + 1]
  columns j >= R pass through unchanged (partial rotary).

This is exactly ``q * cos + rotate(q) * sin`` on the first R columns, for any cos/sin (nothing
assumes c[j] == c[j + h]). Arithmetic is fp32; ``round_dtype`` (bf16/fp16) reproduces eager
PyTorch evaluating that expression in a 16-bit dtype: the inputs are cast to it, each product is
rounded to it and so is their sum. The result is then cast to ``out_dtype``.

The backward is the transposed rotation (the same kernel with sin's halves swapped and negated):
  rotate-half, j < h:  dq[j]     = dout[j]     * c[j]     + dout[j + h] * s[j + h]
                       dq[j + h] = dout[j + h] * c[j + h] - dout[j]     * s[j]
with the roundings autograd applies to the eager 16-bit computation. It is its own custom op
(``fastft::rope_backward``) so AOT autograd can trace it with fake tensors. cos/sin get no
gradient: asking for one is an error, never a silently missing gradient.

Work split: q/k are viewed as 4-D [n0, n1, H, D] (views only: leading size-1 dims are added and
the leading dims permuted so that H is one along which cos/sin do not change, when there is one).
A program takes one (i0, i1) and a run of H rows, so it loads its cos/sin row once and reuses it
for every head. cos/sin are never materialised at the broadcast shape: they are expand()ed views
whose per-dim strides (0 where broadcast) go to the kernel.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import INTERPRETER_TILE_ELEMS, SUPPORTED_DTYPES, cdiv, check_dtype, device_sm_count, next_power_of_2
from .rounding import TL_DTYPE, round_fp32, round_loaded

__all__ = [
    "SUPPORTED_DTYPES",
    "rope",
    "rope_backward",
    "rope_forward",
    "rope_reference",
]

# One program holds a row's rotary part in registers; rotary dims in practice are <= 256.
MAX_D: int = 16384


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------
def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The partner of each column with the sign of the rotation: rotate-half gives cat(-x2, x1),
    the interleaved layout gives (-x[2i+1], x[2i]) for each pair."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RoPE with the exact rounding the kernels reproduce (differentiable).

    ``out_dtype`` None keeps each input's dtype."""
    r = cos.shape[-1]
    compute = round_dtype if round_dtype is not None else torch.float32
    c = cos.to(compute)
    s = sin.to(compute)

    def one(x: torch.Tensor) -> torch.Tensor:
        od = out_dtype if out_dtype is not None else x.dtype
        xr = x[..., :r].to(compute)
        y = (xr * c + _rotate(xr, interleaved) * s).to(od)  # eager, in the compute dtype
        if r < x.shape[-1]:
            y = torch.cat((y, x[..., r:].to(od)), dim=-1)
        return y

    return one(q), one(k)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_pairs(ptr, row_off, row_mask, HALF, INTERLEAVED: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    """Load the first 2*HALF columns of ROWS rows as the two members of each rotation pair,
    (a, b), each [ROWS, BLOCK_HALF] fp32. Rotate-half: a = cols [0, h), b = cols [h, 2h).
    Interleaved: a = even cols, b = odd cols (one contiguous load, then split in registers)."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)
        mask = row_mask[:, None] & (cols < 2 * HALF)[None, :]
        v = tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(v, (ROWS, BLOCK_HALF, 2)))
    else:
        cols = tl.arange(0, BLOCK_HALF)
        mask = row_mask[:, None] & (cols < HALF)[None, :]
        p = ptr + row_off[:, None] + cols[None, :]
        a = tl.load(p, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_pairs(ptr, row_off, row_mask, a, b, HALF, INTERLEAVED: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """Inverse of ``_load_pairs`` (a, b already in the destination dtype)."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)
        mask = row_mask[:, None] & (cols < 2 * HALF)[None, :]
        v = tl.reshape(tl.join(a, b), (ROWS, 2 * BLOCK_HALF))
        tl.store(ptr + row_off[:, None] + cols[None, :], v, mask=mask)
    else:
        cols = tl.arange(0, BLOCK_HALF)
        mask = row_mask[:, None] & (cols < HALF)[None, :]
        p = ptr + row_off[:, None] + cols[None, :]
        tl.store(p, a, mask=mask)
        tl.store(p + HALF, b, mask=mask)


@triton.jit
def _load_cos_sin(c_ptr, s_ptr, c_row_off, s_row_off, row_mask, HALF, TRANSPOSE: tl.constexpr,
                  ROUND_DTYPE: tl.constexpr, INTERLEAVED: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    ca, cb = _load_pairs(c_ptr, c_row_off, row_mask, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
    sa, sb = _load_pairs(s_ptr, s_row_off, row_mask, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
    ca = round_loaded(ca, c_ptr.dtype.element_ty, ROUND_DTYPE)
    cb = round_loaded(cb, c_ptr.dtype.element_ty, ROUND_DTYPE)
    sa = round_loaded(sa, s_ptr.dtype.element_ty, ROUND_DTYPE)
    sb = round_loaded(sb, s_ptr.dtype.element_ty, ROUND_DTYPE)
    if TRANSPOSE:
        # The transposed rotation is the forward formula with (s_a, s_b) -> (-s_b, -s_a):
        #   d_a = g_a*c_a + g_b*s_b,  d_b = g_b*c_b - g_a*s_a.  Negation commutes with rounding.
        sa, sb = -sb, -sa
    return ca, cb, sa, sb


@triton.jit
def _rope_rows(
    x_ptr, o_ptr, c_ptr, s_ptr, pid,
    n1, H, h_chunks, rows_per_prog,
    sx0, sx1, sxh, so0, so1, soh, sc0, sc1, sch, ss0, ss1, ssh,
    HALF, R, D,
    INTERLEAVED: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    HAS_PASS: tl.constexpr,
    CS_BCAST: tl.constexpr,  # cos/sin constant along H: load them once per program
    ROUND_DTYPE: tl.constexpr,  # tl.float32 means "no intermediate rounding"
    OUT_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # pid -> (i0, i1, chunk of H rows); 64-bit offsets: index * stride can exceed 2^31.
    chunk = pid % h_chunks
    outer = pid // h_chunks
    i0 = (outer // n1).to(tl.int64)
    i1 = (outer % n1).to(tl.int64)
    x_base = x_ptr + i0 * sx0 + i1 * sx1
    o_base = o_ptr + i0 * so0 + i1 * so1
    c_base = c_ptr + i0 * sc0 + i1 * sc1
    s_base = s_ptr + i0 * ss0 + i1 * ss1
    h_start = chunk * rows_per_prog
    h_end = tl.minimum(h_start + rows_per_prog, H)

    if CS_BCAST:
        zero = tl.zeros((1,), dtype=tl.int64)
        ca, cb, sa, sb = _load_cos_sin(c_base, s_base, zero, zero, zero == 0, HALF, TRANSPOSE,
                                       ROUND_DTYPE, INTERLEAVED, 1, BLOCK_HALF)

    for h0 in range(h_start, h_end, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        row_mask = rows < h_end
        rows64 = rows.to(tl.int64)
        if not CS_BCAST:
            ca, cb, sa, sb = _load_cos_sin(c_base, s_base, rows64 * sch, rows64 * ssh, row_mask, HALF,
                                           TRANSPOSE, ROUND_DTYPE, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        xa, xb = _load_pairs(x_base, rows64 * sxh, row_mask, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        xa = round_loaded(xa, x_ptr.dtype.element_ty, ROUND_DTYPE)
        xb = round_loaded(xb, x_ptr.dtype.element_ty, ROUND_DTYPE)
        # Each product rounded, then the sum: eager's q*cos + rotate(q)*sin in ROUND_DTYPE.
        oa = round_fp32(round_fp32(xa * ca, ROUND_DTYPE) - round_fp32(xb * sa, ROUND_DTYPE), ROUND_DTYPE)
        ob = round_fp32(round_fp32(xb * cb, ROUND_DTYPE) + round_fp32(xa * sb, ROUND_DTYPE), ROUND_DTYPE)
        if ROUND_DTYPE != OUT_DTYPE:  # else oa/ob are already exact in OUT_DTYPE
            oa = round_fp32(oa, OUT_DTYPE)
            ob = round_fp32(ob, OUT_DTYPE)
        oa = oa.to(OUT_DTYPE)
        ob = ob.to(OUT_DTYPE)
        _store_pairs(o_base, rows64 * soh, row_mask, oa, ob, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)
        if HAS_PASS:
            # Columns [R, D): a plain cast (no ROUND_DTYPE: eager never computes with them).
            pcols = R + tl.arange(0, BLOCK_P)
            pmask = row_mask[:, None] & (pcols < D)[None, :]
            v = tl.load(x_base + rows64[:, None] * sxh + pcols[None, :], mask=pmask, other=0.0)
            if x_ptr.dtype.element_ty != OUT_DTYPE:
                v = round_fp32(v.to(tl.float32), OUT_DTYPE).to(OUT_DTYPE)
            tl.store(o_base + rows64[:, None] * soh + pcols[None, :], v, mask=pmask)


@triton.jit
def rope_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, c_ptr, s_ptr,
    q_progs,
    q_n1, q_H, q_chunks, q_rpp, q_sx0, q_sx1, q_sxh, q_so0, q_so1, q_soh,
    q_sc0, q_sc1, q_sch, q_ss0, q_ss1, q_ssh,
    k_n1, k_H, k_chunks, k_rpp, k_sx0, k_sx1, k_sxh, k_so0, k_so1, k_soh,
    k_sc0, k_sc1, k_sch, k_ss0, k_ss1, k_ssh,
    HALF, R, D,
    INTERLEAVED: tl.constexpr,
    TRANSPOSE: tl.constexpr,  # False: forward rotation; True: its transpose (the backward)
    HAS_PASS: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    Q_OUT_DTYPE: tl.constexpr,
    K_OUT_DTYPE: tl.constexpr,
    Q_CS_BCAST: tl.constexpr,
    K_CS_BCAST: tl.constexpr,
    Q_BLOCK_H: tl.constexpr,
    K_BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # The first q_progs programs rotate q, the rest rotate k: one launch for both.
    pid = tl.program_id(0)
    if pid < q_progs:
        _rope_rows(q_ptr, qo_ptr, c_ptr, s_ptr, pid,
                   q_n1, q_H, q_chunks, q_rpp, q_sx0, q_sx1, q_sxh, q_so0, q_so1, q_soh,
                   q_sc0, q_sc1, q_sch, q_ss0, q_ss1, q_ssh, HALF, R, D,
                   INTERLEAVED, TRANSPOSE, HAS_PASS, Q_CS_BCAST, ROUND_DTYPE, Q_OUT_DTYPE,
                   Q_BLOCK_H, BLOCK_HALF, BLOCK_P)
    else:
        _rope_rows(k_ptr, ko_ptr, c_ptr, s_ptr, pid - q_progs,
                   k_n1, k_H, k_chunks, k_rpp, k_sx0, k_sx1, k_sxh, k_so0, k_so1, k_soh,
                   k_sc0, k_sc1, k_sch, k_ss0, k_ss1, k_ssh, HALF, R, D,
                   INTERLEAVED, TRANSPOSE, HAS_PASS, K_CS_BCAST, ROUND_DTYPE, K_OUT_DTYPE,
                   K_BLOCK_H, BLOCK_HALF, BLOCK_P)


# --------------------------------------------------------------------------------------------
# Host-side launchers
# --------------------------------------------------------------------------------------------
_check_dtype = functools.partial(check_dtype, "fastft::rope")


def _broadcasts_to(src: tuple, dst: tuple) -> bool:
    """Whether ``src`` broadcasts to ``dst`` without changing it (trailing-aligned, 1 or equal)."""
    return len(src) <= len(dst) and all(a == 1 or a == b for a, b in zip(reversed(src), reversed(dst)))


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    round_dtype: Optional[torch.dtype],
    out_dtypes: tuple[torch.dtype, torch.dtype],
    names: tuple[str, str] = ("q", "k"),
) -> None:
    for name, t in zip(names, (q, k)):
        _check_dtype(name, t.dtype)
        if not 1 <= t.dim() <= 4:
            raise ValueError(f"fastft::rope: {name} must have 1 to 4 dims, got shape {tuple(t.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_dtype(name, t.dtype)
        if not 1 <= t.dim() <= 4:
            raise ValueError(f"fastft::rope: {name} must have 1 to 4 dims, got shape {tuple(t.shape)}")
    _check_dtype("round_dtype", round_dtype, allow_none=True)
    for od in out_dtypes:
        _check_dtype("out_dtype", od)
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"fastft::rope: {names[0]} and {names[1]} must share the last dim, "
                         f"got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if not 2 <= d <= MAX_D:
        raise ValueError(f"fastft::rope: last dim of {names[0]} must be in [2, {MAX_D}], got {d}")
    if cos.shape[-1] != sin.shape[-1]:
        raise ValueError(f"fastft::rope: cos and sin must share the last dim (the rotary dim), "
                         f"got shapes {tuple(cos.shape)} and {tuple(sin.shape)}")
    r = cos.shape[-1]
    if r % 2 != 0 or not 2 <= r <= d:
        raise ValueError(f"fastft::rope: the rotary dim (last dim of cos/sin) must be even and in "
                         f"[2, D={d}], got {r}")
    for name, t in zip(names, (q, k)):
        for cs_name, cs in (("cos", cos), ("sin", sin)):
            lead = tuple(t.shape[:-1])
            if not _broadcasts_to(tuple(cs.shape[:-1]), lead):
                raise ValueError(
                    f"fastft::rope: {cs_name} leading shape {tuple(cs.shape[:-1])} must broadcast to "
                    f"{name}.shape[:-1] = {lead} without changing it"
                )
    for name, t in (*zip(names, (q, k)), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"fastft::rope: {name} is on {t.device} but {names[0]} is on {q.device}")


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    # Rows may have any strides, but columns must be adjacent (vector loads).
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _out_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The result buffer for ``x``: x's own strides where x is dense with unit column stride (as
    eager elementwise ops lay out results), else contiguous. Keeping the layout matters: q is
    usually a transposed view of a projection's output, and a gradient that comes back in that
    layout lets the projection's backward reshape without a copy. The fake impls call this too."""
    if x.stride(-1) == 1 or x.shape[-1] == 1:
        out = torch.empty_like(x, dtype=dtype)
        if out.stride(-1) == 1 or out.shape[-1] == 1:
            return out
    return x.new_empty(x.shape, dtype=dtype)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * device_sm_count(device)
    return 4  # the interpreter runs programs one by one: few and large


def _pad3(t: tuple, fill: int) -> tuple:
    return (fill,) * (3 - len(t)) + tuple(t)


# Plans are pure functions of shapes and strides, cached: the host side costs a dict lookup.
@functools.lru_cache(maxsize=4096)
def _plan(
    shape: tuple, x_stride: tuple, o_stride: tuple, c_shape: tuple, c_stride: tuple, s_shape: tuple, s_stride: tuple,
    block_half: int, block_h: Optional[int], rows_per_prog: Optional[int], target: int,
    tile_elems: int = 512, prefer_broadcast: bool = True,
) -> tuple[int, tuple, bool, int]:
    """(programs, kernel args, cos/sin constant along H, BLOCK_H) for one of q / k.

    The tensor is seen as [n0, n1, H, D]: leading dims padded with 1s to three, then permuted so
    H is (preferably) an axis along which cos/sin have stride 0. The output has strides
    ``o_stride``, cos/sin are the expand()ed views (stride 0 where they broadcast)."""
    d = shape[-1]
    sizes = _pad3(shape[:-1], 1)
    xs = _pad3(x_stride[:-1], 0)
    os_ = _pad3(o_stride[:-1], 0)

    def expanded(cs_shape, cs_stride):
        cl, cst = _pad3(cs_shape[:-1], 1), _pad3(cs_stride[:-1], 0)
        return tuple(0 if cl[a] == 1 else cst[a] for a in range(3))

    cs, ss = expanded(c_shape, c_stride), expanded(s_shape, s_stride)
    bcast = [a for a in range(3) if sizes[a] > 1 and cs[a] == 0 and ss[a] == 0]
    if bcast and prefer_broadcast:
        head = max(bcast, key=lambda a: (sizes[a], a))
    else:  # cos/sin vary along every axis: loop over the longest one, loading them per row
        head = max(range(3), key=lambda a: (sizes[a], a))
    cs_bcast = sizes[head] == 1 or head in bcast
    perm = [a for a in range(3) if a != head] + [head]
    n0, n1, h = (sizes[a] for a in perm)

    if block_h is None:
        block_h = max(1, min(next_power_of_2(h), tile_elems // (2 * block_half)))
    if rows_per_prog is None:
        # All H rows in one program unless that leaves too few programs to fill the GPU.
        chunks = max(1, min(cdiv(target, n0 * n1), cdiv(h, block_h)))
        rows_per_prog = cdiv(cdiv(h, chunks), block_h) * block_h
    chunks = cdiv(h, rows_per_prog)
    args = (n1, h, chunks, rows_per_prog, *(xs[a] for a in perm), *(os_[a] for a in perm),
            *(cs[a] for a in perm), *(ss[a] for a in perm))
    return n0 * n1 * chunks, args, cs_bcast, block_h


_NO_ROWS = (0, (1, 0, 1, 1) + (0,) * 12, True, 1)
# Rotary elements (both members of each pair) per row tile.
_TILE_ELEMS = 512


def _check_block(name: str, v: Optional[int]) -> None:
    if v is not None and (v < 1 or v & (v - 1)):
        raise ValueError(f"fastft::rope: {name} must be a power of two, got {v}")


def _launch(
    xs: tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    out_dtypes: tuple[torch.dtype, torch.dtype],
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    round_dtype: Optional[torch.dtype],
    transpose: bool,
    block_h: Optional[int],
    rows_per_program: Optional[int],
    num_warps: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    _check_block("block_h", block_h)
    if rows_per_program is not None and (block_h is None or rows_per_program % block_h):
        raise ValueError("fastft::rope: rows_per_program needs block_h and must be a multiple of it")
    cos = _last_dim_unit(cos)
    sin = _last_dim_unit(sin)
    r = cos.shape[-1]
    half = r // 2
    block_half = next_power_of_2(half)
    present = [x for x in xs if x is not None]
    device = present[0].device
    target = _target_programs(device)
    # Off the GPU (the interpreter), few programs with large tiles: loop over the longest axis.
    on_gpu = device.type == "cuda"
    tiling = (_TILE_ELEMS, True) if on_gpu else (INTERPRETER_TILE_ELEMS, False)
    ins, outs, plans = [], [], []
    for x, od in zip(xs, out_dtypes):
        if x is None or x.numel() == 0:
            ins.append(None)
            outs.append(None if x is None else _out_like(x, od))
            plans.append(_NO_ROWS)
            continue
        out = _out_like(x, od)
        x = _last_dim_unit(x)
        ins.append(x)
        outs.append(out)
        plans.append(_plan(tuple(x.shape), x.stride(), out.stride(), tuple(cos.shape), cos.stride(), tuple(sin.shape),
                           sin.stride(), block_half, block_h, rows_per_program, target, *tiling))
    (q_progs, q_args, q_bcast, q_bh), (k_progs, k_args, k_bcast, k_bh) = plans
    if q_progs + k_progs == 0:
        return outs[0], outs[1]
    d = present[0].shape[-1]
    dummy = next(x for x in ins if x is not None)  # pointer for a tensor without programs
    if num_warps is None:
        num_warps = _NUM_WARPS
    rope_kernel[(q_progs + k_progs,)](
        ins[0] if ins[0] is not None else dummy, outs[0] if ins[0] is not None else dummy,
        ins[1] if ins[1] is not None else dummy, outs[1] if ins[1] is not None else dummy,
        cos, sin, q_progs, *q_args, *k_args, half, r, d,
        INTERLEAVED=bool(interleaved),
        TRANSPOSE=transpose,
        HAS_PASS=d > r,
        ROUND_DTYPE=TL_DTYPE[round_dtype] if round_dtype is not None else tl.float32,
        Q_OUT_DTYPE=TL_DTYPE[out_dtypes[0]],
        K_OUT_DTYPE=TL_DTYPE[out_dtypes[1]],
        Q_CS_BCAST=q_bcast,
        K_CS_BCAST=k_bcast,
        Q_BLOCK_H=q_bh,
        K_BLOCK_H=k_bh,
        BLOCK_HALF=block_half,
        BLOCK_P=next_power_of_2(d - r) if d > r else 1,
        num_warps=num_warps,
    )
    return outs[0], outs[1]


# Swept on an H100 (q [1, 32, 16384, 128] + k with 8 heads, bf16, cos broadcast over heads):
# small tiles (4 heads x 128) and one warp per program, looping over all heads, were fastest.
_NUM_WARPS = 1


def rope_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_h: Optional[int] = None,
    rows_per_program: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (q_out, k_out) laid out as q / k (see ``_out_like``) in ``out_dtype``
    (default: q's dtype). ``block_h`` / ``rows_per_program`` / ``num_warps`` override the tiling
    (tests, tuning)."""
    if out_dtype is None:
        out_dtype = q.dtype
    _check_inputs(q, k, cos, sin, round_dtype, (out_dtype, out_dtype))
    qo, ko = _launch((q, k), (out_dtype, out_dtype), cos, sin, interleaved, round_dtype, False,
                     block_h, rows_per_program, num_warps)
    return qo, ko


def rope_backward(
    dq_out: Optional[torch.Tensor],
    dk_out: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    round_dtype: Optional[torch.dtype],
    dq_dtype: torch.dtype,
    dk_dtype: torch.dtype,
    block_h: Optional[int] = None,
    rows_per_program: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the transposed rotation on the output gradients; returns (dq in dq_dtype, dk in
    dk_dtype), None for a gradient passed as None."""
    present = [t for t in (dq_out, dk_out) if t is not None]
    if not present:
        return None, None
    a = dq_out if dq_out is not None else present[0]
    b = dk_out if dk_out is not None else present[0]
    _check_inputs(a, b, cos, sin, round_dtype, (dq_dtype, dk_dtype), names=("dq_out", "dk_out"))
    return _launch((dq_out, dk_out), (dq_dtype, dk_dtype), cos, sin, interleaved, round_dtype, True,
                   block_h, rows_per_program, num_warps)


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::rope", mutates_args=())
def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
    negate_sin: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k; see ``rope_reference`` for the exact semantics.
    ``negate_sin``: rotate by -sin (a rotate-half written ``cat(x2, -x1)``); the sign flip is exact."""
    return rope_forward(q, k, cos, sin.neg() if negate_sin else sin, interleaved, round_dtype, out_dtype)


@rope.register_fake
def _rope_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
    negate_sin: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, cos, sin, round_dtype, (out_dtype, out_dtype))
    return _out_like(q, out_dtype), _out_like(k, out_dtype)


# Gradients not asked for come back as empty tensors (custom ops return Tensors only).
@torch.library.custom_op("fastft::rope_backward", mutates_args=())
def _rope_backward_op(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    round_dtype: Optional[torch.dtype],
    dq_dtype: torch.dtype,
    dk_dtype: torch.dtype,
    compute_dq: bool,
    compute_dk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk = rope_backward(dq_out if compute_dq else None, dk_out if compute_dk else None, cos, sin,
                           interleaved, round_dtype, dq_dtype, dk_dtype)
    return (dq if dq is not None else dq_out.new_empty(0, dtype=dq_dtype)), (
        dk if dk is not None else dk_out.new_empty(0, dtype=dk_dtype))


@_rope_backward_op.register_fake
def _rope_backward_fake(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    round_dtype: Optional[torch.dtype],
    dq_dtype: torch.dtype,
    dk_dtype: torch.dtype,
    compute_dq: bool,
    compute_dk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if compute_dq or compute_dk:
        _check_inputs(dq_out, dk_out, cos, sin, round_dtype, (dq_dtype, dk_dtype), names=("dq_out", "dk_out"))
    dq = _out_like(dq_out, dq_dtype) if compute_dq else dq_out.new_empty(0, dtype=dq_dtype)
    dk = _out_like(dk_out, dk_dtype) if compute_dk else dk_out.new_empty(0, dtype=dk_dtype)
    return dq, dk


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, interleaved, round_dtype, out_dtype, negate_sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.negate_sin = negate_sin
    ctx.interleaved = interleaved
    ctx.round_dtype = round_dtype
    ctx.q_meta = (q.shape, q.dtype)
    ctx.k_meta = (k.shape, k.dtype)
    ctx.out_dtype = out_dtype


def _backward(ctx, dq_out: Optional[torch.Tensor], dk_out: Optional[torch.Tensor]):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError(
            "fastft::rope: no gradient for cos/sin is implemented, but cos or sin requires grad; "
            "detach them (they are usually computed from fixed frequencies) or do not use this op"
        )
    cos, sin = ctx.saved_tensors
    if ctx.negate_sin:
        sin = sin.neg()
    need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # An unused output may come back without a gradient: it stands for zeros.
    if dq_out is None:
        dq_out = cos.new_zeros(ctx.q_meta[0], dtype=ctx.out_dtype)
    if dk_out is None:
        dk_out = cos.new_zeros(ctx.k_meta[0], dtype=ctx.out_dtype)
    dq, dk = None, None
    if need_dq or need_dk:
        dq, dk = torch.ops.fastft.rope_backward(
            dq_out, dk_out, cos, sin, ctx.interleaved, ctx.round_dtype, ctx.q_meta[1], ctx.k_meta[1],
            need_dq, need_dk,
        )
    return (dq if need_dq else None), (dk if need_dk else None), None, None, None, None, None, None


rope.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The same rotation written with complex numbers: x viewed as pairs (re, im) times freqs
# --------------------------------------------------------------------------------------------
def polar_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for the interleaved layout from complex ``freqs`` [..., R/2]: each value
    repeated for the two columns of the pair it rotates. A multiplication by r*e^{i t} is the
    rotation by t scaled by r, so cos = Re(freqs) and sin = Im(freqs)."""
    parts = torch.view_as_real(freqs)
    return parts[..., 0].repeat_interleave(2, dim=-1), parts[..., 1].repeat_interleave(2, dim=-1)


def rope_polar_reference(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor,
                         out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager complex-number rotary embedding: x.float() as complex pairs, times freqs, back to real."""
    def turn(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs).flatten(-2).to(out_dtype or x.dtype)
    return turn(q), turn(k)


def _check_polar(freqs: torch.Tensor, q: torch.Tensor) -> None:
    if freqs.dtype != torch.complex64:
        raise ValueError(f"fastft::rope_polar: freqs must be complex64, got {freqs.dtype}")
    if freqs.shape[-1] * 2 != q.shape[-1]:
        raise ValueError(f"fastft::rope_polar: freqs has {freqs.shape[-1]} pairs, q's last dim is {q.shape[-1]}")


@torch.library.custom_op("fastft::rope_polar", mutates_args=())
def rope_polar(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor,
               out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding given as complex ``freqs``; see ``rope_polar_reference``. The rotation runs
    in fp32 (the complex form upcasts), through the interleaved kernel."""
    _check_polar(freqs, q)
    cos, sin = polar_cos_sin(freqs)
    return rope_forward(q, k, cos, sin, True, None, out_dtype)


@rope_polar.register_fake
def _rope_polar_fake(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _check_polar(freqs, q)
    return _out_like(q, out_dtype), _out_like(k, out_dtype)


def _polar_setup_context(ctx, inputs, output) -> None:
    q, k, freqs, out_dtype = inputs
    ctx.save_for_backward(freqs)  # cos/sin are recomputed: R/2 complex values per position
    ctx.q_meta, ctx.k_meta, ctx.out_dtype = (q.shape, q.dtype), (k.shape, k.dtype), out_dtype


def _polar_backward(ctx, dq_out: Optional[torch.Tensor], dk_out: Optional[torch.Tensor]):
    if ctx.needs_input_grad[2]:
        raise RuntimeError("fastft::rope_polar: no gradient for freqs is implemented, but freqs "
                           "requires grad; detach it or do not use this op")
    (freqs,) = ctx.saved_tensors
    need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dq or need_dk):
        return None, None, None, None
    cos, sin = polar_cos_sin(freqs)
    if dq_out is None:
        dq_out = cos.new_zeros(ctx.q_meta[0], dtype=ctx.out_dtype)
    if dk_out is None:
        dk_out = cos.new_zeros(ctx.k_meta[0], dtype=ctx.out_dtype)
    dq, dk = torch.ops.fastft.rope_backward(dq_out, dk_out, cos, sin, True, None, ctx.q_meta[1],
                                            ctx.k_meta[1], need_dq, need_dk)
    return (dq if need_dq else None), (dk if need_dk else None), None, None


rope_polar.register_autograd(_polar_backward, setup_context=_polar_setup_context)
