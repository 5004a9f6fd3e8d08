"""Rounding helpers shared by the kernels: reproduce, inside an fp32 computation, the rounding an
eager op in a 16-bit dtype would apply to its result."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Compiled for a GPU, the fp32->bf16 cast rounds to nearest even in one instruction; the
# interpreter's cast truncates, so there the rounding is done with integer ops (which on an H100
# cost ~25% of a norm backward, hence not everywhere). kernels/__init__ picks the mode.
_EMULATE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_fp32(y, DTYPE: tl.constexpr):
    """Round fp32 ``y`` to DTYPE (round-to-nearest-even) and return it as fp32 again.

    Under the interpreter bf16 is rounded with integer ops (its cast truncates, and tests must
    see the real rounding). The result is exactly representable in DTYPE, so a later cast to
    DTYPE is exact everywhere. DTYPE tl.float32 leaves ``y`` as it is.
    """
    if DTYPE == tl.bfloat16 and not _EMULATE_BF16_ROUNDING:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, r)  # keep NaN a NaN (the carry could turn it into inf)
    elif DTYPE == tl.float16:
        y = y.to(tl.float16).to(tl.float32)
    return y
