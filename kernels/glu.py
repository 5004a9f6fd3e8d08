"""Gated linear unit as Triton kernels, registered as the custom ops ``fastft::glu`` and
``fastft::glu_packed``.

    out = round_to(round_to(act(g), R) * u, R)  -> out_dtype        (g, u first rounded to R)

with R the optional ``round_dtype`` (no rounding when None) and ``act`` one of

    silu       act(g) = g * sigmoid(g)
    gelu_erf   act(g) = 0.5 * g * (1 + erf(g / sqrt(2)))                     = g * Phi(g)
    gelu_tanh  act(g) = 0.5 * g * (1 + tanh(k * (g + c * g^3)))              = g * sigmoid(2 k (g + c g^3))
               k = sqrt(2 / pi), c = 0.044715

All arithmetic is fp32. Rounding to R after the activation and after the product reproduces an
eager computation done in the 16-bit dtype R (``act(gate) * up`` with both ops rounding their
results); R = None is the fp32 computation of upcast inputs.

``fastft::glu`` takes gate and up as two tensors [..., I], which may be strided views (each row
contiguous, any row stride): e.g. the two halves of one projection's output. ``fastft::glu_packed``
takes that projection output [..., 2I] itself (gate = first half, up = second half) and its
backward writes the single gradient [..., 2I] directly, so autograd needs no concatenation.

The forward stores nothing: the backward reads gate and up anyway and recomputes act(g). With
the roundings autograd applies to the eager computation (identity when R is None):

    a = R(act(g));  dup = R(dout * a);  da = R(dout * u);  dgate = R(da * act'(g))

    silu       act'(g) = s * (1 + g * (1 - s)),                s = sigmoid(g)
    gelu_erf   act'(g) = Phi(g) + g * phi(g),                   phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    gelu_tanh  act'(g) = s * (1 + 2 g (1 - s) k (1 + 3 c g^2)), s = sigmoid(2 k (g + c g^3))
               (0.5 (1 + tanh v) = s and 0.5 (1 - tanh^2 v) = 2 s (1 - s) for v = k (g + c g^3))

Both backwards are custom ops of their own (``fastft::glu_backward``,
``fastft::glu_packed_backward``) so AOT autograd traces them through their fake impls.

The activation math (``act_fwd``, ``act_fwd_bwd``, ``act_reference``, ``ACTIVATIONS``) and the
elementwise tiling helpers are public: ``kernels/activation.py`` (the ungated activation) uses them.
"""
from __future__ import annotations

import math
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import (SUPPORTED_DTYPES, cdiv, check_dtype, empty_or, interpreter_block_n, interpreter_block_rows,
                     next_power_of_2)
from .rounding import TL_DTYPE, round_fp32, round_loaded

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "act_fwd",
    "act_fwd_bwd",
    "act_reference",
    "as_rows",
    "check_activation",
    "elementwise_config",
    "elementwise_grid",
    "elementwise_tile",
    "glu",
    "glu_backward",
    "glu_backward_and_output",
    "glu_forward",
    "glu_packed",
    "glu_packed_backward",
    "glu_packed_forward",
    "glu_reference",
    "round_tl",
]

# Name -> the kernels' ACT constexpr.
ACTIVATIONS: dict[str, int] = {"silu": 0, "gelu_erf": 1, "gelu_tanh": 2}

