"""Low-rank adapters on frozen linears (peft's LoRA), from their math:

    y = linear(x, W, b?) + linear(linear(dropout?(x.to(a_dtype)?), A), B) * s     W frozen, A and B trainable
    y = y.to(out_dtype)                                                        optional final cast

A base weight stored [in, out] (``linear_t``: transformers' ``Conv1D``, ``addmm(b, x, W)``
between views of x) is the same linear with W transposed; it is fused linear by linear, not in the MLP op.

Recognised from the graph and from which inputs need gradients, never from module classes: the
base weight must be frozen, and A [r, in] and B [out, r] must fit it (frozen adapters, as in
evaluation or when another adapter trains, are fused too: the math is the same). One adapter per linear,
no dropout in training, no bias on the adapter; anything else is left as it is and reported.

Two rewrites, the larger first:

- ``lora_glu_mlp``: a gated MLP whose gate, up and down projections all carry an adapter
  becomes ``fastft::lora_glu_mlp`` (the backward recomputes act(gate) * up);
- ``lora``: any other adapted linear becomes ``fastft::lora_linear`` (``fastft::qlora_linear`` over a
  4-bit base); three of one input (attention's q, k and v, biases or not) become one ``fastft::lora_linear_x3``.
"""
from __future__ import annotations

import torch

from fastft.kernels.lora import (code_table, lora_glu_mlp, lora_glu_mlp_reference, lora_linear,
                                 lora_linear_reference, lora_linear_x3)
from fastft.passes.canonical import canonical, dtype_of, same_size, tensor_meta
from fastft.passes.matcher import Cast, Lit, Match, Op, Var
from fastft.passes.pattern import Pattern, Replacement

from .four_bit import code_book, four_bit_linear
from .glu import activation_rounding, gated_product, gated_product_problem

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _adapted_linear(x, p: str = ""):
    """One LoRA linear over the sub-expression ``x``; every binding name starts with ``p``. The
    base is a linear, or any tensor (``base4``) that the check must prove to be a 4-bit linear of x."""
    base = (Op("linear", x, Var(p + "weight"), Var(p + "bias") | None, name=p + "base")
            | Op("linear_t", x, Var(p + "weight_t"), Var(p + "bias") | None, name=p + "base")
            | Cast(Var(p + "base4"), p + "base_cast"))
    # peft casts x to the adapter's dtype, then applies dropout; the other order is the same math.
    cast_x = Cast(x, p + "x_cast")
    adapter_in = (Op("dropout", cast_x, name=p + "dropout") | Cast(Op("dropout", x, name=p + "dropout"), p + "x_cast")
                  | cast_x)
    low_rank = Op("linear", adapter_in, Var(p + "lora_a"), Var(p + "lora_a_bias") | None, name=p + "a_out")
    adapter = Op("linear", low_rank, Var(p + "lora_b"), Var(p + "lora_b_bias") | None, name=p + "b_out")
    scaled = Cast(Op("mul", adapter, Lit(p + "scale"), commutative=True, name=p + "scaled") | adapter,
                  p + "adapter_cast")
    return Cast(Op("add", base, scaled, commutative=True, name=p + "sum"), p + "out_cast")


def _where(p: str) -> str:
    return f"{p.rstrip('_')} projection: " if p else ""


def _stored_in_out(b: dict, p: str = "") -> bool:
    """Whether the matched base weight is stored [in, out] (``linear_t``, a ``Conv1D``)."""
    return p + "weight_t" in b


def _adapter_problem(b: dict, x_node, p: str = "") -> str | None:
    """Why one matched LoRA linear over a plain frozen weight cannot be fused, or None."""
    where = _where(p)
    stored_in_out = _stored_in_out(b, p)
    x, weight = tensor_meta(x_node), tensor_meta(b[p + "weight_t"] if stored_in_out else b[p + "weight"])
    if weight.requires_grad:
        return f"{where}the base weight is trainable (not a frozen base with an adapter)"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"{where}base weight dtype {weight.dtype} has no fused op (supported: float32, bfloat16, float16)"
    if x.dtype != weight.dtype:
        return f"{where}x is {x.dtype} but the base weight is {weight.dtype}"
    if p + "bias" in b and dtype_of(b[p + "bias"]) != weight.dtype:
        return f"{where}the base bias is {dtype_of(b[p + 'bias'])} but the weight is {weight.dtype}"
    if weight.dim() != 2:
        return f"{where}a base weight of {weight.dim()} dimensions"
    shape = tuple(weight.shape)  # as a linear's: [out, in]
    return _branch_problem(b, x_node, p, shape[::-1] if stored_in_out else shape)


