"""Rotary position embedding, from its math. Per query or key tensor ``x`` (last dim D):

    r = x[..., :R]                      partial rotary: only the first R columns rotate (R <= D)
    y = r * cos + rotate(r) * sin       rotate-half: cat(-r[..., R/2:], r[..., :R/2])
                                        or flipped, cat(r[..., R/2:], -r[..., :R/2]): the
                                        rotation by -sin (the op's ``negate_sin``)
                                        interleaved: stack(-r[..., 1::2], r[..., ::2], -1).flatten(-2)
    y = cat(y, x[..., R:])              the rest passes through (absent when R == D)
    y = y.to(out_dtype)                 optional final cast

The same rotation written with complex numbers is matched too (``rope_polar``):

    y = view_as_real(view_as_complex(x_f.reshape(..., R/2, 2)) * freqs).flatten(-2).to(out_dtype)

cos and sin are inputs, however the model computed them (scaled, repeated, broadcast). A query
and a key rotated by the same cos and sin are grouped into one call of ``fastft::rope``, which
rotates both in one launch. The product and sum are computed in the dtype the graph computes
them in: in a 16-bit dtype the kernel rounds each as eager does (``round_dtype``).
"""
from __future__ import annotations

import torch

from fastft.kernels.rope import SUPPORTED_DTYPES, rope_polar_reference, rope_reference
from fastft.passes.canonical import canonical, dtype_of, same_size, tensor_meta
from fastft.passes.matcher import Cast, Match, Op, Var
from fastft.passes.pattern import Pattern, Replacement


def _last(dim, canon) -> bool:
    return dim == canon.attrs["ndim"] - 1


def _second_last(start, canon) -> bool:
    return start == canon.attrs["ndim"] - 2


def _rotated(r):
    rotate_half = Op("cat", Op("neg", Op("slice", r, dim=_last, step=1, name="hi")),
                     Op("slice", r, dim=_last, step=1, name="lo"), dim=_last, name="rotate_half")
    flipped_half = Op("cat", Op("slice", r, dim=_last, step=1, name="hi"),
                      Op("neg", Op("slice", r, dim=_last, step=1, name="lo")), dim=_last, name="rotate_half_flipped")
    rotate_pairs = Op("flatten", Op("stack", Op("neg", Op("slice", r, dim=_last, step=2, name="hi")),
                                    Op("slice", r, dim=_last, step=2, name="lo"), dim=_last),
                      start=_second_last, end=lambda end, c: end == c.attrs["ndim"] - 1,
                      name="rotate_pairs")
    return rotate_half | flipped_half | rotate_pairs


def _embedded(r, rotated_from):
    # The rotated copy may be cast on its own, before or after the rotation (casts commute with it).
    with_cos = Op("mul", r, Var("cos"), commutative=True, name="with_cos")
    with_sin = Op("mul", Cast(_rotated(rotated_from), "rot_cast"), Var("sin"), commutative=True, name="with_sin")
    return Op("add", with_cos, with_sin, commutative=True, name="embedded")


def _rope_expr():
    x = Cast(Var("x"), "x_cast")
    rot_part = Op("slice", x, dim=_last, start=0, step=1, name="rot_part")
    partial = Op("cat", _embedded(rot_part, rot_part), Op("slice", x, dim=_last, step=1, name="pass_part"),
                 dim=_last, name="joined")
    full = _embedded(x, Cast(Var("x"), "rot_in_cast"))
    return Cast(partial, "out_cast") | Cast(full, "out_cast")


def _slice(m: Match, name: str) -> tuple[int, int, int]:
    a = canonical(m.bindings[name]).attrs
    return a["start"], a["stop"], a["step"]


def _check_rope(m: Match) -> str | None:
    b = m.bindings
    x = tensor_meta(b["x"])
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} has no fused kernel (supported: float32, bfloat16, float16)"
    for cast in ("x_cast", "rot_in_cast", "rot_cast"):
        if b.get(cast) not in (None, torch.float32):
            return f"the input is cast to {b[cast]} in the rotation; the fused kernel reads it as it is"
    d = x.shape[-1]
    rotary = _slice(m, "rot_part")[1] if "rot_part" in b else d
    if "rot_part" in b and _slice(m, "pass_part") != (rotary, d, 1):
        return f"the columns passed through are {_slice(m, 'pass_part')[:2]}, not [{rotary}, {d})"
    if rotary % 2:
        return f"the rotary width {rotary} is odd"
    half = rotary // 2
    lo, hi = _slice(m, "lo"), _slice(m, "hi")
    if ("rotate_half" in b or "rotate_half_flipped" in b) and (lo != (0, half, 1) or hi != (half, rotary, 1)):
        return f"rotate-half takes columns {lo[:2]} and {hi[:2]}; expected halves of {rotary}"
    if "rotate_pairs" in b and (lo[:1] + lo[2:] != (0, 2) or hi[:1] + hi[2:] != (1, 2)):
        return "the pairwise rotation does not take even and odd columns"
    for name in ("cos", "sin"):
        t = tensor_meta(b[name])
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} has no fused kernel"
        if t.requires_grad:
            return f"{name} requires a gradient; the fused kernel gives none for it"
        if t.dim() > x.dim() or not same_size(t.shape[-1], rotary) or not _broadcasts(t.shape[:-1], x.shape[:-1]):
            return f"{name} of shape {tuple(t.shape)} does not broadcast over the rotated part of {tuple(x.shape)}"
    compute = {dtype_of(b[n]) for n in ("with_cos", "with_sin", "embedded")}
    if len(compute) != 1:
        return f"the rotation mixes dtypes {sorted(map(str, compute))}"
    (compute_dtype,) = compute
    if compute_dtype != torch.float32 and b["out_cast"] not in (None, compute_dtype):
        return f"the rotation is rounded to {compute_dtype}, then cast to {b['out_cast']}"
    if "joined" in b and dtype_of(b["joined"]) != compute_dtype:
        return "the passed-through columns change the result's dtype"
    if not all(same_size(a, c) for a, c in zip(tensor_meta(m.root).shape, x.shape)):
        return f"output shape {tuple(tensor_meta(m.root).shape)} differs from the input's {tuple(x.shape)}"
    return None