# Constants in the kernels: 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi),
# 0.7978845608028654 = sqrt(2/pi) = k, 0.044715 = c.


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------
def act_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(g)`` by PyTorch's own functions, in g's dtype (each rounds its result once)."""
    if activation == "silu":
        return torch.nn.functional.silu(g)
    if activation == "gelu_erf":
        return torch.nn.functional.gelu(g)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    check_activation(activation)
    raise AssertionError("unreachable")


def glu_reference(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Plain PyTorch ``act(gate) * up`` with the exact rounding the kernels reproduce (differentiable).

    With ``round_dtype`` the computation is the eager one in that dtype (each op rounds its
    result, and autograd rounds each gradient); without, it is fp32 on upcast inputs.
    """
    if out_dtype is None:
        out_dtype = gate.dtype
    cdt = torch.float32 if round_dtype is None else round_dtype
    return (act_reference(gate.to(cdt), activation) * up.to(cdt)).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    """act(g) for fp32 g."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        # 0.5 * (1 + tanh(v)) == sigmoid(2 v): no tanh needed, and no cancellation for g << 0.
        v = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g * tl.sigmoid(2.0 * v)
    return a


@triton.jit
def act_fwd_bwd(g, ACT: tl.constexpr):
    """(act(g), act'(g)) for fp32 g; act(g) exactly as ``act_fwd`` computes it, so that a
    backward that recomputes the forward's output gets the same bits."""
    a = act_fwd(g, ACT)
    if ACT == 0:
        s = tl.sigmoid(g)
        d = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        d = cdf + g * (0.3989422804014327 * tl.exp(-0.5 * g * g))
    else:
        v = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        s = tl.sigmoid(2.0 * v)
        dv = 0.7978845608028654 * (1.0 + 0.134145 * g * g)  # d v / d g, 0.134145 = 3 * 0.044715
        d = s * (1.0 + 2.0 * g * (1.0 - s) * dv)
    return a, d


@triton.jit
def elementwise_tile(n_rows, N, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows (int64), columns and mask of this program's [BLOCK_ROWS, BLOCK_N] tile.

    Column blocks vary fastest over program ids, so neighbouring programs read neighbouring memory.
    """
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid_r = pid // n_col_blocks
    pid_c = pid - pid_r * n_col_blocks
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    # rows * row_stride can exceed 2^31 elements for large activations: index in int64.
    return rows.to(tl.int64), cols, mask


@triton.jit
def glu_tile(g, u, G_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr,
             OUT_DTYPE: tl.constexpr):
    """act(g) * u in OUT_DTYPE of fp32 tiles loaded from G_DTYPE and U_DTYPE, with the roundings
    of the eager computation."""
    # Inputs are cast to the compute dtype first, as the eager computation does.
    g = round_loaded(g, G_DTYPE, ROUND_DTYPE)
    u = round_loaded(u, U_DTYPE, ROUND_DTYPE)
    a = round_fp32(act_fwd(g, ACT), ROUND_DTYPE)
    out = round_fp32(a * u, ROUND_DTYPE)
    return round_loaded(out, ROUND_DTYPE, OUT_DTYPE).to(OUT_DTYPE)


@triton.jit
def glu_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_rows,
    N,
    stride_g,
    stride_u,
    stride_o,
    ACT: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,  # tl.float32 means "no extra rounding"
    OUT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = elementwise_tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = glu_tile(g, u, gate_ptr.dtype.element_ty, up_ptr.dtype.element_ty, ACT, ROUND_DTYPE, OUT_DTYPE)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=mask)


@triton.jit
def glu_bwd_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    h_ptr,
    n_rows,
    N,
    stride_do,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    stride_h,
    ACT: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    DGATE_DTYPE: tl.constexpr,
    DUP_DTYPE: tl.constexpr,
    H_DTYPE: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    NEED_DUP: tl.constexpr,
    NEED_H: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dgate and dup; with NEED_H also the forward's output act(gate) * up, bit for bit as the
    forward kernel wrote it (for a backward that needs it whole, as a GEMM operand)."""
    rows, cols, mask = elementwise_tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    r = rows[:, None]
    c = cols[None, :]
    dout = tl.load(dout_ptr + r * stride_do + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    # The gradient reaching the rounded product is cast to the compute dtype by autograd.
    dout = round_loaded(dout, dout_ptr.dtype.element_ty, ROUND_DTYPE)
    g = round_loaded(g, gate_ptr.dtype.element_ty, ROUND_DTYPE)
    a, da_dg = act_fwd_bwd(g, ACT)
    a = round_fp32(a, ROUND_DTYPE)
    if NEED_DUP:
        dup = round_fp32(dout * a, ROUND_DTYPE)
        dup = round_loaded(dup, ROUND_DTYPE, DUP_DTYPE).to(DUP_DTYPE)
        tl.store(dup_ptr + r * stride_du + c, dup, mask=mask)
    if NEED_DGATE or NEED_H:
        u = tl.load(up_ptr + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
        u = round_loaded(u, up_ptr.dtype.element_ty, ROUND_DTYPE)
        if NEED_DGATE:
            da = round_fp32(dout * u, ROUND_DTYPE)
            dgate = round_fp32(da * da_dg, ROUND_DTYPE)
            dgate = round_loaded(dgate, ROUND_DTYPE, DGATE_DTYPE).to(DGATE_DTYPE)
            tl.store(dgate_ptr + r * stride_dg + c, dgate, mask=mask)
        if NEED_H:  # glu_tile's steps on the values rounded above
            h = round_loaded(round_fp32(a * u, ROUND_DTYPE), ROUND_DTYPE, H_DTYPE).to(H_DTYPE)
            tl.store(h_ptr + r * stride_h + c, h, mask=mask)


# --------------------------------------------------------------------------------------------
# Host-side validation and launchers
# --------------------------------------------------------------------------------------------
def check_activation(activation: str, op: str = "fastft::glu") -> int:
    """The kernels' ACT constexpr for ``activation``; a ValueError naming ``op`` if there is none."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation]


_check_dtype = functools.partial(check_dtype, "fastft::glu")


def _check_inputs(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> int:
    act = check_activation(activation)
    _check_dtype("gate", gate.dtype)
    _check_dtype("up", up.dtype)
    _check_dtype("round_dtype", round_dtype, allow_none=True)
    _check_dtype("out_dtype", out_dtype)
    if gate.dim() == 0:
        raise ValueError("fastft::glu: gate and up must have at least 1 dimension, got 0-d tensors")
    if gate.shape != up.shape:
        raise ValueError(
            f"fastft::glu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}"
        )
    if gate.device != up.device:
        raise ValueError(f"fastft::glu: gate is on {gate.device} but up is on {up.device}")
    return act


def _check_packed(gate_up: torch.Tensor, activation: str, round_dtype, out_dtype) -> int:
    act = check_activation(activation)
    _check_dtype("gate_up", gate_up.dtype)
    _check_dtype("round_dtype", round_dtype, allow_none=True)
    _check_dtype("out_dtype", out_dtype)
    if gate_up.dim() == 0:
        raise ValueError("fastft::glu: gate_up must have at least 1 dimension, got a 0-d tensor")
    if gate_up.shape[-1] % 2:
        raise ValueError(
            f"fastft::glu: the last dim of gate_up must be even (gate and up halves of width I), "
            f"got {gate_up.shape[-1]}"
        )
    return act


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D [rows, N] tensor with unit column stride and any row stride, without a copy
    where a view can do it (the two halves of a packed tensor, a contiguous tensor's slices)."""
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.unsqueeze(0)
    lead = t.shape[:-1]
    n_rows = math.prod(lead)
    # Leading dims merge into one row index when each stride is the next one times its size.
    stride = None
    ok = True
    for size, st in zip(reversed(lead), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if stride is None:
            stride = st
            expect = st * size
        elif st != expect:
            ok = False
            break
        else:
            expect = st * size
    if not ok:
        t = t.contiguous()
        stride = n
    if stride is None:  # all leading dims of size 1
        stride = n
    return t.as_strided((n_rows, n), (stride, 1))


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def elementwise_config(device: torch.device, n_rows: int, n: int, block_rows: Optional[int],
                       block_n: Optional[int], op: str = "fastft::glu") -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps): [1, 2048] tiles for wide rows, several short rows per
    tile otherwise so loads stay wide; 4 warps (16 elements a thread). Off the GPU, the
    interpreter's larger tiles (``kernels/launch.py``) where none is given.

    Picked by an exploratory sweep (not committed; bench/kernels.py is the measurement of
    record) of bf16 [16384, 14336] views of a packed tensor on an H100, tiles 512..8192 wide or
    tall and 4..16 warps, where this shape was fastest for forward and backward alike. A row that
    is not a multiple of 2048 only idles lanes of its last block.
    """
    if block_rows is None:
        block_rows = interpreter_block_rows(device, n_rows, n)
    if block_n is None:
        block_n = interpreter_block_n(device, n)
    if block_n is None:
        block_n = min(next_power_of_2(n), 2048)
    if block_rows is None:
        block_rows = min(max(1, 2048 // block_n), next_power_of_2(max(n_rows, 1)))
    for name, v in (("block_rows", block_rows), ("block_n", block_n)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{op}: {name} must be a power of two, got {v}")
    num_warps = min(max(block_rows * block_n // 512, 4), 16)
    return block_rows, block_n, num_warps


def elementwise_grid(n_rows: int, n: int, br: int, bn: int) -> tuple[int]:
    """One program per [br, bn] tile of [n_rows, n] (the order ``elementwise_tile`` reads)."""
    return (cdiv(n_rows, br) * cdiv(n, bn),)


def round_tl(round_dtype: Optional[torch.dtype]):
    """The kernels' ROUND_DTYPE constexpr: tl.float32 (no extra rounding) for None."""
    return TL_DTYPE[round_dtype] if round_dtype is not None else tl.float32



def _launch_fwd(gate, up, act, round_dtype, out_dtype, out_shape, block_rows=None, block_n=None):
    out = torch.empty(out_shape, dtype=out_dtype, device=gate.device)
    n = gate.shape[-1]
    if out.numel() == 0:
        return out
    g2, u2 = as_rows(gate), as_rows(up)
    n_rows = g2.shape[0]
    br, bn, num_warps = elementwise_config(g2.device, n_rows, n, block_rows, block_n)
    glu_fwd_kernel[elementwise_grid(n_rows, n, br, bn)](
        g2, u2, out, n_rows, n, g2.stride(0), u2.stride(0), n,
        ACT=act,
        ROUND_DTYPE=round_tl(round_dtype),
        OUT_DTYPE=TL_DTYPE[out_dtype],
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
    )
    return out


def _launch_bwd(dout, gate, up, dgate, dup, act, round_dtype, block_rows=None, block_n=None, h=None) -> None:
    """dgate / dup / h: [rows, N] unit-column-stride outputs (or None when not wanted)."""
    n = gate.shape[-1]
    if gate.numel() == 0:
        return
    do2, g2, u2 = as_rows(dout), as_rows(gate), as_rows(up)
    n_rows = g2.shape[0]
    br, bn, num_warps = elementwise_config(g2.device, n_rows, n, block_rows, block_n)
    dg = dgate if dgate is not None else g2  # dummy pointers; never written
    du = dup if dup is not None else g2
    h2 = h if h is not None else g2
    glu_bwd_kernel[elementwise_grid(n_rows, n, br, bn)](
        do2, g2, u2, dg, du, h2, n_rows, n,
        do2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), h2.stride(0),
        ACT=act,
        ROUND_DTYPE=round_tl(round_dtype),
        DGATE_DTYPE=TL_DTYPE[dg.dtype],
        DUP_DTYPE=TL_DTYPE[du.dtype],
        H_DTYPE=TL_DTYPE[h2.dtype],
        NEED_DGATE=dgate is not None,
        NEED_DUP=dup is not None,
        NEED_H=h is not None,
        BLOCK_ROWS=br,
        BLOCK_N=bn,
        num_warps=num_warps,
    )


def glu_forward(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns a new contiguous tensor of gate's shape in ``out_dtype``."""
    if out_dtype is None:
        out_dtype = gate.dtype
    act = _check_inputs(gate, up, activation, round_dtype, out_dtype)
    return _launch_fwd(gate, up, act, round_dtype, out_dtype, gate.shape, block_rows, block_n)


def glu_packed_forward(
    gate_up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Forward of ``glu_packed``: gate_up [..., 2I] -> [..., I]."""
    if out_dtype is None:
        out_dtype = gate_up.dtype
    act = _check_packed(gate_up, activation, round_dtype, out_dtype)
    gate_up = _unit(gate_up)
    i = gate_up.shape[-1] // 2
    return _launch_fwd(gate_up[..., :i], gate_up[..., i:], act, round_dtype, out_dtype,
                       gate_up.shape[:-1] + (i,), block_rows, block_n)


def glu_backward(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    need_dgate: bool = True,
    need_dup: bool = True,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel; returns (dgate in gate.dtype, dup in up.dtype), None where not asked."""
    dgate, dup, _ = _backward(dout, gate, up, activation, round_dtype, need_dgate, need_dup, None,
                              block_rows, block_n)
    return dgate, dup


def glu_backward_and_output(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
    h_over_dout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, h): the backward, and in the same pass the forward's output h (what
    ``glu_forward`` with these arguments returns, bit for bit), for a backward that needs h
    whole and did not keep it: one more write instead of a pass of the forward kernel.

    ``h_over_dout``: h is written over dout (when dout is contiguous and in ``out_dtype``), which
    the caller no longer needs; each element of dout is read before h's is written, by the same
    program. One [rows, N] buffer less at the peak."""
    reuse = h_over_dout and dout.dtype == out_dtype and dout.is_contiguous()
    return _backward(dout, gate, up, activation, round_dtype, True, True, out_dtype, block_rows, block_n,
                     h=dout if reuse else None)


def _backward(dout, gate, up, activation, round_dtype, need_dgate, need_dup, out_dtype, block_rows, block_n,
              h=None):
    """(dgate, dup, h) with None where not asked; h (the forward's output) is wanted when
    ``out_dtype`` is given, and written into ``h`` when that buffer is given."""
    act = _check_inputs(gate, up, activation, round_dtype, out_dtype or gate.dtype)
    _check_dtype("dout", dout.dtype)
    if dout.shape != gate.shape:
        raise ValueError(f"fastft::glu: dout shape {tuple(dout.shape)} != gate shape {tuple(gate.shape)}")
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_dgate else None
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if need_dup else None
    if h is None and out_dtype is not None:
        h = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if need_dgate or need_dup or h is not None:
        _launch_bwd(
            dout, gate, up,
            as_rows(dgate) if need_dgate else None,
            as_rows(dup) if need_dup else None,
            act, round_dtype, block_rows, block_n,
            h=as_rows(h) if h is not None else None,
        )
    return dgate, dup, h


def glu_packed_backward(
    dout: torch.Tensor,
    gate_up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype] = None,
    block_rows: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Backward of ``glu_packed``: one kernel writes both halves of d(gate_up) [..., 2I]."""
    act = _check_packed(gate_up, activation, round_dtype, gate_up.dtype)
    _check_dtype("dout", dout.dtype)
    i = gate_up.shape[-1] // 2
    if dout.shape != gate_up.shape[:-1] + (i,):
        raise ValueError(
            f"fastft::glu: dout shape {tuple(dout.shape)} does not match gate_up shape "
            f"{tuple(gate_up.shape)} (expected [..., I] with 2I = {gate_up.shape[-1]})"
        )
    gate_up = _unit(gate_up)
    d = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if d.numel():
        d2 = as_rows(d)
        _launch_bwd(dout, gate_up[..., :i], gate_up[..., i:], d2[:, :i], d2[:, i:], act, round_dtype,
                    block_rows, block_n)
    return d


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::glu", mutates_args=())
def glu(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """act(gate) * up over same-shaped [..., I] tensors; see ``glu_reference`` for the semantics."""
    return glu_forward(gate, up, activation, round_dtype, out_dtype)


@glu.register_fake
def _glu_fake(gate, up, activation, round_dtype, out_dtype):
    _check_inputs(gate, up, activation, round_dtype, out_dtype)
    return gate.new_empty(gate.shape, dtype=out_dtype)


@torch.library.custom_op("fastft::glu_packed", mutates_args=())
def glu_packed(
    gate_up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """act(gate_up[..., :I]) * gate_up[..., I:]; see ``glu_reference`` for the semantics."""
    return glu_packed_forward(gate_up, activation, round_dtype, out_dtype)


@glu_packed.register_fake
def _glu_packed_fake(gate_up, activation, round_dtype, out_dtype):
    _check_packed(gate_up, activation, round_dtype, out_dtype)
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=out_dtype)


# Gradients that were not asked for come back as empty tensors (custom ops return Tensors only).
@torch.library.custom_op("fastft::glu_backward", mutates_args=())
def _glu_backward_op(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
    need_dgate: bool,
    need_dup: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = glu_backward(dout, gate, up, activation, round_dtype, need_dgate, need_dup)
    return empty_or(dgate, gate), empty_or(dup, up)


@_glu_backward_op.register_fake
def _glu_backward_fake(dout, gate, up, activation, round_dtype, need_dgate, need_dup):
    _check_inputs(gate, up, activation, round_dtype, gate.dtype)
    dgate = gate.new_empty(gate.shape) if need_dgate else gate.new_empty(0)
    dup = up.new_empty(up.shape) if need_dup else up.new_empty(0)
    return dgate, dup


@torch.library.custom_op("fastft::glu_packed_backward", mutates_args=())
def _glu_packed_backward_op(
    dout: torch.Tensor,
    gate_up: torch.Tensor,
    activation: str,
    round_dtype: Optional[torch.dtype],
) -> torch.Tensor:
    return glu_packed_backward(dout, gate_up, activation, round_dtype)


@_glu_packed_backward_op.register_fake
def _glu_packed_backward_fake(dout, gate_up, activation, round_dtype):
    _check_packed(gate_up, activation, round_dtype, gate_up.dtype)
    return gate_up.new_empty(gate_up.shape)


def _glu_setup_context(ctx, inputs, output) -> None:
    gate, up, activation, round_dtype, _out_dtype = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.round_dtype = round_dtype


def _glu_autograd_backward(ctx, dout: torch.Tensor):
    gate, up = ctx.saved_tensors
    need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dgate, dup = None, None
    if need_dgate or need_dup:
        dgate, dup = torch.ops.fastft.glu_backward(
            dout, gate, up, ctx.activation, ctx.round_dtype, need_dgate, need_dup
        )
    return (dgate if need_dgate else None), (dup if need_dup else None), None, None, None


glu.register_autograd(_glu_autograd_backward, setup_context=_glu_setup_context)


def _glu_packed_setup_context(ctx, inputs, output) -> None:
    gate_up, activation, round_dtype, _out_dtype = inputs
    ctx.save_for_backward(gate_up)
    ctx.activation = activation
    ctx.round_dtype = round_dtype


def _glu_packed_autograd_backward(ctx, dout: torch.Tensor):
    (gate_up,) = ctx.saved_tensors
    d = None
    if ctx.needs_input_grad[0]:
        d = torch.ops.fastft.glu_packed_backward(dout, gate_up, ctx.activation, ctx.round_dtype)
    return d, None, None, None


glu_packed.register_autograd(_glu_packed_autograd_backward, setup_context=_glu_packed_setup_context)
