"""Cross-entropy of a linear projection's logits, computed chunk by chunk so that the full
[N, V] logits never exist: the custom op ``fastft::linear_cross_entropy``.

For hidden states h [N, H], a projection weight W [V, H] (nn.Linear layout), an optional bias
b [V], integer labels y [N] and the constants s = logit_scale, c = softcap:

    a    = h W^T + b                                     (accumulated in fp32, rounded to h's dtype)
    z    = s a                    or, with a softcap:    z = c tanh(s a / c)
           (s: the constant logit_scale, times a frozen per-vocabulary column_scale[v] if given)
    l_i  = logsumexp_v(z_iv) - z_{i, y_i}                (0 for rows with y_i == ignore_index)
    loss = sum_i l_i / D,   D = 1 ("sum"), the count of non-ignored rows ("mean"), or the
                                given normalizer (a tensor, e.g. the number of items in the
                                batch; then reduction must be "sum")

The gradient of the loss with respect to the logits is, for a non-ignored row i,

    dl/da_iv = (softmax(z_i)_v - [v == y_i]) * dz_iv/da_iv / D
    dz/da    = s                  or, with a softcap:    s (1 - tanh^2(s a / c)) = s (1 - (z / c)^2)

and 0 for an ignored row; then dh = (dl/da) W, dW = (dl/da)^T h, db = sum_i dl/da_i.

Since the loss is a scalar, its gradients are fixed up to the scalar grad_output. The forward
therefore computes them right away, one chunk of rows at a time:

    1. a_c = h_c W^T + b into a buffer [rows, V] in the inputs' dtype (cuBLAS: fp32
       accumulation, one rounding, as the eager projection does);
    2. one Triton program per row: an online (running max) logsumexp over V in blocks, in fp32,
       the row's loss, then dl/da written over the row's own logits (same dtype, same lanes);
    3. dh_c = (dl/da)_c W into dh, dW += (dl/da)_c^T h_c, db += sum of (dl/da)_c rows,

and the backward only multiplies the stored gradients by grad_output. Peak memory is one chunk
of logits plus the gradients themselves (dh [N, H], dW [V, H], each only when the input
requires grad), never [N, V]. dW accumulates in the weight's dtype: each chunk's GEMM adds its
fp32 product to it in fp32 and rounds once (an fp32 [V, H] accumulator would cost twice the
weight's size in memory, more than all the rest of the loss step).

The logits are those of the eager computation ``(h @ W.T + b).float()``: 16-bit inputs give
16-bit logits. Keeping them in fp32 instead would be more precise than the model being
optimised and cost 14 instead of 8 bytes of memory traffic per logit (written once, read twice,
gradient written). The differences from eager: the chunks' GEMMs may pick other cuBLAS kernels
than one [N, V] GEMM (the same math, other summation orders), the scale and softcap are applied
in fp32, and dW gets one 16-bit rounding per chunk instead of one overall.

Ops: ``fastft::linear_cross_entropy`` (the public one; a CompositeImplicitAutograd op that asks
which gradients are needed and calls the next) -> ``fastft::linear_cross_entropy_with_grads``
(loss and stored gradients; autograd registered) whose backward is the op
``fastft::linear_cross_entropy_backward`` (scales the stored gradients in place). All have fake
implementations, so AOT autograd / torch.compile trace them.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import SUPPORTED_DTYPES, cdiv, empty_or, next_power_of_2
from .rounding import TL_DTYPE, round_fp32

__all__ = [
    "CHUNK_BYTES",
    "REDUCTIONS",
    "SUPPORTED_DTYPES",
    "column_scale_fits",
    "linear_cross_entropy",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_reference",
    "scale_gradients_",
]

LABEL_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32)
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
# Bytes of the logits chunk, by device type: bounds the loss step's extra memory. 512 MiB on a
# GPU keeps the chunk GEMMs large (>= 512 rows of fp32 logits up to V = 262,144) while staying a small
# fraction of what the unfused computation holds (~12 bytes per logit: bf16 logits, their fp32
# copy, log-softmax output and gradients).
CHUNK_BYTES: dict[str, int] = {"cuda": 512 << 20, "cpu": 32 << 20}
# Never fewer rows a chunk than this (GEMM efficiency), unless the budget above forbids it.
MIN_CHUNK_ROWS: int = 512

_PREFIX = "fastft::linear_cross_entropy:"


# --------------------------------------------------------------------------------------------
# Reference (the oracle the kernels are tested against)
# --------------------------------------------------------------------------------------------
def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    normalizer: Optional[Union[torch.Tensor, float]] = None,
    column_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain PyTorch, the way eager models compute it (differentiable): the projection in the
    inputs' dtype (rounded to it), then upcast to fp32, scaled, soft-capped, cross-entropy."""
    logits = F.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if column_scale is not None:
        logits = logits * column_scale.float().reshape(-1)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if normalizer is not None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / normalizer
    # "mean" through F.cross_entropy itself: all rows ignored gives nan, with zero gradients.
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh in fp32 (no tanh in tl, and libdevice's does not run in the interpreter): an odd
    Taylor polynomial near 0, where (1 - e) / (1 + e) would cancel, that form elsewhere."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)  # in (0, 1]: no overflow for any |x|
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # x - x^3/3 + 2x^5/15 - 17x^7/315 (next term < 2e-10 absolute for |x| < 0.125)
    p = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 - x2 * 0.05396825396825397)))
    return tl.where(a < 0.125, p, tl.where(x < 0, -t, t))


