"""The gated unit of a LoRA MLP with the gate and up adapters' corrections folded in (Triton).

In an MLP whose gate and up projections carry LoRA adapters,

    g = G + s_g (X A_g^T) B_g^T      u = U + s_u (X A_u^T) B_u^T      h = act(g) * u

with G = X W_g^T and U = X W_u^T the frozen bases' outputs. Computed one GEMM at a time, each
rank-r correction reads and writes a full [rows, width] tensor once more (``addmm_`` into G and
U: twice 2 x 128 MiB per layer at 8,192 tokens and width 8,192). Here the GLU kernel, which reads G and U
anyway, adds the corrections on the fly (for a [rows, columns] tile, the product of the
[rows, r] and [r, columns] slices is one ``tl.dot`` of depth r, small next to the tile's loads),
writes the corrected g and u back in place (the backward needs them) and writes h.

Numerics are those of the unfused ops: each corrected value is ``base + s * product`` with the
product accumulated in fp32 and the sum rounded once to the base's dtype (what ``addmm_`` with
beta = 1 does), then the GLU math of ``kernels/glu.py`` with its roundings.

The launcher serves ``fastft::lora_glu_mlp`` (``kernels/lora.py``), whose custom op carries the
backward (with the plain GLU kernels over the corrected g and u); it is not an op of its own.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .glu import check_activation, elementwise_tile, glu_reference, glu_tile, round_tl
from .launch import cdiv, check_dtype, dot_precision, next_power_of_2
from .rounding import TL_DTYPE, round_fp32

__all__ = ["lora_glu_forward", "lora_glu_reference"]


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against): the unfused ops
# --------------------------------------------------------------------------------------------
def lora_glu_reference(gate_base, up_base, xa_gate, xa_up, b_gate, b_up, scale_gate: float, scale_up: float,
                       activation: str, round_dtype: Optional[torch.dtype] = None,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """act(G + s_g xa_g B_g^T) * (U + s_u xa_u B_u^T), each correction added as ``addmm`` adds it;
    G and U are left as they are."""
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
    rows, cols, mask = elementwise_tile(n_rows, N, BLOCK_ROWS, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < N
    # B is [N, r]: its [r, columns] slice has strides (1, r).
    g = _corrected(g_ptr, stride_g, xg_ptr, stride_xg, bg_ptr, 1, RG, RG, scale_g, rows, cols, mask, row_ok, col_ok,
                   BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    u = _corrected(u_ptr, stride_u, xu_ptr, stride_xu, bu_ptr, 1, RU, RU, scale_u, rows, cols, mask, row_ok, col_ok,
                   BLOCK_ROWS, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
    # The corrected values (exact in the bases' dtype) go back in place: the backward reads them.
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + rows[:, None] * stride_u + cols[None, :], u.to(u_ptr.dtype.element_ty), mask=mask)
    out = glu_tile(g, u, g_ptr.dtype.element_ty, u_ptr.dtype.element_ty, ACT, ROUND_DTYPE, OUT_DTYPE)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=mask)


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


# Tiles on the GPU: the dots need 16 rows, columns and depth at least. From bench/lora_glu_tiles.py
# on the H200, 2026-11-29, 8192 x 8192, rank 16, bf16: without the in-place stores, 64 x 64 with
# 4 warps was the fastest of 16..128 rows x 64..256 columns x 4 or 8 warps (0.195 ms); with them
# (``--quick``, at 27fb8b8) it takes 0.281 ms, 32 x 64 and 32 x 128 0.270, the unfused ops 0.323.
GPU_TILES = dict(BLOCK_ROWS=64, BLOCK_N=64, num_warps=4)


def _config(rank: int, on_gpu: bool, tiles: Optional[dict]) -> dict:
    """Launch parameters; ``tiles`` (BLOCK_ROWS, BLOCK_N, num_warps) overrides the defaults."""
    block_r = max(16, min(next_power_of_2(max(rank, 1)), 64))
    if on_gpu:
        return dict(GPU_TILES, **(tiles or {}), BLOCK_R=block_r, UPCAST=False)
    # The interpreter runs one program after another: fewer, larger tiles.
    return dict(dict(BLOCK_ROWS=64, BLOCK_N=256), **(tiles or {}), BLOCK_R=block_r, UPCAST=True)


def lora_glu_forward(gate_base: torch.Tensor, up_base: torch.Tensor, xa_gate: torch.Tensor, xa_up: torch.Tensor,
                     b_gate: torch.Tensor, b_up: torch.Tensor, scale_gate: float, scale_up: float, activation: str,
                     round_dtype: Optional[torch.dtype], out_dtype: torch.dtype, tiles: Optional[dict] = None
                     ) -> torch.Tensor:
    """h [rows, width] in ``out_dtype`` from the bases' outputs G, U [rows, width], x A^T [rows, r]
    and the B matrices [width, r] (in G's dtype); G and U are corrected in place (they become g
    and u). See the module docstring."""
    act = check_activation(activation, _OP)
    check_dtype(_OP, "out_dtype", out_dtype)
    check_dtype(_OP, "round_dtype", round_dtype, allow_none=True)
    rows, width, rank_g, rank_u = _check_corrections(gate_base, up_base, xa_gate, xa_up, b_gate, b_up)
    out = torch.empty((rows, width), dtype=out_dtype, device=gate_base.device)
    if out.numel() == 0:
        return out
    cfg = _config(max(rank_g, rank_u), gate_base.is_cuda, tiles)
    grid = (cdiv(rows, cfg["BLOCK_ROWS"]) * cdiv(width, cfg["BLOCK_N"]),)
    lora_glu_fwd_kernel[grid](
        gate_base, up_base, xa_gate, xa_up, b_gate, b_up, out, rows, width, rank_g, rank_u,
        gate_base.stride(0), up_base.stride(0), xa_gate.stride(0), xa_up.stride(0), out.stride(0),
        float(scale_gate), float(scale_up),
        ACT=act, ROUND_DTYPE=round_tl(round_dtype), OUT_DTYPE=TL_DTYPE[out_dtype],
        PRECISION=dot_precision(gate_base.dtype), **cfg)
    return out
