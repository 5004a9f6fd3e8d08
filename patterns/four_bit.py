"""A linear over a 4-bit quantised weight (bitsandbytes' NF4 / FP4), as Dynamo captures it.

bitsandbytes computes it in an autograd Function, which Dynamo records as one
``autograd_function_apply`` call with a forward and a backward body. The forward body calls the
library's ``gemm_4bit`` op with everything that defines the weight: the packed codes, the
per-block scales (themselves 8-bit with a nested scale and an offset under double
quantisation), the block size, the 4-bit code book and the weight's shape. This module reads
those from the body and maps them to the nodes of the enclosing graph, so that a pattern can
call a fused op on them. The packed weight is never trainable (uint8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fastft.passes.canonical import tensor_meta

QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class FourBitLinear:
    x: fx.Node  # the input the 4-bit GEMM reads (in the enclosing graph)
    packed: fx.Node  # uint8 codes, two per byte
    absmax: fx.Node  # per-block scales: float32, or uint8 codes under double quantisation
    nested: tuple[fx.Node, fx.Node, fx.Node] | None  # (absmax2, code2, offset) under double quantisation
    blocksize: int
    quant_type: str
    shape: tuple[int, int]  # (out_features, in_features)
    bias: fx.Node | None  # added to the product (the graph's cast of the layer's bias), or None
    nodes: tuple = ()  # what computes the output from the inputs above: the call, views, the Function's bodies


def _op_name(node: fx.Node) -> str:
    target = node.target
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else getattr(target, "__name__", str(target))


def four_bit_linear(node: Any) -> tuple[FourBitLinear | None, str | None]:
    """(the 4-bit linear whose output ``node`` is, None) or (None, why it is not one).

    Two forms: the library's ``gemm_4bit`` op called directly (an input that needs no gradient),
    or the first output of the autograd Function around it."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None, "not a call"
    if _op_name(node).endswith("gemm_4bit"):
        views = tuple(a for a in node.args[1:2] if isinstance(a, fx.Node) and _is_view(a))
        return _from_gemm(node, lambda v, what, views=True: _strip_views(v, what) if views else v, (node, *views))
    if getattr(node.target, "__name__", None) != "getitem" or node.args[1] != 0:
        return None, "not the first output of a call"
    apply = node.args[0]
    if not isinstance(apply, fx.Node) or getattr(apply.target, "__name__", None) != "autograd_function_apply":
        return None, "not the output of an autograd Function"
    owner = _owner(apply)
    fwd_ref = apply.args[0]
    if owner is None or not isinstance(fwd_ref, fx.Node) or fwd_ref.op != "get_attr":
        return None, "an autograd Function whose body cannot be read"
    body = getattr(owner, fwd_ref.target, None)
    if not isinstance(body, fx.GraphModule):
        return None, "an autograd Function whose body cannot be read"
    gemms = [n for n in body.graph.nodes if n.op == "call_function" and _op_name(n).endswith("gemm_4bit")]
    if len(gemms) != 1:
        return None, "an autograd Function that is not one 4-bit GEMM"
    placeholders = [p for p in body.graph.nodes if p.op == "placeholder"]
    operands = apply.args[2:]

    def outer(inner: Any, what: str, views: bool = True) -> fx.Node:
        inner = _strip_views(inner, what) if views else inner
        if not isinstance(inner, fx.Node) or inner.op != "placeholder" or inner not in placeholders:
            raise _NotFourBit(f"the 4-bit GEMM's {what} is computed inside the Function")
        value = operands[placeholders.index(inner)]
        return _strip_views(value, what) if views else value

    # The packed codes reach the Function as a view: that view belongs to the linear.
    packed_inner = _strip_views(gemms[0].args[1], "packed weight")
    packed_operand = operands[placeholders.index(packed_inner)] if packed_inner in placeholders else None
    views = (packed_operand,) if isinstance(packed_operand, fx.Node) and _is_view(packed_operand) else ()
    return _from_gemm(gemms[0], outer, (node, apply, fwd_ref, apply.args[1], *views))


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("view", "reshape")


def _strip_views(value: Any, what: str = "input") -> fx.Node:
    # A view of the packed codes (reshaped to a column) reads the same memory.
    while isinstance(value, fx.Node) and value.op == "call_method" and value.target in ("view", "reshape"):
        value = value.args[0]
    if not isinstance(value, fx.Node):
        raise _NotFourBit(f"the 4-bit GEMM's {what} is not a tensor of the graph")
    return value


def _from_gemm(gemm: fx.Node, outer, nodes: tuple) -> tuple[FourBitLinear | None, str | None]:
    """Read one ``gemm_4bit(x, packed, shape, absmax, blocksize, quant_type, bias=, absmax_8bit=,
    absmax_code=, absmax_offset=)`` call; ``outer`` maps its tensor arguments to the nodes of the
    graph being rewritten."""
    args, kwargs = gemm.args, gemm.kwargs
    try:
        if len(args) < 6:
            raise _NotFourBit("a 4-bit GEMM call with an unexpected signature")
        x, packed, shape, absmax, blocksize, quant_type = args[:6]
        bias = kwargs.get("bias", args[6] if len(args) > 6 else None)
        nested = None
        if kwargs.get("absmax_8bit") is not None:
            # The float32 scales passed positionally are then the nested ones.
            nested = (outer(absmax, "nested scales"), outer(kwargs["absmax_code"], "nested code book"),
                      outer(kwargs["absmax_offset"], "scale offset"))
            absmax = kwargs["absmax_8bit"]
        # Views of the packed codes read the same memory; a reshape of the input is real.
        record = FourBitLinear(x=outer(x, "input", views=False), packed=outer(packed, "packed weight"),
                               absmax=outer(absmax, "scales"), nested=nested, blocksize=int(blocksize),
                               quant_type=str(quant_type), shape=tuple(int(s) for s in shape),
                               bias=outer(bias, "bias", views=False) if bias is not None else None, nodes=nodes)
    except _NotFourBit as e:
        return None, str(e)
    if record.quant_type not in QUANT_TYPES:
        return None, f"4-bit quant type {record.quant_type!r} (supported: {', '.join(QUANT_TYPES)})"
    if len(record.shape) != 2:
        return None, f"a 4-bit weight of shape {record.shape}"
    meta = tensor_meta(record.packed)
    if meta is None or meta.dtype != torch.uint8:
        return None, "the packed weight is not uint8"
    return record, None


def code_book(quant_type: str) -> list[float]:
    """The 16 values a 4-bit code stands for, as bitsandbytes defines them for ``quant_type``."""
    from bitsandbytes.functional import get_4bit_type  # only a graph with a 4-bit GEMM gets here

    return [float(v) for v in get_4bit_type(quant_type, device="cpu")]


class _NotFourBit(Exception):
    pass


def _owner(node: fx.Node) -> fx.GraphModule | None:
    return getattr(node.graph, "owning_module", None)
