"""Normalisation: one canonical view of the many spellings Dynamo records for the same op.

Dynamo keeps the user's spelling: ``x.pow(2)``, ``torch.pow(x, 2)`` and ``x ** 2`` are three
different nodes; ``x.float()``, ``x.to(torch.float32)`` and ``x.type_as(y)`` are all casts.
Patterns are written against the canonical view (:class:`Canon`), never against the raw nodes,
so that a variant in spelling is not a variant in pattern. The graph itself is left untouched:
the view is computed on demand and cached in ``node.meta`` (recomputed when a rewrite has
rewired the node's arguments).
"""
from __future__ import annotations

import functools
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

_META_KEY = "fastft_canon"


@dataclass(frozen=True)
class Canon:
    """A node seen as ``op(*args, **attrs)`` with ``op`` from a small fixed vocabulary."""

    op: str
    args: tuple[Any, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    # Nodes this one absorbs: the chunk/split call whose getitem this is belongs to the region too.
    via: tuple[fx.Node, ...] = ()


# name -> canonical op, for binary and unary elementwise ops spelled as functions or methods.
_ELEMENTWISE = {
    "mul": "mul", "multiply": "mul", "add": "add", "sub": "sub", "subtract": "sub",
    "div": "div", "divide": "div", "true_divide": "div", "pow": "pow", "rsqrt": "rsqrt",
    "sqrt": "sqrt", "reciprocal": "reciprocal", "neg": "neg", "negative": "neg",
    "square": "square", "exp": "exp", "tanh": "tanh", "sigmoid": "sigmoid", "erf": "erf",
    "view_as_complex": "view_as_complex", "view_as_real": "view_as_real",
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


# Each dtype holds every value of the dtypes listed for it: a cast into it and on loses nothing.
_HOLDS_EXACTLY = {
    torch.float32: (torch.bfloat16, torch.float16),
    torch.float64: (torch.float32, torch.bfloat16, torch.float16),
}


def _canon_cast(node: fx.Node, name: str) -> Canon | None:
    canon = _cast_of(node, name)
    inner = canonical(canon.args[0]) if canon is not None and canon.op == "cast" else None
    if inner is not None and inner.op == "cast" and isinstance(inner.args[0], fx.Node) \
            and dtype_of(inner.args[0]) in _HOLDS_EXACTLY.get(inner.attrs["dtype"], ()):
        # A cast of an exact widening (bf16 -> fp32 -> bf16: peft casting x to float32 adapters
        # under autocast, which casts it back) is the one cast of the narrower value.
        canon = Canon("cast", (inner.args[0],), canon.attrs, via=(canon.args[0], *inner.via))
    if canon is not None and canon.op == "cast" and isinstance(canon.args[0], fx.Node) \
            and tensor_meta(canon.args[0]) is not None and dtype_of(canon.args[0]) == canon.attrs["dtype"]:
        # A cast to the dtype the tensor already has changes nothing (``.float()`` of a float32
        # value): the same value as its input, wherever a pattern reads the input uncast.
        return Canon("identity", canon.args, via=canon.via)
    return canon


def _cast_of(node: fx.Node, name: str) -> Canon | None:
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


def _dims(dim: Any, ndim: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(ndim))
    return tuple(sorted(d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))))


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _canon_var(node: fx.Node) -> Canon | None:
    """``x.var(dim, unbiased=/correction=, keepdim=)``: a reduction that keeps its correction."""
    x_meta = tensor_meta(node.args[0])
    if x_meta is None:
        return None
    correction = node.kwargs.get("correction")
    unbiased = _arg(node, 2, "unbiased")
    if correction is None:
        correction = 0 if unbiased is False else 1
    return Canon("var", (node.args[0],), {
        "dims": _dims(_arg(node, 1, "dim"), x_meta.dim()), "keepdim": bool(_arg(node, 3, "keepdim", False)),
        "ndim": x_meta.dim(), "correction": correction})