def _branch_problem(b: dict, x_node, p: str, base_shape: tuple) -> str | None:
    """Why the adapter branch ``B(A(x)) * s`` beside a base of ``base_shape`` cannot be fused, or None."""
    where = _where(p)
    x = tensor_meta(x_node)
    lora_a, lora_b = tensor_meta(b[p + "lora_a"]), tensor_meta(b[p + "lora_b"])
    if p + "dropout" in b:
        attrs = canonical(b[p + "dropout"]).attrs
        if attrs["training"] is not False and attrs["p"] != 0:
            return f"{where}the adapter applies dropout p={attrs['p']} in training; the fused op has no dropout"
    if p + "lora_a_bias" in b or p + "lora_b_bias" in b:
        return f"{where}the adapter has a bias; the fused op has none"
    for name, t in (("x", x), ("lora_A", lora_a), ("lora_B", lora_b)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{where}{name} dtype {t.dtype} has no fused op (supported: float32, bfloat16, float16)"
    if b[p + "x_cast"] not in (None, lora_a.dtype):
        return f"{where}x is cast to {b[p + 'x_cast']} for an adapter of dtype {lora_a.dtype}"
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        return f"{where}adapter matrices of {lora_a.dim()} and {lora_b.dim()} dimensions"
    out_features, in_features = base_shape
    rank = lora_a.shape[0]
    if not (same_size(lora_a.shape[1], in_features) and same_size(lora_b.shape[0], out_features)
            and same_size(lora_b.shape[1], rank)):
        return (f"{where}adapter shapes A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit the "
                f"base weight {tuple(base_shape)}")
    scale = b.get(p + "scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return f"{where}the adapter is scaled by {scale!r}, not a number"
    return None


def _another_adapter_added(root) -> bool:
    """Does ``root`` go into a sum with a second low-rank branch (a second active adapter)?"""
    for user in root.users:
        canon = canonical(user)
        if canon is None or canon.op != "add":
            continue
        for other in canon.args:
            scaled = canonical(other)
            if other is root or scaled is None:
                continue
            branch = [a for a in scaled.args if canonical(a) is not None] if scaled.op == "mul" else [other]
            if any(_is_low_rank_product(node) for node in branch):
                return True
    return False


def _is_low_rank_product(node) -> bool:
    """``node`` is linear(linear(., A), B) with A narrower than both its input and B's output."""
    canon = canonical(node)
    if canon is None or canon.op != "linear":
        return False
    inner = canonical(canon.args[0])
    if inner is None or inner.op != "linear":
        return False
    a, b = tensor_meta(inner.args[1]), tensor_meta(canon.args[1])
    if a is None or b is None or a.dim() != 2 or b.dim() != 2:
        return False
    rank = a.shape[0]
    return bool(rank < a.shape[1] and rank < b.shape[0])


def _out_dtype(m: Match):
    return dtype_of(m.root)


# --------------------------------------------------------------------------------------------
# lora: one adapted linear
# --------------------------------------------------------------------------------------------
def _four_bit_problem(b: dict, p: str = "") -> str | None:
    """Why a LoRA linear whose base (``base4``) should be a 4-bit linear of x cannot be fused."""
    record, why = four_bit_linear(b[p + "base4"])
    if record is None:
        return f"the base is neither a linear nor a 4-bit linear: {why}"
    if _uncast(record.x) is not _uncast(b["x"]):
        return (f"the 4-bit base reads '{_uncast(record.x).name}' and the adapter "
                f"'{_uncast(b['x']).name}': different inputs")
    compute = dtype_of(record.x)
    if compute not in SUPPORTED_DTYPES:
        return f"the 4-bit linear computes in {compute}"
    if b[p + "adapter_cast"] not in (None, compute):
        return f"the adapter's product is cast to {b[p + 'adapter_cast']}, the base computes in {compute}"
    if record.bias is not None:
        bias = tensor_meta(record.bias)
        if bias is None or bias.dtype != compute or tuple(bias.shape) != record.shape[:1]:
            return (f"the 4-bit linear's bias is {_described(bias)}; the fused op adds a bias of "
                    f"[{record.shape[0]}] {compute}")
    return _branch_problem(b, b["x"], p, record.shape)


def _described(meta) -> str:
    return "not a tensor" if meta is None else f"{list(meta.shape)} {meta.dtype}"


def _uncast(node):
    """``node`` without the casts (and copies) in front of it."""
    while (canon := canonical(node)) is not None and canon.op in ("cast", "identity"):
        node = canon.args[0]
    return node


def _check_lora(m: Match) -> str | None:
    b = m.bindings
    if "base4" in b:
        reason = _four_bit_problem(b)
    else:
        reason = _adapter_problem(b, b["x"])
        if reason is None and b["adapter_cast"] not in (None, dtype_of(b["b_out"])):
            reason = f"the adapter's product is cast to {b['adapter_cast']} before the sum"
    if reason is not None:
        return reason
    if dtype_of(m.root) not in SUPPORTED_DTYPES:
        return f"the result is cast to {dtype_of(m.root)}"
    if _another_adapter_added(m.root):
        return "a second adapter is added to the same linear (several active adapters)"
    return None


def _replace_lora(m: Match) -> Replacement:
    b = m.bindings
    if "base4" in b:
        return _replace_qlora(m)
    if _stored_in_out(b):
        return Replacement(lora_linear_of_stored_in_out,
                           (b["x"], b["weight_t"], b.get("bias"), b["lora_a"], b["lora_b"],
                            float(b.get("scale", 1.0)), _out_dtype(m)))
    return Replacement(lora_linear,
                       (b["x"], b["weight"], b.get("bias"), b["lora_a"], b["lora_b"], float(b.get("scale", 1.0)),
                        _out_dtype(m)))


def lora_linear_of_stored_in_out(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                                 lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                                 out_dtype: torch.dtype) -> torch.Tensor:
    """``lora_linear`` over a base weight stored [in, out]: its transpose is a view, not a copy."""
    return lora_linear(x, weight_t.t(), bias, lora_a, lora_b, scale, out_dtype)


def _shared_input_key(m: Match):
    """Plain LoRA linears of one input (q, k and v, with or without biases) group into one op;
    anything else gets a key of its own, so it never waits for partners."""
    b = m.bindings
    if "base4" in b or _stored_in_out(b):
        return m.root
    return (b["x"], dtype_of(m.root))


def _replace_shared_input(matches: list[Match]) -> Replacement:
    args = [matches[0].bindings["x"]]
    for m in matches:
        b = m.bindings
        args += [b["weight"], b["lora_a"], b["lora_b"], float(b.get("scale", 1.0))]
    biases = [m.bindings.get("bias") for m in matches]
    return Replacement(lora_linear_x3, (*args, _out_dtype(matches[0]), *biases), outputs=3)


def _replace_qlora(m: Match) -> Replacement:
    b = m.bindings
    record, _ = four_bit_linear(b["base4"])
    absmax2, code2, offset = record.nested if record.nested is not None else (None, None, None)
    out_features, in_features = record.shape
    code_table(code_book(record.quant_type), tensor_meta(record.packed).device)  # made now, not in a CUDA graph
    return Replacement(torch.ops.fastft.qlora_linear.default,
                       (b["x"], record.packed, record.absmax, absmax2, code2, offset,
                        code_book(record.quant_type), record.blocksize, out_features, in_features,
                        dtype_of(record.x), record.bias, b["lora_a"], b["lora_b"], float(b.get("scale", 1.0)),
                        _out_dtype(m)))


def _absorb_four_bit(m: Match) -> list:
    """With a 4-bit base, the region also holds the 4-bit linear and the casts of x before it."""
    b = m.bindings
    if "base4" not in b:
        return []
    record, _ = four_bit_linear(b["base4"])
    casts, node = [], record.x
    while node is not b["x"] and node is not _uncast(b["x"]):
        casts.append(node)
        node = canonical(node).args[0]
    return [*casts, *record.nodes]


def _is_adapter_up_projection(node) -> bool:
    """The anchor of a LoRA region: the up-projection of a low-rank product of trainable weights."""
    if not _is_low_rank_product(node):
        return False
    canon = canonical(node)
    inner = canonical(canon.args[0])
    return bool(tensor_meta(inner.args[1]).requires_grad or tensor_meta(canon.args[1]).requires_grad)


LORA = Pattern(
    name="lora",
    family="lora",
    expr=_adapted_linear(Var("x")),
    check=_check_lora,
    replace=_replace_lora,
    anchors=frozenset({"linear"}),
    anchor_filter=_is_adapter_up_projection,
    reference=lora_linear_reference,
    kernel="fastft::lora_linear",
    absorb=_absorb_four_bit,
    group_key=_shared_input_key,
    group_size=3,
    replace_group=_replace_shared_input,
)


# --------------------------------------------------------------------------------------------
# lora_glu_mlp: down(act(gate(x)) * up(x)), all three adapted
# --------------------------------------------------------------------------------------------
def _projection_output(b: dict, p: str):
    """The node a matched adapted linear's value leaves from (its final cast, or the sum)."""
    total = b[p + "sum"]
    if b[p + "out_cast"] is None:
        return total
    return next(u for u in total.users if (c := canonical(u)) is not None and c.op == "cast")


def _check_mlp(m: Match) -> str | None:
    b = m.bindings
    x = tensor_meta(b["x"])
    gate, up = _projection_output(b, "gate_"), _projection_output(b, "up_")
    if any(p + "base4" in b for p in ("gate_", "up_", "down_")):
        return "a projection has a 4-bit base: the fused MLP takes dense weights (each adapted linear is fused alone)"
    if any(_stored_in_out(b, p) for p in ("gate_", "up_", "down_")):
        return ("a projection's weight is stored [in, out] (a Conv1D): the fused MLP takes [out, in] weights "
                "(each adapted linear is fused alone)")
    product = canonical(b["down_base"]).args[0]
    for p, x_node in (("gate_", b["x"]), ("up_", b["x"]), ("down_", product)):
        reason = _adapter_problem(b, x_node, p)
        if reason is not None:
            return reason
        if p + "bias" in b:
            return f"the {p.rstrip('_')} projection has a bias; the fused MLP has none"
    reason = gated_product_problem(b, gate, up)
    if reason is not None:
        return reason
    for name, node in (("gate", gate), ("up", up), ("the gated product", product),
                       ("the MLP's result", m.root)):
        if dtype_of(node) != x.dtype:
            return f"{name} is {dtype_of(node)} but the MLP's input is {x.dtype}; the fused MLP keeps one dtype"
    if _another_adapter_added(m.root):
        return "a second adapter is added to the down projection (several active adapters)"
    return None


def _replace_mlp(m: Match) -> Replacement:
    b = m.bindings
    kind, round_dtype = activation_rounding(b)
    args = [b["x"]]
    for p in ("gate_", "up_", "down_"):
        args += [b[p + "weight"], b[p + "lora_a"], b[p + "lora_b"], float(b.get(p + "scale", 1.0))]
    return Replacement(lora_glu_mlp, (*args, kind, round_dtype))


def _lora_mlp_expr():
    gate = _adapted_linear(Var("x"), "gate_")
    up = _adapted_linear(Var("x"), "up_")
    return _adapted_linear(gated_product(gate, up), "down_")


def _mlp_reference(x, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a, down_b, down_s,
                   activation, round_dtype):
    return lora_glu_mlp_reference(x, (gate_w, gate_a, gate_b, gate_s), (up_w, up_a, up_b, up_s),
                                  (down_w, down_a, down_b, down_s), activation, round_dtype)


LORA_GLU_MLP = Pattern(
    name="lora_glu_mlp",
    family="lora",
    expr=_lora_mlp_expr(),
    check=_check_mlp,
    replace=_replace_mlp,
    anchors=frozenset(),  # an MLP that is not fused whole still gets the single-linear rewrites
    reference=_mlp_reference,
    kernel="fastft::lora_glu_mlp",
)