@triton.jit
def _logits_block(
    logits_row, cscale_ptr, offs, mask, softcap, logit_scale,
    HAS_COLUMN_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """(z, dz/da) of one block of a row, in fp32; masked lanes give z = -inf."""
    a = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
    scale = logit_scale
    if HAS_COLUMN_SCALE:
        scale = tl.load(cscale_ptr + offs, mask=mask, other=1.0) * logit_scale
    z = a * scale
    dz = scale
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
        dz = scale * (1.0 - t * t)
    z = tl.where(mask, z, float("-inf"))
    return z, dz


@triton.jit
def linear_cross_entropy_rows_kernel(
    logits_ptr,  # [rows, V] DTYPE, row stride stride_l: a = h W^T + b of this chunk; dl/da on return
    labels_ptr,  # [rows] int32 / int64
    cscale_ptr,  # [V] fp32 per-vocabulary scale, or a dummy
    loss_ptr,  # [rows] fp32: each row's loss, not divided by D
    inv_div_ptr,  # [1] fp32: 1 / D
    V,
    stride_l,
    ignore_index,
    softcap,
    logit_scale,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride exceeds 2^31 for large chunks
    logits_row = logits_ptr + row * stride_l
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)

    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero = tl.zeros((BLOCK_V,), dtype=DTYPE)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(logits_row + offs, zero, mask=offs < V)
    else:
        # A label outside [0, V) (torch would raise) makes the row's loss and gradient NaN.
        valid = (label >= 0) & (label < V)
        safe_label = tl.where(valid, label, 0)
        # The target logit first: the gradient pass below overwrites the row.
        # (Never name an unused result `_`: the loops below assign it too, and compiled Triton
        # then takes it for a loop-carried value whose type changes: scalar here, block there.)
        z_t, dz_t = _logits_block(logits_row, cscale_ptr, safe_label, valid, softcap, logit_scale,
                                  HAS_COLUMN_SCALE, HAS_SOFTCAP)
        z_t = tl.where(valid, z_t, float("nan"))

        # Online logsumexp: each lane keeps its running max m and sum s of exp(z - m); lanes
        # are merged once at the end. m starts finite so that exp(m - m_new) is never nan.
        m = tl.full((BLOCK_V,), -1.0e30, dtype=tl.float32)
        s = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z, dz_unused = _logits_block(logits_row, cscale_ptr, offs, offs < V, softcap,
                                         logit_scale, HAS_COLUMN_SCALE, HAS_SOFTCAP)
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        tl.store(loss_ptr + row, lse - z_t)

        if COMPUTE_GRAD:
            inv_div = tl.load(inv_div_ptr)
            inv_div = tl.where(valid, inv_div, float("nan"))
            # Each block's gradient goes over the logits it was computed from, lane for lane.
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                z, dz = _logits_block(logits_row, cscale_ptr, offs, mask, softcap, logit_scale,
                                      HAS_COLUMN_SCALE, HAS_SOFTCAP)
                p = tl.exp(z - lse)
                g = tl.where(offs == label, p - 1.0, p) * dz * inv_div
                g = round_fp32(g, DTYPE).to(DTYPE)
                tl.store(logits_row + offs, g, mask=mask)


# --------------------------------------------------------------------------------------------
# Host-side validation and launcher
# --------------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    logit_scale: float,
    reduction: str,
    normalizer: Optional[torch.Tensor],
    column_scale: Optional[torch.Tensor] = None,
) -> None:
    """Everything checkable without reading data (also run by the fake implementations)."""
    names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
    for arg, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{_PREFIX} {arg} has unsupported dtype {t.dtype}; supported dtypes: {names}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(
            f"{_PREFIX} hidden, weight and bias must share one dtype, got hidden {hidden.dtype}, "
            f"weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(
            f"{_PREFIX} labels must be integer class indices (torch.int64 or torch.int32), got {labels.dtype}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_PREFIX} reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() < 1:
        raise ValueError(f"{_PREFIX} hidden must have at least 1 dimension [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{_PREFIX} weight must be [V, H] with H = {hidden.shape[-1]} (the last dim of hidden), "
            f"got shape {_shape(weight)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{_PREFIX} weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{_PREFIX} bias must be [V] with V = {weight.shape[0]}, got shape {_shape(bias)}"
        )
    lead = _shape(hidden)[:-1]
    n_rows = math.prod(lead)
    if _shape(labels) != lead and not (labels.dim() == 1 and labels.shape[0] == n_rows):
        raise ValueError(
            f"{_PREFIX} labels must have hidden's leading shape {lead} (or be flat with {n_rows} "
            f"elements), got shape {_shape(labels)}"
        )
    for arg, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{_PREFIX} {arg} is on {t.device} but hidden is on {hidden.device}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"{_PREFIX} softcap must be a positive finite number or None, got {softcap}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"{_PREFIX} logit_scale must be finite, got {logit_scale}")
    if column_scale is not None:
        v = weight.shape[0]
        if not column_scale_fits(column_scale, v):
            raise ValueError(f"{_PREFIX} column_scale must be a floating-point [V] tensor (V = {v}) or one "
                             f"number, got {column_scale.dtype} of shape {_shape(column_scale)}")
        if column_scale.device != hidden.device:
            raise ValueError(f"{_PREFIX} column_scale is on {column_scale.device} but hidden is on {hidden.device}")
    if normalizer is not None:
        if reduction != "sum":
            raise ValueError(
                f"{_PREFIX} a normalizer divides the summed loss: reduction must be 'sum', got {reduction!r}"
            )
        if normalizer.numel() != 1:
            raise ValueError(f"{_PREFIX} normalizer must hold one number, got shape {_shape(normalizer)}")
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"{_PREFIX} normalizer must be a real number, got dtype {normalizer.dtype}")