def _int(value: Any) -> int | None:
    """A size as a Python int, or None when it is symbolic. Never int() a SymInt: that would add
    a guard and specialise the graph on it (a recompile for every sequence length)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    return None


def same_size(a: Any, b: Any) -> bool:
    """Sizes known equal without guarding (symbolic sizes compare by their expressions)."""
    return bool(statically_known_true(a == b))


def same_shape(a: Any, b: Any) -> bool:
    """Shapes (sequences of sizes) of one rank whose sizes are each known equal (``same_size``)."""
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def _slice_attrs(dim: int, ndim: int, size: int, start: Any, stop: Any, step: Any) -> dict | None:
    start, stop, step = slice(start, stop, step).indices(size)
    if step <= 0:
        return None
    return {"dim": dim, "ndim": ndim, "start": start, "stop": max(start, stop), "step": step}


def _canon_getitem(node: fx.Node) -> Canon | None:
    """``x[..., a:b:s]`` (one sliced dim), or one output of ``chunk``/``split``: both are a slice."""
    base, index = node.args
    if not isinstance(base, fx.Node):
        return None
    split = _canon_split_output(base, index)
    if split is not None:
        return split
    meta = tensor_meta(base)
    if meta is None:
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is Ellipsis or isinstance(i, slice)) for i in items) or items.count(Ellipsis) > 1:
        return None  # integer or None indexing changes the rank: not a slice
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (meta.dim() - len(items) + 1)
    items += [slice(None)] * (meta.dim() - len(items))
    sliced = [d for d, s in enumerate(items) if s != slice(None)]
    if len(sliced) != 1:
        return None
    d = sliced[0]
    size = _int(meta.shape[d])
    if size is None:
        return None
    s = items[d]
    if any(isinstance(v, fx.Node) for v in (s.start, s.stop, s.step)):
        return None
    attrs = _slice_attrs(d, meta.dim(), size, s.start, s.stop, s.step)
    return Canon("slice", (base,), attrs) if attrs else None


def _canon_split_output(call: fx.Node, index: Any) -> Canon | None:
    name = _name_of(call) if call.op in ("call_function", "call_method") else None
    if name not in ("chunk", "split") or not isinstance(index, int):
        return None
    if call.op == "call_function" and not _is_torch_callable(call.target):
        return None
    x = call.args[0]
    meta = tensor_meta(x)
    if meta is None:
        return None
    ndim = meta.dim()
    dim = _arg(call, 2, "dim", 0) % ndim
    size = _int(meta.shape[dim])
    if size is None:
        return None
    if name == "chunk":
        chunks = _arg(call, 1, "chunks")
        if not isinstance(chunks, int) or chunks < 1:
            return None
        each = -(-size // chunks)
        bounds = [(i, min(i + each, size)) for i in range(0, size, each)]
    else:
        sizes = _arg(call, 1, "split_size_or_sections", _arg(call, 1, "split_size"))
        if isinstance(sizes, int) and sizes > 0:
            bounds = [(i, min(i + sizes, size)) for i in range(0, size, sizes)]
        elif not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) for v in sizes):
            return None  # sizes computed in the graph: not constants to reason on
        else:
            edges = [0]
            for s in sizes:
                edges.append(edges[-1] + s)
            bounds = list(zip(edges, edges[1:]))
    if not 0 <= index < len(bounds):
        return None
    start, stop = bounds[index]
    return Canon("slice", (x,), {"dim": dim, "ndim": ndim, "start": start, "stop": stop, "step": 1},
                 via=(call,))


def _canon_cat(node: fx.Node) -> Canon | None:
    tensors = _arg(node, 0, "tensors")
    out = tensor_meta(node)
    if not isinstance(tensors, (tuple, list)) or out is None:
        return None
    dim = _arg(node, 1, "dim", 0)
    ndim = out.dim()
    # stack adds a dim: normalise its position against the output's rank.
    op = "stack" if _name_of(node) == "stack" else "cat"
    return Canon(op, tuple(tensors), {"dim": dim % ndim, "ndim": ndim})


def _canon_flatten(node: fx.Node) -> Canon | None:
    """``flatten(start, end)``, and a view/reshape that only merges adjacent dims, as flatten; a
    view/reshape that splits the last dim in two, as unflatten."""
    x_meta, out = tensor_meta(node.args[0]), tensor_meta(node)
    if x_meta is None or out is None:
        return None
    ndim = x_meta.dim()
    if _name_of(node) != "flatten" and out.dim() == ndim + 1 and ndim >= 1:
        shape, new = list(x_meta.shape), list(out.shape)
        if all(same_size(a, b) for a, b in zip(shape[:-1], new[:-2])) and same_size(new[-2] * new[-1], shape[-1]):
            return Canon("unflatten", (node.args[0],), {"dim": ndim - 1, "ndim": ndim,
                                                        "sizes": (_int(new[-2]), _int(new[-1]))})
        return None
    if _name_of(node) == "flatten":
        start = _arg(node, 1, "start_dim", 0) % max(ndim, 1)
        end = _arg(node, 2, "end_dim", -1) % max(ndim, 1)
    else:
        shape, new = list(x_meta.shape), list(out.shape)
        merged = ndim - len(new) + 1
        start = next((i for i in range(len(new)) if not same_size(shape[i], new[i])), None)
        if start is None or merged < 2:
            return None
        if not all(same_size(a, b) for a, b in zip(shape[start + merged:], new[start + 1:])):
            return None
        if not same_size(math.prod(shape[start:start + merged]), new[start]):
            return None
        end = start + merged - 1
    return Canon("flatten", (node.args[0],), {"start": start, "end": end, "ndim": ndim})


def _canon_activation(node: fx.Node) -> Canon | None:
    name = _name_of(node)
    if _arg(node, 1, "inplace", False) is True:
        return None  # an in-place activation mutates its input: not a pure op to match
    if name == "gelu":
        return Canon("gelu", (node.args[0],), {"approximate": node.kwargs.get("approximate", "none")})
    return Canon(name, (node.args[0],))


def _canon_layer_norm(node: fx.Node) -> Canon | None:
    x = node.args[0]
    shape = _arg(node, 1, "normalized_shape")
    weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    x_meta = tensor_meta(x)
    if x_meta is None or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    return Canon("layer_norm", (x, weight, bias, eps), {"shape": tuple(_int(s) for s in shape),
                                                        "ndim": x_meta.dim()})


def _canon_rms_norm(node: fx.Node) -> Canon | None:
    """``F.rms_norm(x, normalized_shape, weight, eps)``; eps None is PyTorch's default, the
    machine epsilon of the float32 it computes in (of float64 for a float64 input)."""
    x = node.args[0]
    shape = _arg(node, 1, "normalized_shape")
    weight, eps = _arg(node, 2, "weight"), _arg(node, 3, "eps")
    x_meta = tensor_meta(x)
    if x_meta is None or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    if eps is None:
        eps = torch.finfo(torch.float64 if x_meta.dtype == torch.float64 else torch.float32).eps
    return Canon("rms_norm", (x, weight, eps), {"shape": tuple(_int(s) for s in shape), "ndim": x_meta.dim()})


def _canon_linear(node: fx.Node) -> Canon | None:
    return Canon("linear", (node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")))


def _canon_matmul(node: fx.Node) -> Canon | None:
    """``x @ W^T`` (``matmul``/``mm``) with W a matrix: the same math as ``linear(x, W)``, as
    models with their own linear layers write it; the transpose belongs to the region. In a
    checkpointed body that receives W^T as an input: ``linear_t`` of that input."""
    if len(node.args) != 2:
        return None
    x, transposed = node.args
    weight = _transposed_matrix(transposed)
    x_meta = tensor_meta(x)
    if x_meta is None or x_meta.dim() < 1:
        return None
    if weight is not None:
        return Canon("linear", (x, weight, None), via=(transposed,))
    if isinstance(transposed, fx.Node) and _transposed_matrix(outer_value(transposed)) is not None:
        # W^T computed outside the body: the input is W stored [in, out], as a Conv1D's weight.
        return Canon("linear_t", (x, transposed, None))
    return None


def _canon_addmm(node: fx.Node) -> Canon | None:
    """``addmm(b, x, M)`` with a bias vector b: ``linear(x, W, b)`` where M is the transpose of
    W (``x @ W.T + b``), and ``linear_t(x, M, b)`` where M is a weight stored [in, out]
    (transformers' ``Conv1D``), which is ``linear(x, M^T, b)``."""
    if len(node.args) != 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias, x, matrix = node.args
    bias_meta, x_meta, matrix_meta = tensor_meta(bias), tensor_meta(x), tensor_meta(matrix)
    if bias_meta is None or x_meta is None or matrix_meta is None or bias_meta.dim() != 1 or matrix_meta.dim() != 2:
        return None
    if not same_size(bias_meta.shape[0], matrix_meta.shape[1]):
        return None  # a bias broadcast over the outputs is not a linear's
    weight = _transposed_matrix(matrix)
    if weight is not None:
        return Canon("linear", (x, weight, bias), via=(matrix,))
    return Canon("linear_t", (x, matrix, bias))


def _linear_over_rows(node: fx.Node) -> Canon | None:
    """``view(linear(view(x, [rows, in]), W, b), [*lead, out])``: the linear of x itself, as a
    layer that flattens x's leading dimensions around a 2-D GEMM computes it (transformers'
    ``Conv1D``); both views belong to the region. For an x that is [rows, in] already, both
    views keep the shape they were given."""
    inner = node.args[0] if node.args else None
    canon = canonical(inner)
    if canon is None or canon.op not in ("linear", "linear_t") or len(inner.users) != 1:
        return None
    rows = canon.args[0]
    flattened = canonical(rows)
    if flattened is not None and flattened.op == "flatten":
        x = flattened.args[0]
    elif _keeps_its_shape(rows):
        x, flattened = rows.args[0], None
    else:
        return None
    x_meta, inner_meta, out_meta = tensor_meta(x), tensor_meta(inner), tensor_meta(node)
    if x_meta is None or inner_meta is None or out_meta is None or inner_meta.dim() != 2:
        return None
    if flattened is not None and flattened.attrs != {"start": 0, "end": x_meta.dim() - 2, "ndim": x_meta.dim()}:
        return None  # the view must merge exactly the leading dimensions
    expected = (*x_meta.shape[:-1], inner_meta.shape[1])
    if not same_shape(out_meta.shape, expected):
        return None
    return Canon(canon.op, (x, *canon.args[1:]), canon.attrs, via=(rows, inner, *canon.via))


def _keeps_its_shape(node: Any) -> bool:
    """Whether ``node`` is a view or reshape of a tensor to the shape it has (a no-op)."""
    if not isinstance(node, fx.Node) or _name_of(node) not in ("view", "reshape") or not node.args:
        return False
    if node.op == "call_function" and not _is_torch_callable(node.target):
        return False
    before, after = tensor_meta(node.args[0]), tensor_meta(node)
    return before is not None and after is not None and same_shape(before.shape, after.shape)


def _canon_view(node: fx.Node) -> Canon | None:
    return _linear_over_rows(node) or _canon_flatten(node)


def _transposed_matrix(node: Any) -> fx.Node | None:
    """M, where ``node`` is the transpose of a 2-D M: ``M.T``, ``M.mT``, ``M.t()``,
    ``M.transpose(0, 1)`` (any two dims) or ``M.permute(1, 0)``."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return None
    source = node.args[0]
    meta = tensor_meta(source)
    if not isinstance(source, fx.Node) or meta is None or meta.dim() != 2:
        return None
    if node.op == "call_function" and node.target is getattr:
        return source if node.args[1] in ("T", "mT") else None
    name = _name_of(node)
    if node.op == "call_function" and not _is_torch_callable(node.target):
        return None
    if name == "t" and len(node.args) == 1:
        return source
    if name in ("transpose", "swapaxes", "swapdims") and len(node.args) == 3:
        dims = {d % 2 for d in node.args[1:] if isinstance(d, int)}
        return source if dims == {0, 1} else None
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return source if [d % 2 for d in dims if isinstance(d, int)] == [1, 0] and len(dims) == 2 else None
    return None


def _canon_cross_entropy(node: fx.Node) -> Canon | None:
    """``F.cross_entropy(input, target, ...)`` with its options as attributes (deprecated
    size_average/reduce spellings are not folded in: they are left unmatched)."""
    if _arg(node, 3, "size_average") is not None or _arg(node, 5, "reduce") is not None:
        return None
    return Canon("cross_entropy", (node.args[0], _arg(node, 1, "target")), {
        "class_weight": _arg(node, 2, "weight"), "ignore_index": _arg(node, 4, "ignore_index", -100),
        "reduction": _arg(node, 6, "reduction", "mean"), "label_smoothing": _arg(node, 7, "label_smoothing", 0.0)})


def _canon_dropout(node: fx.Node) -> Canon | None:
    """``F.dropout(x, p, training, inplace)``: with p = 0 or outside training it is the identity,
    which patterns may treat as such; otherwise the attributes say what it would drop."""
    return Canon("dropout", (node.args[0],), {"p": _arg(node, 1, "p", 0.5),
                                             "training": _arg(node, 2, "training", True)})


def _canon_sdpa(node: fx.Node) -> Canon | None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``."""
    return Canon("sdpa", (node.args[0], _arg(node, 1, "key"), _arg(node, 2, "value")), {
        "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
        "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale"),
        "enable_gqa": _arg(node, 7, "enable_gqa", False)})


