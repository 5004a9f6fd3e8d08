"""Gated linear unit (the gated MLP's middle), from its math:

    h = act(gate) * up            act: SiLU (x * sigmoid(x)), GELU erf, GELU tanh
    h = h.to(out_dtype)           optional final cast

gate and up are any two tensors of one shape: two linears of the same input, or the two halves
of one packed linear (``chunk``/``split``/slicing), in which case ``fastft::glu_packed`` reads the
packed tensor and returns its gradient in one piece. The matmuls around it stay with cuBLAS.
The activation may be the library function or written out; written out in a 16-bit dtype it
rounds after every step, which the kernel (fp32 inside) does not reproduce bit for bit, so that
form is accepted only in float32.

The activation's spellings and the checks of its own constraints are public: ``patterns/activation.py``
matches the same activations where nothing multiplies them (an ungated MLP).
"""
from __future__ import annotations

import math

import torch

from fastft.kernels.glu import SUPPORTED_DTYPES, glu_reference
from fastft.passes.canonical import canonical, dtype_of, same_shape, tensor_meta
from fastft.passes.matcher import Cast, Lit, Match, Op, Var
from fastft.passes.pattern import Pattern, Replacement


def _approximate(kind: str):
    return lambda value, canon: value == kind


def activation_expr(g, **attrs):
    """Every spelling of the three activations of ``g``, each binding its node as ``act_<kind>``
    (``act_<kind>_written`` when written out). ``attrs`` are constraints on that node, as
    ``Op`` takes them."""
    silu = Op("silu", g, name="act_silu", **attrs) | Op("mul", g, Op("sigmoid", g), commutative=True,
                                                        name="act_silu_written", **attrs)
    gelu_erf = Op("gelu", g, approximate=_approximate("none"), name="act_gelu_erf", **attrs) | \
        _written_gelu_erf(g, attrs)
    gelu_tanh = Op("gelu", g, approximate=_approximate("tanh"), name="act_gelu_tanh", **attrs) | \
        _written_gelu_tanh(g, attrs)
    return silu | gelu_erf | gelu_tanh


def _written_gelu_erf(g, attrs):
    # 0.5 * g * (1 + erf(g / sqrt(2)))  (also with g * 0.5 first, or * (1/sqrt(2)))
    scaled = Op("div", g, Lit("erf_div")) | Op("mul", g, Lit("erf_mul"), commutative=True)
    one_plus = Op("add", Op("erf", scaled), Lit("one"), commutative=True)
    half_g = Op("mul", g, Lit("half"), commutative=True)
    return Op("mul", half_g, one_plus, commutative=True, name="act_gelu_erf_written", **attrs)


def _written_gelu_tanh(g, attrs):
    # 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 * g^3)))
    cube = Op("pow", g, 3.0) | Op("pow", g, 3) | Op("mul", Op("mul", g, g), g, commutative=True)
    inner = Op("add", g, Op("mul", cube, Lit("cubic"), commutative=True), commutative=True)
    one_plus = Op("add", Op("tanh", Op("mul", inner, Lit("tanh_scale"), commutative=True)), Lit("one"),
                  commutative=True)
    half_g = Op("mul", g, Lit("half"), commutative=True)
    return Op("mul", half_g, one_plus, commutative=True, name="act_gelu_tanh_written", **attrs)


_CONSTANTS = {  # what the written-out forms must use, to float32 precision
    "erf_div": math.sqrt(2.0), "erf_mul": 1 / math.sqrt(2.0), "one": 1.0, "half": 0.5,
    "cubic": 0.044715, "tanh_scale": math.sqrt(2.0 / math.pi),
}


def _last(dim, canon) -> bool:
    return dim == canon.attrs["ndim"] - 1


def gated_product(gate, up):
    """``act(gate) * up``, optionally cast, over two given sub-expressions (binds ``act_*``,
    ``gate_cast``, ``up_cast``, ``product`` and ``out_cast``)."""
    product = Op("mul", activation_expr(Cast(gate, "gate_cast")), Cast(up, "up_cast"), commutative=True,
                 name="product")
    return Cast(product, "out_cast")


def _glu_expr():
    # Halves of one packed tensor first: then the slices belong to the region and the packed op
    # can take their place.
    gate = Op("slice", Var("packed"), dim=_last, step=1, name="gate") | Var("gate")
    up = Op("slice", Var("packed"), dim=_last, step=1, name="up") | Var("up")
    return gated_product(gate, up)


def activation_kind(b: dict) -> tuple[str, str]:
    """(activation name of the kernel, binding name of the activation node)."""
    for key in b:
        if key.startswith("act_"):
            kind = key[4:].removesuffix("_written")
            return kind, key
    raise AssertionError("an activation always binds")


