"""The two products of a LoRA linear's backward that read its output gradient, in one pass:

    dyb = dY (s B)          [rows, r]    the rank-r factor of the adapter's share of dX and of dA
    dB  = s dY^T (X A^T)    [out, r]     B's gradient (X A^T: kept from the forward)

As two GEMMs, each reads dY [rows, out], the largest tensor either touches: for a gated MLP's
gate and up at 8,192 tokens that is [8192, 8192], read twice per projection by GEMMs of rank
width that cuBLAS runs below the memory bandwidth. Here one kernel reads each tile of dY once and
feeds it to both products (tensor-core dots with the rank as one side).

Programs tile dY as (column block, row segment). Every product over the columns (dyb) has one
fp32 partial per column block, every product over the rows (dB) one per row segment; a second
kernel sums each set in a fixed order and rounds once, so the result is deterministic and has the
rounding of one fp32-accumulating GEMM: dyb rounded once to dY's dtype, dB in fp32, scaled in
fp32, then in B's dtype. The linears of one input (q, k, v) leave their sums pending and
``sum_partials`` runs them all in one launch.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .launch import cdiv, device_sm_count, dot_precision, next_power_of_2
from .rounding import TL_DTYPE, round_fp32

__all__ = ["PartialSum", "Tiles", "adapter_grads", "adapter_grads_pays", "adapter_grads_reference", "gpu_tiles",
           "sum_partials", "tile_grid"]

# Below this many elements of dY, the two GEMMs' second read costs less than the partials and the
# extra launches: the smallest dY measured faster fused is a [8192, 512] key projection's (4M).
FUSED_MIN_ELEMENTS: int = 1 << 22
# Ranks up to this go through the fused pass (its dots hold a [rows, rank] block in registers).
FUSED_MAX_RANK: int = 64


def adapter_grads_reference(dy: torch.Tensor, b_scaled: torch.Tensor, xa: torch.Tensor, scale: float,
                            db_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two GEMMs this replaces: (dY (s B) in dY's dtype, s dY^T (X A^T) in ``db_dtype``),
    each accumulated in fp32."""
    dyb = (dy.float() @ b_scaled.float()).to(dy.dtype)
    db = (dy.float().t() @ xa.float()) * scale
    return dyb, db.to(db_dtype)


def adapter_grads_pays(dy: torch.Tensor, rank: int) -> bool:
    """Whether the fused pass is used for this dY (2-D, unit column stride) and rank."""
    return (dy.dim() == 2 and dy.stride(1) == 1 and dy.numel() >= FUSED_MIN_ELEMENTS
            and 0 < rank <= FUSED_MAX_RANK and dy.dtype in TL_DTYPE)


@triton.jit
def rank_block(ptr, stride, lines, line_ok, rk, R, UPCAST: tl.constexpr):
    """A [lines, BLOCK_R] block of a [lines, R] matrix (zeros past R), fp32 off the GPU."""
    t = tl.load(ptr + lines[:, None] * stride + rk[None, :], mask=line_ok[:, None] & (rk < R)[None, :], other=0.0)
    return t.to(tl.float32) if UPCAST else t


# The partials ``sum_partials`` adds are [parts, lines, BLOCK_R] fp32: a pass writes, per column
# block, a dyb partial for each of its rows, and per row segment a dB (or dA) partial for each of
# its columns. Every pass stores them through these two.
@triton.jit
def store_row_part(parts_ptr, part, n_rows, rows, row_ok, rk, value, BLOCK_R: tl.constexpr):
    """value [rows, BLOCK_R] as part ``part`` of the rows' partials."""
    tl.store(parts_ptr + (part.to(tl.int64) * n_rows + rows[:, None]) * BLOCK_R + rk[None, :], value,
             mask=row_ok[:, None])


