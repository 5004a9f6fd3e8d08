"""Joins made after autograd, in the graphs Inductor lowers: a residual add into the RMSNorm
that reads its sum, and the add that sums a residual stream's two gradients into the norm's
backward.

Both adds are glue Inductor cannot fuse into an opaque op: each reads two [rows, N] tensors and
writes a third beside a norm kernel that reads one of them anyway. They are joined here rather
than as a pattern of the captured graph because only here is the split between forward and
backward settled: a fused add + norm in the captured graph would have its output recomputed
from the add's inputs, keeping one more tensor per norm for the backward.

Each join is exact: the kernels round the sum and the summed gradient as the adds did. The glue
Inductor generates around a join may still change (a reduction over the summed gradient, such as
a bias's, can sum in another order).
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Optional

import torch
import torch.fx as fx
from torch._prims_common import is_contiguous_or_false
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fastft.kernels.rms_norm  # noqa: F401  (registers fastft::add_rms_norm)
from fastft.passes.canonical import tensor_meta

_ADD = torch.ops.aten.add.Tensor
_NORM = torch.ops.fastft.rms_norm.default
_NORM_BACKWARD = torch.ops.fastft.rms_norm_backward.default
_ADD_NORM = torch.ops.fastft.add_rms_norm.default

FORWARD_JOIN = "residual add + rms_norm"
BACKWARD_JOIN = "rms_norm backward + gradient add"


def join_norm_adds(graph: fx.Graph) -> Counter:
    """Join the adds next to RMSNorms in a lowered graph, in place; counts the joins by kind."""
    joins: Counter = Counter()
    order = _positions(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _NORM and _join_forward(graph, node, order):
            joins[FORWARD_JOIN] += 1
        elif node.target is _ADD and _join_backward(graph, node, order):
            joins[BACKWARD_JOIN] += 1
        else:
            continue
        order = _positions(graph)  # the join added nodes
    if joins:
        graph.lint()
    return joins


def _positions(graph: fx.Graph) -> dict:
    return {node: i for i, node in enumerate(graph.nodes)}


def _plain_add(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """The two operands of ``a + b`` of one shape and dtype, contiguous, without broadcasting or
    type promotion (the kernels read both as rows of the sum's layout). Symbolic sizes count as
    equal only where they are known to be, without adding a guard to a compiled graph."""
    if node.target is not _ADD or node.kwargs or len(node.args) != 2:
        return None
    out = tensor_meta(node)
    if out is None or not is_contiguous_or_false(out):
        return None
    for arg in node.args:
        val = tensor_meta(arg)
        if val is None or val.dtype != out.dtype or not is_contiguous_or_false(val) or val.dim() != out.dim():
            return None
        if not all(statically_known_true(a == b) for a, b in zip(val.shape, out.shape)):
            return None
    return node.args[0], node.args[1]


def _join_forward(graph: fx.Graph, norm: fx.Node, order: dict) -> bool:
    """h = a + b; y = rms_norm(h, ...)  ->  h, y = add_rms_norm(a, b, ...)."""
    add = norm.args[0]
    if not isinstance(add, fx.Node) or _plain_add(add) is None or len(norm.args) < 6:
        return False
    rest = list(norm.args[1:]) + list(norm.kwargs.values())
    # The joined node goes where the add was: everything the norm reads besides h must exist there.
    if any(isinstance(a, fx.Node) and order[a] > order[add] for a in rest):
        return False
    with graph.inserting_after(add):
        joined = graph.call_function(_ADD_NORM, (*add.args, *norm.args[1:]), dict(norm.kwargs))
        joined.meta["val"] = (tensor_meta(add), tensor_meta(norm))
    with graph.inserting_after(joined):
        normed = graph.call_function(_getitem, (joined, 1))
        normed.meta["val"] = tensor_meta(norm)
    with graph.inserting_after(joined):
        total = graph.call_function(_getitem, (joined, 0))
        total.meta["val"] = tensor_meta(add)
    add.replace_all_uses_with(total)
    norm.replace_all_uses_with(normed)
    graph.erase_node(norm)
    graph.erase_node(add)
    return True


def _join_backward(graph: fx.Graph, add: fx.Node, order: dict) -> bool:
    """dx = rms_norm_backward(...)[0]; s = dx + g  ->  s = rms_norm_backward(..., grad_add=g)[0].

    Only where dx has no other reader. The joined backward takes the old one's place where g
    exists there already, or else the add's place, where the old one's other output (dW) must
    then have no reader."""
    operands = _plain_add(add)
    if operands is None:
        return False
    for i, dx in enumerate(operands):
        other = operands[1 - i]
        backward = dx.args[0] if dx.target is _getitem and dx.args[1] == 0 else None
        if not isinstance(backward, fx.Node) or backward.target is not _NORM_BACKWARD or len(dx.users) != 1:
            continue
        args = _backward_args(backward)
        if args is None or not args["compute_dx"] or args["grad_add"] is not None:
            continue
        outputs = [u for u in backward.users if u is not dx]
        if order[other] < order[backward]:
            where = backward
        elif all(not u.users for u in outputs):
            where = add
        else:
            continue
        args["grad_add"] = other
        with graph.inserting_before(where):
            joined = graph.call_function(_NORM_BACKWARD, tuple(args.values()))
            joined.meta["val"] = backward.meta.get("val")
            total = graph.call_function(_getitem, (joined, 0))
            total.meta["val"] = tensor_meta(add)
        for user in outputs:  # dW: moved to the joined node, or unread and dropped
            if where is add:
                graph.erase_node(user)
            else:
                user.replace_input_with(backward, joined)
        add.replace_all_uses_with(total)
        graph.erase_node(add)
        graph.erase_node(dx)
        if not backward.users:
            graph.erase_node(backward)
        return True
    return False


def _backward_args(node: fx.Node) -> Optional[dict]:
    """The backward call's arguments by name, in the op's order, defaults filled in."""
    params = _NORM_BACKWARD._schema.arguments
    if len(node.args) > len(params):
        return None
    args = dict(zip((p.name for p in params), node.args))
    args.update(node.kwargs)
    for p in params:
        if p.name not in args and p.has_default_value():
            args[p.name] = p.default_value
    if set(args) != {p.name for p in params}:
        return None
    return {p.name: args[p.name] for p in params}


_getitem = operator.getitem
