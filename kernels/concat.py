"""Copies of several tensors into one (Triton), for the LoRA ops of ``kernels/lora.py``:

- ``concat_columns``: 2-D tensors side by side in one wider tensor, the operands of a GEMM that
  takes a LoRA correction through its depth, [x | x A^T] and [W | s B];
- ``cast_parts``: small tensors one after another in one flat buffer, each cast (and scaled)
  on the way: the adapters of a group of LoRA linears in the GEMMs' dtype, in one launch.

``concat_columns``:

PyTorch's ``copy_`` into a column slice of a wider tensor cannot use its vectorised kernel (the
destination is not contiguous) and moved a [8192, 2048] bf16 block at about 1.6 TB/s on the
H200: 39 us a copy, four such copies per layer of the 1B LoRA training step of bench/train_step
(its profile at cd9bde0, 2026-11-29; bench/README.md names the run). Here each part is copied in
[rows, columns] tiles whose rows are contiguous on both sides, so loads and stores are wide.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .launch import SUPPORTED_DTYPES, cdiv, interpreter_block_n, interpreter_block_rows, next_power_of_2
from .rounding import TL_DTYPE, round_fp32, round_loaded

__all__ = ["cast_parts", "concat_columns"]


@triton.jit
def _copy_tile(src_ptr, dst_ptr, tile, n_rows, N, stride_src, stride_dst, OUT_DTYPE: tl.constexpr,
               BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile number ``tile`` (column blocks fastest) of dst[:, :N] = src, cast to OUT_DTYPE."""
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid_r = tile // n_col_blocks
    pid_c = tile - pid_r * n_col_blocks
    rows = (pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    v = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :], mask=mask)
    if src_ptr.dtype.element_ty != OUT_DTYPE:  # rounded to nearest (the interpreter's cast truncates)
        v = round_loaded(v.to(tl.float32), src_ptr.dtype.element_ty, OUT_DTYPE)
    tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], v.to(OUT_DTYPE), mask=mask)


@triton.jit
def _concat_kernel(dst_ptr, stride_dst, n_rows, s0, s1, s2, n0, n1, n2, ss0, ss1, ss2, c0, c1, c2, t1, t2,
                   OUT_DTYPE: tl.constexpr, R0: tl.constexpr, B0: tl.constexpr, R1: tl.constexpr,
                   B1: tl.constexpr, R2: tl.constexpr, B2: tl.constexpr):
    # Programs [0, t1) copy part 0 into columns [c0, c0 + n0), [t1, t2) part 1 into [c1, c1 + n1) and
    # the rest part 2 into [c2, c2 + n2); each part in tiles [R_i, B_i] of its own shape.
    pid = tl.program_id(0)
    if pid < t1:
        _copy_tile(s0, dst_ptr + c0, pid, n_rows, n0, ss0, stride_dst, OUT_DTYPE, R0, B0)
    elif pid < t2:
        _copy_tile(s1, dst_ptr + c1, pid - t1, n_rows, n1, ss1, stride_dst, OUT_DTYPE, R1, B1)
    else:
        _copy_tile(s2, dst_ptr + c2, pid - t2, n_rows, n2, ss2, stride_dst, OUT_DTYPE, R2, B2)


# Parts one launch copies: the LoRA ops concatenate two or three ([x A_g^T | x | x A_u^T]);
# one launch each instead of one per part: a narrow part alone is a kernel of a few microseconds.
CONCAT_PARTS = 3


