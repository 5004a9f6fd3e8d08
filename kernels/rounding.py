"""Rounding helpers shared by the kernels: reproduce, inside an fp32 computation, the rounding an
eager op in a 16-bit dtype would apply to its result."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

_INF = tl.constexpr(float("inf"))
# Compiled for an NVIDIA GPU (not run by Triton's interpreter, which kernels/__init__.py selects
# without one): the hardware's round-to-nearest conversions, two PTX instructions (the bf16 ones
# need sm_80 or later), instead of the integer sequence (eight) the interpreter needs. Inside a
# training step the memory-bound kernels are short of instruction issue, and this took about 1 ms
# off the 1B LoRA step's GPU work (bench/README.md, seventh session). Inline assembly is opaque to
# LLVM, so it cannot fuse a rounded product into an FMA either.
_HARDWARE_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None)


@triton.jit
def round_fp32(y, DTYPE: tl.constexpr):
    """Round fp32 ``y`` to DTYPE (round-to-nearest-even) and return it as fp32 again; DTYPE
    tl.float32 leaves ``y`` as it is. The result is exactly representable in DTYPE, so a later
    cast to DTYPE is exact everywhere.

    Never a cast pair, for two reasons: the interpreter's fp32->bf16 cast truncates (tests must
    see the real rounding: integer ops there), and compiled for a GPU, LLVM sees through a cast
    pair: it narrows ``trunc(ext(a) * ext(c))`` of 16-bit loads into a 16-bit multiply and fuses
    that with the next add into an FMA, dropping the product's rounding that eager PyTorch
    applies (PTX conversions there, which LLVM does not look into).
    """
    if _HARDWARE_ROUNDING and (DTYPE == tl.bfloat16 or DTYPE == tl.float16):
        y = _round_by_conversion(y, DTYPE)
    elif DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, r)  # keep NaN a NaN (the carry could turn it into inf)
    elif DTYPE == tl.float16:
        y = _round_fp16(y)
    return y


@triton.jit
def add_rounded(a, b, DTYPE: tl.constexpr):
    """``round_fp32(a + b, DTYPE)`` as an eager add in DTYPE gives it, where ``a`` is the
    already rounded result of a product: compiled for a GPU, the add is PTX ``add.rn``, which
    neither LLVM nor ptxas fuses with the product into an FMA (an fp32 DTYPE has no rounding in
    between to keep them apart)."""
    if _HARDWARE_ROUNDING:
        y = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = a + b
    return round_fp32(y, DTYPE)


@triton.jit
def round_loaded(y, SRC_DTYPE: tl.constexpr, DTYPE: tl.constexpr):
    """``round_fp32`` of a value loaded from SRC_DTYPE: nothing to do (and no ALU work, which
    the memory-bound kernels feel) when it already is in DTYPE. Also for a value that was
    rounded to SRC_DTYPE just before."""
    if SRC_DTYPE != DTYPE:
        y = round_fp32(y, DTYPE)
    return y


@triton.jit
def _round_by_conversion(y, DTYPE: tl.constexpr):
    """fp32 -> DTYPE (round to nearest even; NaN stays NaN, overflow gives inf) -> fp32, in PTX."""
    if DTYPE == tl.bfloat16:
        r = tl.inline_asm_elementwise("{ .reg .b16 t; cvt.rn.bf16.f32 t, $1; cvt.f32.bf16 $0, t; }", "=f,f", [y],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.inline_asm_elementwise("{ .reg .b16 t; cvt.rn.f16.f32 t, $1; cvt.f32.f16 $0, t; }", "=f,f", [y],
                                      dtype=tl.float32, is_pure=True, pack=1)
    return r


@triton.jit
def _round_fp16(y):
    bits = y.to(tl.uint32, bitcast=True)
    # Normal fp16 range: keep 10 of fp32's 23 mantissa bits, ties to even.
    r = (((bits + (0xFFF + ((bits >> 13) & 1))) >> 13) << 13).to(tl.float32, bitcast=True)
    # Subnormal fp16 range (|y| < 2^-14): multiples of 2^-24. Adding 0.5 (fp32 ulp there: 2^-24)
    # rounds to one, ties to even; subtracting it again is exact.
    a = tl.abs(y)
    sub = (a + 0.5) - 0.5
    negative = (bits >> 31) != 0  # the sign bit: -0.0 stays -0.0
    r = tl.where(a < 6.103515625e-05, tl.where(negative, -sub, sub), r)
    r = tl.where(tl.abs(r) > 65504.0, tl.where(negative, -_INF, _INF), r)  # overflow
    return tl.where(y != y, y, r)  # NaN stays NaN