def _canon_contiguous(node: fx.Node) -> Canon | None:
    return Canon("identity", (node.args[0],))  # same values; only the memory layout may change


# Ops whose canonical form needs more than their argument list: name -> canonicaliser.
_STRUCTURAL = {
    "var": _canon_var, "cat": _canon_cat, "concat": _canon_cat, "concatenate": _canon_cat,
    "stack": _canon_cat, "flatten": _canon_flatten, "view": _canon_view, "reshape": _canon_view,
    "silu": _canon_activation, "gelu": _canon_activation, "layer_norm": _canon_layer_norm,
    "rms_norm": _canon_rms_norm,
    "linear": _canon_linear, "matmul": _canon_matmul, "mm": _canon_matmul, "addmm": _canon_addmm,
    "cross_entropy": _canon_cross_entropy, "contiguous": _canon_contiguous,
    "dropout": _canon_dropout, "scaled_dot_product_attention": _canon_sdpa, "clone": _canon_contiguous,
}


def _compute(node: fx.Node) -> Canon | None:
    if node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        return _canon_getitem(node)
    if node.op == "call_function" and node.target is operator.matmul:
        return _canon_matmul(node)
    if node.op == "call_function" and node.target in _OPERATORS:
        return Canon(_OPERATORS[node.target], tuple(node.args))
    name = _name_of(node)
    if name is None or (node.op == "call_function" and not _is_torch_callable(node.target)):
        return None
    if name in ("float", "half", "bfloat16", "double", "type_as", "to", "type"):
        return _canon_cast(node, name)
    if name in ("mean", "sum"):
        return _canon_reduction(node, name)
    if name in _STRUCTURAL:
        return _STRUCTURAL[name](node)
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
    cached = node.meta.get(_META_KEY)
    if cached is not None:
        inputs, canon = cached
        if _same_inputs(inputs, _inputs_of(node, canon)):
            return canon
    canon = _compute(node)
    node.meta[_META_KEY] = (_inputs_of(node, canon), canon)
    return canon


