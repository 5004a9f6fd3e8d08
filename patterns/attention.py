"""Attention given a mask that the graph builds itself, when the mask is provably causal (or
provably all true):

    sdpa(q, k, v, attn_mask=M)   M[..., i, j] = (pos[j] <= pos[i]) with pos an arange   ->  sdpa(q, k, v, is_causal=True)
    sdpa(q, k, v, attn_mask=M)   M all true                                             ->  sdpa(q, k, v)

Captured models build their masks without looking at the data (``patterns/mask_analysis.py``
says what it proves and how). The masked kernel visits every tile and reads the mask; the causal
one skips the tiles above the diagonal and reads nothing, and the mask's own computation goes.
SDPA's ``is_causal`` is the top-left aligned lower triangle, ``j <= i``: exactly the proved form.

A mask that depends on the data (padding, user positions, packed sequences), a sliding window or
anything the analysis cannot prove stays as it is, and the report says why.

Grouped-query attention: a model that passes a mask repeats each key/value head for the query
heads that share it before SDPA (``x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)``):
libraries keep SDPA's own ``enable_gqa`` for unmasked calls, as some of its backends take no mask
with it. Once the mask is gone the
rewritten call takes the unrepeated keys and values with ``enable_gqa=True``: the same values
(query head i reads key/value head i // n either way), without n copies of k and v written in the
forward, kept for the backward, and summed back in it.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fastft.passes.canonical import canonical, same_size, tensor_meta
from fastft.passes.matcher import Match, Op, Var
from fastft.passes.pattern import Pattern, Replacement

from .mask_analysis import Causal, Const, Unknown, analyse_mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                     enable_gqa: bool, *mask_inputs: Any) -> torch.Tensor:
    """SDPA with ``is_causal=True``. ``mask_inputs`` are what the replaced mask was computed from
    outside the region (symbolic sizes, a mask passed into a checkpointed layer): unused, they
    keep the region's inputs the same as the call's."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)


def unmasked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                       enable_gqa: bool, *mask_inputs: Any) -> torch.Tensor:
    """SDPA without a mask (the replaced one was all true)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)


def _reference(q, k, v, mask, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def _has_mask(mask, canon) -> bool:
    return mask is not None


def _analyse(m: Match):
    """(analysis, None) or (None, reason)."""
    mask = canonical(m.root).attrs["attn_mask"]
    if tensor_meta(mask) is None:
        return None, "the mask is not a tensor"
    try:
        return analyse_mask(mask), None
    except Unknown as e:
        return None, f"the mask is not provably causal: {e}"


def _check(m: Match) -> str | None:
    attrs = canonical(m.root).attrs
    if attrs["is_causal"]:
        return "is_causal together with a mask"
    if attrs["dropout_p"] not in (0, 0.0):
        return f"attention dropout p={attrs['dropout_p']}: left as it is (random, so not checkable)"
    mask = attrs["attn_mask"]
    if tensor_meta(mask).dtype != torch.bool:
        return f"the mask is {tensor_meta(mask).dtype}, not boolean (an additive mask)"
    q, k = tensor_meta(m.bindings["q"]), tensor_meta(m.bindings["k"])
    if q.dim() != 4 or k.dim() != 4:
        return f"query and key of {q.dim()} and {k.dim()} dimensions (expected [batch, heads, tokens, dim])"
    analysis, reason = _analyse(m)
    if reason is not None:
        return reason
    value = analysis.value
    if isinstance(value, Causal) and (value.q_axis, value.kv_axis) == (-2, -1):
        return None
    if isinstance(value, Const) and value.value in (True, 1):
        return None
    return f"the mask is {value}, neither causal over (query, key) nor all true"


def _inserts_dim_2(node: Any) -> fx.Node | None:
    """x when ``node`` is x with a new axis at dim 2 (``x.unsqueeze(2)`` or ``x[:, :, None]``)."""
    if not isinstance(node, fx.Node):
        return None
    if (node.op == "call_method" and node.target == "unsqueeze") or \
            (node.op == "call_function" and node.target is torch.unsqueeze):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] if dim in (2, -3) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if len(index) >= 3 and index[0] == full and index[1] == full and index[2] is None \
                and all(i == full or i is Ellipsis for i in index[3:]):
            return node.args[0]
    return None


def _repeated_heads(node: Any) -> tuple[fx.Node, int, list] | None:
    """(x, n, the nodes of the repeat) when ``node`` is x [batch, heads, tokens, dim] with each
    head repeated n > 1 times in a row, as ``x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n,
    t, d)`` gives it (head i of the result is head i // n of x); None otherwise. Shapes decide,
    from the recorded example values: an expand of another axis (a tiling) does not fit them."""
    if not isinstance(node, fx.Node) or not (
            (node.op == "call_method" and node.target in ("reshape", "view"))
            or (node.op == "call_function" and node.target is torch.reshape)):
        return None
    expanded = node.args[0]
    if not (isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand"):
        return None
    inserted = expanded.args[0]
    x = _inserts_dim_2(inserted)
    shapes = [tensor_meta(t) for t in (x, inserted, expanded, node)]
    if x is None or any(t is None for t in shapes):
        return None
    xs, us, es, rs = (tuple(t.shape) for t in shapes)
    if len(xs) != 4 or len(us) != 5 or len(es) != 5 or len(rs) != 4:
        return None
    n = es[2]
    if not isinstance(n, int) or n < 2:
        return None
    b, h, t, d = xs
    expected_u, expected_e = (b, h, 1, t, d), (b, h, n, t, d)
    expected_r = (b, h * n, t, d)
    if not all(same_size(a, e) for have, want in ((us, expected_u), (es, expected_e), (rs, expected_r))
               for a, e in zip(have, want)):
        return None
    return x, n, [node, expanded, inserted]


def _grouped_kv(m: Match) -> tuple[fx.Node, fx.Node, list] | None:
    """(k, v, the repeat's nodes) before a key/value head repeat both went through, else None."""
    k, v = _repeated_heads(m.bindings["k"]), _repeated_heads(m.bindings["v"])
    if k is None or v is None or k[1] != v[1]:
        return None
    return k[0], v[0], k[2] + v[2]


def _absorb(m: Match) -> list:
    analysis, _ = _analyse(m)
    grouped = _grouped_kv(m)
    return analysis.nodes + (grouped[2] if grouped is not None else [])


def _replace(m: Match) -> Replacement:
    attrs = canonical(m.root).attrs
    analysis, _ = _analyse(m)
    target = causal_attention if isinstance(analysis.value, Causal) else unmasked_attention
    b = m.bindings
    grouped = _grouped_kv(m)
    k, v, gqa = (grouped[0], grouped[1], True) if grouped is not None else (b["k"], b["v"], bool(attrs["enable_gqa"]))
    return Replacement(target, (b["q"], k, v, attrs["scale"], gqa, *analysis.inputs))


CAUSAL_MASK = Pattern(
    name="causal_mask",
    family="attention",
    expr=Op("sdpa", Var("q"), Var("k"), Var("v"), attn_mask=_has_mask, name="sdpa"),
    check=_check,
    replace=_replace,
    anchors=frozenset(),  # an SDPA with a data-dependent mask is reported through its rejected match
    reference=_reference,
    kernel="sdpa(is_causal)",
    absorb=_absorb,
)
