"""RMSNorm as a Triton kernel pair registered as the custom op ``fastft::rms_norm``.

    y = round_to(x * rsqrt(mean(x^2) + eps), norm_dtype) * (weight + weight_offset)  -> out_dtype

All arithmetic is fp32. The optional ``norm_dtype`` rounding of the normalised value before the
weight multiply lets one op reproduce the exact rounding of the common module variants (normalise
in fp32, cast back to the activation dtype, then multiply; or multiply in fp32 with ``1 + w``).

The forward stores no rstd: the backward has to read x anyway, so recomputing it is free.
The backward is hand-written Triton and is itself a custom op (``fastft::rms_norm_backward``) so
that AOT autograd can trace it with fake tensors.

``fastft::add_rms_norm`` is the same norm of a residual add's sum, ``h = x + residual``, in the
same kernel, which also stores h; the backward's ``grad_add`` adds h's other gradient to dx in
the backward kernel. Both round as the separate add would (patterns/norm_add.py joins them).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import (SUPPORTED_DTYPES, cdiv, check_block_rows, check_dtype, empty_or, interpreter_block_rows,
                     next_power_of_2, num_partial_programs, row_tile_config)
from .rounding import TL_DTYPE, add_rounded, round_fp32

__all__ = [
    "MAX_N",
    "SUPPORTED_DTYPES",
    "add_rms_norm",
    "add_rms_norm_forward",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "rms_norm_reference",
]

# One program holds a whole row in registers; beyond this the row would spill far too much.
MAX_N: int = 65536



# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------
def rms_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float = 0.0,
    norm_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    sum_of_squares: bool = False,
) -> torch.Tensor:
    """Plain PyTorch RMSNorm with the exact rounding the kernels reproduce (differentiable).
    ``sum_of_squares``: the sum of the squares instead of their mean (an L2 normalisation)."""
    if out_dtype is None:
        out_dtype = x.dtype
    xf = x.float()
    squares = xf.pow(2)
    ms = squares.sum(-1, keepdim=True) if sum_of_squares else squares.mean(-1, keepdim=True)
    y = xf * torch.rsqrt(ms + eps)
    if norm_dtype is not None:
        y = y.to(norm_dtype)  # rounded before the weight multiply, as the modules do
    if weight is not None:
        w = weight.float() + weight_offset
        y = y.float() * w  # fp32 product; rounding to a 16-bit out_dtype below matches bf16*bf16
    return y.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    residual_ptr,
    sum_ptr,
    n_rows,
    N,
    stride_x,
    stride_y,
    eps,
    weight_offset,
    HAS_WEIGHT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # normalise x + residual (rounded to X_DTYPE, as the add would) and store it
    X_DTYPE: tl.constexpr,
    NORM_DTYPE: tl.constexpr,  # tl.float32 means "no extra rounding"
    OUT_DTYPE: tl.constexpr,
    SUM_OF_SQUARES: tl.constexpr,  # an L2 normalisation: the sum of the squares, not their mean
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
    if HAS_RESIDUAL:
        # Both addends and the sum are contiguous rows of width N.
        offsets = rows64[:, None] * N + cols[None, :]
        x = round_fp32(x + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32), X_DTYPE)
        tl.store(sum_ptr + offsets, x.to(X_DTYPE), mask=mask)
    # Masked lanes load 0, so they add nothing to the sum; divide by the true width N.
    ms = tl.sum(x * x, axis=1)
    if not SUM_OF_SQUARES:
        ms = ms / N
    r = tl.rsqrt(ms + eps)
    y = round_fp32(x * r[:, None], NORM_DTYPE)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
        y = y * w[None, :]
    y = round_fp32(y, OUT_DTYPE).to(OUT_DTYPE)
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_partial_ptr,
    grad_add_ptr,
    n_rows,
    N,
    stride_dy,
    stride_x,
    stride_dx,
    eps,
    weight_offset,
    blocks_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD_ADD: tl.constexpr,  # dx + grad_add: another gradient of x (a residual's), added after dx's rounding
    NORM_DTYPE: tl.constexpr,
    DX_DTYPE: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    SUM_OF_SQUARES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program walks a contiguous run of row tiles and keeps its dW partial in registers,
    # so dW costs one [G, N] fp32 write instead of an atomic or a [rows, N] buffer.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for i in range(0, blocks_per_program):
        rows = (pid * blocks_per_program + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ms = tl.sum(x * x, axis=1)
        if not SUM_OF_SQUARES:
            ms = ms / N
        r = tl.rsqrt(ms + eps)
        xhat = x * r[:, None]
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
            g = round_fp32(g, NORM_DTYPE)
            # dx = r (g - k xhat sum(g xhat)), k the factor of the sum of squares: 1/N or 1.
            c = tl.sum(g * xhat, axis=1)
            if not SUM_OF_SQUARES:
                c = c / N
            dx = r[:, None] * (g - xhat * c[:, None])
            dx = round_fp32(dx, DX_DTYPE)
            if HAS_GRAD_ADD:
                other = tl.load(grad_add_ptr + rows64[:, None] * N + cols[None, :], mask=mask, other=0.0)
                dx = add_rounded(dx, other.to(tl.float32), DX_DTYPE)
            dx = dx.to(DX_DTYPE)
            tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], dx, mask=mask)

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * N + cols, dw_acc, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Host-side launchers
# --------------------------------------------------------------------------------------------
_check_dtype = functools.partial(check_dtype, "fastft::rms_norm")


def _check_inputs(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> None:
    _check_dtype("x", x.dtype)
    _check_dtype("norm_dtype", norm_dtype, allow_none=True)
    _check_dtype("out_dtype", out_dtype)
    if x.dim() == 0:
        raise ValueError("fastft::rms_norm: x must have at least 1 dimension, got a 0-d tensor")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"fastft::rms_norm: last dim of x must be in [1, {MAX_N}], got {n}")
    if weight is not None:
        _check_dtype("weight", weight.dtype)
        if weight.dim() != 1 or weight.shape[0] != n:
            raise ValueError(
                f"fastft::rms_norm: weight must be 1-D of size N={n} (last dim of x), "
                f"got shape {tuple(weight.shape)}"
            )
        if weight.device != x.device:
            raise ValueError(f"fastft::rms_norm: weight is on {weight.device} but x is on {x.device}")


_check_block_rows = functools.partial(check_block_rows, "fastft::rms_norm")


def _check_like_x(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """A tensor read as rows of x's layout (an addend, a gradient to add) must have x's shape,
    dtype and device: no broadcasting, no type promotion."""
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} {t.dtype} on {t.device} must match "
                         f"x {tuple(x.shape)} {x.dtype} on {x.device}")


# Launch shapes below come from an exploratory H100 sweep (not committed; bench/kernels.py is the
# measurement of record) of bf16 rows of N = 128 .. 16384. Rows whose N is not a multiple of 16
# cannot use vector loads and are slower whatever the shape.
_fwd_config = functools.partial(row_tile_config, "fastft::rms_norm")


def _bwd_config(n_rows: int, n: int, block_rows: Optional[int]) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps) of the backward: it holds ~3x the live values of the
    forward per element, so it wants more warps per row. Two rows per tile help up to 8K wide,
    unless the row is padded (N not a power of two), where a second row doubles the waste."""
    block_n = next_power_of_2(n)
    if block_rows is None:
        if block_n != n:
            block_rows = max(1024 // block_n, 1)
        else:
            block_rows = max(4096 // block_n, 2) if block_n <= 8192 else 1
        block_rows = min(block_rows, 32, next_power_of_2(n_rows))
    _check_block_rows(block_rows)
    num_warps = min(max(block_n // 512, 4), 32)
    return block_rows, block_n, num_warps


def rms_norm_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float = 0.0,
    norm_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    sum_of_squares: bool = False,
) -> torch.Tensor:
    """Launch the forward kernel; returns a contiguous tensor of x's shape in ``out_dtype``."""
    return _forward(x, None, weight, eps, weight_offset, norm_dtype, out_dtype, block_rows, sum_of_squares)[1]


def add_rms_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float = 0.0,
    norm_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    sum_of_squares: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, the RMSNorm of that sum) from one kernel: the sum rounded to x's dtype as
    the add would round it, and normalised as rounded."""
    _check_like_x("fastft::add_rms_norm", "residual", residual, x)
    return _forward(x, residual, weight, eps, weight_offset, norm_dtype, out_dtype, block_rows, sum_of_squares)


def _forward(x, residual, weight, eps, weight_offset, norm_dtype, out_dtype, block_rows, sum_of_squares):
    """(x + residual or None without a residual, the norm); one launch either way."""
    if out_dtype is None:
        out_dtype = x.dtype
    _check_inputs(x, weight, norm_dtype, out_dtype)
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if n_rows == 0:
        return total, y
    w = weight.contiguous() if weight is not None else x2  # dummy pointer when there is no weight
    r2 = residual.contiguous() if residual is not None else x2
    if block_rows is None:
        block_rows = interpreter_block_rows(x.device, n_rows, n)
    br, bn, num_warps = _fwd_config(n_rows, n, block_rows)
    grid = (cdiv(n_rows, br),)
    rms_norm_fwd_kernel[grid](
        x2, w, y, r2, total if total is not None else x2, n_rows, n, x2.stride(0), n, float(eps),
        float(weight_offset),
        HAS_WEIGHT=weight is not None,
        HAS_RESIDUAL=residual is not None,
        X_DTYPE=TL_DTYPE[x.dtype],
        NORM_DTYPE=TL_DTYPE[norm_dtype] if norm_dtype is not None else tl.float32,
        OUT_DTYPE=TL_DTYPE[out_dtype],
        SUM_OF_SQUARES=sum_of_squares,
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    return total, y


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float = 0.0,
    norm_dtype: Optional[torch.dtype] = None,
    compute_dx: bool = True,
    compute_dw: bool = True,
    block_rows: Optional[int] = None,
    num_programs: Optional[int] = None,
    sum_of_squares: bool = False,
    grad_add: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel; returns (dx in x.dtype, dw in weight.dtype), None where not asked.

    ``num_programs`` caps the grid (default: 2-4 per SM, 8 off-GPU); each program writes one fp32
    partial dW row, and the few partial rows are summed in torch. ``grad_add``: another gradient
    of x (x's dtype and shape), added to dx as an add after this backward would add it.
    """
    _check_inputs(x, weight, norm_dtype, x.dtype)
    _check_dtype("dy", dy.dtype)
    if dy.shape != x.shape:
        raise ValueError(f"fastft::rms_norm: dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    if grad_add is not None:
        _check_like_x("fastft::rms_norm", "grad_add", grad_add, x)
        if not compute_dx:
            raise ValueError("fastft::rms_norm: grad_add is added to dx, so it needs compute_dx")
    compute_dw = compute_dw and weight is not None
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    dy2 = dy.contiguous().view(-1, n)
    n_rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    if n_rows == 0 or not (compute_dx or compute_dw):
        dw = torch.zeros_like(weight) if compute_dw else None
        return dx, dw
    add2 = grad_add.contiguous().view(-1, n) if grad_add is not None else x2

    if block_rows is None:
        block_rows = interpreter_block_rows(x.device, n_rows, n)
    br, bn, num_warps = _bwd_config(n_rows, n, block_rows)
    n_blocks = cdiv(n_rows, br)
    if compute_dw:
        g = (num_partial_programs(x.device, n_blocks, bn) if num_programs is None
             else max(1, min(num_programs, n_blocks)))
    else:
        # No reduction across rows: one tile per program gives the most parallelism.
        g = n_blocks if num_programs is None else max(1, min(num_programs, n_blocks))
    blocks_per_program = cdiv(n_blocks, g)
    g = cdiv(n_blocks, blocks_per_program)  # drop programs that would get no rows
    partials = torch.empty((g, n), dtype=torch.float32, device=x.device) if compute_dw else x2
    w = weight.contiguous() if weight is not None else x2
    dx2 = dx.view(-1, n) if compute_dx else x2  # dummy pointer; never written
    rms_norm_bwd_kernel[(g,)](
        dy2, x2, w, dx2, partials, add2, n_rows, n, dy2.stride(0), x2.stride(0), dx2.stride(0),
        float(eps), float(weight_offset), blocks_per_program,
        HAS_WEIGHT=weight is not None,
        HAS_GRAD_ADD=grad_add is not None,
        NORM_DTYPE=TL_DTYPE[norm_dtype] if norm_dtype is not None else tl.float32,
        DX_DTYPE=TL_DTYPE[x.dtype],
        COMPUTE_DX=compute_dx,
        COMPUTE_DW=compute_dw,
        SUM_OF_SQUARES=sum_of_squares,
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    dw = partials.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
    sum_of_squares: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dim of x; see ``rms_norm_reference`` for the exact semantics."""
    return rms_norm_forward(x, weight, eps, weight_offset, norm_dtype, out_dtype, sum_of_squares=sum_of_squares)


@rms_norm.register_fake
def _rms_norm_fake(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
    sum_of_squares: bool = False,
) -> torch.Tensor:
    _check_inputs(x, weight, norm_dtype, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


# The backward is an op of its own so AOT autograd / torch.compile trace it through its fake impl.
# Outputs that were not asked for come back as empty tensors (custom ops return Tensors only).
@torch.library.custom_op("fastft::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    norm_dtype: Optional[torch.dtype],
    compute_dx: bool,
    compute_dw: bool,
    sum_of_squares: bool = False,
    grad_add: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = rms_norm_backward(dy, x, weight, eps, weight_offset, norm_dtype, compute_dx, compute_dw,
                               sum_of_squares=sum_of_squares, grad_add=grad_add)
    return empty_or(dx, x), empty_or(dw, x)


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    norm_dtype: Optional[torch.dtype],
    compute_dx: bool,
    compute_dw: bool,
    sum_of_squares: bool = False,
    grad_add: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if (compute_dw and weight is not None) else x.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps, weight_offset, norm_dtype, _out_dtype, sum_of_squares = inputs
    ctx.save_for_backward(x, weight)
    ctx.sum_of_squares = sum_of_squares
    ctx.eps = eps
    ctx.weight_offset = weight_offset
    ctx.norm_dtype = norm_dtype


def _backward(ctx, dy: torch.Tensor):
    x, weight = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = None, None
    if need_dx or need_dw:
        dx, dw = torch.ops.fastft.rms_norm_backward(
            dy, x, weight, ctx.eps, ctx.weight_offset, ctx.norm_dtype, need_dx, need_dw, ctx.sum_of_squares
        )
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


# fastft::add_rms_norm: a residual add and the RMSNorm that reads its sum, one kernel each way.
# Its backward adds the sum's other gradient (dh, from the sum's other readers) into dx in the
# norm's backward kernel, where an add after the backward would read and write dx again.
@torch.library.custom_op("fastft::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    norm_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
    sum_of_squares: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual in x's dtype, y = the RMSNorm of h as ``fastft::rms_norm`` gives it."""
    return add_rms_norm_forward(x, residual, weight, eps, weight_offset, norm_dtype, out_dtype,
                                sum_of_squares=sum_of_squares)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps, weight_offset, norm_dtype, out_dtype, sum_of_squares=False):
    _check_inputs(x, weight, norm_dtype, out_dtype)
    _check_like_x("fastft::add_rms_norm", "residual", residual, x)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=out_dtype)


def _add_setup_context(ctx, inputs, output) -> None:
    _x, _residual, weight, eps, weight_offset, norm_dtype, _out_dtype, sum_of_squares = inputs
    ctx.save_for_backward(output[0], weight)  # the sum: what the norm read
    ctx.eps, ctx.weight_offset, ctx.norm_dtype, ctx.sum_of_squares = eps, weight_offset, norm_dtype, sum_of_squares


def _add_backward(ctx, dh: Optional[torch.Tensor], dy: Optional[torch.Tensor]):
    h, weight = ctx.saved_tensors
    need_sum = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    need_dw = weight is not None and ctx.needs_input_grad[2]
    dsum, dw = dh, None
    if dy is not None and (need_sum or need_dw):
        grad_add = dh.to(h.dtype).contiguous() if (dh is not None and need_sum) else None
        dsum, dw = torch.ops.fastft.rms_norm_backward(dy, h, weight, ctx.eps, ctx.weight_offset, ctx.norm_dtype,
                                                      need_sum, need_dw, ctx.sum_of_squares, grad_add)
    dsum = dsum if need_sum else None
    return (dsum if ctx.needs_input_grad[0] else None, dsum if ctx.needs_input_grad[1] else None,
            dw if need_dw else None, None, None, None, None, None)


add_rms_norm.register_autograd(_add_backward, setup_context=_add_setup_context)
