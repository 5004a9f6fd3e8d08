"""LoRA linears with a frozen base weight, registered as the custom ops ``fastft::lora_linear``
and ``fastft::lora_glu_mlp``.

    lora_linear(x) = x W^T + b + s (x A^T) B^T          W [out, in] frozen, A [r, in], B [out, r]

The speed of adapter training comes from what the backward need not do, and from never
materialising the full-size intermediates that a module-by-module computation makes:

- the adapter's contribution is accumulated into the base GEMM's output by a second GEMM
  (``addmm`` with ``alpha = s``): no [tokens, out] product, scaled copy and sum;
- the backward computes dX = dY W + s (dY B) A the same way, dA = s (dY B)^T X and
  dB = s dY^T (X A^T), and no dW unless the base weight is trainable;
- only X is saved (X A^T is [tokens, r] and recomputed).

The matmuls stay with cuBLAS: a GEMM written in Triton would not beat it. The MLP op uses the
Triton GLU kernels of ``kernels/glu.py`` for the activation and recomputes act(gate) * up in the
backward instead of saving it (one [tokens, width] tensor per layer less).

Numerics: everything runs in the base weight's dtype (the adapters, often kept in float32 by
peft, are cast to it: they are tiny), with float32 accumulation inside the GEMMs, as a 16-bit
model computes its base linears anyway. Gradients come back in each parameter's own dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .glu import glu_backward, glu_forward, glu_reference
from .nf4 import dequantize_4bit_forward
from .launch import SUPPORTED_DTYPES, check_dtype

__all__ = [
    "lora_glu_mlp",
    "lora_glu_mlp_reference",
    "lora_linear",
    "lora_linear_reference",
    "lora_linear_x3",
    "code_table",
    "qlora_linear",
]


# --------------------------------------------------------------------------------------------
# References (the oracle the ops are tested against): a peft LoRA linear, as peft computes it
# --------------------------------------------------------------------------------------------
def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``base(x) + lora_B(lora_A(x)) * scale`` with the adapter run in its own dtype, then cast."""
    base = F.linear(x, weight, bias)
    adapter = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scale
    return (base + adapter).to(out_dtype or base.dtype)


def lora_glu_mlp_reference(x: torch.Tensor, gate: tuple, up: tuple, down: tuple, activation: str,
                           round_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)), each projection a LoRA linear given as (W, A, B, scale)."""
    g = lora_linear_reference(x, gate[0], None, *gate[1:])
    u = lora_linear_reference(x, up[0], None, *up[1:])
    h = glu_reference(g, u, activation, round_dtype, g.dtype)
    return lora_linear_reference(h, down[0], None, *down[1:])


# --------------------------------------------------------------------------------------------
# Host code: the GEMMs of one LoRA linear, forward and backward, on 2-D row views
# --------------------------------------------------------------------------------------------
def _check(op: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_dtype(op, name, t.dtype)
    if x.dtype != weight.dtype:
        raise ValueError(f"{op}: x is {x.dtype} but the base weight is {weight.dtype}; "
                         f"they must agree (the base linear runs in one dtype)")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"{op}: weight, lora_a and lora_b must be 2-D, got {weight.dim()}-D, "
                         f"{lora_a.dim()}-D and {lora_b.dim()}-D")
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x of shape {tuple(x.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)} (expected [..., {in_features}])")
    if tuple(lora_a.shape) != (rank, in_features) or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"{op}: adapter shapes A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not "
                         f"fit a weight of shape {tuple(weight.shape)} (expected A [r, {in_features}], "
                         f"B [{out_features}, r])")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias of shape {tuple(bias.shape)} for {out_features} outputs")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _forward_2d(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    dtype = weight.dtype
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    if bias is not None:
        y = torch.addmm(bias.to(dtype), x2, weight.t())
    else:
        y = torch.mm(x2, weight.t())
    # The adapter's product goes straight into y's accumulator (beta = 1): no [rows, out] temporary.
    return y.addmm_(torch.mm(x2, a.t()), b.t(), alpha=scale)


def _backward_2d(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, need: tuple[bool, bool, bool, bool, bool],
                 dx: Optional[torch.Tensor] = None):
    """(dx, dweight, dbias, dlora_a, dlora_b) on 2-D views; None where ``need`` says no. Given
    ``dx`` (other linears of the same input), the input gradient accumulates into it in place."""
    need_dx, need_dw, need_dbias, need_da, need_db = need
    dtype = weight.dtype
    dy2 = dy2.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    dy_b = torch.mm(dy2, b) if (need_dx or need_da) else None  # [rows, r]
    if need_dx:
        # Each GEMM accumulates into the one buffer (beta = 1): no temporary per contribution.
        dx = torch.mm(dy2, weight) if dx is None else dx.addmm_(dy2, weight)
        dx.addmm_(dy_b, a, alpha=scale)
    dw = torch.mm(dy2.t(), x2).to(weight.dtype) if need_dw else None
    dbias = dy2.sum(0) if need_dbias else None
    da = torch.mm(dy_b.t(), x2).mul_(scale).to(lora_a.dtype) if need_da else None
    db = torch.mm(dy2.t(), torch.mm(x2, a.t())).mul_(scale).to(lora_b.dtype) if need_db else None
    return dx, dw, dbias, da, db


# --------------------------------------------------------------------------------------------
# fastft::lora_linear
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x W^T + bias + scale (x A^T) B^T in the base weight's dtype, returned in ``out_dtype``."""
    _check("fastft::lora_linear", x, weight, bias, lora_a, lora_b)
    y = _forward_2d(_rows(x), weight, bias, lora_a, lora_b, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)


@lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, out_dtype):
    _check("fastft::lora_linear", x, weight, bias, lora_a, lora_b)
    check_dtype("fastft::lora_linear", "out_dtype", out_dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


def _lora_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scale, _out_dtype = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _lora_linear_backward(ctx, dy: Optional[torch.Tensor]):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:5])
    if dy is None or not any(need):
        return None, None, None, None, None, None, None
    need_dx, need_dw, need_dbias, need_da, need_db = need
    dx, dw, dbias, da, db = _backward_2d(_rows(dy), _rows(x), weight, lora_a, lora_b, ctx.scale,
                                         (need_dx, need_dw, need_dbias, need_da, need_db))
    if dx is not None:
        dx = dx.reshape(x.shape)
    return dx, dw, dbias, da, db, None, None


lora_linear.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup_context)


# --------------------------------------------------------------------------------------------
# fastft::lora_linear_x3: three LoRA linears of one input (attention's q, k and v)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::lora_linear_x3", mutates_args=())
def lora_linear_x3(x: torch.Tensor,
                   w0: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, s0: float,
                   w1: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, s1: float,
                   w2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, s2: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lora_linear`` of x by three (W, A, B, s), without biases. One op so that the backward
    sums the three input gradients in one buffer (each GEMM accumulates into it) instead of
    materialising three and adding them."""
    x2 = _rows(x)
    outs = []
    for w, a, b, s in ((w0, a0, b0, s0), (w1, a1, b1, s1), (w2, a2, b2, s2)):
        _check("fastft::lora_linear_x3", x, w, None, a, b)
        outs.append(_forward_2d(x2, w, None, a, b, s).reshape(*x.shape[:-1], w.shape[0]).to(out_dtype))
    return tuple(outs)


@lora_linear_x3.register_fake
def _lora_linear_x3_fake(x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, out_dtype):
    outs = []
    for w, a, b in ((w0, a0, b0), (w1, a1, b1), (w2, a2, b2)):
        _check("fastft::lora_linear_x3", x, w, None, a, b)
        outs.append(x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype))
    return tuple(outs)


def _lora_linear_x3_setup_context(ctx, inputs, output) -> None:
    x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, _out_dtype = inputs
    ctx.save_for_backward(x, w0, a0, b0, w1, a1, b1, w2, a2, b2)
    ctx.scales = (s0, s1, s2)
    ctx.set_materialize_grads(False)


def _lora_linear_x3_backward(ctx, *dys: Optional[torch.Tensor]):
    x, *saved = ctx.saved_tensors
    grads: list[Optional[torch.Tensor]] = [None] * 14
    x2, dx = _rows(x), None
    for i, dy in enumerate(dys):
        if dy is None:
            continue
        w, a, b = saved[3 * i:3 * i + 3]
        need = (ctx.needs_input_grad[0], False, False, ctx.needs_input_grad[2 + 4 * i],
                ctx.needs_input_grad[3 + 4 * i])
        dx, _, _, grads[2 + 4 * i], grads[3 + 4 * i] = _backward_2d(_rows(dy), x2, w, a, b, ctx.scales[i], need,
                                                                    dx)
    if dx is not None:
        grads[0] = dx.reshape(x.shape)
    return tuple(grads)


lora_linear_x3.register_autograd(_lora_linear_x3_backward, setup_context=_lora_linear_x3_setup_context)


# --------------------------------------------------------------------------------------------
# fastft::lora_glu_mlp: down(act(gate(x)) * up(x)), every projection a LoRA linear
# --------------------------------------------------------------------------------------------
def _check_mlp(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b) -> None:
    op = "fastft::lora_glu_mlp"
    _check(op, x, gate_w, None, gate_a, gate_b)
    _check(op, x, up_w, None, up_a, up_b)
    if gate_w.shape != up_w.shape:
        raise ValueError(f"{op}: gate {tuple(gate_w.shape)} and up {tuple(up_w.shape)} projections differ in shape")
    if down_w.dtype != x.dtype:
        raise ValueError(f"{op}: the down projection is {down_w.dtype} but x is {x.dtype}")
    _check(op, x.new_empty((1, gate_w.shape[0])), down_w, None, down_a, down_b)


# The forward returns the gate and up pre-activations beside the result: the backward needs them
# (recomputing them would cost two large GEMMs), and setup_context can only save what the op
# returns. The GLU output h, as large as either, is not kept: the backward recomputes it with the
# Triton kernel. ``lora_glu_mlp`` below is the function to call; it returns the result alone.
@torch.library.custom_op("fastft::lora_glu_mlp_forward", mutates_args=())
def _lora_glu_mlp_forward_op(x: torch.Tensor,
                             gate_w: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_scale: float,
                             up_w: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor, up_scale: float,
                             down_w: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor, down_scale: float,
                             activation: str, round_dtype: Optional[torch.dtype]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_mlp(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b)
    x2 = _rows(x)
    g = _forward_2d(x2, gate_w, None, gate_a, gate_b, gate_scale)
    u = _forward_2d(x2, up_w, None, up_a, up_b, up_scale)
    h = glu_forward(g, u, activation, round_dtype, x.dtype)
    y = _forward_2d(h, down_w, None, down_a, down_b, down_scale)
    return y.reshape(*x.shape[:-1], down_w.shape[0]), g, u


@_lora_glu_mlp_forward_op.register_fake
def _lora_glu_mlp_forward_fake(x, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
                               down_w, down_a, down_b, down_scale, activation, round_dtype):
    _check_mlp(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b)
    rows = x.numel() // x.shape[-1]
    width = gate_w.shape[0]
    return x.new_empty((*x.shape[:-1], down_w.shape[0])), x.new_empty((rows, width)), x.new_empty((rows, width))


def lora_glu_mlp(x: torch.Tensor,
                 gate_w: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_scale: float,
                 up_w: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor, up_scale: float,
                 down_w: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor, down_scale: float,
                 activation: str, round_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A gated MLP whose three projections carry LoRA adapters (frozen bases, no biases); the
    result is in x's dtype. See ``lora_glu_mlp_reference`` for the math."""
    return torch.ops.fastft.lora_glu_mlp_forward(x, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b,
                                                 up_scale, down_w, down_a, down_b, down_scale, activation,
                                                 round_dtype)[0]


# The backward is an op of its own, so that AOT autograd traces it through its fake.
@torch.library.custom_op("fastft::lora_glu_mlp_backward", mutates_args=())
def _lora_glu_mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                              gate_w: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_scale: float,
                              up_w: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor, up_scale: float,
                              down_w: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor, down_scale: float,
                              activation: str, round_dtype: Optional[torch.dtype], need: list[bool]
                              ) -> list[torch.Tensor]:
    need_dx, need_gate_a, need_gate_b, need_up_a, need_up_b, need_down_a, need_down_b = need
    x2 = _rows(x)
    h = glu_forward(g, u, activation, round_dtype, x.dtype)
    need_dh = need_dx or need_gate_a or need_gate_b or need_up_a or need_up_b
    dh, _, _, d_down_a, d_down_b = _backward_2d(_rows(dy), h, down_w, down_a, down_b, down_scale,
                                                (need_dh, False, False, need_down_a, need_down_b))
    del h
    grads: list[Optional[torch.Tensor]] = [None] * 7
    grads[5], grads[6] = d_down_a, d_down_b
    if need_dh:
        dg, du = glu_backward(dh, g, u, activation, round_dtype)
        del dh
        dx, _, _, grads[1], grads[2] = _backward_2d(dg, x2, gate_w, gate_a, gate_b, gate_scale,
                                                    (need_dx, False, False, need_gate_a, need_gate_b))
        dx, _, _, grads[3], grads[4] = _backward_2d(du, x2, up_w, up_a, up_b, up_scale,
                                                    (need_dx, False, False, need_up_a, need_up_b), dx)
        if need_dx:
            grads[0] = dx.reshape(x.shape)
    like = (x, gate_a, gate_b, up_a, up_b, down_a, down_b)
    return [t if t is not None else ref.new_empty(0) for t, ref in zip(grads, like)]


