"""What an attention mask built inside the graph is, proved from the ops that build it.

Under capture a model cannot look at its data to skip building a mask, so it builds the full
[batch, heads, q, kv] boolean mask from position indices (``kv_pos <= q_pos``, often combined
with a "same packed sequence" test derived from the positions). SDPA given that mask runs a
masked kernel over every tile; with ``is_causal=True`` it skips the upper half. This module
evaluates the mask's computation abstractly, over a small domain of values that are exact:

    Ramp(axis, offset)   element [..., i_axis, ...] = offset + i_axis   (e.g. an arange)
    Const(value)         every element equals value
    Causal(q, kv)        element = (i_kv <= i_q)

Axes are counted from the end (-1 is the last), so that broadcasting does not move them. An op
outside the handful it knows, or an input the graph does not compute itself (a padding mask, user
position ids), makes the mask unknown, with the reason. Only what the rules prove is claimed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fastft.passes.canonical import outer_value, tensor_meta


@dataclass(frozen=True)
class Ramp:
    axis: int  # negative: counted from the last axis
    offset: int


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Causal:
    q_axis: int
    kv_axis: int


Value = Ramp | Const | Causal


class Unknown(Exception):
    """The mask's value could not be proved; the message says where and why."""


@dataclass
class MaskAnalysis:
    value: Value
    nodes: list[fx.Node]  # every op node of this graph the mask is computed from
    inputs: list[fx.Node]  # what else it reads: symbolic sizes, and values an enclosing graph passes in


def analyse_mask(mask: fx.Node) -> MaskAnalysis:
    """The abstract value of ``mask`` and the nodes computing it; raises Unknown with a reason."""
    state = _Interpreter()
    value = state.eval(mask)
    return MaskAnalysis(value, list(state.nodes), list(state.inputs))


def _outer(node: fx.Node) -> Value:
    """The value an enclosing graph passes into a nested body (a checkpointed layer), proved
    there; its computation stays in that graph."""
    return _Interpreter().eval(outer_value(node))


