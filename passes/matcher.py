"""The matcher core: small expression patterns over the canonical view, matched with backtracking.

A pattern's math is written once as an expression tree::

    x = Var("x"); xf = Cast(x, "upcast")
    Op("mul", xf, Op("rsqrt", Op("add", Op("mean", Op("pow", xf, 2)), Lit("eps"))))

``Var`` binds a tensor-valued node (the same name must bind the same node everywhere),
``Lit`` binds a Python constant (eps is a wildcard read from the graph), ``Cast`` is an optional
dtype cast whose dtype is bound (or None when absent), ``Op`` matches a canonical op
(commutative ones in either order), and ``a | b`` tries alternatives in order.

Matching yields every way an expression matches at a root node, so that a pattern's
constraint check can reject one binding and the next is tried. When nothing matches, the
failure that got furthest is kept, to explain near misses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch.fx as fx

from .canonical import canonical, tensor_meta

Bindings = dict[str, Any]


class Expr:
    def __or__(self, other: "Expr") -> "Alt":
        return Alt(self, other)


@dataclass(frozen=True, eq=False)
class Var(Expr):
    """Any tensor-valued node; bound by name."""

    name: str


@dataclass(frozen=True, eq=False)
class Lit(Expr):
    """A Python constant (not a graph node); bound by name."""

    name: str


@dataclass(frozen=True, eq=False)
class Op(Expr):
    """A canonical op. ``attrs`` values are required values or predicates; ``name`` binds the node;
    ``where``, a predicate on the node itself, for what its canonical view does not hold (its users)."""

    op: str
    args: tuple[Any, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    commutative: bool = False
    name: str | None = None
    where: Callable[[fx.Node], bool] | None = None

    def __init__(self, op: str, *args: Any, commutative: bool = False, name: str | None = None,
                 where: Callable[[fx.Node], bool] | None = None, **attrs: Any) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "attrs", attrs)
        object.__setattr__(self, "commutative", commutative)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "where", where)


@dataclass(frozen=True, eq=False)
class Cast(Expr):
    """``inner`` optionally wrapped in a dtype cast; binds ``name`` to the cast's dtype or None."""

    inner: Any
    name: str


@dataclass(frozen=True, eq=False)
class Alt(Expr):
    options: tuple[Any, ...]

    def __init__(self, *options: Any) -> None:
        flat: list[Any] = []
        for o in options:
            flat.extend(o.options if isinstance(o, Alt) else (o,))
        object.__setattr__(self, "options", tuple(flat))


@dataclass
class Match:
    root: fx.Node
    bindings: Bindings
    nodes: list[fx.Node]  # every op node inside the region, root included
    # Nodes the region also recomputes (``Pattern.absorb``); not claimed: another region may absorb them too.
    absorbed: list[fx.Node] = field(default_factory=list)


@dataclass
class Failure:
    depth: int = -1
    reason: str = ""
    region: tuple = ()  # the nodes of a whole match that a constraint then rejected

    def note(self, depth: int, reason: str, region: tuple = ()) -> None:
        if depth > self.depth:
            self.depth, self.reason, self.region = depth, reason, region