@_lora_glu_mlp_backward_op.register_fake
def _lora_glu_mlp_backward_fake(dy, x, g, u, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
                                down_w, down_a, down_b, down_scale, activation, round_dtype, need):
    like = (x, gate_a, gate_b, up_a, up_b, down_a, down_b)
    return [ref.new_empty(ref.shape) if n else ref.new_empty(0) for n, ref in zip(need, like)]


# Positions of the differentiable inputs among the op's arguments: x, then each A and B.
_MLP_GRAD_INPUTS = (0, 2, 3, 6, 7, 10, 11)


def _lora_glu_mlp_setup_context(ctx, inputs, output) -> None:
    (x, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
     down_w, down_a, down_b, down_scale, activation, round_dtype) = inputs
    _y, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.set_materialize_grads(False)
    ctx.scales = (gate_scale, up_scale, down_scale)
    ctx.activation, ctx.round_dtype = activation, round_dtype
    ctx.save_for_backward(x, g, u, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b)


def _lora_glu_mlp_backward(ctx, dy: Optional[torch.Tensor], _dg, _du):
    none = [None] * 15
    need = [bool(ctx.needs_input_grad[i]) for i in _MLP_GRAD_INPUTS]
    if dy is None or not any(need):
        return tuple(none)
    x, g, u, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b = ctx.saved_tensors
    gate_scale, up_scale, down_scale = ctx.scales
    grads = torch.ops.fastft.lora_glu_mlp_backward(
        dy, x, g, u, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
        down_w, down_a, down_b, down_scale, ctx.activation, ctx.round_dtype, need)
    for position, wanted, grad in zip(_MLP_GRAD_INPUTS, need, grads):
        none[position] = grad if wanted else None
    return tuple(none)


