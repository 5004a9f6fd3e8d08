"""Elementwise activation as a Triton kernel, registered as the custom op ``fastft::activation``:
the middle of an ungated MLP (up-linear -> activation -> down-linear).

    out = round_to(act(round_to(x, R)), R)  -> out_dtype

with R the optional ``round_dtype`` (no rounding when None) and ``act`` one of the activations of
``kernels/glu.py`` (silu, gelu_erf, gelu_tanh), whose Triton math, name table and reference this
module shares. All arithmetic is fp32: R reproduces an eager activation computed in the 16-bit
dtype R (one rounding of its result); R = None is the fp32 activation of the upcast input.

The forward stores nothing: the backward reads x and recomputes act'(x). With the roundings
autograd applies to the eager computation (identity when R is None):

    dx = R(R(dout) * act'(R(x)))  -> x.dtype

(eager's activation backward in a 16-bit dtype also computes in fp32 and rounds once). The
backward is a custom op of its own (``fastft::activation_backward``) so AOT autograd traces it
through its fake impl.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .glu import (
    ACTIVATIONS,
    act_fwd,
    act_fwd_bwd,
    act_reference,
    as_rows,
    check_activation,
    elementwise_config,
    elementwise_grid,
    elementwise_tile,
    round_tl,
)
from .launch import SUPPORTED_DTYPES, check_dtype
from .rounding import TL_DTYPE, round_fp32, round_loaded

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "activation",
    "activation_backward",
    "activation_forward",
    "activation_reference",
]

_OP = "fastft::activation"


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------
def activation_reference(
    x: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Plain PyTorch ``act(x)`` with the exact rounding the kernels reproduce (differentiable).

    With ``round_dtype`` the activation is the eager one in that dtype; without, it is fp32 on
    the upcast input.
    """
    if out_dtype is None:
        out_dtype = x.dtype
    cdt = torch.float32 if round_dtype is None else round_dtype
    return act_reference(x.to(cdt), activation).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def activation_fwd_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    N,
    stride_x,
    stride_o,
    ACT: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,  # tl.float32 means "no extra rounding"
    OUT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # The input is cast to the compute dtype first, as the eager computation does.
    x = round_loaded(x, x_ptr.dtype.element_ty, ROUND_DTYPE)
    a = round_fp32(act_fwd(x, ACT), ROUND_DTYPE)
    out = round_loaded(a, ROUND_DTYPE, OUT_DTYPE).to(OUT_DTYPE)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=mask)


@triton.jit
def activation_bwd_kernel(
    dout_ptr,
    x_ptr,
    dx_ptr,
    n_rows,
    N,
    stride_do,
    stride_x,
    stride_dx,
    ACT: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    DX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    r = rows[:, None]
    c = cols[None, :]
    dout = tl.load(dout_ptr + r * stride_do + c, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    # The gradient reaching the rounded activation is cast to the compute dtype by autograd.
    dout = round_loaded(dout, dout_ptr.dtype.element_ty, ROUND_DTYPE)
    x = round_loaded(x, x_ptr.dtype.element_ty, ROUND_DTYPE)
    _, da_dx = act_fwd_bwd(x, ACT)
    dx = round_fp32(dout * da_dx, ROUND_DTYPE)
    dx = round_loaded(dx, ROUND_DTYPE, DX_DTYPE).to(DX_DTYPE)
    tl.store(dx_ptr + r * stride_dx + c, dx, mask=mask)


# --------------------------------------------------------------------------------------------
# Host-side validation and launchers
# --------------------------------------------------------------------------------------------
_check_dtype = functools.partial(check_dtype, _OP)


def _check_inputs(x: torch.Tensor, activation: str, round_dtype: Optional[torch.dtype],
                  out_dtype: torch.dtype) -> int:
    act = check_activation(activation, _OP)
    _check_dtype("x", x.dtype)
    _check_dtype("round_dtype", round_dtype, allow_none=True)
    _check_dtype("out_dtype", out_dtype)
    return act


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    # A 0-d tensor is one row of one element (as_rows needs a last dim).
    return as_rows(t.reshape(1) if t.dim() == 0 else t)


def _launch(kernel, tensors: tuple[torch.Tensor, ...], act: int, round_dtype: Optional[torch.dtype],
            dst_constexpr: str, block_rows: Optional[int], block_n: Optional[int]) -> None:
    """``kernel`` over same-shaped, non-empty ``tensors``: its inputs, then its contiguous
    output, whose dtype the kernel takes as ``dst_constexpr``."""
    views = [_as_rows(t) for t in tensors]
    n_rows, n = views[0].shape
    br, bn, num_warps = elementwise_config(views[0].device, n_rows, n, block_rows, block_n, _OP)
    kernel[elementwise_grid(n_rows, n, br, bn)](
        *views, n_rows, n, *(v.stride(0) for v in views),
        ACT=act,
        ROUND_DTYPE=round_tl(round_dtype),
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
        **{dst_constexpr: TL_DTYPE[tensors[-1].dtype]},
    )


def activation_forward(
    x: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns a new contiguous tensor of x's shape in ``out_dtype``."""
    if out_dtype is None:
        out_dtype = x.dtype
    act = _check_inputs(x, activation, round_dtype, out_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel():
        _launch(activation_fwd_kernel, (x, out), act, round_dtype, "OUT_DTYPE", block_rows, block_n)
    return out


def activation_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Launch the backward kernel; returns dx, contiguous, in x.dtype."""
    act = _check_inputs(x, activation, round_dtype, x.dtype)
    _check_dtype("dout", dout.dtype)
    if dout.shape != x.shape:
        raise ValueError(f"{_OP}: dout shape {tuple(dout.shape)} != x shape {tuple(x.shape)}")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel():
        _launch(activation_bwd_kernel, (dout, x, dx), act, round_dtype, "DX_DTYPE", block_rows, block_n)
    return dx


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::activation", mutates_args=())
def activation(
    x: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """act(x) elementwise; see ``activation_reference`` for the semantics."""
    return activation_forward(x, activation, round_dtype, out_dtype)


@activation.register_fake
def _activation_fake(x, activation, round_dtype, out_dtype):
    _check_inputs(x, activation, round_dtype, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("fastft::activation_backward", mutates_args=())
def _activation_backward_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
) -> torch.Tensor:
    return activation_backward(dout, x, activation, round_dtype)


@_activation_backward_op.register_fake
def _activation_backward_fake(dout, x, activation, round_dtype):
    _check_inputs(x, activation, round_dtype, x.dtype)
    return x.new_empty(x.shape)


def _activation_setup_context(ctx, inputs, output) -> None:
    x, activation_name, round_dtype, _out_dtype = inputs
    ctx.save_for_backward(x)
    ctx.activation = activation_name
    ctx.round_dtype = round_dtype


def _activation_autograd_backward(ctx, dout: torch.Tensor):
    (x,) = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.fastft.activation_backward(dout, x, ctx.activation, ctx.round_dtype)
    return dx, None, None, None


activation.register_autograd(_activation_autograd_backward, setup_context=_activation_setup_context)
