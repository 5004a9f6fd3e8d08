"""LoRA linears with a frozen base weight: ``lora_linear``, ``lora_linear_x3`` (three of one
input), ``lora_glu_mlp`` and the op ``fastft::qlora_linear`` (a 4-bit base). The first three
call the custom ops ``fastft::lora_linear_forward``, ``fastft::lora_linear_x3_forward`` and
``fastft::lora_glu_mlp_forward``, which also return what their backward keeps.

    lora_linear(x) = x W^T + b + s (x A^T) B^T          W [out, in] frozen, A [r, in], B [out, r]

The speed of adapter training comes from what the backward need not do, and from never
materialising the full-size intermediates that a module-by-module computation makes:

- the adapter's contribution is accumulated into the base GEMM's output by a second GEMM
  (``addmm`` with s B): no [tokens, out] product, scaled copy and sum; or, where
  copying x and W is cheaper than a pass over that output (many tokens into a wide output,
  ``depth_concat_pays``), through the GEMM's depth: [x | x A^T] [W | s B]^T is one GEMM;
- the backward computes dX = dY W + s (dY B) A the same way, dA = s (dY B)^T X and
  dB = s dY^T (X A^T), and no dW unless the base weight is trainable;
- X is saved, and X A^T beside it ([tokens, r]: small), so that the backward reads X once, for
  dA; linears of one input (q, k, v; gate, up) stack their A matrices, so that one GEMM reads X
  for all their x A^T and one for all their dA.

The matmuls stay with cuBLAS: a GEMM written in Triton would not beat it. The MLP op's gate
and up get their corrections through the GEMMs' depth where that pays; otherwise its forward
GLU kernel (``kernels/lora_glu.py``) adds them while it reads those [tokens, width] tensors
anyway: either way, two full read-write passes per layer less. The backward
recomputes act(gate) * up instead of saving it (one [tokens, width] tensor per layer less), in
the pass of the GLU's backward kernel; where dg and du are large, that pass also feeds them and
act(gate) * up to the gate and up adapters' products and the down adapter's dA
(``lora_glu_backward``), which would otherwise read each again.

Numerics: everything runs in the base weight's dtype (the adapters, often kept in float32 by
peft, are cast to it: they are tiny; s B is scaled in fp32 before its one rounding), with float32
accumulation inside the GEMMs, as a 16-bit model computes its base linears anyway. Gradients come
back in each parameter's own dtype: an fp32 adapter's straight from its GEMM's fp32 accumulator.
An op's adapters are cast by one kernel launch in its forward (``cast_parts``; the MLP's six
matrices together), which the op returns so that its backward reuses them: one launch per tensor
was most of a 1B LoRA step's kernels.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .adapter_grads import PartialSum, adapter_grads, adapter_grads_pays, sum_partials
from .concat import cast_parts, concat_columns
from .glu import glu_backward_and_output, glu_forward, glu_reference
from .lora_glu import lora_glu_backward, lora_glu_forward
from .nf4 import dequantize_4bit_forward
from .launch import SUPPORTED_DTYPES, check_dtype, empty_or

__all__ = [
    "lora_glu_mlp",
    "lora_glu_mlp_reference",
    "lora_linear",
    "lora_linear_reference",
    "lora_linear_x3",
    "code_table",
    "depth_concat_pays",
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


def _shaped(y: torch.Tensor, *shape: int) -> torch.Tensor:
    """An op's output ``y`` (a GEMM's [rows, out]) in ``shape``, as a tensor of its own, not a
    view of y: autograd forbids changing a view a custom op returns in place (a model's
    ``h += residual`` after the linear). A fresh contiguous y takes the shape itself, without a copy."""
    if tuple(y.shape) == shape:
        return y
    if y._base is None and y.is_contiguous():
        return y.resize_(shape)
    return y.reshape(shape).clone()


# --------------------------------------------------------------------------------------------
# Host code: the GEMMs of a group of LoRA linears that read one input, on 2-D row views
# --------------------------------------------------------------------------------------------
class Adapted(NamedTuple):
    """One LoRA linear of a group that shares its input (q, k, v; gate, up; or one alone)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float


class Needed(NamedTuple):
    """Which of one linear's parameter gradients the backward computes."""

    dweight: bool = False
    dbias: bool = False
    dlora_a: bool = False
    dlora_b: bool = False


class Operands(NamedTuple):
    """A group's adapters as its GEMMs take them, in the GEMMs' dtype."""

    a: torch.Tensor  # the A matrices one above the other, [sum of ranks, in]: one GEMM reads x for all
    b: list[torch.Tensor]  # s_i B_i per linear, [out_i, r_i], scaled in fp32 before the one rounding


def _as_they_are(groups: Sequence[Sequence[Adapted]], dtype: torch.dtype) -> bool:
    """Whether the adapters are their groups' Operands already: one linear per group, in
    ``dtype``, scale 1."""
    return all(len(group) == 1 and group[0].scale == 1.0 and group[0].lora_a.dtype == group[0].lora_b.dtype == dtype
               for group in groups)


def _cast_adapters(groups: Sequence[Sequence[Adapted]], dtype: torch.dtype) -> torch.Tensor:
    """Every group's Operands in one flat tensor (``_operands_in`` views it): each group's A
    matrices, then its s B's, group after group, cast (peft keeps adapters in fp32) and scaled by
    one ``cast_parts`` launch per six matrices, instead of a cast, a scale and a concatenation
    each. An empty tensor where ``_as_they_are``. The forward ops return it, so that their
    backward reuses it instead of casting again."""
    lead = groups[0][0].lora_a
    if _as_they_are(groups, dtype):
        return lead.new_empty(0, dtype=dtype)
    parts, scales = [], []
    for group in groups:
        parts += [lin.lora_a for lin in group] + [lin.lora_b for lin in group]
        scales += [1.0] * len(group) + [lin.scale for lin in group]
    return cast_parts(parts, dtype, scales)