@triton.jit
def store_column_part(parts_ptr, part, N, cols, col_ok, rk, value, BY_RANK: tl.constexpr, BLOCK_R: tl.constexpr):
    """value, a sum over rows kept as [BLOCK_R, columns] (BY_RANK) or [columns, BLOCK_R], as part
    ``part`` of the columns' partials."""
    if BY_RANK:
        tl.store(parts_ptr + (part.to(tl.int64) * N + cols[None, :]) * BLOCK_R + rk[:, None], value,
                 mask=col_ok[None, :])
    else:
        tl.store(parts_ptr + (part.to(tl.int64) * N + cols[:, None]) * BLOCK_R + rk[None, :], value,
                 mask=col_ok[:, None])


@triton.jit
def _adapter_grads_kernel(dy_ptr, b_ptr, xa_ptr, dyb_parts_ptr, db_parts_ptr, n_rows, N, R, segment_rows,
                          stride_dy, stride_b, stride_xa,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_R: tl.constexpr, DB_T: tl.constexpr):
    """Program (j, s): columns [j BLOCK_N, (j + 1) BLOCK_N) of rows [s segment_rows, (s + 1)
    segment_rows). Writes dyb's partial over these columns for each of the rows
    (dyb_parts[j, row, :]) and dB's partial over these rows for each of the columns
    (db_parts[s, col, :]), both fp32. DB_T: dB's partial as (X A^T)^T dY ([r, columns]: the dY tile
    is the dot's right operand as it lies) instead of dY^T (X A^T) (the tile transposed)."""
    j = tl.program_id(0)
    s = tl.program_id(1)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_R)
    col_ok = cols < N
    b = rank_block(b_ptr, stride_b, cols, col_ok, rk, R, UPCAST)
    if DB_T:
        db = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    first = s * segment_rows
    for m in range(0, segment_rows, BLOCK_M):
        rows = (first + m + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = (rows < n_rows) & (m + tl.arange(0, BLOCK_M) < segment_rows)
        tile = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0)
        xa = rank_block(xa_ptr, stride_xa, rows, row_ok, rk, R, UPCAST)
        if UPCAST:  # the interpreter's dot cannot take 16-bit floats; their fp32 products are exact
            tile = tile.to(tl.float32)
        part = tl.dot(tile, b, input_precision=PRECISION)
        if DB_T:
            db += tl.dot(tl.trans(xa), tile, input_precision=PRECISION)
        else:
            db += tl.dot(tl.trans(tile), xa, input_precision=PRECISION)
        store_row_part(dyb_parts_ptr, j, n_rows, rows, row_ok, rk, part, BLOCK_R)
    store_column_part(db_parts_ptr, s, N, cols, col_ok, rk, db, DB_T, BLOCK_R)


