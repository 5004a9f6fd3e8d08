"""LayerNorm as a Triton kernel pair registered as the custom op ``fastft::layer_norm``.

Over the last dim of x, of width N:

    mean = sum(x) / N
    var  = sum((x - mean)^2) / N                         (biased)
    xhat = (x - mean) * rsqrt(var + eps)
    y    = round_to(xhat, norm_dtype) * weight + bias    -> out_dtype

All arithmetic is fp32 and the result is rounded once to ``out_dtype``. weight and bias are
optional, each independently. The optional ``norm_dtype`` rounding of the normalised value before
the affine lets one op reproduce the modules that normalise in fp32, cast back to the activation
dtype and only then apply the affine; with norm_dtype None the op is ``F.layer_norm`` for
fp32/bf16/fp16 inputs (fp32 inside, one rounding at the end).

Backward, with g = d loss / d round_to(xhat, norm_dtype) = round_to(dy * weight, norm_dtype):

    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = sum over rows of dy * round_to(xhat, norm_dtype)
    dbias   = sum over rows of dy

The forward stores neither mean nor rstd: the backward has to read x anyway, and recomputing the
two row statistics from registers costs no memory traffic, while saving them would need extra op
outputs. The backward is hand-written Triton and is itself a custom op
(``fastft::layer_norm_backward``) so that AOT autograd can trace it with fake tensors.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import (SUPPORTED_DTYPES, cdiv, check_block_rows, check_dtype, empty_or, interpreter_block_rows,
                     next_power_of_2, num_partial_programs, row_tile_config)
from .rounding import TL_DTYPE, round_fp32

__all__ = [
    "MAX_N",
    "SUPPORTED_DTYPES",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_forward",
    "layer_norm_reference",
]

# One program holds a whole row in registers; beyond this the row would spill far too much.
MAX_N: int = 65536


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------
def layer_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Plain PyTorch LayerNorm with the exact rounding the kernels reproduce (differentiable)."""
    if out_dtype is None:
        out_dtype = x.dtype
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)  # biased, as normalisation layers use
    y = (xf - mean) * torch.rsqrt(var + eps)
    if norm_dtype is not None:
        y = y.to(norm_dtype)  # rounded before the affine, as some modules do
    if weight is not None:
        y = y.float() * weight.float()  # fp32 product; the one rounding to out_dtype comes last
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def layer_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    n_rows,
    N,
    stride_x,
    stride_y,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM_DTYPE: tl.constexpr,  # tl.float32 means "no extra rounding"
    OUT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A [BLOCK_ROWS, BLOCK_N] tile: several short rows per program keep loads wide for small N.
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride can exceed 2^31 for large activations

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # The row stays in registers, so the variance takes the exact two-pass form (no cancellation
    # as in E[x^2] - mean^2) at no extra memory cost. Masked lanes load 0: they add nothing to
    # the sum, and are zeroed again after centring so they add nothing to the variance either.
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = round_fp32(xc * rstd[:, None], NORM_DTYPE)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    y = round_fp32(y, OUT_DTYPE).to(OUT_DTYPE)
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def layer_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    partial_ptr,
    n_rows,
    N,
    stride_dy,
    stride_x,
    stride_dx,
    stride_partial,
    db_offset,
    eps,
    blocks_per_program,
    HAS_WEIGHT: tl.constexpr,
    NORM_DTYPE: tl.constexpr,
    DX_DTYPE: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program walks a contiguous run of row tiles and keeps its dW / dB partials in
    # registers, so they cost one fp32 row each in a [G, 2N] buffer (dW then dB) instead of
    # atomics or a [rows, N] buffer.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for i in range(0, blocks_per_program):
        rows = (pid * blocks_per_program + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
        if COMPUTE_DX or COMPUTE_DW:  # dB alone does not need x
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
            xhat = xc * rstd[:, None]  # 0 on masked lanes
            if COMPUTE_DW:
                # dW sees the rounded normalised value (it is what multiplied the weight).
                dw_acc += tl.sum(dy * round_fp32(xhat, NORM_DTYPE), axis=0)
            if COMPUTE_DX:
                if HAS_WEIGHT:
                    g = dy * w[None, :]
                else:
                    g = dy
                # As in autograd: the gradient w.r.t. the norm_dtype value is itself a norm_dtype
                # tensor (rounded), then passes the cast back to fp32 unchanged.
                g = round_fp32(g, NORM_DTYPE)  # masked lanes: dy = 0, so g = 0
                mean_g = tl.sum(g, axis=1) / N
                mean_gx = tl.sum(g * xhat, axis=1) / N
                dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
                dx = round_fp32(dx, DX_DTYPE).to(DX_DTYPE)
                tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], dx, mask=mask)

    if COMPUTE_DW:
        tl.store(partial_ptr + pid * stride_partial + cols, dw_acc, mask=col_mask)
    if COMPUTE_DB:
        tl.store(partial_ptr + pid * stride_partial + db_offset + cols, db_acc, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Host-side launchers
# --------------------------------------------------------------------------------------------
_check_dtype = functools.partial(check_dtype, "fastft::layer_norm")


def _check_param(arg: str, p: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if p is None:
        return
    n = x.shape[-1]
    _check_dtype(arg, p.dtype)
    if p.dim() != 1 or p.shape[0] != n:
        raise ValueError(
            f"fastft::layer_norm: {arg} must be 1-D of size N={n} (last dim of x), got shape {tuple(p.shape)}"
        )
    if p.device != x.device:
        raise ValueError(f"fastft::layer_norm: {arg} is on {p.device} but x is on {x.device}")


def _check_inputs(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> None:
    _check_dtype("x", x.dtype)
    _check_dtype("norm_dtype", norm_dtype, allow_none=True)
    _check_dtype("out_dtype", out_dtype)
    if x.dim() == 0:
        raise ValueError("fastft::layer_norm: x must have at least 1 dimension, got a 0-d tensor")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"fastft::layer_norm: last dim of x must be in [1, {MAX_N}], got {n}")
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)


_check_block_rows = functools.partial(check_block_rows, "fastft::layer_norm")


# Launch shapes: the forward's are the RMSNorm kernels'. The backward's come from an exploratory
# H100 sweep (not committed; bench/kernels.py is the measurement of record) of bf16 rows of
# N = 1024 .. 8192: ~8K-element tiles with few warps (many values in flight per thread) beat one
# row of 2-4K per 4-8 warps.
_fwd_config = functools.partial(row_tile_config, "fastft::layer_norm")


def _bwd_config(n_rows: int, n: int, block_rows: Optional[int]) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps) of the backward. Several rows per tile, unless the row is
    padded (N not a power of two), where every extra row repeats the waste."""
    block_n = next_power_of_2(n)
    if block_rows is None:
        if block_n != n:
            block_rows = max(1024 // block_n, 1)
        else:
            tile = 4096 if block_n <= 1024 else (8192 if block_n <= 4096 else 16384)
            block_rows = max(tile // block_n, 1)
        block_rows = min(block_rows, 32, next_power_of_2(n_rows))
    _check_block_rows(block_rows)
    num_warps = 4 if block_n <= 4096 else min(block_n // 512, 32)
    return block_rows, block_n, num_warps


def layer_norm_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns a contiguous tensor of x's shape in ``out_dtype``."""
    if out_dtype is None:
        out_dtype = x.dtype
    _check_inputs(x, weight, bias, norm_dtype, out_dtype)
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if n_rows == 0:
        return y
    w = weight.contiguous() if weight is not None else x2  # dummy pointers when absent
    b = bias.contiguous() if bias is not None else x2
    if block_rows is None:
        block_rows = interpreter_block_rows(x.device, n_rows, n)
    br, bn, num_warps = _fwd_config(n_rows, n, block_rows)
    grid = (cdiv(n_rows, br),)
    layer_norm_fwd_kernel[grid](
        x2, w, b, y, n_rows, n, x2.stride(0), n, float(eps),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        NORM_DTYPE=TL_DTYPE[norm_dtype] if norm_dtype is not None else tl.float32,
        OUT_DTYPE=TL_DTYPE[out_dtype],
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    return y


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype] = None,
    compute_dx: bool = True,
    compute_dw: bool = True,
    compute_db: bool = True,
    block_rows: Optional[int] = None,
    num_programs: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel; returns (dx in x.dtype, dw in weight.dtype, db in bias.dtype),
    None where not asked (or where weight / bias is None). bias is only read for its dtype.

    ``num_programs`` caps the grid (default: 2-4 per SM, 8 off-GPU); each program writes one fp32
    partial row of dW and of dB, and the few partial rows are summed in torch.
    """
    _check_inputs(x, weight, bias, norm_dtype, x.dtype)
    _check_dtype("dy", dy.dtype)
    if dy.shape != x.shape:
        raise ValueError(f"fastft::layer_norm: dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    compute_dw = compute_dw and weight is not None
    compute_db = compute_db and bias is not None
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    dy2 = dy.contiguous().view(-1, n)
    n_rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    if n_rows == 0 or not (compute_dx or compute_dw or compute_db):
        dw = torch.zeros_like(weight) if compute_dw else None
        db = torch.zeros_like(bias) if compute_db else None
        return dx, dw, db

    if block_rows is None:
        block_rows = interpreter_block_rows(x.device, n_rows, n)
    br, bn, num_warps = _bwd_config(n_rows, n, block_rows)
    n_blocks = cdiv(n_rows, br)
    if compute_dw or compute_db:
        g = num_partial_programs(x.device, n_blocks, bn) if num_programs is None else max(1, min(num_programs, n_blocks))
    else:
        # No reduction across rows: one tile per program gives the most parallelism.
        g = n_blocks if num_programs is None else max(1, min(num_programs, n_blocks))
    blocks_per_program = cdiv(n_blocks, g)
    g = cdiv(n_blocks, blocks_per_program)  # drop programs that would get no rows
    # One buffer for both partials, so one reduction kernel sums them.
    n_sums = int(compute_dw) + int(compute_db)
    partials = torch.empty((g, n_sums * n), dtype=torch.float32, device=x.device) if n_sums else x2
    db_offset = n if compute_dw else 0
    w = weight.contiguous() if weight is not None else x2
    dx2 = dx.view(-1, n) if compute_dx else x2  # dummy pointer; never written
    layer_norm_bwd_kernel[(g,)](
        dy2, x2, w, dx2, partials, n_rows, n,
        dy2.stride(0), x2.stride(0), dx2.stride(0), partials.stride(0), db_offset, float(eps), blocks_per_program,
        HAS_WEIGHT=weight is not None,
        NORM_DTYPE=TL_DTYPE[norm_dtype] if norm_dtype is not None else tl.float32,
        DX_DTYPE=TL_DTYPE[x.dtype],
        COMPUTE_DX=compute_dx,
        COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db,
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    dw, db = None, None
    if n_sums:
        sums = partials.sum(0)
        dw = sums[:n].to(weight.dtype) if compute_dw else None
        db = sums[db_offset:].to(bias.dtype) if compute_db else None
        if dw is not None and db is not None and dw.dtype == db.dtype == torch.float32:
            db = db.clone()  # both would be views of sums; op outputs must not alias each other
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """LayerNorm over the last dim of x; see ``layer_norm_reference`` for the exact semantics."""
    return layer_norm_forward(x, weight, bias, eps, norm_dtype, out_dtype)


@layer_norm.register_fake
def _layer_norm_fake(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_inputs(x, weight, bias, norm_dtype, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


# The backward is an op of its own so AOT autograd / torch.compile trace it through its fake impl.
# Outputs that were not asked for come back as empty tensors (custom ops return Tensors only).
@torch.library.custom_op("fastft::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype],
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layer_norm_backward(dy, x, weight, bias, eps, norm_dtype, compute_dx, compute_dw, compute_db)
    return empty_or(dx, x), empty_or(dw, x), empty_or(db, x)


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: Optional[torch.dtype],
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if (compute_dw and weight is not None) else x.new_empty(0)
    db = bias.new_empty(bias.shape) if (compute_db and bias is not None) else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, norm_dtype, _out_dtype = inputs
    # bias is saved only for its dtype (dbias is returned in it); it costs no memory.
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps
    ctx.norm_dtype = norm_dtype


def _backward(ctx, dy: torch.Tensor):
    x, weight, bias = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = None, None, None
    if need_dx or need_dw or need_db:
        dx, dw, db = torch.ops.fastft.layer_norm_backward(
            dy, x, weight, bias, ctx.eps, ctx.norm_dtype, need_dx, need_dw, need_db
        )
    return (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None), None, None, None


layer_norm.register_autograd(_backward, setup_context=_setup_context)
