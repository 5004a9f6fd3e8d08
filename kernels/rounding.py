"""Rounding helpers shared by the kernels: reproduce, inside an fp32 computation, the rounding an
eager op in a 16-bit dtype would apply to its result."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def round_fp32(y, DTYPE: tl.constexpr):
    """Round fp32 ``y`` to DTYPE (round-to-nearest-even) and return it as fp32 again.

    bf16 is rounded with integer ops rather than ``.to(tl.bfloat16)``: on GPU both are RTNE, but
    the Triton interpreter's fp32->bf16 cast truncates, and tests must see the real rounding.
    The result is exactly representable in DTYPE, so a later cast to DTYPE is exact everywhere.
    DTYPE tl.float32 leaves ``y`` as it is.
    """
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, r)  # keep NaN a NaN (the carry could turn it into inf)
    elif DTYPE == tl.float16:
        y = y.to(tl.float16).to(tl.float32)
    return y