def _cast_size(groups: Sequence[Sequence[Adapted]], dtype: torch.dtype) -> int:
    """The number of elements of ``_cast_adapters``' tensor (for the ops' fakes)."""
    if _as_they_are(groups, dtype):
        return 0
    return sum(lin.lora_a.numel() + lin.lora_b.numel() for group in groups for lin in group)


def _operands_in(groups: Sequence[Sequence[Adapted]], flat: torch.Tensor, dtype: torch.dtype) -> list[Operands]:
    """Each group's Operands in ``dtype``: views of ``flat`` from ``_cast_adapters``; where that
    is empty, the adapters as they are, or cast here if they are not Operands as they are."""
    if flat.numel() == 0:
        if _as_they_are(groups, dtype):
            return [Operands(group[0].lora_a, [group[0].lora_b]) for group in groups]
        flat = _cast_adapters(groups, dtype)
    out, start = [], 0
    for group in groups:
        ranks, inner = sum(lin.lora_a.shape[0] for lin in group), group[0].lora_a.shape[1]
        a, start, bs = flat[start:start + ranks * inner].view(ranks, inner), start + ranks * inner, []
        for lin in group:
            bs.append(flat[start:start + lin.lora_b.numel()].view(lin.lora_b.shape))
            start += lin.lora_b.numel()
        out.append(Operands(a, bs))
    return out


def _cast_operands(groups: Sequence[Sequence[Adapted]], dtype: torch.dtype
                   ) -> tuple[torch.Tensor, list[Operands]]:
    """``_cast_adapters`` of the groups, and each group's Operands viewing it."""
    adapters = _cast_adapters(groups, dtype)
    return adapters, _operands_in(groups, adapters, dtype)


def _operands(group: Sequence[Adapted], dtype: torch.dtype) -> Operands:
    """The group's Operands, cast here."""
    return _cast_operands([group], dtype)[1][0]