def _inputs_of(node: fx.Node, canon: Canon | None) -> tuple:
    """What a cached view was computed from: the node's arguments and those of the nodes it
    absorbs. A rewrite that splices in a fused op rewires the users of the region's root
    (``replace_all_uses_with`` gives them new argument tuples); a view computed before that
    would still name the erased nodes, so the cache is keyed on these tuples' identity."""
    via = canon.via if canon is not None else ()
    return (node.args, node.kwargs) + tuple(t for v in via for t in (v.args, v.kwargs))


def _same_inputs(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


_OUTER_META = "fastft_outer_value"

# Higher-order ops whose body is called with the operands that follow it: (body, *operands).
_BODY_THEN_OPERANDS = ("tag_activation_checkpoint", "wrap")


def link_nested_inputs(gm: fx.GraphModule) -> None:
    """Let each input of a nested body (a checkpointed layer) name the outer node it receives,
    so that an analysis may follow a value across the boundary (``outer_value``)."""
    for parent in gm.modules():
        if not isinstance(parent, fx.GraphModule):
            continue
        for node in parent.graph.nodes:
            if node.op != "call_function" or getattr(node.target, "__name__", None) not in _BODY_THEN_OPERANDS:
                continue
            body_ref = node.args[0] if node.args else None
            if not isinstance(body_ref, fx.Node) or body_ref.op != "get_attr":
                continue
            body = getattr(parent, body_ref.target, None)
            if not isinstance(body, fx.GraphModule):
                continue
            inputs = [p for p in body.graph.nodes if p.op == "placeholder"]
            operands = node.args[1:]
            if len(inputs) == len(operands):
                for inner, outer in zip(inputs, operands):
                    if isinstance(outer, fx.Node):
                        inner.meta[_OUTER_META] = outer


def outer_value(node: fx.Node) -> fx.Node | None:
    """The node of the enclosing graph that a nested body's input receives, if known."""
    return node.meta.get(_OUTER_META) if node.op == "placeholder" else None


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
