"""Side-by-side copies of 2-D tensors into one wider tensor (Triton): the operands of a GEMM that
takes a LoRA correction through its depth, [x | x A^T] and [W | s B] (``kernels/lora.py``).

PyTorch's ``copy_`` into a column slice of a wider tensor cannot use its vectorised kernel (the
destination is not contiguous) and moved a [8192, 2048] bf16 block at about 1.6 TB/s on the
H200: 39 us a copy, four such copies per layer of the 1B LoRA training step of bench/train_step
(its profile at cd9bde0, 2026-11-29; bench/README.md names the run). Here each part is copied in
[rows, columns] tiles whose rows are contiguous on both sides, so loads and stores are wide.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import SUPPORTED_DTYPES, cdiv, interpreter_block_n, interpreter_block_rows, next_power_of_2
from .rounding import TL_DTYPE, round_loaded

__all__ = ["concat_columns"]


@triton.jit
def _copy_block_kernel(src_ptr, dst_ptr, n_rows, N, stride_src, stride_dst, OUT_DTYPE: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid_r = pid // n_col_blocks
    pid_c = pid - pid_r * n_col_blocks
    rows = (pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    v = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :], mask=mask)
    if src_ptr.dtype.element_ty != OUT_DTYPE:  # rounded to nearest (the interpreter's cast truncates)
        v = round_loaded(v.to(tl.float32), src_ptr.dtype.element_ty, OUT_DTYPE)
    tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], v.to(OUT_DTYPE), mask=mask)


def _copy_block(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:, :] = src for 2-D tensors of one shape, both with unit column stride."""
    n_rows, n = src.shape
    if src.numel() == 0:
        return
    # About 4K elements a program on a GPU: wide rows in one or a few programs, narrow ones
    # stacked; the interpreter's larger tiles off it.
    block_n = interpreter_block_n(src.device, n) or min(next_power_of_2(n), 1024)
    block_rows = (interpreter_block_rows(src.device, n_rows, n)
                  or min(max(1, 4096 // block_n), next_power_of_2(n_rows)))
    _copy_block_kernel[(cdiv(n_rows, block_rows) * cdiv(n, block_n),)](
        src, dst, n_rows, n, src.stride(0), dst.stride(0), OUT_DTYPE=TL_DTYPE[dst.dtype],
        BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=4)


def concat_columns(*parts: torch.Tensor) -> torch.Tensor:
    """[part_0 | part_1 | ...]: 2-D tensors of one row count side by side in one new contiguous
    tensor, in the first part's dtype (each part cast as it is copied)."""
    first = parts[0]
    for i, p in enumerate(parts):
        if p.dim() != 2 or p.shape[0] != first.shape[0]:
            raise ValueError(f"concat_columns: part {i} is {list(p.shape)}; every part must be 2-D with "
                             f"{first.shape[0]} rows")
        if p.dtype not in SUPPORTED_DTYPES or p.device != first.device:
            raise ValueError(f"concat_columns: part {i} is {p.dtype} on {p.device}; parts must be float32, "
                             f"bfloat16 or float16 on {first.device}")
    out = first.new_empty((first.shape[0], sum(p.shape[1] for p in parts)))
    start = 0
    for p in parts:
        width = p.shape[1]
        if width:
            _copy_block(p if p.stride(1) == 1 or width == 1 else p.contiguous(), out[:, start:start + width])
        start += width
    return out