@triton.jit
def _sum_job(parts_ptr, out_ptr, block, n_parts, n_lines, part_stride, R, stride_out, stride_out_r, scale,
             OUT_DTYPE: tl.constexpr, BLOCK_LINES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Block ``block`` of out[line, :R] = scale * sum over p of parts[p, line, :R] (fp32, p in
    order), rounded once; out may be a transposed view (a dA [r, lines]). ``part_stride`` is
    n_lines BLOCK_R, from the host: the GPU compiler takes an argument equal to 1 (n_lines) as a
    Python int, which has no .to() for a 64-bit product."""
    lines = (block * BLOCK_LINES + tl.arange(0, BLOCK_LINES)).to(tl.int64)
    rk = tl.arange(0, BLOCK_R)
    line_ok = lines < n_lines
    # The pointers step one part at a time: parts can pass 2^31 elements (a vocabulary-wide dY),
    # and a 64-bit pointer plus a 32-bit stride does not overflow where p times the stride would.
    ptrs = parts_ptr + lines[:, None] * BLOCK_R + rk[None, :]
    acc = tl.zeros((BLOCK_LINES, BLOCK_R), dtype=tl.float32)
    for _part in range(0, n_parts):
        acc += tl.load(ptrs, mask=line_ok[:, None], other=0.0)
        ptrs += part_stride
    acc = round_fp32(acc * scale, OUT_DTYPE)
    tl.store(out_ptr + lines[:, None] * stride_out + rk[None, :] * stride_out_r, acc.to(OUT_DTYPE),
             mask=line_ok[:, None] & (rk < R)[None, :])


@triton.jit
def _sum_parts_kernel(p0, o0, np0, nl0, ps0, r0, so0, sr0, c0, p1, o1, np1, nl1, ps1, r1, so1, sr1, c1,
                      p2, o2, np2, nl2, ps2, r2, so2, sr2, c2, p3, o3, np3, nl3, ps3, r3, so3, sr3, c3,
                      p4, o4, np4, nl4, ps4, r4, so4, sr4, c4, p5, o5, np5, nl5, ps5, r5, so5, sr5, c5,
                      t1, t2, t3, t4, t5,
                      D0: tl.constexpr, R0: tl.constexpr, D1: tl.constexpr, R1: tl.constexpr,
                      D2: tl.constexpr, R2: tl.constexpr, D3: tl.constexpr, R3: tl.constexpr,
                      D4: tl.constexpr, R4: tl.constexpr, D5: tl.constexpr, R5: tl.constexpr,
                      BLOCK_LINES: tl.constexpr):
    """Up to SUM_JOBS sums in one launch: programs [0, t1) sum job 0, [t1, t2) job 1, ... and
    [t5, end) job 5 (job i: parts p_i into o_i, in dtype D_i, the parts R_i wide)."""
    pid = tl.program_id(0)
    if pid < t1:
        _sum_job(p0, o0, pid, np0, nl0, ps0, r0, so0, sr0, c0, D0, BLOCK_LINES, R0)
    elif pid < t2:
        _sum_job(p1, o1, pid - t1, np1, nl1, ps1, r1, so1, sr1, c1, D1, BLOCK_LINES, R1)
    elif pid < t3:
        _sum_job(p2, o2, pid - t2, np2, nl2, ps2, r2, so2, sr2, c2, D2, BLOCK_LINES, R2)
    elif pid < t4:
        _sum_job(p3, o3, pid - t3, np3, nl3, ps3, r3, so3, sr3, c3, D3, BLOCK_LINES, R3)
    elif pid < t5:
        _sum_job(p4, o4, pid - t4, np4, nl4, ps4, r4, so4, sr4, c4, D4, BLOCK_LINES, R4)
    else:
        _sum_job(p5, o5, pid - t5, np5, nl5, ps5, r5, so5, sr5, c5, D5, BLOCK_LINES, R5)


class Tiles(NamedTuple):
    """A launch configuration of the fused pass. ``per_sm``: programs of this configuration one
    SM holds at once (its shared memory decides: stages x (tile + operands)); the grid is sized
    to whole waves of them, because a partly filled last wave costs as much as a full one."""

    block_m: int = 64
    block_n: int = 256
    num_warps: int = 8
    num_stages: int = 3
    per_sm: int = 2
    db_transposed: bool = False  # the kernel's DB_T


# Measured on an H200 (2026-11-30, bench/adapter_grads.py, bf16, r16, in CUDA graphs; the two
# GEMMs in brackets): dY [8192, 8192] 55.2 us (74.2), [8192, 2048] 17.1 (24.2), [2048, 14336]
# 34.4 (35.2), [2048, 4096] 12.0 (16.6) with WIDE_TILES; [8192, 512] 10.9 (13.5) with
# NARROW_TILES, where WIDE_TILES took 15.1. WIDE_TILES take 76 KiB of shared memory at r16 (3
# stages of a [64, 256] tile of dY and a [64, r] one of X A^T, and s B): two programs an SM.
WIDE_TILES = Tiles(block_m=64, block_n=256, num_warps=4, num_stages=3, per_sm=2, db_transposed=True)
NARROW_TILES = Tiles(block_m=64, block_n=128, num_warps=4, num_stages=3, per_sm=3)
NARROW_MAX_COLUMNS = 1024
INTERPRETER_TILES = Tiles(block_m=64, block_n=256, num_warps=4, num_stages=1, per_sm=1)


def gpu_tiles(n: int) -> Tiles:
    """The launch configuration for a dY of ``n`` columns on a GPU."""
    return NARROW_TILES if n <= NARROW_MAX_COLUMNS else WIDE_TILES


def _grid(device: torch.device, n_rows: int, n: int, tiles: Tiles) -> tuple[int, int]:
    """(column blocks, row segments): as many segments as fill whole waves with the column
    blocks (few dB partials, one per segment; the dyb partials are one per column block)."""
    col_blocks = cdiv(n, tiles.block_n)
    if device.type != "cuda":  # the interpreter runs programs one by one: a few segments
        return col_blocks, max(1, min(4, cdiv(n_rows, 4 * tiles.block_m)))
    wave = tiles.per_sm * device_sm_count(device)
    segments = max(1, wave // col_blocks) if col_blocks <= wave else 1
    return col_blocks, max(1, min(segments, cdiv(n_rows, tiles.block_m)))


def tile_grid(device: torch.device, n_rows: int, n: int, tiles: Tiles) -> tuple[int, int, int]:
    """(column blocks, row segments, rows per segment) of a pass that tiles [n_rows, n] as
    ``_grid`` says, each segment a whole number of ``tiles.block_m`` rows."""
    col_blocks, segments = _grid(device, n_rows, n, tiles)
    segment_rows = cdiv(cdiv(n_rows, segments), tiles.block_m) * tiles.block_m
    return col_blocks, cdiv(n_rows, segment_rows), segment_rows


class PartialSum(NamedTuple):
    """A sum the fused pass leaves to its caller: out = scale * parts.sum(0), rounded once."""

    parts: torch.Tensor  # [n_parts, lines, BLOCK_R] fp32
    out: torch.Tensor  # [lines, r], any strides
    scale: float


def adapter_grads(dy: torch.Tensor, b_scaled: torch.Tensor, xa: torch.Tensor, scale: float,
                  dyb_out: Optional[torch.Tensor] = None, db_dtype: Optional[torch.dtype] = None,
                  need_db: bool = True, tiles: Optional[Tiles] = None,
                  pending: Optional[list[PartialSum]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dyb, dB) of one LoRA linear, reading ``dy`` [rows, out] once.

    ``b_scaled`` [out, r] is s B in dY's dtype, ``xa`` [rows, r] is X A^T in dY's dtype and
    ``scale`` the s that dB gets. ``dyb_out`` (optional, [rows, r], any row stride, dY's dtype)
    receives dyb: a column slice of a wider buffer. dB comes back in ``db_dtype`` (default:
    ``b_scaled``'s), or None without ``need_db``. ``tiles``: the launch configuration (default:
    gpu_tiles(out) on a GPU, INTERPRETER_TILES off it). ``pending``: where given, the two final
    sums are appended to it instead of launched, and dyb and dB hold their values only after the
    caller's ``sum_partials`` (one launch for the sums of several linears)."""
    n_rows, n = dy.shape
    rank = b_scaled.shape[1]
    if dy.stride(1) != 1 or b_scaled.stride(1) != 1 or xa.stride(1) != 1:
        raise ValueError("adapter_grads: dy, b_scaled and xa need unit column stride")
    if tuple(b_scaled.shape) != (n, rank) or tuple(xa.shape) != (n_rows, rank):
        raise ValueError(f"adapter_grads: b_scaled {tuple(b_scaled.shape)} and xa {tuple(xa.shape)} do not fit "
                         f"dy {tuple(dy.shape)} (expected [{n}, r] and [{n_rows}, r])")
    if not (dy.dtype == b_scaled.dtype == xa.dtype) or dy.dtype not in TL_DTYPE:
        raise ValueError(f"adapter_grads: dy, b_scaled and xa must share one of {list(TL_DTYPE)}, got "
                         f"{dy.dtype}, {b_scaled.dtype} and {xa.dtype}")
    if rank > FUSED_MAX_RANK:
        raise ValueError(f"adapter_grads: rank {rank} is above {FUSED_MAX_RANK}")
    dyb = dyb_out if dyb_out is not None else dy.new_empty((n_rows, rank))
    if tuple(dyb.shape) != (n_rows, rank) or dyb.dtype != dy.dtype or dyb.stride(1) != 1:
        raise ValueError(f"adapter_grads: dyb_out must be [{n_rows}, {rank}] {dy.dtype} with unit column stride")
    db_dtype = db_dtype or b_scaled.dtype
    db = dy.new_empty((n, rank), dtype=db_dtype) if need_db else None
    if n_rows == 0 or n == 0:
        dyb.zero_()
        if db is not None:
            db.zero_()
        return dyb, db
    if tiles is None:  # off the GPU, a narrow dY gets a narrower tile: the interpreter computes whole tiles
        tiles = gpu_tiles(n) if dy.is_cuda else INTERPRETER_TILES._replace(block_n=min(next_power_of_2(max(n, 16)), 256))
    col_blocks, segments, segment_rows = tile_grid(dy.device, n_rows, n, tiles)
    block_r = max(16, next_power_of_2(rank))  # a dot's side is at least 16
    dyb_parts = torch.empty((col_blocks, n_rows, block_r), dtype=torch.float32, device=dy.device)
    db_parts = torch.empty((segments, n, block_r), dtype=torch.float32, device=dy.device)
    _adapter_grads_kernel[(col_blocks, segments)](
        dy, b_scaled, xa, dyb_parts, db_parts, n_rows, n, rank, segment_rows,
        dy.stride(0), b_scaled.stride(0), xa.stride(0),
        # Off the GPU the operands arrive upcast to fp32, whose products are then exact.
        PRECISION=dot_precision(dy.dtype if dy.is_cuda else torch.float32), UPCAST=not dy.is_cuda,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=block_r, DB_T=tiles.db_transposed,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    sums = [PartialSum(dyb_parts, dyb, 1.0)] + ([PartialSum(db_parts, db, scale)] if db is not None else [])
    if pending is not None:
        pending.extend(sums)
    else:
        sum_partials(sums)
    return dyb, db


# Sums one launch takes: a group of three linears (q, k, v) leaves six. One launch per sum was
# 224 kernels of about 4 us in the 1B LoRA step, most of it launch and tail.
SUM_JOBS = 6


def sum_partials(sums: Sequence[PartialSum]) -> None:
    """Every sum that ``adapter_grads`` left pending, SUM_JOBS to a launch."""
    for first in range(0, len(sums), SUM_JOBS):
        _sum_launch(sums[first:first + SUM_JOBS])


def _sum_block_lines(lines: Sequence[int], device: torch.device) -> int:
    """The lines each program of a sum launch takes, for jobs of ``lines`` lines each."""
    if device.type != "cuda":  # the interpreter: one program per job
        return next_power_of_2(max(lines))
    # About two programs per SM on the largest job alone: each program sums its [lines, r] block
    # part by part, a chain of dependent loads, so the launch wants many programs in flight. Sized
    # on all the jobs' lines together, the 1B LoRA step's launches took 27.9 us each, against 8.4.
    return min(256, max(16, next_power_of_2(cdiv(max(lines), 2 * device_sm_count(device)))))


def _sum_launch(jobs: Sequence[PartialSum]) -> None:
    lines = [job.parts.shape[1] for job in jobs]
    block_lines = _sum_block_lines(lines, jobs[0].parts.device)
    ends = list(itertools.accumulate(cdiv(n, block_lines) for n in lines))
    padded = list(jobs) + [jobs[0]] * (SUM_JOBS - len(jobs))  # padding jobs get no programs
    ends += [ends[-1]] * (SUM_JOBS - len(jobs))
    args, constexprs = [], {}
    for i, job in enumerate(padded):
        n_parts, n_lines, block_r = job.parts.shape
        args += [job.parts, job.out, n_parts, n_lines, job.parts.stride(0), job.out.shape[1], job.out.stride(0),
                 job.out.stride(1), float(job.scale)]
        constexprs[f"D{i}"], constexprs[f"R{i}"] = TL_DTYPE[job.out.dtype], block_r
    _sum_parts_kernel[(ends[-1],)](*args, *ends[:-1], BLOCK_LINES=block_lines, num_warps=4, **constexprs)