def _mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b returned in ``dtype`` (an adapter gradient in its parameter's dtype). An fp32
    result of 16-bit operands comes straight from the GEMM's fp32 accumulator, without a 16-bit
    rounding and a cast kernel after it; off the GPU, where torch has no such GEMM, from the
    upcast operands (the same products: 16-bit values are exact in fp32)."""
    if dtype == a.dtype:
        return torch.mm(a, b)
    if dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype) if a.is_cuda else torch.mm(a.float(), b.float())
    return torch.mm(a, b).to(dtype)


def _rank_columns(group: Sequence[Adapted]) -> list[slice]:
    """Where each adapter's x A^T sits among the stacked columns."""
    columns, start = [], 0
    for lin in group:
        columns.append(slice(start, start + lin.lora_a.shape[0]))
        start += lin.lora_a.shape[0]
    return columns


def depth_concat_pays(rows: int, inner: int, outer: int, weights: int = 1) -> bool:
    """Whether rank-r corrections to ``weights`` GEMM outputs [rows, outer], each of depth
    ``inner``, cost less added through the GEMMs' depth than as a pass over each output.

    Through the depth, x [rows, inner] and each weight [outer, inner] are copied into operands
    r wider ([x | x A^T] times [W | s B]^T: one GEMM gives the corrected output); as a pass, each
    output is read and written once more. The copies win when they are the smaller: many rows
    of a narrow input into a wide output (a gated MLP's gate and up at 8,192 tokens, 2,048 into
    8,192), not few rows through large weights (2,048 tokens, 4,096 into 14,336)."""
    return rows * inner + weights * outer * inner < weights * rows * outer


def _group_forward(x2: torch.Tensor, group: Sequence[Adapted], ops: Optional[Operands] = None,
                   add_adapters: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each linear's output, and x A^T of every adapter side by side ([rows, sum of ranks]): the
    backward takes it from here instead of reading x again (it is rank / in of x's size).
    ``ops``: the group's Operands where the caller has them already. ``add_adapters`` False:
    the bases' outputs alone, for a kernel that adds the corrections."""
    dtype = x2.dtype
    ops = ops if ops is not None else _operands(group, dtype)
    xa = torch.mm(x2, ops.a.t())
    if add_adapters and len(group) == 1 and depth_concat_pays(*x2.shape, group[0].weight.shape[0]):
        lin = group[0]
        xs = concat_columns(x2, xa)
        w_b = concat_columns(lin.weight, ops.b[0])
        y = torch.addmm(lin.bias.to(dtype), xs, w_b.t()) if lin.bias is not None else torch.mm(xs, w_b.t())
        return [y], xa
    outs = []
    for lin, b, columns in zip(group, ops.b, _rank_columns(group)):
        if lin.bias is not None:
            y = torch.addmm(lin.bias.to(dtype), x2, lin.weight.t())
        else:
            y = torch.mm(x2, lin.weight.t())
        if add_adapters:
            # The adapter's product goes straight into y's accumulator (beta = 1): no [rows, out] temporary.
            y.addmm_(xa[:, columns], b.t())
        outs.append(y)
    return outs, xa


def _group_backward(dys: Sequence[Optional[torch.Tensor]], x2: torch.Tensor, xa: torch.Tensor,
                    group: Sequence[Adapted], need_dx: bool, needs: Sequence[Needed],
                    dx: Optional[torch.Tensor] = None, ops: Optional[Operands] = None,
                    rows: Optional[tuple[torch.Tensor, list[Optional[torch.Tensor]]]] = None
                    ) -> tuple[Optional[torch.Tensor], list[tuple[Optional[torch.Tensor], ...]]]:
    """dx (accumulated into ``dx`` in place when given) and, per linear, (dweight, dbias, dA, dB),
    None where not needed or where the linear's output got no gradient (``dys[i]`` None).
    ``ops``: the group's Operands where the caller has them already. ``rows``: what
    ``_adapter_rows`` would return, where the caller computed it in a pass of its own (every dY given).

    dX = sum_i dY_i W_i + [s_i dY_i B_i]_i [A_i]_i, dA_i = s_i (dY_i B_i)^T X, dB_i = s_i dY_i^T (X A_i^T):
    the [rows, rank] products of all adapters sit side by side, so that one GEMM over x gives
    every dA and one accumulates every adapter's share of dX."""
    dtype = group[0].weight.dtype
    dys = [dy.to(dtype) if dy is not None else None for dy in dys]
    live = [dy is not None for dy in dys]
    any_da = any(n.dlora_a and on for n, on in zip(needs, live))
    if (need_dx or any_da) and any(live):
        ops = ops if ops is not None else _operands(group, dtype)
    else:
        ops = None
    if rows is not None:
        dyb, fused_dbs = rows
    elif ops is not None:
        dyb, fused_dbs = _adapter_rows(dys, group, ops, xa, [n.dlora_b for n in needs])
    else:
        dyb, fused_dbs = None, [None] * len(group)
    if need_dx and dyb is not None:
        dx = _group_dx(dys, dyb, group, ops, dx)
    da_dtype = group[0].lora_a.dtype
    if any(lin.lora_a.dtype != da_dtype for lin in group):
        da_dtype = dtype  # cast per adapter below
    da_all = _mm_as(dyb.t(), x2, da_dtype) if any_da else None
    grads = []
    for lin, dy, need, columns, fused_db in zip(group, dys, needs, _rank_columns(group), fused_dbs):
        if dy is None:
            grads.append((None, None, None, None))
            continue
        dw = torch.mm(dy.t(), x2).to(lin.weight.dtype) if need.dweight else None
        dbias = dy.sum(0) if need.dbias else None
        # A fresh tensor each (copy): an op's outputs must not alias one another.
        da = (da_all if len(group) == 1 else da_all[columns]).to(lin.lora_a.dtype, copy=len(group) > 1) \
            if need.dlora_a else None
        db = fused_db if fused_db is not None else _b_grad(dy, xa[:, columns], lin) if need.dlora_b else None
        grads.append((dw, dbias, da, db))
    return dx, grads


def _adapter_rows(dys: Sequence[Optional[torch.Tensor]], group: Sequence[Adapted], ops: Operands,
                  xa: Optional[torch.Tensor] = None, want_db: Optional[Sequence[bool]] = None
                  ) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """[s_i dY_i B_i]_i side by side ([rows, sum of ranks], zeros for a linear with no dY): the
    rank-r factor of every adapter's dX share and dA; and, per linear, dB where it came out of the
    same pass over dY (``kernels/adapter_grads.py``: a large dY, given ``xa`` and ``want_db``),
    None where the caller still computes it."""
    dbs: list[Optional[torch.Tensor]] = [None] * len(group)
    fused = [xa is not None and dy is not None and adapter_grads_pays(dy, lin.lora_a.shape[0])
             for lin, dy in zip(group, dys)]
    like = next(d for d in dys if d is not None)
    if not any(fused):
        parts = [torch.mm(dy, b) if dy is not None else like.new_zeros((like.shape[0], lin.lora_a.shape[0]))
                 for lin, dy, b in zip(group, dys, ops.b)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), dbs
    want_db = want_db or [False] * len(group)
    dyb = like.new_empty((like.shape[0], sum(lin.lora_a.shape[0] for lin in group)))
    pending: list[PartialSum] = []  # the fused passes' final sums: one launch for the group
    for i, (lin, dy, b, columns) in enumerate(zip(group, dys, ops.b, _rank_columns(group))):
        if dy is None:
            dyb[:, columns].zero_()
        elif fused[i]:
            _, dbs[i] = adapter_grads(dy, b, xa[:, columns], lin.scale, dyb_out=dyb[:, columns],
                                      db_dtype=lin.lora_b.dtype, need_db=want_db[i], pending=pending)
        else:
            dyb[:, columns] = torch.mm(dy, b)
    sum_partials(pending)
    return dyb, dbs


def _group_dx(dys: Sequence[Optional[torch.Tensor]], dyb: torch.Tensor, group: Sequence[Adapted],
              ops: Operands, dx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dX = sum_i dY_i W_i + dyb [A_i]_i, accumulated into ``dx`` in place when given."""
    if dx is None and len(group) == 1 and depth_concat_pays(dyb.shape[0], *group[0].weight.shape):
        # dX = [dY | s dY B] [W; A]: the adapter's share through the GEMM's depth.
        lin = group[0]
        return torch.mm(concat_columns(dys[0], dyb), torch.cat([lin.weight, ops.a]))
    # Each GEMM accumulates into the one buffer (beta = 1): no temporary per contribution.
    for lin, dy in zip(group, dys):
        if dy is not None:
            dx = torch.mm(dy, lin.weight) if dx is None else dx.addmm_(dy, lin.weight)
    return dx.addmm_(dyb, ops.a)


def _b_grad(dy: torch.Tensor, xa: torch.Tensor, lin: Adapted) -> torch.Tensor:
    """dB = s dY^T (X A^T), in B's dtype."""
    db = _mm_as(dy.t(), xa, lin.lora_b.dtype)
    return db.mul_(lin.scale) if lin.scale != 1.0 else db


# --------------------------------------------------------------------------------------------
# fastft::lora_group_backward: the backward of lora_linear and lora_linear_x3
# --------------------------------------------------------------------------------------------
# An op of its own, as the MLP's and the 4-bit linear's are: traced into the backward graph as
# aten ops, each accumulating GEMM (addmm_ into dX) would be made functional, and every one
# would first copy dX to a new buffer.
@torch.library.custom_op("fastft::lora_group_backward", mutates_args=())
def _lora_group_backward_op(dys: list[Optional[torch.Tensor]], x: torch.Tensor, xa: torch.Tensor,
                            weights: list[torch.Tensor], lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
                            scales: list[float], adapters: torch.Tensor, need_dx: bool, needs: list[bool]
                            ) -> list[torch.Tensor]:
    """[dX] + [dW, dbias, dA, dB] per linear; ``needs`` holds those four flags per linear, and
    what is not needed (or whose linear's dY is None) comes back as an empty tensor.
    ``adapters``: the forward's ``_cast_adapters`` of the group."""
    group = [Adapted(w, None, a, b, s) for w, a, b, s in zip(weights, lora_as, lora_bs, scales)]
    flags = [Needed(*needs[4 * i:4 * i + 4]) for i in range(len(group))]
    dx, per_linear = _group_backward([_rows(dy) if dy is not None else None for dy in dys], _rows(x), xa, group,
                                     need_dx, flags, ops=_operands_in([group], adapters, x.dtype)[0])
    out = [empty_or(dx.reshape(x.shape) if dx is not None else None, x)]
    for lin, grads in zip(group, per_linear):
        likes = (lin.weight, lin.weight, lin.lora_a, lin.lora_b)  # dbias: in the weight's dtype
        out.extend(empty_or(g, like) for g, like in zip(grads, likes))
    return out


@_lora_group_backward_op.register_fake
def _lora_group_backward_fake(dys, x, xa, weights, lora_as, lora_bs, scales, adapters, need_dx, needs):
    out = [x.new_empty(x.shape) if need_dx and any(dy is not None for dy in dys) else x.new_empty(0)]
    for i, (w, a, b, dy) in enumerate(zip(weights, lora_as, lora_bs, dys)):
        shapes = (w, w.new_empty(w.shape[0]), a, b)
        out.extend(ref.new_empty(ref.shape) if needs[4 * i + j] and dy is not None else ref.new_empty(0)
                   for j, ref in enumerate(shapes))
    return out


def _group_backward_call(dys: Sequence[Optional[torch.Tensor]], x: torch.Tensor, xa: torch.Tensor,
                         group: Sequence[Adapted], adapters: torch.Tensor, need_dx: bool, needs: Sequence[Needed]
                         ) -> tuple[Optional[torch.Tensor], list[tuple[Optional[torch.Tensor], ...]]]:
    """``_group_backward`` through the op: dX (x's shape) and per linear (dW, dbias, dA, dB),
    None where not needed. ``adapters``: the forward's ``_cast_adapters`` of the group."""
    flat = [bool(f) for n in needs for f in n]
    out = torch.ops.fastft.lora_group_backward(list(dys), x, xa, [lin.weight for lin in group],
                                               [lin.lora_a for lin in group], [lin.lora_b for lin in group],
                                               [float(lin.scale) for lin in group], adapters, bool(need_dx), flat)
    live = any(dy is not None for dy in dys)
    dx = out[0] if need_dx and live else None
    per_linear = []
    for i, dy in enumerate(dys):
        grads = out[1 + 4 * i:5 + 4 * i]
        per_linear.append(tuple(g if flat[4 * i + j] and dy is not None else None for j, g in enumerate(grads)))
    return dx, per_linear


# --------------------------------------------------------------------------------------------
# fastft::lora_linear
# --------------------------------------------------------------------------------------------
# The forward ops return x A^T and the cast adapters (``_cast_adapters``) beside the result:
# setup_context can only save what an op takes or returns. ``lora_linear`` and ``lora_linear_x3``
# below are the functions to call.
@torch.library.custom_op("fastft::lora_linear_forward", mutates_args=())
def _lora_linear_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("fastft::lora_linear", x, weight, bias, lora_a, lora_b)
    group = [Adapted(weight, bias, lora_a, lora_b, scale)]
    adapters, (ops,) = _cast_operands([group], x.dtype)
    (y,), xa = _group_forward(_rows(x), group, ops)
    return _shaped(y, *x.shape[:-1], weight.shape[0]).to(out_dtype), xa, adapters


@_lora_linear_forward_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, out_dtype):
    _check("fastft::lora_linear", x, weight, bias, lora_a, lora_b)
    check_dtype("fastft::lora_linear", "out_dtype", out_dtype)
    rows = x.numel() // x.shape[-1]
    size = _cast_size([[Adapted(weight, bias, lora_a, lora_b, scale)]], x.dtype)
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype),
            x.new_empty((rows, lora_a.shape[0]), dtype=weight.dtype), x.new_empty(size))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x W^T + bias + scale (x A^T) B^T in the base weight's dtype, returned in ``out_dtype``."""
    return torch.ops.fastft.lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, out_dtype)[0]