class _Search:
    def __init__(self, blocked: set[fx.Node], failure: Failure) -> None:
        self.blocked = blocked
        self.failure = failure

    def match(self, e: Any, v: Any, b: Bindings, nodes: tuple) -> Iterator[tuple[Bindings, tuple]]:
        if isinstance(e, Var):
            yield from self._var(e, v, b, nodes)
        elif isinstance(e, Lit):
            if isinstance(v, fx.Node):
                self.failure.note(len(nodes), f"{e.name} is computed by node '{v.name}', not a constant")
                return
            if e.name in b and b[e.name] != v:
                return
            yield {**b, e.name: v}, nodes
        elif isinstance(e, Alt):
            for option in e.options:
                yield from self.match(option, v, b, nodes)
        elif isinstance(e, Cast):
            yield from self._cast(e, v, b, nodes)
        elif isinstance(e, Op):
            yield from self._op(e, v, b, nodes)
        else:  # a literal required value, e.g. the 2 of pow(x, 2)
            if not isinstance(v, fx.Node) and v == e:
                yield b, nodes
            else:
                self.failure.note(len(nodes), f"expected the constant {e!r}, found {_describe(v)}")

    def _var(self, e: Var, v: Any, b: Bindings, nodes: tuple):
        if not isinstance(v, fx.Node) or tensor_meta(v) is None:
            self.failure.note(len(nodes), f"{e.name} must be a tensor, found {_describe(v)}")
            return
        if e.name in b:
            if b[e.name] is v:
                yield b, nodes
            else:
                self.failure.note(len(nodes), f"{e.name} is '{b[e.name].name}' in one place and "
                                              f"'{v.name}' in another")
            return
        yield {**b, e.name: v}, nodes

    def _cast(self, e: Cast, v: Any, b: Bindings, nodes: tuple):
        canon = canonical(v)
        if canon is not None and canon.op in ("cast", "identity") and v not in self.blocked:
            dtype = canon.attrs.get("dtype")
            if canon.op == "identity":
                yield from self._cast(e, canon.args[0], b, nodes + (v,) + canon.via)
            elif e.name not in b or b[e.name] == dtype:
                yield from self.match(e.inner, canon.args[0], {**b, e.name: dtype}, nodes + (v,) + canon.via)
        if e.name not in b or b[e.name] is None:
            yield from self.match(e.inner, v, {**b, e.name: None}, nodes)

    def _op(self, e: Op, v: Any, b: Bindings, nodes: tuple):
        canon = canonical(v)
        if canon is not None and canon.op == "identity" and v not in self.blocked:
            # The same value as its input (a cast to the dtype it has, a layout change): the op
            # is looked for there, and the identity joins the region.
            yield from self._op(e, canon.args[0], b, nodes + (v,) + canon.via)
            return
        if canon is None or canon.op != e.op:
            found = canon.op if canon else (
                "an input of the captured graph (computed before it, e.g. across a graph break)"
                if isinstance(v, fx.Node) and v.op == "placeholder" else "an op outside the vocabulary")
            self.failure.note(len(nodes), f"expected {e.op} at {_describe(v)}, found {found}")
            return
        if v in self.blocked:
            self.failure.note(len(nodes), f"'{v.name}' already belongs to another rewrite")
            return
        for key, want in e.attrs.items():
            have = canon.attrs.get(key)
            ok = want(have, canon) if callable(want) else have == want
            if not ok:
                self.failure.note(len(nodes) + 1, f"{e.op} at '{v.name}' has {key}={have!r}")
                return
        if e.where is not None and not e.where(v):
            self.failure.note(len(nodes) + 1, f"{e.op} at '{v.name}' fails {getattr(e.where, '__name__', 'a condition')}")
            return
        if len(canon.args) != len(e.args):
            self.failure.note(len(nodes), f"{e.op} at '{v.name}' takes {len(canon.args)} arguments")
            return
        if e.name is not None:
            if e.name in b and b[e.name] is not v:
                return
            b = {**b, e.name: v}
        orders = [canon.args]
        if e.commutative and len(canon.args) == 2:
            orders.append(canon.args[::-1])
        for actual in orders:
            yield from self._args(list(e.args), list(actual), b, nodes + (v,) + canon.via)

    def _args(self, exprs: list, values: list, b: Bindings, nodes: tuple):
        if not exprs:
            yield b, nodes
            return
        for b2, n2 in self.match(exprs[0], values[0], b, nodes):
            yield from self._args(exprs[1:], values[1:], b2, n2)


def match_at(expr: Expr, root: fx.Node, blocked: set[fx.Node], failure: Failure) -> Iterator[Match]:
    """Every match of ``expr`` rooted at ``root`` whose op nodes avoid ``blocked``."""
    seen: set[tuple] = set()
    for bindings, nodes in _Search(blocked, failure).match(expr, root, {}, ()):
        unique = list(dict.fromkeys(nodes))
        key = (tuple(sorted(bindings.items(), key=lambda kv: kv[0]).__repr__()), tuple(unique))
        if key in seen:
            continue
        seen.add(key)
        yield Match(root=root, bindings=bindings, nodes=unique)


def _describe(v: Any) -> str:
    return f"node '{v.name}'" if isinstance(v, fx.Node) else repr(v)