def _tile_shape(device: torch.device, n_rows: int, n: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_N): about 4K elements a program on a GPU, wide rows in one or a few
    programs, narrow ones stacked; the interpreter's larger tiles off it."""
    block_n = interpreter_block_n(device, n) or min(next_power_of_2(n), 1024)
    block_rows = interpreter_block_rows(device, n_rows, n) or min(max(1, 4096 // block_n), next_power_of_2(n_rows))
    return block_rows, block_n


def _concat_launch(out: torch.Tensor, parts: Sequence[tuple[torch.Tensor, int]]) -> None:
    """out[:, c_i:c_i + width_i] = part_i for up to CONCAT_PARTS (part, c_i), in one launch."""
    n_rows = out.shape[0]
    shapes = [_tile_shape(out.device, n_rows, p.shape[1]) for p, _ in parts]
    tiles = [cdiv(n_rows, r) * cdiv(p.shape[1], b) for (p, _), (r, b) in zip(parts, shapes)]
    pad = CONCAT_PARTS - len(parts)
    srcs = [p for p, _ in parts] + [parts[0][0]] * pad  # padding parts have no tiles: never read
    widths = [p.shape[1] for p, _ in parts] + [0] * pad
    strides = [p.stride(0) for p, _ in parts] + [0] * pad
    cols = [c for _, c in parts] + [0] * pad
    shapes += [(1, 1)] * pad
    ends = [sum(tiles[:i + 1]) for i in range(len(tiles))] + [sum(tiles)] * pad
    _concat_kernel[(sum(tiles),)](
        out, out.stride(0), n_rows, *srcs, *widths, *strides, *cols, ends[0], ends[1],
        OUT_DTYPE=TL_DTYPE[out.dtype], R0=shapes[0][0], B0=shapes[0][1], R1=shapes[1][0], B1=shapes[1][1],
        R2=shapes[2][0], B2=shapes[2][1], num_warps=4)


def _check_parts(op: str, parts: Sequence[torch.Tensor]) -> None:
    """Every part in a dtype the kernels copy, on the first part's device."""
    for i, p in enumerate(parts):
        if p.dtype not in SUPPORTED_DTYPES or p.device != parts[0].device:
            raise ValueError(f"{op}: part {i} is {p.dtype} on {p.device}; parts must be float32, "
                             f"bfloat16 or float16 on {parts[0].device}")


def concat_columns(*parts: torch.Tensor) -> torch.Tensor:
    """[part_0 | part_1 | ...]: 2-D tensors of one row count side by side in one new contiguous
    tensor, in the first part's dtype (each part cast as it is copied)."""
    first = parts[0]
    for i, p in enumerate(parts):
        if p.dim() != 2 or p.shape[0] != first.shape[0]:
            raise ValueError(f"concat_columns: part {i} is {list(p.shape)}; every part must be 2-D with "
                             f"{first.shape[0]} rows")
    _check_parts("concat_columns", parts)
    out = first.new_empty((first.shape[0], sum(p.shape[1] for p in parts)))
    placed, start = [], 0
    for p in parts:
        if p.shape[1] and p.shape[0]:
            placed.append((p if p.stride(1) == 1 or p.shape[1] == 1 else p.contiguous(), start))
        start += p.shape[1]
    for i in range(0, len(placed), CONCAT_PARTS):
        _concat_launch(out, placed[i:i + CONCAT_PARTS])
    return out


# ---------------------------------------------------------------------------------------------
# cast_parts
# ---------------------------------------------------------------------------------------------
# A group's adapters (up to three A and three B matrices) are cast every step, forward and
# backward. One launch per tensor (and one more to stack the A's) is a kernel of a few hundred
# kilobytes each, dozens of them per layer: here one launch moves a group's parts, each program
# one block of one part (the grid's second axis picks the part).
MAX_PARTS = 6
_PART_BLOCK = 1024


@triton.jit
def _cast_part(src_ptr, dst_ptr, n, scale, offs, OUT_DTYPE: tl.constexpr, SCALED: tl.constexpr):
    mask = offs < n
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        v = v * scale
    tl.store(dst_ptr + offs, round_fp32(v, OUT_DTYPE).to(OUT_DTYPE), mask=mask)


@triton.jit
def _cast_parts_kernel(out_ptr, s0, s1, s2, s3, s4, s5, o1, o2, o3, o4, o5, n0, n1, n2, n3, n4, n5,
                       c0, c1, c2, c3, c4, c5, OUT_DTYPE: tl.constexpr, SCALED: tl.constexpr,
                       BLOCK: tl.constexpr):
    part = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if part == 0:
        _cast_part(s0, out_ptr, n0, c0, offs, OUT_DTYPE, SCALED)
    elif part == 1:
        _cast_part(s1, out_ptr + o1, n1, c1, offs, OUT_DTYPE, SCALED)
    elif part == 2:
        _cast_part(s2, out_ptr + o2, n2, c2, offs, OUT_DTYPE, SCALED)
    elif part == 3:
        _cast_part(s3, out_ptr + o3, n3, c3, offs, OUT_DTYPE, SCALED)
    elif part == 4:
        _cast_part(s4, out_ptr + o4, n4, c4, offs, OUT_DTYPE, SCALED)
    else:
        _cast_part(s5, out_ptr + o5, n5, c5, offs, OUT_DTYPE, SCALED)


def cast_parts(parts: Sequence[torch.Tensor], dtype: torch.dtype,
               scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """A new 1-D tensor in ``dtype`` holding every part's elements (row-major), part after part:
    part i is ``(parts[i].float() * scales[i]).to(dtype)``, one rounding (no scaling without
    ``scales``). Consecutive 2-D parts with one column count form a row-stacked matrix in it."""
    if not parts:
        raise ValueError("cast_parts: no parts")
    scales = list(scales) if scales is not None else [1.0] * len(parts)
    if len(scales) != len(parts):
        raise ValueError(f"cast_parts: {len(parts)} parts but {len(scales)} scales")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cast_parts: dtype {dtype} is not float32, bfloat16 or float16")
    _check_parts("cast_parts", parts)
    sizes = [p.numel() for p in parts]
    out = torch.empty(sum(sizes), dtype=dtype, device=parts[0].device)
    start = 0
    for first in range(0, len(parts), MAX_PARTS):
        batch = [p.contiguous() for p in parts[first:first + MAX_PARTS]]
        n = sizes[first:first + MAX_PARTS]
        offsets = [start + sum(n[:i]) for i in range(len(batch))]
        start += sum(n)
        if not any(n):
            continue
        pad = MAX_PARTS - len(batch)
        srcs = batch + [batch[0]] * pad  # never read: the grid has one column per real part
        block = interpreter_block_n(out.device, max(n)) or _PART_BLOCK
        c = [float(x) for x in scales[first:first + MAX_PARTS]] + [1.0] * pad
        _cast_parts_kernel[(cdiv(max(n), block), len(batch))](
            out[offsets[0]:], *srcs, *(o - offsets[0] for o in offsets[1:]), *([0] * pad),
            *n, *([0] * pad), *c, OUT_DTYPE=TL_DTYPE[dtype], SCALED=any(x != 1.0 for x in c),
            BLOCK=block, num_warps=4)
    return out
