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
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastft.passes.canonical import canonical, tensor_meta
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


def _absorb(m: Match) -> list:
    analysis, _ = _analyse(m)
    return analysis.nodes


def _replace(m: Match) -> Replacement:
    attrs = canonical(m.root).attrs
    analysis, _ = _analyse(m)
    target = causal_attention if isinstance(analysis.value, Causal) else unmasked_attention
    b = m.bindings
    return Replacement(target, (b["q"], b["k"], b["v"], attrs["scale"], bool(attrs["enable_gqa"]),
                                *analysis.inputs))


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