def _lora_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scale, _out_dtype = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], output[2])
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _lora_linear_backward(ctx, dy: Optional[torch.Tensor], _dxa, _dadapters):
    x, weight, lora_a, lora_b, xa, adapters = ctx.saved_tensors
    need_dx, need_dw, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
    if dy is None or not any((need_dx, need_dw, need_dbias, need_da, need_db)):
        return None, None, None, None, None, None, None
    dx, [(dw, dbias, da, db)] = _group_backward_call(
        [dy], x, xa, [Adapted(weight, None, lora_a, lora_b, ctx.scale)], adapters, need_dx,
        [Needed(need_dw, need_dbias, need_da, need_db)])
    return dx, dw, dbias, da, db, None, None


_lora_linear_forward_op.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup_context)


# --------------------------------------------------------------------------------------------
# fastft::lora_linear_x3: three LoRA linears of one input (attention's q, k and v)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::lora_linear_x3_forward", mutates_args=())
def _lora_linear_x3_forward_op(x: torch.Tensor,
                               w0: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, s0: float,
                               w1: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, s1: float,
                               w2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, s2: float,
                               out_dtype: torch.dtype, bias0: Optional[torch.Tensor] = None,
                               bias1: Optional[torch.Tensor] = None, bias2: Optional[torch.Tensor] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    group = _x3_group(x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, (bias0, bias1, bias2))
    adapters, (ops,) = _cast_operands([group], x.dtype)
    outs, xa = _group_forward(_rows(x), group, ops)
    return (*(_shaped(y, *x.shape[:-1], lin.weight.shape[0]).to(out_dtype) for y, lin in zip(outs, group)), xa,
            adapters)


def _x3_group(x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, biases=(None, None, None)) -> list[Adapted]:
    group = [Adapted(w0, biases[0], a0, b0, s0), Adapted(w1, biases[1], a1, b1, s1),
             Adapted(w2, biases[2], a2, b2, s2)]
    for lin in group:
        _check("fastft::lora_linear_x3", x, lin.weight, lin.bias, lin.lora_a, lin.lora_b)
    return group


@_lora_linear_x3_forward_op.register_fake
def _lora_linear_x3_fake(x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, out_dtype, bias0=None, bias1=None,
                         bias2=None):
    group = _x3_group(x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, (bias0, bias1, bias2))
    rows, rank = x.numel() // x.shape[-1], sum(lin.lora_a.shape[0] for lin in group)
    return (*(x.new_empty((*x.shape[:-1], lin.weight.shape[0]), dtype=out_dtype) for lin in group),
            x.new_empty((rows, rank), dtype=w0.dtype), x.new_empty(_cast_size([group], x.dtype)))


def lora_linear_x3(x: torch.Tensor,
                   w0: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, s0: float,
                   w1: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, s1: float,
                   w2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, s2: float,
                   out_dtype: torch.dtype, bias0: Optional[torch.Tensor] = None, bias1: Optional[torch.Tensor] = None,
                   bias2: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lora_linear`` of x by three (W, A, B, s), each with its bias where given (q, k and v of
    an attention with biases). One op so that x is read once for the three adapters' x A^T and
    once for their dA, and the backward sums the three input gradients in one buffer (each GEMM
    accumulates into it)."""
    outs = torch.ops.fastft.lora_linear_x3_forward(x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2, out_dtype,
                                                   bias0, bias1, bias2)
    return outs[0], outs[1], outs[2]


# Positions among the op's arguments: each linear's W, A, B and s four apart from 1, its bias after out_dtype.
_X3_A, _X3_B, _X3_BIAS = (2, 6, 10), (3, 7, 11), (14, 15, 16)


def _lora_linear_x3_setup_context(ctx, inputs, output) -> None:
    x, w0, a0, b0, s0, w1, a1, b1, s1, w2, a2, b2, s2 = inputs[:13]
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.save_for_backward(x, output[3], output[4], w0, a0, b0, w1, a1, b1, w2, a2, b2)
    ctx.scales = (s0, s1, s2)
    ctx.set_materialize_grads(False)


def _lora_linear_x3_backward(ctx, dy0, dy1, dy2, _dxa, _dadapters):
    x, xa, adapters, *saved = ctx.saved_tensors
    # One gradient per argument the op was called with: the biases may have been left to their defaults.
    n_args = len(ctx.needs_input_grad)
    grads: list[Optional[torch.Tensor]] = [None] * 17
    dys = [dy0, dy1, dy2]
    if all(dy is None for dy in dys):
        return tuple(grads[:n_args])
    group = [Adapted(saved[3 * i], None, saved[3 * i + 1], saved[3 * i + 2], ctx.scales[i]) for i in range(3)]
    need = list(ctx.needs_input_grad) + [False] * (17 - n_args)
    needs = [Needed(dbias=need[_X3_BIAS[i]], dlora_a=need[_X3_A[i]], dlora_b=need[_X3_B[i]]) for i in range(3)]
    grads[0], per_linear = _group_backward_call(dys, x, xa, group, adapters, need[0], needs)
    for i, (_dw, dbias, da, db) in enumerate(per_linear):
        grads[_X3_BIAS[i]], grads[_X3_A[i]], grads[_X3_B[i]] = dbias, da, db
    return tuple(grads[:n_args])


_lora_linear_x3_forward_op.register_autograd(_lora_linear_x3_backward, setup_context=_lora_linear_x3_setup_context)


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


# The forward returns, beside the result, the gate and up pre-activations (the backward needs
# them; recomputing them would cost two large GEMMs) and x A^T of the three adapters (small),
# since setup_context can only save what the op returns. The adapters' corrections to gate and
# up are added by the GLU kernel (``kernels/lora_glu.py``), which reads the bases' outputs
# anyway, instead of by a read-write pass of their own over each. The GLU output h, as large as
# either, is not kept: the GLU's backward kernel recomputes it beside dg and du.
# ``lora_glu_mlp`` below is the function to call; it returns the result alone.
@torch.library.custom_op("fastft::lora_glu_mlp_forward", mutates_args=())
def _lora_glu_mlp_forward_op(x: torch.Tensor,
                             gate_w: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_scale: float,
                             up_w: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor, up_scale: float,
                             down_w: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor, down_scale: float,
                             activation: str, round_dtype: Optional[torch.dtype]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    _check_mlp(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b)
    gate, up = Adapted(gate_w, None, gate_a, gate_b, gate_scale), Adapted(up_w, None, up_a, up_b, up_scale)
    down = Adapted(down_w, None, down_a, down_b, down_scale)
    x2 = _rows(x)
    adapters, (ops, down_ops) = _cast_operands([[gate, up], [down]], x.dtype)  # all six matrices in one launch
    if depth_concat_pays(*x2.shape, gate_w.shape[0], weights=2):
        g, u, xa_gate_up = _gate_up_through_depth(x2, gate, up, ops)
        h = glu_forward(g, u, activation, round_dtype, x.dtype)
    else:
        # g and u come out of the GEMMs as the bases' outputs; the GLU kernel adds the adapters'
        # corrections as it reads them, and writes the corrected values back in place.
        (g, u), xa_gate_up = _group_forward(x2, [gate, up], ops, add_adapters=False)
        rank = gate_a.shape[0]  # the B's come scaled: the kernel's scales are 1
        h = lora_glu_forward(g, u, xa_gate_up[:, :rank], xa_gate_up[:, rank:], *ops.b, 1.0, 1.0, activation,
                             round_dtype, x.dtype)
    (y,), xa_down = _group_forward(h, [down], down_ops)
    return _shaped(y, *x.shape[:-1], down_w.shape[0]), g, u, xa_gate_up, xa_down, adapters


# The one-pass MLP backward's reach: what bench/lora_glu_backward.py measured (16-bit, rank 16;
# a smaller rank runs the same rank-16 dots). For the GPU's tiles, rank 64 spills registers and
# fp32 of rank 64 needs more shared memory than an H100 or H200 has (303,104 bytes, compiled for
# sm_90): those take adapter_grads after the GLU backward, as before.
GLU_PASS_DTYPES = (torch.bfloat16, torch.float16)
GLU_PASS_MAX_RANK = 16


def _glu_backward_fused_pays(g: torch.Tensor, *ranks: int) -> bool:
    """Whether the MLP's backward takes the fused pass: where the adapters' products of dg and du
    would each have been a pass of ``adapter_grads`` of their own (large enough), for the dtypes
    and ranks it was measured at."""
    return (g.dtype in GLU_PASS_DTYPES and max(ranks) <= GLU_PASS_MAX_RANK and adapter_grads_pays(g, max(ranks))
            and g.is_contiguous())


def _gate_up_through_depth(x2: torch.Tensor, gate: Adapted, up: Adapted, ops: Operands
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrected g and u, each from one GEMM over [x A_g^T | x | x A_u^T]: gate reads its first
    r_g + in columns against [s_g B_g | W_g], up its last in + r_u against [W_u | s_u B_u]."""
    rank_gate, inner = gate.lora_a.shape[0], x2.shape[1]
    xa = torch.mm(x2, ops.a.t())
    wide = concat_columns(xa[:, :rank_gate], x2, xa[:, rank_gate:])
    g = torch.mm(wide[:, :rank_gate + inner], concat_columns(ops.b[0], gate.weight).t())
    u = torch.mm(wide[:, rank_gate:], concat_columns(up.weight, ops.b[1]).t())
    return g, u, xa


@_lora_glu_mlp_forward_op.register_fake
def _lora_glu_mlp_forward_fake(x, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
                               down_w, down_a, down_b, down_scale, activation, round_dtype):
    _check_mlp(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b)
    rows = x.numel() // x.shape[-1]
    width = gate_w.shape[0]
    groups = [[Adapted(gate_w, None, gate_a, gate_b, gate_scale), Adapted(up_w, None, up_a, up_b, up_scale)],
              [Adapted(down_w, None, down_a, down_b, down_scale)]]
    return (x.new_empty((*x.shape[:-1], down_w.shape[0])), x.new_empty((rows, width)), x.new_empty((rows, width)),
            x.new_empty((rows, gate_a.shape[0] + up_a.shape[0])), x.new_empty((rows, down_a.shape[0])),
            x.new_empty(_cast_size(groups, x.dtype)))


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
                              xa_gate_up: torch.Tensor, xa_down: torch.Tensor, adapters: torch.Tensor,
                              gate_w: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_scale: float,
                              up_w: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor, up_scale: float,
                              down_w: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor, down_scale: float,
                              activation: str, round_dtype: Optional[torch.dtype], need: list[bool]
                              ) -> list[torch.Tensor]:
    need_dx, need_gate_a, need_gate_b, need_up_a, need_up_b, need_down_a, need_down_b = need
    gate, up = Adapted(gate_w, None, gate_a, gate_b, gate_scale), Adapted(up_w, None, up_a, up_b, up_scale)
    down = Adapted(down_w, None, down_a, down_b, down_scale)
    need_dh = need_dx or need_gate_a or need_gate_b or need_up_a or need_up_b
    grads: list[Optional[torch.Tensor]] = [None] * 7
    dy2 = _rows(dy).to(down_w.dtype)
    gate_up_ops, down_ops = _operands_in([[gate, up], [down]], adapters, down_w.dtype)
    dyb, (fused_db,) = _adapter_rows([dy2], [down], down_ops, xa_down, [need_down_b]) if need_dh or need_down_a \
        else (None, (None,))
    h = gate_up_rows = None
    if need_dh:
        dh = _group_dx([dy2], dyb, [down], down_ops)
        if _glu_backward_fused_pays(g, gate_a.shape[0], up_a.shape[0], down_a.shape[0]):
            # One pass gives dg, du, the gate and up adapters' products of them and the down
            # adapter's dA (``kernels/lora_glu.py``): no pass over dg and du of their own, and no h.
            dyb_gate_up, pending = dh.new_empty((dh.shape[0], gate_a.shape[0] + up_a.shape[0])), []
            dg, du, db_gate, db_up, grads[5] = lora_glu_backward(
                dh, g, u, xa_gate_up[:, :gate_a.shape[0]], xa_gate_up[:, gate_a.shape[0]:], *gate_up_ops.b, dyb,
                gate_scale, up_scale, activation, round_dtype, x.dtype, dyb_gate_up, pending,
                db_dtypes=(gate_b.dtype if need_gate_b else None, up_b.dtype if need_up_b else None),
                da_dtype=down_a.dtype if need_down_a else None, dg_over_dh=True)
            sum_partials(pending)
            gate_up_rows = (dyb_gate_up, [db_gate, db_up])
        else:
            # h, which the down adapter's dA reads, comes out of the same pass as dg and du (one
            # more write there instead of a pass of the forward kernel), into dh's buffer.
            dg, du, h = glu_backward_and_output(dh, g, u, activation, round_dtype, x.dtype, h_over_dout=True)
        del dh
    elif need_down_a:
        h = glu_forward(g, u, activation, round_dtype, x.dtype)
    if h is not None and need_down_a:  # the fused pass gave dA_d already
        grads[5] = _mm_as(dyb.t(), h, down_a.dtype)
    del h
    grads[6] = fused_db if fused_db is not None else _b_grad(dy2, xa_down, down) if need_down_b else None
    if need_dh:
        dx, [(_, _, grads[1], grads[2]), (_, _, grads[3], grads[4])] = _group_backward(
            [dg, du], _rows(x), xa_gate_up, [gate, up], need_dx,
            [Needed(dlora_a=need_gate_a, dlora_b=need_gate_b), Needed(dlora_a=need_up_a, dlora_b=need_up_b)],
            ops=gate_up_ops, rows=gate_up_rows)
        if need_dx:
            grads[0] = dx.reshape(x.shape)
    like = (x, gate_a, gate_b, up_a, up_b, down_a, down_b)
    return [empty_or(t, ref) for t, ref in zip(grads, like)]


@_lora_glu_mlp_backward_op.register_fake
def _lora_glu_mlp_backward_fake(dy, x, g, u, xa_gate_up, xa_down, adapters, gate_w, gate_a, gate_b, gate_scale, up_w, up_a,
                                up_b, up_scale, down_w, down_a, down_b, down_scale, activation, round_dtype, need):
    like = (x, gate_a, gate_b, up_a, up_b, down_a, down_b)
    return [ref.new_empty(ref.shape) if n else ref.new_empty(0) for n, ref in zip(need, like)]


# Positions of the differentiable inputs among the op's arguments: x, then each A and B.
_MLP_GRAD_INPUTS = (0, 2, 3, 6, 7, 10, 11)


def _lora_glu_mlp_setup_context(ctx, inputs, output) -> None:
    (x, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
     down_w, down_a, down_b, down_scale, activation, round_dtype) = inputs
    _y, g, u, xa_gate_up, xa_down, adapters = output
    ctx.mark_non_differentiable(g, u, xa_gate_up, xa_down, adapters)
    ctx.set_materialize_grads(False)
    ctx.scales = (gate_scale, up_scale, down_scale)
    ctx.activation, ctx.round_dtype = activation, round_dtype
    ctx.save_for_backward(x, g, u, xa_gate_up, xa_down, adapters, gate_w, gate_a, gate_b, up_w, up_a, up_b,
                          down_w, down_a, down_b)


def _lora_glu_mlp_backward(ctx, dy: Optional[torch.Tensor], *_non_differentiable):
    none = [None] * 15
    need = [bool(ctx.needs_input_grad[i]) for i in _MLP_GRAD_INPUTS]
    if dy is None or not any(need):
        return tuple(none)
    (x, g, u, xa_gate_up, xa_down, adapters, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a,
     down_b) = ctx.saved_tensors
    gate_scale, up_scale, down_scale = ctx.scales
    grads = torch.ops.fastft.lora_glu_mlp_backward(
        dy, x, g, u, xa_gate_up, xa_down, adapters, gate_w, gate_a, gate_b, gate_scale, up_w, up_a, up_b, up_scale,
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


def _check_4bit(x, packed, code, blocksize, out_features, in_features, compute_dtype, bias, lora_a, lora_b):
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
           torch.empty((out_features, in_features), dtype=compute_dtype, device="meta"), bias, lora_a, lora_b)


@torch.library.custom_op("fastft::qlora_linear", mutates_args=())
def qlora_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                 code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], code: list[float], blocksize: int,
                 out_features: int, in_features: int, compute_dtype: torch.dtype, bias: Optional[torch.Tensor],
                 lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x W^T + bias + scale (x A^T) B^T with W the dequantised 4-bit weight, computed in
    ``compute_dtype``; W exists only for the duration of the call (and again in the backward)."""
    _check_4bit(x, packed, code, blocksize, out_features, in_features, compute_dtype, bias, lora_a, lora_b)
    weight = _dequantized(packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features,
                          compute_dtype)
    x2 = _rows(x)
    if _adapters_wider(x, compute_dtype, lora_a, lora_b):
        bias = bias.to(compute_dtype) if bias is not None else None
        y = F.linear(x2.to(compute_dtype), weight, bias).to(x.dtype)
        y.addmm_(torch.mm(x2, lora_a.t()), (lora_b * scale).t())
    else:
        (y,), _ = _group_forward(x2.to(compute_dtype), [Adapted(weight, bias, lora_a, lora_b, scale)])
    return _shaped(y, *x.shape[:-1], out_features).to(out_dtype)


def _adapters_wider(x: torch.Tensor, compute_dtype: torch.dtype, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether x and the adapters are float32 over a 16-bit 4-bit GEMM, as peft's
    prepare_model_for_kbit_training leaves a model. peft then runs the adapter and the sum in
    float32 and only the base in the GEMM's dtype; the op does the same, where it otherwise
    runs everything in the GEMM's dtype."""
    return x.dtype == lora_a.dtype == lora_b.dtype == torch.float32 != compute_dtype


