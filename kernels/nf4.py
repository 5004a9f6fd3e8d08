"""Dequantisation of a bitsandbytes 4-bit weight (NF4 or FP4, with or without double
quantisation) in one Triton kernel, registered as the custom op ``fastft::dequantize_4bit``.

Storage layout (bitsandbytes' ``quantize_4bit``; checked against ``dequantize_4bit`` in the tests)
-----------------------------------------------------------------------------------------------
The weight of ``numel`` elements is taken flat, in row-major order, and cut into blocks of
``blocksize`` consecutive elements: block ``k`` holds elements ``[k * blocksize, (k+1) * blocksize)``
whatever the shape (a block may straddle rows). Two 4-bit codes share a byte, the element with
the even flat index in the HIGH nibble:

    byte j = (q[2j] << 4) | q[2j + 1]
    w[i]   = code[q[i]] * absmax[i // blocksize]                       (fp32, then one rounding)

``code`` is the 16-entry fp32 table of the quant type (NF4: normal quantiles in [-1, 1], index
order = value order; FP4: a sign-exponent-mantissa encoding, index order != value order). The
kernel does not care which: it looks the code up. With double quantisation
(``compress_statistics=True``) the per-block scales are themselves stored as uint8 codes into a
second, 256-entry table, blockwise again over the flat list of block scales, with the mean
subtracted first:

    absmax[k] = code2[absmax_u8[k]] * absmax2[k // nested_blocksize] + offset

as two fp32 operations, each rounded (bitsandbytes dequantises the nested scales, then adds the
offset in a separate op; the kernel is launched with FP fusion off so a GPU does not contract
them into one FMA, which would change the last bit of the scale).

Where the fields of a ``bnb.nn.Params4bit`` go (``qs = weight.quant_state``)
---------------------------------------------------------------------------
    packed           weight.data (a [numel/2, 1] uint8 tensor; with a quant_storage other than
                     uint8, ``weight.data.view(torch.uint8)``)
    absmax           qs.absmax            (fp32 [n_blocks], or uint8 [n_blocks] when qs.nested)
    code             qs.code              (fp32 [16])
    blocksize        qs.blocksize
    shape, dtype     qs.shape, the dtype wanted (qs.dtype is the dtype the weight had)
    when qs.nested:
    absmax2          qs.state2.absmax     (fp32 [ceil(n_blocks / qs.state2.blocksize)])
    code2            qs.state2.code       (fp32 [256])
    nested_blocksize qs.state2.blocksize  (256 as bitsandbytes makes it)
    offset           float(qs.offset)     (an fp32 scalar: the Python float is exact, and the
                                           kernel gets it as fp32 again)

(A helper taking the Params4bit itself would make this module import bitsandbytes; kernels/
imports torch and triton only.)

(bitsandbytes 0.50.2's native AVX-512 CPU kernel mis-indexes blocks for some shapes, e.g.
[64, 96] with blocksize 64: rows that are a multiple of 32 but not of blocksize. Its pure-PyTorch
backend and its quantize_4bit follow the flat layout above; tests/test_kernel_nf4.py says how it
compares.)

Only whole blocks are supported: bitsandbytes also accepts a weight whose numel is not a
multiple of blocksize (a short last block) or is odd (a padding nibble); this op raises a
ValueError for those, so a caller can leave such a weight to bitsandbytes.

No autograd: the 4-bit weight is frozen (QLoRA trains adapters beside it), and gradients never
flow into ``packed``, ``absmax`` or the tables; this op has no backward, and none is registered.
A caller that needs the dequantised weight in its own backward (dX = dY W) dequantises again
there rather than saving it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from .launch import INTERPRETER_TILE_ELEMS, cdiv, check_dtype, next_power_of_2
from .rounding import TL_DTYPE, round_fp32

__all__ = [
    "dequantize_4bit",
    "dequantize_4bit_forward",
    "dequantize_4bit_reference",
]

_OP = "fastft::dequantize_4bit"


# --------------------------------------------------------------------------------------------
# Validation (shared by the reference, the launcher and the fake impl)
# --------------------------------------------------------------------------------------------
def _check_args(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor],
    nested_blocksize: int,
    offset: float,
) -> tuple[int, int]:
    """Raise a ValueError naming the problem unless the arguments describe a weight the kernel
    can dequantise; return (numel, n_blocks)."""
    check_dtype(_OP, "dtype", dtype)
    if packed.dtype != torch.uint8:
        raise ValueError(
            f"{_OP}: packed must be uint8 (two 4-bit codes a byte), got {packed.dtype}; a weight "
            f"stored with another quant_storage is passed as packed.view(torch.uint8)"
        )
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"{_OP}: shape {tuple(shape)} has a negative size")
    numel = math.prod(int(s) for s in shape)
    if packed.numel() * 2 != numel:
        raise ValueError(
            f"{_OP}: packed has {packed.numel()} bytes = {packed.numel() * 2} 4-bit codes, but shape "
            f"{tuple(shape)} has {numel} elements"
        )
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"{_OP}: blocksize must be a power of two >= 2, got {blocksize}")
    if numel % blocksize:
        raise ValueError(
            f"{_OP}: blocksize {blocksize} does not divide the {numel} elements of shape "
            f"{tuple(shape)}; a short last block is not supported"
        )
    n_blocks = numel // blocksize
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(
            f"{_OP}: code must be the 16-entry float32 table of the quant type, got "
            f"{code.numel()} entries of {code.dtype}"
        )

    nested = absmax2 is not None or code2 is not None
    if nested and (absmax2 is None or code2 is None):
        given, missing = ("absmax2", "code2") if absmax2 is not None else ("code2", "absmax2")
        raise ValueError(f"{_OP}: double quantisation needs absmax2 and code2 together; {given} "
                         f"was given without {missing}")
    if nested and nested_blocksize <= 0:
        raise ValueError(f"{_OP}: absmax2 and code2 were given but nested_blocksize is "
                         f"{nested_blocksize}; pass quant_state.state2.blocksize (> 0)")
    if isinstance(offset, torch.Tensor):
        if offset.numel() != 1 or offset.dtype != torch.float32 or not nested:
            raise ValueError(f"{_OP}: a tensor offset must be one float32 value of a double-quantised "
                             f"weight, got {offset.dtype} of {offset.numel()} elements")
    elif not nested and (nested_blocksize != 0 or offset != 0.0):
        raise ValueError(f"{_OP}: nested_blocksize={nested_blocksize} and offset={offset} describe "
                         f"double quantisation, but absmax2 and code2 were not given")

    if nested:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"{_OP}: with double quantisation absmax holds uint8 codes, got "
                             f"{absmax.dtype}")
        if code2.dtype != torch.float32 or code2.numel() != 256:
            raise ValueError(f"{_OP}: code2 must be the 256-entry float32 table of the nested "
                             f"quantisation, got {code2.numel()} entries of {code2.dtype}")
        n2 = -(-n_blocks // nested_blocksize)
        if absmax2.dtype != torch.float32 or absmax2.numel() != n2:
            raise ValueError(
                f"{_OP}: absmax2 must be float32 with one entry per {nested_blocksize} blocks "
                f"({n2} for {n_blocks} blocks), got {absmax2.numel()} entries of {absmax2.dtype}"
            )
    elif absmax.dtype != torch.float32:
        hint = ""
        if absmax.dtype == torch.uint8:
            hint = " (uint8 absmax is double-quantised: pass absmax2 and code2 too)"
        raise ValueError(f"{_OP}: absmax must be float32, got {absmax.dtype}{hint}")
    if absmax.numel() != n_blocks:
        raise ValueError(f"{_OP}: absmax has {absmax.numel()} entries, but {numel} elements in "
                         f"blocks of {blocksize} make {n_blocks} blocks")

    devices = {t.device for t in (packed, absmax, code, absmax2, code2) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{_OP}: all tensors must be on one device, got {sorted(map(str, devices))}")
    return numel, n_blocks


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernel is tested against)
# --------------------------------------------------------------------------------------------
def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested: Optional[tuple[torch.Tensor, torch.Tensor, int, Union[float, torch.Tensor]]] = None,
) -> torch.Tensor:
    """Plain PyTorch dequantisation of the layout in the module docstring.

    ``nested`` is ``(absmax2, code2, nested_blocksize, offset)`` for a double-quantised weight
    (offset a float or bitsandbytes' 0-d fp32 tensor), else None.
    """
    absmax2, code2, nested_blocksize, offset = nested if nested is not None else (None, None, 0, 0.0)
    offset = torch.as_tensor(offset, dtype=torch.float32, device=absmax.device)
    _check_args(packed, absmax, code, blocksize, shape, dtype, absmax2, code2, nested_blocksize,
                float(offset))
    flat = packed.reshape(-1)
    q = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1).long()
    if absmax2 is not None:
        block = torch.arange(absmax.numel(), device=absmax.device)
        scale = code2[absmax.long()] * absmax2[block // nested_blocksize]
        scale = scale + offset
    else:
        scale = absmax
    w = code[q].view(-1, blocksize) * scale.view(-1, 1)
    return w.reshape(tuple(shape)).to(dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,  # uint8 [n_blocks * BLOCKSIZE / 2]
    absmax_ptr,  # fp32 [n_blocks], or uint8 [n_blocks] when NESTED
    code_ptr,  # fp32 [16]
    absmax2_ptr,  # fp32 [cdiv(n_blocks, nested_blocksize)] (unused unless NESTED)
    code2_ptr,  # fp32 [256] (unused unless NESTED)
    out_ptr,  # OUT_DTYPE [n_blocks * BLOCKSIZE]
    n_blocks,
    nested_blocksize,
    offset,  # a float, or (OFFSET_IN_MEMORY) a pointer to one
    NESTED: tl.constexpr,
    OFFSET_IN_MEMORY: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """One program dequantises BLOCKS_PER_PROGRAM whole quantisation blocks: a
    [BLOCKS_PER_PROGRAM, BLOCKSIZE] tile of the flat output, with its scales computed once."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    # Flat indices reach numel; index in int64 so a weight beyond 2^31 elements stays addressable.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block_mask = blocks < n_blocks

    if NESTED:
        q_scale = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q_scale, mask=block_mask, other=0.0)
        scale = scale * tl.load(absmax2_ptr + blocks // nested_blocksize, mask=block_mask, other=0.0)
        if OFFSET_IN_MEMORY:
            scale = scale + tl.load(offset)
        else:
            scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0)

    byte_cols = tl.arange(0, HALF)
    mask = block_mask[:, None] & (byte_cols < HALF)[None, :]
    byte = tl.load(packed_ptr + blocks[:, None] * HALF + byte_cols[None, :], mask=mask, other=0)
    # The even element of each pair is in the high nibble.
    first = tl.load(code_ptr + (byte >> 4).to(tl.int32), mask=mask, other=0.0)
    second = tl.load(code_ptr + (byte & 0xF).to(tl.int32), mask=mask, other=0.0)
    w = tl.interleave(first, second) * scale[:, None]
    w = round_fp32(w, OUT_DTYPE).to(OUT_DTYPE)

    cols = tl.arange(0, BLOCKSIZE)
    out_mask = block_mask[:, None] & (cols < BLOCKSIZE)[None, :]
    tl.store(out_ptr + blocks[:, None] * BLOCKSIZE + cols[None, :], w, mask=out_mask)


