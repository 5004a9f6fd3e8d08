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

The backward kernel reads dh, g and u and writes dg and du, as the plain GLU backward does, and
feeds each tile it holds to the adapters' rank-r products that would otherwise read those
tensors again (each [rows, width]):

    dyb_g = dg (s_g B_g)    dB_g = s_g dg^T (X A_g^T)    (the same for up)
    dA_d  = dyb_d^T h        (dyb_d = dY (s_d B_d), the down adapter's factor; h = act(g) * u)

so that neither ``kernels/adapter_grads.py``'s pass over dg and du nor h (written, then read by
a GEMM for the down adapter's dA) is needed. Its products are fp32 partials, one per column block
(dyb) or row segment (dB, dA), summed in a fixed order and rounded once by ``sum_partials``: the
products of the unfused ops up to the order of the fp32 sums.

The launchers serve ``fastft::lora_glu_mlp`` (``kernels/lora.py``), whose custom op carries the
backward; neither is an op of its own.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .adapter_grads import PartialSum, Tiles, rank_block, store_column_part, store_row_part, tile_grid
from .glu import act_fwd_bwd, check_activation, elementwise_tile, glu_reference, glu_tile, round_tl
from .launch import cdiv, check_dtype, dot_precision, next_power_of_2
from .rounding import TL_DTYPE, round_fp32, round_loaded

__all__ = ["LoraGluGrads", "lora_glu_backward", "lora_glu_backward_reference", "lora_glu_forward",
           "lora_glu_reference"]


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


def lora_glu_backward_reference(dh, g, u, xa_gate, xa_up, b_gate, b_up, dyb_down, scale_gate: float,
                                scale_up: float, activation: str, round_dtype: Optional[torch.dtype],
                                h_dtype: torch.dtype, db_dtype: torch.dtype = torch.float32,
                                da_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """The unfused ops: (dg, du) by autograd through ``glu_reference``, then dyb_g = dg b_g and
    dyb_u = du b_u in dg's dtype (``b_*`` are s B), dB_g = s_g dg^T xa_g and dB_u in ``db_dtype``,
    and dA_d = dyb_down^T h in ``da_dtype``, each product accumulated in fp32."""
    gate, up = g.detach().requires_grad_(), u.detach().requires_grad_()
    h = glu_reference(gate, up, activation, round_dtype, h_dtype)
    dg, du = torch.autograd.grad(h, (gate, up), dh.to(h.dtype))

    def mm(a, b, dtype, scale=1.0):
        return ((a.float() @ b.float()) * scale).to(dtype)

    return (dg, du, mm(dg, b_gate, dg.dtype), mm(du, b_up, du.dtype), mm(dg.t(), xa_gate, db_dtype, scale_gate),
            mm(du.t(), xa_up, db_dtype, scale_up), mm(dyb_down.t(), h.detach(), da_dtype))


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


@triton.jit
def _pinned(x, ON_GPU: tl.constexpr):
    """x, computed once in the layout it has: the compiler may not recompute it for a consumer
    that wants another layout. A tile that feeds both stores and dots otherwise has its whole
    elementwise chain, loads included, duplicated in each dot operand's layout: on the H200 the
    first build of the backward kernel took 0.66-45.7 ms where the unfused ops take 0.35, ptxas
    spilling 13 KB a thread. An opaque move does it; off the GPU (the interpreter) there is
    nothing to pin."""
    if ON_GPU:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=False, pack=1)
    return x


@triton.jit
def _over_rows(tile, rank_block, acc, BY_RANK: tl.constexpr, PRECISION: tl.constexpr):
    """acc plus rank_block^T tile ([BLOCK_R, BLOCK_N]) with BY_RANK, else plus its transpose
    tile^T rank_block ([BLOCK_N, BLOCK_R]: the tile is the dot's wide left operand)."""
    if BY_RANK:
        acc = tl.dot(tl.trans(rank_block), tile, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(tl.trans(tile), rank_block, acc, input_precision=PRECISION)
    return acc


@triton.jit
def lora_glu_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, xg_ptr, xu_ptr, bg_ptr, bu_ptr, dybd_ptr,
    dyb_g_parts, dyb_u_parts, db_g_parts, db_u_parts, da_parts,
    n_rows, N, RG, RU, RD, segment_rows,
    stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_xg, stride_xu, stride_bg, stride_bu, stride_dybd,
    ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, H_DTYPE: tl.constexpr, NEED_DA: tl.constexpr,
    PRODUCTS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BY_RANK: tl.constexpr,
):
    """Program (j, s): columns [j BLOCK_N, (j + 1) BLOCK_N) of rows [s segment_rows, (s + 1)
    segment_rows). Writes dg and du there (over dh where the launcher asks: each element of dh is
    read before the same program writes it), dyb_g's and dyb_u's partials over these columns for
    each row (``*_parts[j, row, :]``), and dB_g's, dB_u's and dA_d's over these rows for each
    column (``*_parts[s, col, :]``), all fp32. Without PRODUCTS, none of the gate and up
    adapters' products (dg, du and dA_d alone). BY_RANK: the sums over rows are accumulated as
    [rank, columns] (else [columns, rank]; which is faster depends on the tiles)."""
    j = tl.program_id(0)
    s = tl.program_id(1)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rk = tl.arange(0, BLOCK_R)
    if BY_RANK:
        db_g = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        db_g = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    db_u = tl.zeros_like(db_g)
    da = tl.zeros_like(db_g)
    first = s * segment_rows
    for m in range(0, segment_rows, BLOCK_M):
        local = m + tl.arange(0, BLOCK_M)
        rows = (first + local).to(tl.int64)
        row_ok = (rows < n_rows) & (local < segment_rows)
        mask = row_ok[:, None] & col_ok[None, :]
        r = rows[:, None]
        c = cols[None, :]
        # The GLU backward of kernels/glu.py, with its roundings (masked elements are 0 throughout).
        dout = tl.load(dh_ptr + r * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
        dout = round_loaded(dout, dh_ptr.dtype.element_ty, ROUND_DTYPE)
        g = round_loaded(g, g_ptr.dtype.element_ty, ROUND_DTYPE)
        u = round_loaded(u, u_ptr.dtype.element_ty, ROUND_DTYPE)
        a, da_dg = act_fwd_bwd(g, ACT)
        a = round_fp32(a, ROUND_DTYPE)
        dup = _pinned(round_fp32(dout * a, ROUND_DTYPE), PRODUCTS and not UPCAST)
        dup = round_loaded(dup, ROUND_DTYPE, du_ptr.dtype.element_ty).to(du_ptr.dtype.element_ty)
        dgate = _pinned(round_fp32(round_fp32(dout * u, ROUND_DTYPE) * da_dg, ROUND_DTYPE), PRODUCTS and not UPCAST)
        dgate = round_loaded(dgate, ROUND_DTYPE, dg_ptr.dtype.element_ty).to(dg_ptr.dtype.element_ty)
        tl.store(dg_ptr + r * stride_dg + c, dgate, mask=mask)
        tl.store(du_ptr + r * stride_du + c, dup, mask=mask)
        if PRODUCTS:  # the adapters' products of the values just stored, as a GEMM would read them back
            if UPCAST:  # the interpreter's dot cannot take 16-bit floats; their fp32 products are exact
                dgate, dup = dgate.to(tl.float32), dup.to(tl.float32)
            # s B [columns, BLOCK_R], loaded where it is used: fewer registers held across the loop
            bg = rank_block(bg_ptr, stride_bg, cols, col_ok, rk, RG, UPCAST)
            store_row_part(dyb_g_parts, j, n_rows, rows, row_ok, rk, tl.dot(dgate, bg, input_precision=PRECISION),
                           BLOCK_R)
            bu = rank_block(bu_ptr, stride_bu, cols, col_ok, rk, RU, UPCAST)
            store_row_part(dyb_u_parts, j, n_rows, rows, row_ok, rk, tl.dot(dup, bu, input_precision=PRECISION),
                           BLOCK_R)
            xg = rank_block(xg_ptr, stride_xg, rows, row_ok, rk, RG, UPCAST)
            xu = rank_block(xu_ptr, stride_xu, rows, row_ok, rk, RU, UPCAST)
            db_g = _over_rows(dgate, xg, db_g, BY_RANK, PRECISION)
            db_u = _over_rows(dup, xu, db_u, BY_RANK, PRECISION)
        if NEED_DA:  # h as the forward kernel wrote it (glu_tile's steps on the values rounded above)
            h = _pinned(round_fp32(a * u, ROUND_DTYPE), not UPCAST)
            h = round_loaded(h, ROUND_DTYPE, H_DTYPE).to(H_DTYPE)
            if UPCAST:
                h = h.to(tl.float32)
            dybd = rank_block(dybd_ptr, stride_dybd, rows, row_ok, rk, RD, UPCAST)
            da = _over_rows(h, dybd, da, BY_RANK, PRECISION)
    if PRODUCTS:
        store_column_part(db_g_parts, s, N, cols, col_ok, rk, db_g, BY_RANK, BLOCK_R)
        store_column_part(db_u_parts, s, N, cols, col_ok, rk, db_u, BY_RANK, BLOCK_R)
    if NEED_DA:
        store_column_part(da_parts, s, N, cols, col_ok, rk, da, BY_RANK, BLOCK_R)


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


class LoraGluGrads(NamedTuple):
    """What ``lora_glu_backward`` gives: dg and du at once; dyb (in ``dyb_out``), dB_g, dB_u and
    dA_d once the sums it left in ``pending`` have run (None where not asked)."""

    dg: torch.Tensor
    du: torch.Tensor
    db_gate: Optional[torch.Tensor]
    db_up: Optional[torch.Tensor]
    da_down: Optional[torch.Tensor]


# From bench/lora_glu_backward.py (H200, 2026-11-30, [8192, 8192] r16 bf16): 64 x 64 tiles, 4 warps,
# 3 stages, two programs an SM took 312.7 us (the unfused ops 351.2; the plain GLU backward alone
# 162.3); 64 x 128 with 8 warps 336.5, 32 x 256 [rank, columns] sums 366.2; with 4 or 5 stages,
# one or three programs an SM, 525-401 us. Without the products' dots in the pass, the GLU
# backward writing dg and du takes half the time: they, and the layout changes their operands need,
# are most of its cost. Measured for 16-bit inputs of rank 16, which is where kernels/lora.py takes
# the pass: compiled for sm_90, fp32 at rank 64 needs 303,104 bytes of shared memory, more than the
# GPU has. The interpreter computes whole tiles: fewer, larger ones.
BACKWARD_GPU_TILES = Tiles(block_m=64, block_n=64, num_warps=4, num_stages=3, per_sm=2)
BACKWARD_INTERPRETER_TILES = Tiles(block_m=32, block_n=64, num_warps=4, num_stages=1, per_sm=1)


def lora_glu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, xa_gate: torch.Tensor,
                      xa_up: torch.Tensor, b_gate: torch.Tensor, b_up: torch.Tensor, dyb_down: torch.Tensor,
                      scale_gate: float, scale_up: float, activation: str, round_dtype: Optional[torch.dtype],
                      h_dtype: torch.dtype, dyb_out: Optional[torch.Tensor], pending: list[PartialSum],
                      db_dtypes: tuple[Optional[torch.dtype], Optional[torch.dtype]] = (torch.float32, torch.float32),
                      da_dtype: Optional[torch.dtype] = torch.float32, dg_over_dh: bool = False,
                      tiles: Optional[Tiles] = None) -> LoraGluGrads:
    """The backward of h = act(g) * u in a LoRA MLP, with the adapters' products of dg, du and h.

    dh, g, u [rows, width] in one dtype; ``xa_gate``, ``xa_up`` [rows, r] (X A^T), ``b_gate``,
    ``b_up`` [width, r] (s B) and ``dyb_down`` [rows, r_d] (dY (s_d B_d)) in that dtype too.
    ``dyb_out`` [rows, r_g + r_u] receives [dg (s_g B_g) | du (s_u B_u)]; dB comes back in
    ``db_dtypes`` (None: not wanted), dA_d [r_d, width] in ``da_dtype`` (None: not wanted).
    ``dyb_out`` None: none of the gate and up adapters' products (no dyb, no dB), which the caller
    then computes from dg and du (``kernels/adapter_grads.py``).
    The sums are appended to ``pending``: the caller runs ``sum_partials`` (with others).
    ``dg_over_dh``: dg is written into dh's buffer (the caller's dh is then gone)."""
    act = check_activation(activation, _OP)
    check_dtype(_OP, "round_dtype", round_dtype, allow_none=True)
    check_dtype(_OP, "h_dtype", h_dtype)
    rows, width, rank_g, rank_u = _check_corrections(g, u, xa_gate, xa_up, b_gate, b_up)
    rank_d = dyb_down.shape[-1]
    _check_2d("dh", dh, (rows, width), g.dtype)
    _check_2d("dY s B_down", dyb_down, (rows, rank_d), g.dtype)
    products = dyb_out is not None
    if products:
        _check_2d("dyb_out", dyb_out, (rows, rank_g + rank_u), g.dtype)
    else:
        db_dtypes = (None, None)
    block_r = max(16, next_power_of_2(max(rank_g, rank_u, rank_d)))
    if block_r > 64:
        raise ValueError(f"{_OP}: ranks up to 64 go through the fused backward, got {max(rank_g, rank_u, rank_d)}")
    dg = dh if dg_over_dh and dh.is_contiguous() else torch.empty_like(g)
    du = torch.empty_like(u)
    db_gate, db_up = (g.new_empty((width, r), dtype=d) if d is not None else None
                      for r, d in zip((rank_g, rank_u), db_dtypes))
    da_down = g.new_empty((rank_d, width), dtype=da_dtype) if da_dtype is not None else None
    if rows == 0 or width == 0:
        for t in (dyb_out, db_gate, db_up, da_down):
            if t is not None:
                t.zero_()
        return LoraGluGrads(dg, du, db_gate, db_up, da_down)
    tiles = tiles or (BACKWARD_GPU_TILES if g.is_cuda else BACKWARD_INTERPRETER_TILES)
    col_blocks, segments, segment_rows = tile_grid(g.device, rows, width, tiles)
    parts = dict(device=g.device, dtype=torch.float32)
    unused = torch.empty(1, **parts)  # for the partials a launch does not write
    dyb_g_parts, dyb_u_parts = (torch.empty((col_blocks, rows, block_r), **parts) if products else unused
                                for _ in range(2))
    db_g_parts, db_u_parts = (torch.empty((segments, width, block_r), **parts) if products else unused
                              for _ in range(2))
    da_parts = torch.empty((segments, width, block_r), **parts) if da_down is not None else unused
    lora_glu_bwd_kernel[(col_blocks, segments)](
        dh, g, u, dg, du, xa_gate, xa_up, b_gate, b_up, dyb_down,
        dyb_g_parts, dyb_u_parts, db_g_parts, db_u_parts, da_parts,
        rows, width, rank_g, rank_u, rank_d, segment_rows,
        dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), xa_gate.stride(0), xa_up.stride(0),
        b_gate.stride(0), b_up.stride(0), dyb_down.stride(0),
        ACT=act, ROUND_DTYPE=round_tl(round_dtype), H_DTYPE=TL_DTYPE[h_dtype], NEED_DA=da_down is not None,
        PRODUCTS=products,
        # Off the GPU the operands arrive upcast to fp32, whose products are then exact.
        PRECISION=dot_precision(g.dtype if g.is_cuda else torch.float32), UPCAST=not g.is_cuda,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=block_r, BY_RANK=tiles.db_transposed,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if products:
        pending += [PartialSum(dyb_g_parts, dyb_out[:, :rank_g], 1.0),
                    PartialSum(dyb_u_parts, dyb_out[:, rank_g:], 1.0)]
    pending += [PartialSum(p, db, scale) for p, db, scale in
                ((db_g_parts, db_gate, scale_gate), (db_u_parts, db_up, scale_up)) if db is not None]
    if da_down is not None:
        pending.append(PartialSum(da_parts, da_down.t(), 1.0))
    return LoraGluGrads(dg, du, db_gate, db_up, da_down)