_lora_glu_mlp_forward_op.register_autograd(_lora_glu_mlp_backward, setup_context=_lora_glu_mlp_setup_context)


# --------------------------------------------------------------------------------------------
# fastft::qlora_linear: the base weight stored in 4 bits (bitsandbytes NF4 / FP4)
# --------------------------------------------------------------------------------------------
def _dequantized(packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features, dtype):
    """The 4-bit weight as a dense [out, in] tensor in ``dtype``: one Triton launch."""
    return dequantize_4bit_forward(packed, absmax, code_table(code, packed.device), blocksize,
                                   (out_features, in_features), dtype, absmax2, code2,
                                   _NESTED_BLOCKSIZE if absmax2 is not None else 0,
                                   offset if offset is not None else 0.0)


# bitsandbytes' 4-bit GEMM supports double quantisation with nested blocks of 256 scales only.
_NESTED_BLOCKSIZE = 256
_CODE_TABLES: dict = {}


def code_table(code: list[float], device: torch.device) -> torch.Tensor:
    """The 16-entry code book as a device tensor, made once per book and device and kept.

    A graph rewrite calls this when it places the op, so the table exists before the first run:
    made during a CUDA graph's warm-up instead, it would be a live allocation in the graph's
    private memory pool that no output accounts for, which CUDA graph recording refuses."""
    key = (tuple(code), str(device))
    if key not in _CODE_TABLES:
        _CODE_TABLES[key] = torch.tensor(code, dtype=torch.float32, device=device)
    return _CODE_TABLES[key]