@qlora_linear.register_fake
def _qlora_linear_fake(x, packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features,
                       compute_dtype, bias, lora_a, lora_b, scale, out_dtype):
    _check_4bit(x, packed, code, blocksize, out_features, in_features, compute_dtype, bias, lora_a, lora_b)
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)


# The backward is an op of its own (as for the GLU): AOT autograd traces it through its fake,
# while its body launches the dequantisation kernel on real tensors.
@torch.library.custom_op("fastft::qlora_linear_backward", mutates_args=())
def _qlora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                              absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                              offset: Optional[torch.Tensor], code: list[float], blocksize: int,
                              out_features: int, in_features: int, compute_dtype: torch.dtype,
                              bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                              scale: float, need: list[bool]) -> list[torch.Tensor]:
    """[dX, dbias, dA, dB], each an empty tensor where ``need`` (the same order) says it is not needed."""
    need_dx, need_dbias, need_da, need_db = need
    weight = _dequantized(packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features,
                          compute_dtype)
    wider = _adapters_wider(x, compute_dtype, lora_a, lora_b)
    # bitsandbytes sums the bias's gradient from the output gradient in the GEMM's dtype.
    dy_compute = _rows(dy).to(compute_dtype) if wider or need_dbias else None
    dbias = dy_compute.sum(0, dtype=torch.float32).to(bias.dtype) if need_dbias and bias is not None else None
    if wider:
        dx, da, db = _qlora_wider_backward(_rows(dy).to(x.dtype), dy_compute, _rows(x), weight, lora_a, lora_b,
                                           scale, need_dx, need_da, need_db)
        return [empty_or(dx.reshape(x.shape) if dx is not None else None, x),
                empty_or(dbias, bias if bias is not None else x), empty_or(da, lora_a), empty_or(db, lora_b)]
    x2 = _rows(x).to(compute_dtype)
    # x A^T is recomputed, not saved: the 4-bit path mostly runs under checkpointed layers, whose
    # forward runs again before this backward anyway.
    lin = Adapted(weight, None, lora_a, lora_b, scale)
    ops = _operands([lin], compute_dtype)
    xa = torch.mm(x2, ops.a.t()) if need_db else None
    dx, [(_, _, da, db)] = _group_backward([_rows(dy)], x2, xa, [lin], need_dx,
                                           [Needed(dlora_a=need_da, dlora_b=need_db)], ops=ops)
    dx = dx.reshape(x.shape).to(x.dtype) if dx is not None else None
    return [empty_or(dx, x), empty_or(dbias, bias if bias is not None else x), empty_or(da, lora_a),
            empty_or(db, lora_b)]