# --------------------------------------------------------------------------------------------
# Host-side launcher
# --------------------------------------------------------------------------------------------
def _blocks_per_program(device: torch.device, n_blocks: int, blocksize: int,
                        blocks_per_program: Optional[int]) -> int:
    """Whole blocks per program: ~2048 output elements on a GPU (one block when blocksize is
    larger), one large tile under the interpreter (INTERPRETER_TILE_ELEMS), never more than the
    weight has."""
    if blocks_per_program is None:
        target = INTERPRETER_TILE_ELEMS if device.type != "cuda" else 2048
        blocks_per_program = min(max(1, target // blocksize), next_power_of_2(max(n_blocks, 1)))
    if blocks_per_program < 1 or blocks_per_program & (blocks_per_program - 1):
        raise ValueError(f"{_OP}: blocks_per_program must be a power of two, got {blocks_per_program}")
    return blocks_per_program


def dequantize_4bit_forward(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    absmax2: Optional[torch.Tensor] = None,
    code2: Optional[torch.Tensor] = None,
    nested_blocksize: int = 0,
    offset: Union[float, torch.Tensor] = 0.0,
    blocks_per_program: Optional[int] = None,
) -> torch.Tensor:
    """Launch the kernel once; returns a new contiguous tensor of ``shape`` in ``dtype``.
    ``blocks_per_program`` (a power of two) overrides the tiling, for tests."""
    _, n_blocks = _check_args(packed, absmax, code, blocksize, shape, dtype, absmax2, code2,
                              nested_blocksize, offset)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if n_blocks == 0:
        return out
    nested = absmax2 is not None
    bpp = _blocks_per_program(packed.device, n_blocks, blocksize, blocks_per_program)
    dequantize_4bit_kernel[(cdiv(n_blocks, bpp),)](
        packed.reshape(-1).contiguous(),
        absmax.reshape(-1).contiguous(),
        code.contiguous(),
        absmax2.reshape(-1).contiguous() if nested else absmax,  # dummies when not nested: never read
        code2.contiguous() if nested else code,
        out,
        n_blocks,
        nested_blocksize if nested else 1,
        # The captured graph holds the offset as a device tensor: read it there, with no host sync.
        offset.reshape(1) if isinstance(offset, torch.Tensor) else float(offset),
        NESTED=nested,
        OFFSET_IN_MEMORY=isinstance(offset, torch.Tensor),
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=bpp,
        OUT_DTYPE=TL_DTYPE[dtype],
        num_warps=4,
        # Keep the nested scale's multiply and add two rounded operations, as bitsandbytes does.
        enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration (no autograd: the 4-bit weight is frozen)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(_OP, mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    absmax2: Optional[torch.Tensor] = None,
    code2: Optional[torch.Tensor] = None,
    nested_blocksize: int = 0,
    offset: float = 0.0,
) -> torch.Tensor:
    """The bitsandbytes 4-bit weight (``packed`` + scales + code table) as a dense ``shape`` tensor
    in ``dtype``, in one kernel launch; see the module docstring for the layout and arguments."""
    return dequantize_4bit_forward(packed, absmax, code, blocksize, shape, dtype, absmax2, code2,
                                   nested_blocksize, offset)


@dequantize_4bit.register_fake
def _dequantize_4bit_fake(packed, absmax, code, blocksize, shape, dtype, absmax2=None, code2=None,
                          nested_blocksize=0, offset=0.0):
    _check_args(packed, absmax, code, blocksize, shape, dtype, absmax2, code2, nested_blocksize, offset)
    return packed.new_empty(tuple(shape), dtype=dtype)