def _broadcasts(small, big) -> bool:
    small, big = list(small), list(big)
    return all(same_size(s, 1) or same_size(s, g) for s, g in zip(reversed(small), reversed(big)))


def _settings(m: Match) -> tuple:
    """What the rotation of one tensor depends on besides the tensor: the group key."""
    b = m.bindings
    compute_dtype = dtype_of(b["embedded"])
    round_dtype = compute_dtype if compute_dtype != torch.float32 else None
    return b["cos"], b["sin"], "rotate_pairs" in b, round_dtype, dtype_of(m.root), "rotate_half_flipped" in b


def _replace_group(matches: list[Match]) -> Replacement:
    cos, sin, interleaved, round_dtype, out_dtype, negate_sin = _settings(matches[0])
    q = matches[0].bindings["x"]
    k = matches[1].bindings["x"] if len(matches) > 1 else q  # alone: rotate it twice, use one
    return Replacement(torch.ops.fastft.rope.default,
                       (q, k, cos, sin, interleaved, round_dtype, out_dtype, negate_sin), outputs=len(matches))


def _group_key(m: Match) -> tuple:
    return _settings(m) + (tensor_meta(m.bindings["x"]).shape[-1],)


def _rotates_something(neg) -> bool:
    """Only a negation that goes into a cat or stack with a slice (a rotation's shape) is a sign
    of RoPE; others (e.g. a state-space model's ``-exp(A)``) are not near misses of it."""
    for user in neg.users:
        c = canonical(user)
        if c is not None and c.op in ("cat", "stack") and any(
                (a := canonical(arg)) is not None and a.op == "slice" for arg in c.args if arg is not neg):
            return True
    return False


ROPE = Pattern(
    name="rope",
    family="rope",
    expr=_rope_expr(),
    check=_check_rope,
    replace=lambda m: _replace_group([m]),
    anchors=frozenset({"neg"}),
    anchor_filter=_rotates_something,
    reference=rope_reference,
    kernel="fastft::rope",
    group_key=_group_key,
    group_size=2,
    replace_group=_replace_group,
)


def _rope_polar_expr():
    pairs = Op("unflatten", Cast(Var("x"), "x_cast"), sizes=lambda sizes, c: sizes[-1] == 2)
    turned = Op("mul", Op("view_as_complex", pairs), Var("freqs"), commutative=True, name="turned")
    real = Op("flatten", Op("view_as_real", turned), start=_second_last,
              end=lambda end, c: end == c.attrs["ndim"] - 1)
    return Cast(real, "out_cast")


def _check_rope_polar(m: Match) -> str | None:
    b = m.bindings
    x, freqs = tensor_meta(b["x"]), tensor_meta(b["freqs"])
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} has no fused kernel (supported: float32, bfloat16, float16)"
    if b["x_cast"] not in (None, torch.float32) or dtype_of(b["turned"]) != torch.complex64:
        return "the complex rotation is not computed in complex64 (float32 pairs)"
    if freqs.dtype != torch.complex64:
        return f"freqs has dtype {freqs.dtype}, not complex64"
    if freqs.requires_grad:
        return "freqs requires a gradient; the fused kernel gives none for it"
    if freqs.dim() > x.dim() or not same_size(freqs.shape[-1] * 2, x.shape[-1]) or not _broadcasts(
            freqs.shape[:-1], x.shape[:-1]):
        return f"freqs of shape {tuple(freqs.shape)} does not broadcast over the pairs of {tuple(x.shape)}"
    return None


def _replace_polar_group(matches: list[Match]) -> Replacement:
    q = matches[0].bindings["x"]
    k = matches[1].bindings["x"] if len(matches) > 1 else q
    return Replacement(torch.ops.fastft.rope_polar.default,
                       (q, k, matches[0].bindings["freqs"], dtype_of(matches[0].root)), outputs=len(matches))


ROPE_POLAR = Pattern(
    name="rope_polar",
    family="rope",
    expr=_rope_polar_expr(),
    check=_check_rope_polar,
    replace=lambda m: _replace_polar_group([m]),
    anchors=frozenset({"view_as_complex"}),
    reference=rope_polar_reference,
    kernel="fastft::rope_polar",
    group_key=lambda m: (m.bindings["freqs"], dtype_of(m.root), tensor_meta(m.bindings["x"]).shape[-1]),
    group_size=2,
    replace_group=_replace_polar_group,
)