def _check_glu(m: Match) -> str | None:
    return gated_product_problem(m.bindings, m.bindings["gate"], m.bindings["up"])


def operand_problem(name: str, node, cast: torch.dtype | None) -> str | None:
    """Why ``node``, read by a fused kernel after the optional ``cast``, cannot be, or None."""
    dtype = dtype_of(node)
    if dtype not in SUPPORTED_DTYPES:
        return f"{name} dtype {dtype} has no fused kernel (supported: float32, bfloat16, float16)"
    if cast not in (None, torch.float32):
        return f"{name} is cast to {cast} first; the fused kernel reads it as it is"
    return None


def activation_problem(b: dict) -> str | None:
    """Why the activation bound by ``activation_expr`` cannot be the kernels' activation, or None:
    a written-out form with other constants, or computed in a 16-bit dtype."""
    kind, act_key = activation_kind(b)
    for name, want in _CONSTANTS.items():
        if name in b and not math.isclose(float(b[name]), want, rel_tol=1e-6):
            return f"the written-out {kind} uses {b[name]!r} where {want:.7g} was expected"
    act_dtype = dtype_of(b[act_key])
    if act_key.endswith("_written") and act_dtype != torch.float32:
        return f"the {kind} activation is written out in {act_dtype}: rounded at every step"
    return None


def recast_problem(what: str, node, out_cast: torch.dtype | None) -> str | None:
    """A result rounded to a 16-bit dtype and then cast to another one, which the fused ops do
    not take on; else None."""
    dtype = dtype_of(node)
    if dtype != torch.float32 and out_cast not in (None, dtype):
        return f"the {what} is rounded to {dtype}, then cast to {out_cast}"
    return None


def gated_product_problem(b: dict, gate_node, up_node) -> str | None:
    """Why the bindings of ``gated_product`` over ``gate_node`` and ``up_node`` cannot become the
    GLU kernel, or None."""
    for name, node in (("gate", gate_node), ("up", up_node)):
        problem = operand_problem(name, node, b[f"{name}_cast"])
        if problem is not None:
            return problem
    gate, up = tensor_meta(gate_node), tensor_meta(up_node)
    if not same_shape(gate.shape, up.shape):
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (a broadcast, not a GLU)"
    if gate.dtype != up.dtype:
        # The kernel rounds both operands to the activation's dtype; eager would promote instead.
        return f"gate ({gate.dtype}) and up ({up.dtype}) differ in dtype"
    return activation_problem(b) or recast_problem("product", b["product"], b["out_cast"])


def _packed(m: Match):
    """The packed tensor when gate is the first half of its last dim and up the second, else None."""
    b = m.bindings
    gate, up = canonical(b["gate"]), canonical(b["up"])
    if "packed" not in b or gate is None or up is None or gate.op != "slice" or up.op != "slice":
        return None
    if gate.args[0] is not b["packed"] or up.args[0] is not b["packed"]:
        return None
    width = tensor_meta(b["packed"]).shape[-1]
    if width % 2 or (gate.attrs["start"], gate.attrs["stop"]) != (0, width // 2):
        return None
    if (up.attrs["start"], up.attrs["stop"]) != (width // 2, width):
        return None
    return b["packed"]


def activation_rounding(b: dict) -> tuple[str, torch.dtype | None]:
    """(activation name, the 16-bit dtype the eager activation rounds to, or None in float32)."""
    kind, act_key = activation_kind(b)
    act_dtype = dtype_of(b[act_key])
    return kind, (act_dtype if act_dtype != torch.float32 else None)


def _replace_glu(m: Match) -> Replacement:
    b = m.bindings
    kind, round_dtype = activation_rounding(b)
    packed = _packed(m)
    if packed is not None:
        return Replacement(torch.ops.fastft.glu_packed.default, (packed, kind, round_dtype, dtype_of(m.root)))
    return Replacement(torch.ops.fastft.glu.default, (b["gate"], b["up"], kind, round_dtype, dtype_of(m.root)))


def gates_something(activation) -> bool:
    """Only an activation whose output is multiplied by something is a gated unit."""
    return any((c := canonical(u)) is not None and c.op == "mul" for u in activation.users)


GLU = Pattern(
    name="glu",
    family="glu_mlp",
    expr=_glu_expr(),
    check=_check_glu,
    replace=_replace_glu,
    anchors=frozenset({"silu", "gelu"}),
    anchor_filter=gates_something,
    reference=glu_reference,
    kernel="fastft::glu",
)
