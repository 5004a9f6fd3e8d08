"""Autocast made explicit: the casts ``torch.autocast`` makes inside an op, written into the graph.

A model traced under autocast (HF Trainer's ``bf16=True``/``fp16=True`` wraps the forward in it;
a model may open its own ``torch.autocast`` block) records each op with the dtypes its inputs had
before autocast cast them: ``linear(x: f32, w: f32) -> bf16``. A fused op put in place of such a
region does not go through autocast (custom ops have no autocast kernel), so it would get the
uncast inputs and compute something else, or fail on the mixed dtypes. This pass inserts, before
each op that autocast changed, the casts autocast makes: every input it casts goes to the dtype
of the op's result. The graph then computes the same values with or without autocast (autocast
casting an input already in its dtype is a no-op), and patterns see casts they already know.

Which ops autocast changed is read from the traced dtypes, not from autocast's op lists (they
differ by device and torch version): an op whose floating result dtype is not the promotion of
its floating inputs' dtypes, and that is neither a cast nor in place. Every autocast policy casts
its inputs to the result's dtype (lower precision, float32, promote), and float64 tensors and
0-dim tensors (which do not take part in promotion against larger tensors) are left alone, as
autocast and type promotion leave them.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from .canonical import canonical, tensor_meta

__all__ = ["autocast_made_explicit"]

_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)  # float64 is never cast
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
# Higher-order ops whose bodies run under the autocast state of their call site.
_NESTED = ("tag_activation_checkpoint", "wrap", "cond")


def autocast_made_explicit(gm: fx.GraphModule) -> int:
    """Insert the casts autocast makes into ``gm`` and its nested bodies; returns how many.
    The autocast state outside the graph is the one in force now (Dynamo compiles a frame
    under the state it guards on)."""
    ambient = {device: torch.is_autocast_enabled(device) for device in ("cpu", "cuda", "xpu", "mps")}
    inserted = _explicit(gm, ambient, set())
    if inserted:
        for sub in gm.modules():
            if isinstance(sub, fx.GraphModule):
                sub.graph.lint()
                sub.recompile()
    return inserted


def _explicit(gm: fx.GraphModule, outside: dict[str, bool], seen: set[int]) -> int:
    if id(gm) in seen:
        return 0
    seen.add(id(gm))
    inserted = 0
    opened: list[tuple[fx.Node, str, bool]] = []  # autocast blocks open at this point of the graph
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}  # one cast per value and dtype, shared
    for node in list(gm.graph.nodes):
        if node.op != "call_function" and node.op != "call_method":
            continue
        state = dict(outside)
        state.update({device: enabled for _, device, enabled in opened})
        if node.target is _enter_autocast:
            device, enabled = node.args[0], node.args[2] if len(node.args) > 2 else True
            opened.append((node, str(device), bool(enabled)))
            continue
        if node.target is _exit_autocast:
            opened = [entry for entry in opened if entry[0] is not node.args[0]]
            continue
        if getattr(node.target, "__name__", None) in _NESTED:
            for arg in node.args:
                body = getattr(gm, arg.target, None) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
                if isinstance(body, fx.GraphModule):
                    inserted += _explicit(body, state, seen)
            continue
        inserted += _cast_inputs(gm.graph, node, state, casts)
    return inserted


def _cast_inputs(graph: fx.Graph, node: fx.Node, enabled: dict[str, bool],
                 casts: dict[tuple[fx.Node, torch.dtype], fx.Node]) -> int:
    inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
    if not inputs or not enabled.get(tensor_meta(inputs[0]).device.type, False):
        return 0
    result = _result_dtype(node)
    if result is None or _is_cast_or_in_place(node):
        return 0
    castable = [a for a in inputs if tensor_meta(a).dtype in _AUTOCAST_CASTS and tensor_meta(a).dim() > 0]
    promoted = _promotion([tensor_meta(a).dtype for a in inputs
                           if tensor_meta(a).is_floating_point() and tensor_meta(a).dim() > 0])
    if promoted is None or promoted == result:
        return 0  # type promotion alone explains the result: autocast did nothing here
    targets = {a for a in castable if tensor_meta(a).dtype != result}
    if not targets:
        return 0
    made = 0
    for a in targets:
        if (a, result) not in casts:
            # Shared by every op that needs it (a frozen base's linear and its first adapter read
            # one x), placed where grouping the ops stays possible: a graph input's cast at the
            # top (three linears fused into one op need their three weights before the first), a
            # computed value's before its first op that needs it (ops are visited in order), not
            # right after the value (q's cast would then come before k is computed).
            where = _last_placeholder(graph).next if a.op == "placeholder" else node
            with graph.inserting_before(where):
                cast = graph.call_method("to", (a, result))
            cast.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            cast.meta["example_value"] = tensor_meta(a).to(result)
            casts[(a, result)] = cast
            made += 1
    node.args = fx.node.map_arg(node.args, lambda a: casts.get((a, result), a))
    node.kwargs = fx.node.map_arg(node.kwargs, lambda a: casts.get((a, result), a))
    return made



def _result_dtype(node: fx.Node) -> torch.dtype | None:
    """The one floating dtype of the node's tensor results, if they have exactly one."""
    value = node.meta.get("example_value", node.meta.get("val"))
    values = value if isinstance(value, (tuple, list)) else (value,)
    dtypes = {v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _promotion(dtypes: list[torch.dtype]) -> torch.dtype | None:
    if not dtypes:
        return None
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted


def _is_cast_or_in_place(node: fx.Node) -> bool:
    canon = canonical(node)
    if canon is not None and canon.op in ("cast", "identity"):
        return True
    if any(isinstance(v, torch.dtype) for v in (*node.args, *node.kwargs.values())):
        return True  # the op is asked for its result's dtype (softmax(x, dtype=...), x.new_zeros(dtype=...))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    name = getattr(node.target, "__name__", "")
    return node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]
