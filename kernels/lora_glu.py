"""The gated unit of a LoRA MLP with the adapters' low-rank corrections folded in (Triton).

In an MLP whose gate, up and down projections carry LoRA adapters,

    g = G + s_g (X A_g^T) B_g^T      u = U + s_u (X A_u^T) B_u^T      h = act(g) * u

with G = X W_g^T and U = X W_u^T the frozen bases' outputs, and in the backward

    dh = dH + (s_d dY B_d) A_d       dH = dY W_d

Computed one GEMM at a time, each rank-r correction reads and writes a full [rows, width]
tensor once more (``addmm_`` into G, U and dH: three times 2 x 128 MiB per layer of a
Llama-3.2-1B step). Here the kernels that read G and U (and dH) anyway add the corrections on
the fly: for a [rows, columns] tile, the product of the [rows, r] and [r, columns] slices is one
``tl.dot`` of depth r, small next to the tile's loads.

Numerics are those of the unfused ops: each corrected value is ``base + s * product`` with the
product accumulated in fp32 and the sum rounded once to the base's dtype (what ``addmm_`` with
beta = 1 does), then the GLU math of ``kernels/glu.py`` with its roundings.

These launchers serve the ``fastft::lora_glu_mlp`` ops (``kernels/lora.py``), whose custom ops
carry the backward; they are not ops of their own.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .glu import _act_fwd, _act_fwd_bwd, _check_activation, _round_tl, _tile, glu_reference
from .launch import check_dtype
from .rounding import TL_DTYPE, round_fp32, round_loaded

__all__ = ["lora_glu_backward", "lora_glu_forward", "lora_glu_reference"]


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against): the unfused ops
# --------------------------------------------------------------------------------------------
def lora_glu_reference(gate_base, up_base, xa_gate, xa_up, b_gate, b_up, scale_gate: float, scale_up: float,
                       activation: str, round_dtype: Optional[torch.dtype] = None,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """act(G + s_g xa_g B_g^T) * (U + s_u xa_u B_u^T), each correction added as ``addmm`` adds it
    (differentiable in the corrected gate and up)."""
    g = torch.addmm(gate_base, xa_gate, b_gate.t(), alpha=scale_gate)
    u = torch.addmm(up_base, xa_up, b_up.t(), alpha=scale_up)
    return glu_reference(g, u, activation, round_dtype, out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _corrected(base_ptr, stride_base, lhs_ptr, stride_lhs, rhs_ptr, stride_rhs_k, stride_rhs_n, R, scale,
               rows, cols, mask, row_ok, col_ok, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """base + scale * lhs[rows, :R] @ rhs[:R, cols] on one tile, rounded once to base's dtype
    (returned as fp32)."""
    base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        k_ok = ks < R
        lhs = tl.load(lhs_ptr + rows[:, None] * stride_lhs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                      other=0.0)
        rhs = tl.load(rhs_ptr + ks[:, None] * stride_rhs_k + cols[None, :] * stride_rhs_n,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot cannot take 16-bit floats; their fp32 products are exact
            lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION)
    return round_fp32(base + scale * acc, base_ptr.dtype.element_ty)


@triton.jit
def lora_glu_fwd_kernel(
    g_ptr, u_ptr, xg_ptr, xu_ptr, bg_ptr, bu_ptr, out_ptr,
    n_rows, N, RG, RU,
    stride_g, stride_u, stride_xg, stride_xu, stride_o,
    scale_g, scale_u,
    ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < N
    # B is [N, r]: its [r, columns] slice has strides (1, r).
    g = _corrected(g_ptr, stride_g, xg_ptr, stride_xg, bg_ptr, 1, RG, RG, scale_g, rows, cols, mask, row_ok, col_ok,
                   BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    u = _corrected(u_ptr, stride_u, xu_ptr, stride_xu, bu_ptr, 1, RU, RU, scale_u, rows, cols, mask, row_ok, col_ok,
                   BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    g = round_loaded(g, g_ptr.dtype.element_ty, ROUND_DTYPE)
    u = round_loaded(u, u_ptr.dtype.element_ty, ROUND_DTYPE)
    a = round_fp32(_act_fwd(g, ACT), ROUND_DTYPE)
    out = round_fp32(a * u, ROUND_DTYPE)
    out = round_loaded(out, ROUND_DTYPE, OUT_DTYPE).to(OUT_DTYPE)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=mask)


@triton.jit
def lora_glu_bwd_kernel(
    dh_ptr, dyb_ptr, ad_ptr, g_ptr, u_ptr, xg_ptr, xu_ptr, bg_ptr, bu_ptr, dg_ptr, du_ptr,
    n_rows, N, RD, RG, RU,
    stride_dh, stride_dyb, stride_g, stride_u, stride_xg, stride_xu, stride_dg, stride_du,
    scale_g, scale_u,
    ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < N
    # dh = dH + (s_d dY B_d) A_d: the scaled [rows, r] product comes in; A_d is [r, N], strides (N, 1).
    dout = _corrected(dh_ptr, stride_dh, dyb_ptr, stride_dyb, ad_ptr, N, 1, RD, 1.0, rows, cols, mask, row_ok,
                      col_ok, BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    g = _corrected(g_ptr, stride_g, xg_ptr, stride_xg, bg_ptr, 1, RG, RG, scale_g, rows, cols, mask, row_ok, col_ok,
                   BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    u = _corrected(u_ptr, stride_u, xu_ptr, stride_xu, bu_ptr, 1, RU, RU, scale_u, rows, cols, mask, row_ok, col_ok,
                   BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    # As in glu_bwd_kernel: the gradient reaching the rounded product is cast to the compute dtype.
    dout = round_loaded(dout, dh_ptr.dtype.element_ty, ROUND_DTYPE)
    g = round_loaded(g, g_ptr.dtype.element_ty, ROUND_DTYPE)
    u = round_loaded(u, u_ptr.dtype.element_ty, ROUND_DTYPE)
    a, da_dg = _act_fwd_bwd(g, ACT)
    dup = round_fp32(dout * round_fp32(a, ROUND_DTYPE), ROUND_DTYPE)
    dup = round_loaded(dup, ROUND_DTYPE, du_ptr.dtype.element_ty).to(du_ptr.dtype.element_ty)
    tl.store(du_ptr + rows[:, None] * stride_du + cols[None, :], dup, mask=mask)
    da = round_fp32(dout * u, ROUND_DTYPE)
    dgate = round_fp32(da * da_dg, ROUND_DTYPE)
    dgate = round_loaded(dgate, ROUND_DTYPE, dg_ptr.dtype.element_ty).to(dg_ptr.dtype.element_ty)
    tl.store(dg_ptr + rows[:, None] * stride_dg + cols[None, :], dgate, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_OP = "fastft::lora_glu_mlp"


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: Optional[torch.dtype] = None) -> None:
    check_dtype(_OP, name, t.dtype)
    if tuple(t.shape) != shape or t.stride(-1) != 1:
        raise ValueError(f"{_OP}: {name} must be {list(shape)} with unit column stride, "
                         f"got {list(t.shape)} with strides {list(t.stride())}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{_OP}: {name} is {t.dtype} but should be {dtype}")


def _check_corrections(gate_base, up_base, xa_gate, xa_up, b_gate, b_up) -> tuple[int, int, int, int]:
    rows, width = gate_base.shape
    rank_g, rank_u = xa_gate.shape[-1], xa_up.shape[-1]
    _check_2d("gate", gate_base, (rows, width))
    _check_2d("up", up_base, (rows, width), gate_base.dtype)
    _check_2d("x A_gate^T", xa_gate, (rows, rank_g), gate_base.dtype)
    _check_2d("x A_up^T", xa_up, (rows, rank_u), gate_base.dtype)
    _check_2d("B_gate", b_gate, (width, rank_g), gate_base.dtype)
    _check_2d("B_up", b_up, (width, rank_u), gate_base.dtype)
    return rows, width, rank_g, rank_u


def _config(rank: int, on_gpu: bool) -> dict:
    # [64, 128] tiles: the dots need 16 rows, columns and depth at least; on the GPU 8 warps keep
    # enough loads in flight. The interpreter runs one program after another: fewer, larger tiles.
    block_r = max(16, min(triton.next_power_of_2(max(rank, 1)), 64))
    if on_gpu:
        return dict(BLOCK_ROWS=64, BLOCK_N=128, BLOCK_R=block_r, UPCAST=False, num_warps=8)
    return dict(BLOCK_ROWS=64, BLOCK_N=256, BLOCK_R=block_r, UPCAST=True)


def _precision(dtype: torch.dtype) -> str:
    # fp32 tensors get fp32 products, as cuBLAS gives them by default (no TF32); for 16-bit
    # operands the setting is moot (the default is named).
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_glu_forward(gate_base: torch.Tensor, up_base: torch.Tensor, xa_gate: torch.Tensor, xa_up: torch.Tensor,
                     b_gate: torch.Tensor, b_up: torch.Tensor, scale_gate: float, scale_up: float, activation: str,
                     round_dtype: Optional[torch.dtype], out_dtype: torch.dtype) -> torch.Tensor:
    """h [rows, width] in ``out_dtype`` from the bases' outputs G, U [rows, width], x A^T [rows, r]
    and the B matrices [width, r] (in G's dtype); see the module docstring."""
    act = _check_activation(activation)
    check_dtype(_OP, "out_dtype", out_dtype)
    check_dtype(_OP, "round_dtype", round_dtype, allow_none=True)
    rows, width, rank_g, rank_u = _check_corrections(gate_base, up_base, xa_gate, xa_up, b_gate, b_up)
    out = torch.empty((rows, width), dtype=out_dtype, device=gate_base.device)
    if out.numel() == 0:
        return out
    cfg = _config(max(rank_g, rank_u), gate_base.is_cuda)
    grid = (triton.cdiv(rows, cfg["BLOCK_ROWS"]) * triton.cdiv(width, cfg["BLOCK_N"]),)
    lora_glu_fwd_kernel[grid](
        gate_base, up_base, xa_gate, xa_up, b_gate, b_up, out, rows, width, rank_g, rank_u,
        gate_base.stride(0), up_base.stride(0), xa_gate.stride(0), xa_up.stride(0), out.stride(0),
        float(scale_gate), float(scale_up),
        ACT=act, ROUND_DTYPE=_round_tl(round_dtype), OUT_DTYPE=TL_DTYPE[out_dtype],
        PRECISION=_precision(gate_base.dtype), **cfg)
    return out


def lora_glu_backward(dh_base: torch.Tensor, dyb_down: torch.Tensor, a_down: torch.Tensor,
                      gate_base: torch.Tensor, up_base: torch.Tensor, xa_gate: torch.Tensor, xa_up: torch.Tensor,
                      b_gate: torch.Tensor, b_up: torch.Tensor, scale_gate: float, scale_up: float,
                      activation: str, round_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up), each [rows, width] in G's dtype, from dH = dY W_down [rows, width], the
    down adapter's scaled s_d dY B_down [rows, r_d] and A_down [r_d, width]."""
    act = _check_activation(activation)
    check_dtype(_OP, "round_dtype", round_dtype, allow_none=True)
    rows, width, rank_g, rank_u = _check_corrections(gate_base, up_base, xa_gate, xa_up, b_gate, b_up)
    rank_d = dyb_down.shape[-1]
    _check_2d("dh", dh_base, (rows, width), gate_base.dtype)
    _check_2d("dY B_down", dyb_down, (rows, rank_d), gate_base.dtype)
    _check_2d("A_down", a_down, (rank_d, width), gate_base.dtype)
    dgate, dup = torch.empty_like(gate_base), torch.empty_like(up_base)
    if dgate.numel() == 0:
        return dgate, dup
    cfg = _config(max(rank_g, rank_u, rank_d), gate_base.is_cuda)
    grid = (triton.cdiv(rows, cfg["BLOCK_ROWS"]) * triton.cdiv(width, cfg["BLOCK_N"]),)
    lora_glu_bwd_kernel[grid](
        dh_base, dyb_down, a_down, gate_base, up_base, xa_gate, xa_up, b_gate, b_up, dgate, dup,
        rows, width, rank_d, rank_g, rank_u,
        dh_base.stride(0), dyb_down.stride(0), gate_base.stride(0), up_base.stride(0), xa_gate.stride(0),
        xa_up.stride(0), dgate.stride(0), dup.stride(0), float(scale_gate), float(scale_up),
        ACT=act, ROUND_DTYPE=_round_tl(round_dtype), PRECISION=_precision(gate_base.dtype), **cfg)
    return dgate, dup