def _qlora_wider_backward(dy: torch.Tensor, dy_compute: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, need_dx: bool, need_da: bool,
                          need_db: bool) -> tuple[Optional[torch.Tensor], ...]:
    """(dX, dA, dB) on row views where ``_adapters_wider``: the base's share of dX from the output
    gradient in the GEMM's dtype (``dy_compute``), as bitsandbytes computes it, the adapter's
    products in float32, as peft's autograd does."""
    dyb = torch.mm(dy, lora_b * scale) if need_dx or need_da else None
    dx = torch.mm(dy_compute, weight).to(x.dtype).addmm_(dyb, lora_a) if need_dx else None
    da = torch.mm(dyb.t(), x) if need_da else None
    db = torch.mm(dy.t(), torch.mm(x, lora_a.t())).mul_(scale) if need_db else None
    return dx, da, db


@_qlora_linear_backward_op.register_fake
def _qlora_linear_backward_fake(dy, x, packed, absmax, absmax2, code2, offset, code, blocksize, out_features,
                                in_features, compute_dtype, bias, lora_a, lora_b, scale, need):
    likes = (x, bias if bias is not None else x, lora_a, lora_b)
    return [ref.new_empty(ref.shape) if n else ref.new_empty(0) for n, ref in zip(need, likes)]