def _check_4bit(x, packed, code, blocksize, out_features, in_features, compute_dtype, lora_a, lora_b):
    op = "fastft::qlora_linear"
    if packed.dtype != torch.uint8:
        raise ValueError(f"{op}: packed weight must be uint8, got {packed.dtype}")
    if packed.numel() * 2 != out_features * in_features:
        raise ValueError(f"{op}: {packed.numel()} packed bytes for a [{out_features}, {in_features}] weight")
    if len(code) != 16:
        raise ValueError(f"{op}: a 4-bit code book has 16 entries, got {len(code)}")
    check_dtype(op, "compute_dtype", compute_dtype)
    # Shapes and dtypes only: meta tensors stand for the cast input and the dequantised weight.
    _check(op, torch.empty((1, in_features), dtype=compute_dtype, device="meta"),
           torch.empty((out_features, in_features), dtype=compute_dtype, device="meta"), None, lora_a, lora_b)


@torch.library.custom_op("fastft::qlora_linear", mutates_args=())
def qlora_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                 code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], code: list[float], blocksize: int,
                 out_features: int, in_features: int, compute_dtype: torch.dtype, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x W^T + scale (x A^T) B^T with W the dequantised 4-bit weight, computed in ``compute_dtype``;
    W exists only for the duration of the call (and again in the backward)."""
    _check_4bit(x, packed, code, blocksize, out_features, in_features, compute_dtype, lora_a, lora_b)
    weight = _dequantized(packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features,
                          compute_dtype)
    y = _forward_2d(_rows(x).to(compute_dtype), weight, None, lora_a, lora_b, scale)
    return y.reshape(*x.shape[:-1], out_features).to(out_dtype)


@qlora_linear.register_fake
def _qlora_linear_fake(x, packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features,
                       compute_dtype, lora_a, lora_b, scale, out_dtype):
    _check_4bit(x, packed, code, blocksize, out_features, in_features, compute_dtype, lora_a, lora_b)
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)


# The backward is an op of its own (as for the GLU): AOT autograd traces it through its fake,
# while its body launches the dequantisation kernel on real tensors.
@torch.library.custom_op("fastft::qlora_linear_backward", mutates_args=())
def _qlora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                              absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                              offset: Optional[torch.Tensor], code: list[float], blocksize: int,
                              out_features: int, in_features: int, compute_dtype: torch.dtype,
                              lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, need: list[bool]
                              ) -> list[torch.Tensor]:
    need_dx, need_da, need_db = need
    weight = _dequantized(packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features,
                          compute_dtype)
    dx, _, _, da, db = _backward_2d(_rows(dy), _rows(x).to(compute_dtype), weight, lora_a, lora_b, scale,
                                    (need_dx, False, False, need_da, need_db))
    dx = dx.reshape(x.shape).to(x.dtype) if dx is not None else x.new_empty(0)
    return [dx, da if da is not None else lora_a.new_empty(0), db if db is not None else lora_b.new_empty(0)]


@_qlora_linear_backward_op.register_fake
def _qlora_linear_backward_fake(dy, x, packed, absmax, absmax2, code2, offset, code, blocksize, out_features,
                                in_features, compute_dtype, lora_a, lora_b, scale, need):
    return [ref.new_empty(ref.shape) if n else ref.new_empty(0) for n, ref in zip(need, (x, lora_a, lora_b))]


_QLORA_GRAD_INPUTS = (0, 11, 12)  # x, lora_a, lora_b among the op's arguments


def _qlora_setup_context(ctx, inputs, output) -> None:
    (x, packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features, compute_dtype,
     lora_a, lora_b, scale, _out_dtype) = inputs
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, offset, lora_a, lora_b)
    ctx.static = (code, blocksize, out_features, in_features, compute_dtype, scale)
    ctx.set_materialize_grads(False)


def _qlora_backward(ctx, dy: Optional[torch.Tensor]):
    grads: list[Optional[torch.Tensor]] = [None] * 15
    need = [bool(ctx.needs_input_grad[i]) for i in _QLORA_GRAD_INPUTS]
    if dy is None or not any(need):
        return tuple(grads)
    x, packed, absmax, absmax2, code2, offset, lora_a, lora_b = ctx.saved_tensors
    code, blocksize, out_features, in_features, compute_dtype, scale = ctx.static
    results = torch.ops.fastft.qlora_linear_backward(dy, x, packed, absmax, absmax2, code2, offset, code, blocksize,
                                                     out_features, in_features, compute_dtype, lora_a, lora_b,
                                                     scale, need)
    for position, wanted, grad in zip(_QLORA_GRAD_INPUTS, need, results):
        grads[position] = grad if wanted else None
    return tuple(grads)


qlora_linear.register_autograd(_qlora_backward, setup_context=_qlora_setup_context)
