"""Normalisation: one canonical view of the many spellings Dynamo records for the same op.

Dynamo keeps the user's spelling: ``x.pow(2)``, ``torch.pow(x, 2)`` and ``x ** 2`` are three
different nodes; ``x.float()``, ``x.to(torch.float32)`` and ``x.type_as(y)`` are all casts.
Patterns are written against the canonical view (:class:`Canon`), never against the raw nodes,
so that a variant in spelling is not a variant in pattern. The graph itself is left untouched:
the view is computed on demand and cached in ``node.meta``.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

_META_KEY = "fastft_canon"


@dataclass(frozen=True)
class Canon:
    """A node seen as ``op(*args, **attrs)`` with ``op`` from a small fixed vocabulary."""

    op: str
    args: tuple[Any, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


# name -> canonical op, for binary and unary elementwise ops spelled as functions or methods.
_ELEMENTWISE = {
    "mul": "mul", "multiply": "mul", "add": "add", "sub": "sub", "subtract": "sub",
    "div": "div", "divide": "div", "true_divide": "div", "pow": "pow", "rsqrt": "rsqrt",
    "sqrt": "sqrt", "reciprocal": "reciprocal", "neg": "neg", "negative": "neg",
    "square": "square", "exp": "exp", "tanh": "tanh", "sigmoid": "sigmoid",
}
_OPERATORS = {
    operator.mul: "mul", operator.add: "add", operator.sub: "sub", operator.truediv: "div",
    operator.pow: "pow", operator.neg: "neg", operator.imul: "mul", operator.iadd: "add",
}
_DTYPE_METHODS = {
    "float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
    "double": torch.float64,
}


def tensor_meta(value: Any) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for a node, or None for non-tensors."""
    if isinstance(value, fx.Node):
        value = value.meta.get("example_value", value.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def dtype_of(value: Any) -> torch.dtype | None:
    t = tensor_meta(value)
    return t.dtype if t is not None else None


def _name_of(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target in _OPERATORS:
            return None
        return getattr(node.target, "__name__", None)
    return None


@functools.lru_cache(maxsize=1)
def _torch_namespace_ids() -> frozenset[int]:
    # Builtins such as torch.rsqrt carry no __module__; recognise them by identity.
    return frozenset(id(v) for v in vars(torch).values() if callable(v))


def _is_torch_callable(target: Any) -> bool:
    module = getattr(target, "__module__", "") or ""
    return (module.startswith("torch") or id(target) in _torch_namespace_ids()
            or getattr(target, "__objclass__", None) is torch._C.TensorBase)


def _canon_cast(node: fx.Node, name: str) -> Canon | None:
    src = node.args[0] if node.args else None
    if name in _DTYPE_METHODS and len(node.args) == 1:
        return Canon("cast", (src,), {"dtype": _DTYPE_METHODS[name]})
    if name == "type_as" and len(node.args) == 2:
        return Canon("cast", (src,), {"dtype": dtype_of(node.args[1])})
    if name in ("to", "type"):
        rest = list(node.args[1:])
        dtype = node.kwargs.get("dtype")
        for a in rest:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, fx.Node) and tensor_meta(a) is not None:
                dtype = dtype_of(a)
        if dtype is None:
            # .to(device) alone moves data; on one device it is the identity for matching.
            return Canon("identity", (src,))
        return Canon("cast", (src,), {"dtype": dtype})
    return None


def _canon_reduction(node: fx.Node, name: str) -> Canon | None:
    args = list(node.args)
    x = args[0]
    dim = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if node.kwargs.get("dtype") is not None:
        return None
    x_meta = tensor_meta(x)
    if x_meta is None:
        return None
    ndim = x_meta.dim()
    if dim is None:
        dims = tuple(range(ndim))
    else:
        dims = tuple(sorted(d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))))
    return Canon(name, (x,), {"dims": dims, "keepdim": bool(keepdim), "ndim": ndim})


def _compute(node: fx.Node) -> Canon | None:
    if node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target in _OPERATORS:
        return Canon(_OPERATORS[node.target], tuple(node.args))
    name = _name_of(node)
    if name is None or (node.op == "call_function" and not _is_torch_callable(node.target)):
        return None
    if name in ("float", "half", "bfloat16", "double", "type_as", "to", "type"):
        return _canon_cast(node, name)
    if name in ("mean", "sum"):
        return _canon_reduction(node, name)
    if name in _ELEMENTWISE:
        canon_name = _ELEMENTWISE[name]
        if canon_name in ("add", "sub") and node.kwargs.get("alpha", 1) != 1:
            return None
        if canon_name == "square":
            return Canon("pow", (node.args[0], 2))
        args = tuple(node.args) + tuple(v for k, v in node.kwargs.items() if k in ("other", "exponent"))
        return Canon(canon_name, args)
    return None


def canonical(node: Any) -> Canon | None:
    """The canonical view of ``node`` (cached), or None when it is not an op the view knows."""
    if not isinstance(node, fx.Node):
        return None
    if _META_KEY not in node.meta:
        node.meta[_META_KEY] = _compute(node)
    return node.meta[_META_KEY]


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost nn.Module that produced ``node``, relative to the captured module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)  # the captured module itself
    path = re.sub(r"\.?(?:__dict__\['_modules'\]|_modules)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")