_QLORA_GRAD_INPUTS = (0, 11, 12, 13)  # x, bias, lora_a, lora_b among the op's arguments


def _qlora_setup_context(ctx, inputs, output) -> None:
    (x, packed, absmax, absmax2, code2, offset, code, blocksize, out_features, in_features, compute_dtype,
     bias, lora_a, lora_b, scale, _out_dtype) = inputs
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b)
    ctx.static = (code, blocksize, out_features, in_features, compute_dtype, scale)
    ctx.set_materialize_grads(False)


def _qlora_backward(ctx, dy: Optional[torch.Tensor]):
    grads: list[Optional[torch.Tensor]] = [None] * 16
    need = [bool(ctx.needs_input_grad[i]) for i in _QLORA_GRAD_INPUTS]
    if dy is None or not any(need):
        return tuple(grads)
    x, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b = ctx.saved_tensors
    code, blocksize, out_features, in_features, compute_dtype, scale = ctx.static
    results = torch.ops.fastft.qlora_linear_backward(dy, x, packed, absmax, absmax2, code2, offset, code, blocksize,
                                                     out_features, in_features, compute_dtype, bias, lora_a, lora_b,
                                                     scale, need)
    for position, wanted, grad in zip(_QLORA_GRAD_INPUTS, need, results):
        grads[position] = grad if wanted else None
    return tuple(grads)


qlora_linear.register_autograd(_qlora_backward, setup_context=_qlora_setup_context)