def column_scale_fits(scale: torch.Tensor, vocabulary: int) -> bool:
    """Whether ``scale`` can multiply the logits column by column: a floating-point [V] tensor or
    one number, with any leading dims of size 1."""
    shape = _shape(scale)
    return scale.is_floating_point() and all(d == 1 for d in shape[:-1]) and (
        not shape or shape[-1] == 1 or shape[-1] == vocabulary)


def _chunk_rows(n_rows: int, v: int, device: torch.device, chunk_rows: Optional[int],
                element_size: int = 4) -> int:
    """Rows per chunk: as many as the logits budget allows (at most an eighth of the rows,
    but never fewer than MIN_CHUNK_ROWS), balanced so that the chunks have equal sizes."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"{_PREFIX} chunk_rows must be >= 1, got {chunk_rows}")
        return min(chunk_rows, max(n_rows, 1))
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    rows = max(1, min(budget // (element_size * v), max(n_rows // 8, MIN_CHUNK_ROWS)))
    n_chunks = cdiv(max(n_rows, 1), rows)
    return cdiv(max(n_rows, 1), n_chunks)


def _project(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """out = h @ weight.T (+ bias) in h's dtype: one GEMM accumulating in fp32, rounded once."""
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)


def _kernel_config(v: int, device: torch.device, block_v: Optional[int]) -> tuple[int, int]:
    """(BLOCK_V, num_warps): rows are long (V ~ 1e5), so wide blocks with many warps. Swept on
    the H200 (2026-11-30, ``python3 bench/loss_tiles.py``: 1024 rows of V = 128,256 bf16
    logits, gradients computed, do_bench medians): 4096 with 16 warps 238 us, 8192 with 16 246,
    2048 with 8 250, 4096 with 8 260."""
    if block_v is None:
        # Off the GPU (Triton's interpreter) a wide block means few numpy calls per row.
        block_v = min(next_power_of_2(v), 4096 if device.type == "cuda" else 16384)
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"{_PREFIX} block_v must be a power of two, got {block_v}")
    num_warps = 16 if block_v >= 4096 else 8 if block_v >= 2048 else 4
    return block_v, num_warps