def _name(node: fx.Node) -> str:
    """The op's name, a dunder method as its operator (``__eq__`` -> ``eq``, ``__and__`` -> ``and_``)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        return name + "_" if name in ("and", "or") else name  # operator.and_, operator.or_
    return name


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return None


class _Interpreter:
    def __init__(self) -> None:
        self.values: dict[fx.Node, Value] = {}
        self.nodes: dict[fx.Node, None] = {}
        self.inputs: dict[fx.Node, None] = {}

    def eval(self, node: Any) -> Value:
        if not isinstance(node, fx.Node):
            if isinstance(node, (bool, int, float)):
                return Const(node)
            raise Unknown(f"the mask uses the constant {node!r}")
        if node in self.values:
            return self.values[node]
        if node.op == "placeholder" and outer_value(node) is not None:
            value = self.values[node] = _outer(node)
            self.inputs[node] = None  # read from outside: an input of the region
            return value
        if node.op == "placeholder":
            what = "a graph input" if tensor_meta(node) is not None else "a size"
            raise Unknown(f"the mask reads {what} '{node.name}' (a padding mask or positions passed in)")
        if node.op not in ("call_function", "call_method"):
            raise Unknown(f"the mask reads '{node.name}' ({node.op})")
        value = self._op(node)
        self.values[node] = value
        self.nodes[node] = None
        return value

    def _size(self, value: Any) -> None:
        """A size argument (of arange, expand, ...): its value does not matter to the mask's
        pattern, but a symbolic one computed in the graph must be an input of the region."""
        if isinstance(value, (list, tuple)):
            for v in value:
                self._size(v)
        elif isinstance(value, fx.Node):
            self.inputs[value] = None

    def _op(self, node: fx.Node) -> Value:  # noqa: C901  (one rule per op, in one place)
        name = _name(node)
        args, kwargs = node.args, node.kwargs
        if name == "arange":
            if kwargs.get("step", 1) != 1 or len(args) > 2 or (len(args) == 2 and _int(args[0]) is None):
                raise Unknown(f"'{node.name}': an arange with a start or step the rules do not follow")
            self._size(args[-1])
            return Ramp(-1, _int(args[0]) if len(args) == 2 else 0)
        if name in ("to", "contiguous", "clone", "detach", "type_as"):
            inner = self.eval(args[0])
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
            if dtype is not None and dtype != torch.bool and isinstance(inner, Causal):
                raise Unknown(f"'{node.name}': the mask is cast to {dtype}")
            return inner
        if name in ("add", "sub", "iadd"):
            return self._shift(node, args, sign=1 if name != "sub" else -1)
        if name in ("unsqueeze",):
            inner = self.eval(args[0])
            return _unsqueeze(inner, _ndim(args[0]), args[1] if len(args) > 1 else kwargs["dim"])
        if name in ("expand", "expand_as", "broadcast_to"):
            self._size(args[1:])
            return self.eval(args[0])  # values unchanged; axes counted from the end stay put
        if name == "getitem":
            return self._getitem(node)
        if name in ("le", "ge", "lt", "gt", "eq", "ne"):
            return self._compare(node, name)
        if name in ("and_", "logical_and", "bitwise_and", "mul"):
            return _and(self.eval(args[0]), self.eval(args[1]), node)
        if name in ("new_ones", "new_zeros", "ones", "zeros"):
            if name.startswith("new_"):
                self.eval(args[0])  # only its dtype and device matter, but the region must compute it
            self._size(args[1:] if name.startswith("new_") else args)
            fill = 1 if "ones" in name else 0
            dtype = kwargs.get("dtype")
            return Const(bool(fill) if dtype == torch.bool else fill)
        if name == "tril":
            inner = self.eval(args[0])
            diagonal = node.kwargs.get("diagonal", args[1] if len(args) > 1 else 0)
            if isinstance(inner, Const) and inner.value in (True, 1) and diagonal == 0:
                return Causal(q_axis=-2, kv_axis=-1)
            raise Unknown(f"'{node.name}': the lower triangle of something other than ones, or off the diagonal")
        if name == "diff":
            return self._diff(node)
        if name == "cumsum":
            inner = self.eval(args[0])
            if isinstance(inner, Const) and inner.value in (0, False):
                return Const(0)
            raise Unknown(f"'{node.name}': a cumulative sum of a varying tensor")
        raise Unknown(f"'{node.name}': the op {name} is not one the mask rules follow")

    def _shift(self, node: fx.Node, args, sign: int) -> Value:
        a, b = args[0], args[1]
        if isinstance(b, fx.Node) and not isinstance(a, fx.Node) and sign == 1:
            a, b = b, a
        if isinstance(b, fx.Node):
            raise Unknown(f"'{node.name}': adds two computed tensors")
        shift = _int(b)
        if shift is None:
            raise Unknown(f"'{node.name}': shifts by {b!r}")
        inner = self.eval(a)
        if isinstance(inner, Ramp):
            return Ramp(inner.axis, inner.offset + sign * shift)
        if isinstance(inner, Const) and isinstance(inner.value, (int, float)):
            return Const(inner.value + sign * shift)
        raise Unknown(f"'{node.name}': arithmetic on a mask")

    def _getitem(self, node: fx.Node) -> Value:
        source, index = node.args
        inner = self.eval(source)
        ndim = _ndim(source)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) for i in index):
            return self._gather(node, inner, ndim, index)
        return _basic_index(inner, ndim, index, node)

    def _gather(self, node: fx.Node, inner: Value, ndim: int, index: tuple) -> Value:
        """``x[i0, i1, ...]`` with index tensors for every axis of x (advanced indexing)."""
        if len(index) != ndim or not all(isinstance(i, fx.Node) for i in index):
            raise Unknown(f"'{node.name}': indexing that mixes index tensors with slices")
        out_ndim = _ndim(node)
        indices = [self.eval(i) for i in index]
        if isinstance(inner, Const):
            return inner
        if isinstance(inner, Ramp):
            picked = indices[ndim + inner.axis]  # the index tensor along the ramp's axis
            if isinstance(picked, Ramp):
                return Ramp(picked.axis, inner.offset + picked.offset)
            if isinstance(picked, Const) and _int(picked.value) is not None:
                return Const(inner.offset + picked.value)
        raise Unknown(f"'{node.name}': gathers a value the rules cannot follow (out ndim {out_ndim})")

    def _compare(self, node: fx.Node, name: str) -> Value:
        a, b = (self.eval(x) for x in node.args[:2])
        if isinstance(a, Const) and isinstance(b, Const):
            op = {"le": operator.le, "ge": operator.ge, "lt": operator.lt, "gt": operator.gt,
                  "eq": operator.eq, "ne": operator.ne}[name]
            return Const(bool(op(a.value, b.value)))
        if name == "ge":
            a, b, name = b, a, "le"
        if name == "le" and isinstance(a, Ramp) and isinstance(b, Ramp) and a.axis != b.axis:
            if a.offset != b.offset:
                raise Unknown(f"'{node.name}': positions with different offsets (a cache or a window)")
            return Causal(q_axis=b.axis, kv_axis=a.axis)
        raise Unknown(f"'{node.name}': compares positions with {name} (a sliding window, or another band "
                      f"than the causal one)")

    def _diff(self, node: fx.Node) -> Value:
        x = node.args[0]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else -1)
        if node.kwargs.get("n", node.args[1] if len(node.args) > 1 else 1) != 1:
            raise Unknown(f"'{node.name}': a difference of order > 1")
        inner = self.eval(x)
        ndim = _ndim(x)
        axis = dim - ndim if dim >= 0 else dim
        if not isinstance(inner, Ramp) or inner.axis != axis:
            raise Unknown(f"'{node.name}': a difference of something other than positions along its axis")
        prepend = node.kwargs.get("prepend")
        if prepend is not None:
            first = self.eval(prepend)
            # One prepended value, the first position minus one: the first difference is 1 too.
            meta = tensor_meta(prepend)
            if meta is None or meta.shape[axis] != 1:
                raise Unknown(f"'{node.name}': a difference with more than one prepended value")
            if not (isinstance(first, Ramp) and first.axis == axis and first.offset == inner.offset - 1):
                raise Unknown(f"'{node.name}': a difference with a prepended value the rules do not prove")
        if node.kwargs.get("append") is not None:
            raise Unknown(f"'{node.name}': a difference with appended values")
        return Const(1)


def _ndim(node: Any) -> int:
    meta = tensor_meta(node)
    if meta is None:
        raise Unknown(f"'{getattr(node, 'name', node)}' is not a tensor")
    return meta.dim()


def _unsqueeze(inner: Value, ndim: int, dim: int) -> Value:
    new_ndim = ndim + 1
    position = dim if dim >= 0 else dim + new_ndim
    def moved(axis: int) -> int:
        return axis if position <= ndim + axis else axis - 1
    if isinstance(inner, Ramp):
        return Ramp(moved(inner.axis), inner.offset)
    if isinstance(inner, Causal):
        return Causal(moved(inner.q_axis), moved(inner.kv_axis))
    return inner


def _basic_index(inner: Value, ndim: int, index: tuple, node: fx.Node) -> Value:
    """Indexing with None, slices and Ellipsis (no integers): axes kept, inserted or narrowed."""
    if any(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise Unknown(f"'{node.name}': integer indexing")
    if index.count(Ellipsis) > 1:
        raise Unknown(f"'{node.name}': indexing with several Ellipses")
    consumed = sum(1 for i in index if isinstance(i, slice))
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - consumed) + index[at + 1:]
    else:
        index = index + (slice(None),) * (ndim - consumed)
    # Walk the source's axes (positive), noting where each lands and what its slice starts at.
    out_axis, placed, starts = 0, {}, {}
    source_axis = 0
    for i in index:
        if i is None:
            out_axis += 1
            continue
        if not isinstance(i, slice) or i.step not in (None, 1):
            raise Unknown(f"'{node.name}': indexing with {i!r}")
        start = i.start or 0
        if _int(start) is None or start < 0:
            raise Unknown(f"'{node.name}': a slice starting at {start!r}")
        placed[source_axis], starts[source_axis] = out_axis, start
        out_axis += 1
        source_axis += 1
    out_ndim = out_axis

    def moved(axis: int) -> tuple[int, int]:
        source = ndim + axis
        return placed[source] - out_ndim, starts[source]

    if isinstance(inner, Ramp):
        axis, start = moved(inner.axis)
        return Ramp(axis, inner.offset + start)
    if isinstance(inner, Causal):
        (q, q_start), (kv, kv_start) = moved(inner.q_axis), moved(inner.kv_axis)
        if q_start != kv_start:
            raise Unknown(f"'{node.name}': slices a causal mask off its diagonal")
        return Causal(q, kv)
    return inner


def _and(a: Value, b: Value, node: fx.Node) -> Value:
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Const) and x.value in (True, 1):
            return y
        if isinstance(x, Const) and x.value in (False, 0):
            return Const(False)
    if isinstance(a, Causal) and a == b:
        return a
    raise Unknown(f"'{node.name}': combines {a} and {b}")