def _divisor(labels: torch.Tensor, ignore_index: int, reduction: str,
             normalizer: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """D as a 0-d fp32 tensor on the device (None for a plain sum): no host synchronisation."""
    if normalizer is not None:
        return normalizer.detach().to(device=device, dtype=torch.float32).reshape(())
    if reduction == "mean":
        return (labels != ignore_index).sum().to(torch.float32)
    return None


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    normalizer: Optional[Union[torch.Tensor, float]] = None,
    need_dhidden: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
    chunk_rows: Optional[int] = None,
    block_v: Optional[int] = None,
    column_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Loss (0-d fp32) and its gradients for grad_output = 1: (loss, dhidden in hidden's
    shape and dtype, dweight, dbias), None where not asked (dbias also when there is no bias).

    ``chunk_rows`` overrides the number of rows whose logits exist at once, ``block_v``
    the kernel's block of vocabulary entries (a power of two). ``column_scale`` (frozen: it gets
    no gradient) multiplies each vocabulary entry's logit.
    """
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        normalizer = torch.tensor(float(normalizer))
    _check_inputs(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, reduction, normalizer,
                  column_scale)
    device = hidden.device
    v, h_dim = weight.shape
    if column_scale is not None:
        column_scale = column_scale.detach().float().reshape(-1).expand(v).contiguous()
    need_dbias = need_dbias and bias is not None
    h2 = hidden.reshape(-1, h_dim)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    y = labels.reshape(-1).contiguous()
    n_rows = h2.shape[0]
    compute_grad = need_dhidden or need_dweight or need_dbias

    dh = torch.empty((n_rows, h_dim), dtype=hidden.dtype, device=device) if need_dhidden else None
    # dW is written whole by the first chunk (zeros only when there is none)
    dw = (torch.empty if n_rows else torch.zeros)((v, h_dim), dtype=weight.dtype, device=device) if need_dweight else None
    db32 = torch.zeros((v,), dtype=torch.float32, device=device) if need_dbias else None
    row_loss = torch.empty((n_rows,), dtype=torch.float32, device=device)
    divisor = _divisor(y, ignore_index, reduction, normalizer, device)
    inv_div = (1.0 / divisor if divisor is not None else torch.ones((), device=device)).reshape(1)

    if n_rows:
        rows = _chunk_rows(n_rows, v, device, chunk_rows, hidden.element_size())
        buf = torch.empty((rows, v), dtype=hidden.dtype, device=device)
        block_v, num_warps = _kernel_config(v, device, block_v)
        cscale_arg = column_scale if column_scale is not None else buf
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            h_c = h2[r0:r1]
            logits = buf[: r1 - r0]
            _project(logits, h_c, weight, bias)
            linear_cross_entropy_rows_kernel[(r1 - r0,)](
                logits, y[r0:r1], cscale_arg, row_loss[r0:r1], inv_div,
                v, logits.stride(0), int(ignore_index),
                float(softcap) if softcap is not None else 1.0, float(logit_scale),
                HAS_COLUMN_SCALE=column_scale is not None,
                HAS_SOFTCAP=softcap is not None,
                COMPUTE_GRAD=compute_grad,
                DTYPE=TL_DTYPE[hidden.dtype],
                BLOCK_V=block_v,
                num_warps=num_warps,
            )
            grad = logits  # now dl/da
            if need_dhidden:
                torch.mm(grad, weight, out=dh[r0:r1])
            if need_dweight:
                if r0 == 0:
                    torch.mm(grad.t(), h_c, out=dw)
                else:
                    dw.addmm_(grad.t(), h_c)
            if need_dbias:
                db32 += grad.sum(0, dtype=torch.float32)

    loss = row_loss.sum()
    if divisor is not None:
        loss = loss / divisor
    return (
        loss,
        dh.view(hidden.shape) if need_dhidden else None,
        dw,
        db32.to(bias.dtype) if need_dbias else None,
    )


@triton.jit
def scale_in_place_kernel(x_ptr, n, factor_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """x *= factor (a device scalar, read here: no host synchronisation), in fp32, rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    factor = tl.load(factor_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, round_fp32(x * factor, DTYPE).to(DTYPE), mask=mask)


_SCALE_BLOCK = 4096


def scale_gradients_(grad_output: torch.Tensor, *grads: Optional[torch.Tensor]) -> None:
    """Multiply each (contiguous) gradient in place by the scalar grad_output: fp32 products,
    rounded once to the gradient's dtype. A kernel of its own, so that no temporary of a
    gradient's size (dW can be gigabytes) is ever allocated."""
    factor = grad_output.detach().reshape(1)
    for d in grads:
        if d is None or not d.numel():
            continue
        if not d.is_contiguous():
            raise ValueError(f"{_PREFIX} the stored gradients must be contiguous, got strides {d.stride()}")
        n = d.numel()
        scale_in_place_kernel[(cdiv(n, _SCALE_BLOCK),)](
            d, n, factor, DTYPE=TL_DTYPE[d.dtype], BLOCK=_SCALE_BLOCK, num_warps=8)


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
# Loss and the stored gradients (for grad_output = 1); gradients that were not asked for come
# back as empty tensors (custom ops return Tensors only).
@torch.library.custom_op("fastft::linear_cross_entropy_with_grads", mutates_args=())
def _with_grads_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    logit_scale: float,
    reduction: str,
    normalizer: Optional[torch.Tensor],
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    column_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, dh, dw, db = linear_cross_entropy_forward(
        hidden, weight, bias, labels, ignore_index, softcap, logit_scale, reduction, normalizer,
        need_dhidden, need_dweight, need_dbias, column_scale=column_scale,
    )
    return loss, empty_or(dh, hidden), empty_or(dw, weight), empty_or(db, hidden)


@_with_grads_op.register_fake
def _with_grads_fake(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, reduction,
                     normalizer, need_dhidden, need_dweight, need_dbias, column_scale=None):
    _check_inputs(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, reduction, normalizer,
                  column_scale)
    loss = hidden.new_empty((), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dweight else weight.new_empty(0)
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else hidden.new_empty(0)
    return loss, dh, dw, db


# The backward: the stored gradients times grad_output, in place (no second copy of dW). Empty
# tensors (gradients not computed) are left alone.
@torch.library.custom_op("fastft::linear_cross_entropy_backward", mutates_args=("dhidden", "dweight", "dbias"))
def _backward_op(
    grad_output: torch.Tensor,
    dhidden: torch.Tensor,
    dweight: torch.Tensor,
    dbias: torch.Tensor,
) -> None:
    scale_gradients_(grad_output, dhidden, dweight, dbias)


@_backward_op.register_fake
def _backward_fake(grad_output, dhidden, dweight, dbias) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    _loss, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    # Autograd would otherwise hand the backward a zero "gradient" for each stored-gradient
    # output: a dW-sized allocation (gigabytes) that is never read.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dh, dw, db)
    ctx.needs = (inputs[9], inputs[10], inputs[11] and inputs[2] is not None)


def _autograd_backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    dh, dw, db = ctx.saved_tensors
    # Scaling in place bumps the saved tensors' versions: a second backward through the same
    # graph (retain_graph=True) raises instead of scaling twice.
    torch.ops.fastft.linear_cross_entropy_backward(grad_loss, dh, dw, db)
    need_dh, need_dw, need_db = ctx.needs
    return ((dh if need_dh else None), (dw if need_dw else None), (db if need_db else None),
            None, None, None, None, None, None, None, None, None, None)


_with_grads_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# The public op. It must decide which gradients the forward computes, which depends on autograd
# state (grad mode, requires_grad): so it is CompositeImplicitAutograd, run above autograd, and
# forwards to the op above. Under AOT autograd / torch.compile it decomposes into that op.
_LIB = torch.library.Library("fastft", "FRAGMENT")  # noqa: TOR901  (kept alive: owns the registration)
_LIB.define(
    "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
    "float? softcap, float logit_scale, str reduction, Tensor? normalizer, Tensor? column_scale=None) -> Tensor"
)


def _linear_cross_entropy_composite(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    logit_scale: float,
    reduction: str,
    normalizer: Optional[torch.Tensor],
    column_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    grad = torch.is_grad_enabled()
    if grad and column_scale is not None and column_scale.requires_grad:
        raise ValueError(f"{_PREFIX} column_scale requires grad, and the fused loss gives it none: "
                         f"pass a frozen (detached) scale, or compute this loss unfused")
    need_dh = grad and hidden.requires_grad
    need_dw = grad and weight.requires_grad
    need_db = grad and bias is not None and bias.requires_grad
    loss, _, _, _ = torch.ops.fastft.linear_cross_entropy_with_grads(
        hidden, weight, bias, labels, ignore_index, softcap, logit_scale, reduction, normalizer,
        need_dh, need_dw, need_db, column_scale,
    )
    return loss


_LIB.impl("linear_cross_entropy", _linear_cross_entropy_composite, "CompositeImplicitAutograd")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    normalizer: Optional[torch.Tensor] = None,
    column_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``torch.ops.fastft.linear_cross_entropy`` with defaults; see the module docstring."""
    return torch.ops.fastft.linear_cross_entropy(
        hidden, weight, bias, labels, ignore_index, softcap, logit_scale, reduction, normalizer, column_scale
    )
