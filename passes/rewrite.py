"""Match patterns in a captured graph (and every graph nested in it) and splice in fused ops."""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

try:
    from torch._prims_common import is_contiguous_or_false
except ImportError:  # an older torch: contiguity known only where every size and stride is an int
    def is_contiguous_or_false(t: torch.Tensor) -> bool:
        return not any(isinstance(v, torch.SymInt) for v in (*t.shape, *t.stride())) and t.is_contiguous()

from .canonical import canonical, link_nested_inputs, module_path, same_shape, tensor_meta
from .matcher import Failure, Match, match_at
from .pattern import Pattern, Replacement

REWRITE_META = "fastft_rewrite"


@dataclass
class AppliedRewrite:
    pattern: Pattern
    module_path: str
    node: fx.Node  # the fused call in the rewritten graph
    region: fx.GraphModule  # the original subgraph; its inputs are the fused call's distinct node args, in order
    released: list[str] = field(default_factory=list)  # graph outputs replaced by empty tensors

    @property
    def kernel(self) -> str:
        """The op that replaced the region (a pattern may choose among several)."""
        target = self.node.target
        schema = getattr(target, "_schema", None)
        if schema is not None:
            return schema.name
        # A kernel module's function that wraps its custom op (to return part of what it saves)
        # is named after the op it stands for.
        if getattr(target, "__module__", "").startswith("fastft.kernels."):
            return f"fastft::{target.__name__}"
        return self.pattern.kernel


@dataclass
class RegionMiss:
    pattern: str
    module_path: str
    node: str
    reason: str


@dataclass
class RewriteResult:
    applied: list[AppliedRewrite] = field(default_factory=list)
    near_misses: list[RegionMiss] = field(default_factory=list)


def rewrite_graph_module(gm: fx.GraphModule, patterns: list[Pattern]) -> RewriteResult:
    """Rewrite ``gm`` in place, including nested graphs (checkpointed layers, control-flow bodies)."""
    result = RewriteResult()
    link_nested_inputs(gm)
    for sub in list(gm.modules()):
        if isinstance(sub, fx.GraphModule):
            merge_repeated_views(sub.graph)
            _rewrite_graph(sub, patterns, result)
    return result


_PURE_VIEWS = {"unsqueeze", "view", "reshape", "transpose", "expand", "permute"}


def merge_repeated_views(graph: fx.Graph) -> None:
    """Keep one node for each view computed several times over (``f[:, None]`` written once for
    q and once for k): then the grouped patterns see q and k rotated by the same cos/sin node.
    Views compute nothing and read the same memory, so merging them changes no value."""
    seen: dict = {}
    for node in list(graph.nodes):
        is_view = (node.op == "call_function" and node.target is operator.getitem
                   and isinstance(node.args[0], fx.Node) and tensor_meta(node.args[0]) is not None) or (
            node.op == "call_method" and node.target in _PURE_VIEWS)
        if not is_view:
            continue
        try:
            key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    return value


def _rewrite_graph(gm: fx.GraphModule, patterns: list[Pattern], result: RewriteResult) -> None:
    graph = gm.graph
    consumed: set[fx.Node] = set()
    failures: dict[tuple[str, fx.Node], Failure] = {}
    changed = False
    # Root -> the node now standing in for it. A match waiting for partners may read a node that
    # a splice replaced meanwhile (its input is another match's result): it is read through this.
    replaced: dict[fx.Node, fx.Node] = {}
    for pattern in patterns:
        pending: dict = {}  # group key -> accepted matches waiting for a partner
        # From the output backwards, so that the largest region (the one ending in a final cast)
        # is seen before the smaller one inside it.
        for root in reversed(list(graph.nodes)):
            if root in consumed or root.op not in ("call_function", "call_method"):
                continue
            failure = failures.setdefault((pattern.name, root), Failure())
            accepted = _first_accepted(pattern, root, consumed, failure)
            if accepted is None:
                continue
            match, prepared = accepted
            consumed.update(match.nodes)
            changed = True
            if pattern.group_key is None:
                replaced.update(_splice(gm, pattern, [match], prepared, result))
                continue
            group = pending.setdefault(pattern.group_key(match), [])
            group.append((match, prepared))
            if len(group) == pattern.group_size:
                _splice_group(gm, pattern, group, replaced, result)
                group.clear()
        for group in pending.values():
            _splice_each(gm, pattern, group, replaced, result)
    result.near_misses.extend(_near_misses(graph, patterns, consumed, failures))
    if changed:
        graph.lint()
        gm.recompile()


def _first_accepted(pattern: Pattern, root: fx.Node, consumed: set[fx.Node], failure: Failure):
    for match in match_at(pattern.expr, root, consumed, failure):
        reason = pattern.check(match)
        if reason is None and pattern.absorb is not None:
            extra = pattern.absorb(match)
            if consumed.intersection(extra):
                reason = "part of what it computes from already belongs to another rewrite"
            else:
                match.absorbed = [n for n in dict.fromkeys(extra) if n not in match.nodes]
        if reason is None:
            replacement = pattern.replace(match)
            region, reason = extract_region([match], _inputs(replacement))
            if region is not None:
                return match, (replacement, region)
        failure.note(len(match.nodes) + 100, reason, tuple(match.nodes))  # outranks any partial match
    return None


def _inputs(replacement: Replacement) -> list[fx.Node]:
    return list(dict.fromkeys(a for a in replacement.args if isinstance(a, fx.Node)))


def extract_region(matches: list[Match], inputs: list[fx.Node]) -> tuple[fx.GraphModule | None, str | None]:
    """The matched nodes as a standalone GraphModule taking ``inputs`` and returning each match's
    root (a tuple when there are several); or the reason it cannot be."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    inside = {n for m in matches for n in m.nodes + m.absorbed}
    for node in matches[0].root.graph.nodes:  # graph order is a topological order
        if node not in inside:
            continue
        for dep in node.all_input_nodes:
            if dep not in env:
                return None, (f"the region reads '{dep.name}', which is neither one of its inputs "
                              f"nor computed inside it")
        env[node] = graph.node_copy(node, lambda n: env[n])
    roots = [env[m.root] for m in matches]
    graph.output(roots[0] if len(roots) == 1 else tuple(roots))
    # Built over the graph's own module, so that a body the region calls (get_attr) comes along.
    owner = matches[0].root.graph.owning_module
    return fx.GraphModule(owner if owner is not None else torch.nn.Module(), graph), None


def _followed(value: Any, replaced: dict[fx.Node, fx.Node]) -> Any:
    """``value`` with each node a splice replaced swapped for the node standing in for it."""
    if isinstance(value, fx.Node):
        while value in replaced:
            value = replaced[value]
        return value
    if type(value) in (list, tuple):
        return type(value)(_followed(v, replaced) for v in value)
    return value


def _current(entry: tuple, replaced: dict[fx.Node, fx.Node]) -> tuple:
    """An accepted (match, (replacement, region)) whose bindings and call read the graph as it is
    now. The region, cut out when the match was accepted, keeps its inputs' order."""
    match, (replacement, region) = entry
    if not replaced:
        return entry
    match = dataclasses.replace(match, bindings={k: _followed(v, replaced) for k, v in match.bindings.items()})
    return match, (dataclasses.replace(replacement, args=_followed(replacement.args, replaced)), region)


def _splice_each(gm: fx.GraphModule, pattern: Pattern, entries: list, replaced: dict[fx.Node, fx.Node],
                 result: RewriteResult) -> None:
    """Each accepted (match, prepared) its own call, in turn, each reading the graph as the splices
    before it left it; ``replaced`` gains each root with the node that replaced it."""
    for entry in entries:
        match, prepared = _current(entry, replaced)
        replaced.update(_splice(gm, pattern, [match], prepared, result))


def _splice_group(gm: fx.GraphModule, pattern: Pattern, group: list, replaced: dict[fx.Node, fx.Node],
                  result: RewriteResult) -> None:
    """One call for the whole group, placed after its last input and before its first use;
    where no such place exists (or the region cannot be cut out), each match gets its own call.
    ``replaced`` gains each root with the node that replaced it."""
    group = [_current(entry, replaced) for entry in group]
    matches = [m for m, _ in group]
    order = _position(gm.graph)
    matches.sort(key=lambda m: order(m.root))
    replacement = pattern.replace_group(matches)
    inputs = _inputs(replacement)
    region, _ = extract_region(matches, inputs)
    last_input = max((order(n) for n in inputs), default=-1)
    first_use = min((order(u) for m in matches for u in m.root.users), default=len(gm.graph.nodes))
    if region is None or last_input >= first_use:
        _splice_each(gm, pattern, group, replaced, result)
        return
    replaced.update(_splice(gm, pattern, matches, (replacement, region), result))


def _splice(gm: fx.GraphModule, pattern: Pattern, matches: list[Match], prepared, result: RewriteResult
            ) -> dict[fx.Node, fx.Node]:
    """The fused call in place of ``matches``' regions; returns each root with the node that
    replaced it."""
    replacement, region = prepared
    graph = gm.graph
    order = _position(graph)
    inputs = _inputs(replacement)
    # Right before the first root, or right after the last input when that comes later.
    first_root = min((m.root for m in matches), key=order)
    last_input = max(inputs, key=order, default=None)
    if last_input is not None and order(last_input) > order(first_root):
        where = graph.inserting_after(last_input)
    else:
        where = graph.inserting_before(first_root)
    with where:
        fused = graph.call_function(replacement.target, replacement.args)
    fused.meta.update({k: v for k, v in first_root.meta.items() if k not in ("fastft_canon", "example_value", "val")})
    if replacement.outputs is None:
        fused.meta.update({k: v for k, v in first_root.meta.items() if k in ("example_value", "val")})
    nodes = [n for m in matches for n in m.nodes]
    applied = AppliedRewrite(pattern=pattern, module_path=_region_path(nodes), node=fused, region=region)
    fused.meta[REWRITE_META] = applied
    if pattern.recompute:  # a checkpointed region's own policy, copied from the root above, stays
        from torch.utils.checkpoint import CheckpointPolicy

        fused.meta.setdefault("recompute", CheckpointPolicy.PREFER_RECOMPUTE)
    replaced: dict[fx.Node, fx.Node] = {}
    if replacement.outputs is None:
        replaced[matches[0].root] = _with_layout_of(graph, fused, matches[0].root, inputs)
        matches[0].root.replace_all_uses_with(replaced[matches[0].root])
    else:
        with graph.inserting_after(fused):
            for i, m in reversed(list(enumerate(matches))):
                out = graph.call_function(operator.getitem, (fused, i))
                out.meta.update({k: v for k, v in m.root.meta.items() if k != "fastft_canon"})
                replaced[m.root] = _with_layout_of(graph, out, m.root, inputs)
                m.root.replace_all_uses_with(replaced[m.root])
        fused.meta["example_value"] = tuple(tensor_meta(m.root) for m in matches)
    inside = set(nodes) | {n for m in matches for n in m.absorbed}
    for m in matches:
        for node in (pattern.release(m) if pattern.release else []):
            if _release(graph, node, inside):
                applied.released.append(node.name)
    for node in sorted(inside, key=order, reverse=True):
        if not node.users:
            graph.erase_node(node)
    result.applied.append(applied)
    return replaced


def _with_layout_of(graph: fx.Graph, out: fx.Node, root: fx.Node, inputs: list[fx.Node]) -> fx.Node:
    """``out``, made contiguous where the region's result was contiguous but a fused op may lay
    its result out like a strided input of the same shape (a rotation of a transposed q whose
    original ended in a cat): code after it may ``view`` it. ``contiguous()`` of a tensor that
    already is returns it as it is."""
    meta = tensor_meta(root)
    # Guard-free tests (sizes may be symbolic): contiguity only where it is known.
    if meta is None or not is_contiguous_or_false(meta):
        return out
    strided_like = [a for a in inputs if (m := tensor_meta(a)) is not None and same_shape(m.shape, meta.shape)
                    and not is_contiguous_or_false(m)]
    if not strided_like:
        return out
    with graph.inserting_after(out):
        kept = graph.call_method("contiguous", (out,))
    kept.meta.update({k: v for k, v in root.meta.items() if k != "fastft_canon"})
    return kept


def _release(graph: fx.Graph, node: fx.Node, inside: set[fx.Node]) -> bool:
    """Where the graph returns ``node``, return an empty tensor instead, if nothing else outside
    the region reads it (the region's own nodes go with the region)."""
    outside = [u for u in node.users if u not in inside]
    meta = tensor_meta(node)
    if not outside or meta is None or any(u.op != "output" for u in outside):
        return False
    (output,) = outside
    with graph.inserting_before(output):
        empty = graph.call_function(torch.empty, ((0,),), {"dtype": meta.dtype, "device": meta.device})
    empty.meta["example_value"] = meta.new_empty((0,))
    output.replace_input_with(node, empty)
    return True


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order.get(n, -1)


def _region_path(nodes: list[fx.Node]) -> str:
    """The deepest module that contains the whole region."""
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(common), len(p)) and common[i] == p[i]:
            i += 1
        common = common[:i]
    return ".".join(common)


def _near_misses(graph: fx.Graph, patterns: list[Pattern], consumed: set[fx.Node],
                 failures: dict[tuple[str, fx.Node], Failure]) -> list[RegionMiss]:
    misses, reported = [], set()
    for anchor in graph.nodes:
        canon = canonical(anchor)
        if anchor in consumed or canon is None:
            continue
        for pattern in patterns:
            if canon.op not in pattern.anchors or not pattern.is_anchor(anchor):
                continue
            best = Failure()
            for root in _downstream(anchor, hops=6):
                f = failures.get((pattern.name, root))
                if f is not None and f.depth > best.depth:
                    best = f
            reason = best.reason or "no part of the pattern matched around it"
            misses.append(RegionMiss(pattern.name, module_path(anchor), anchor.name, reason))
            reported.update((pattern.name, n) for n in best.region + (anchor,))
    # The whole math matched but a constraint rejected it, and no rewrite took any of it: a near
    # miss even without an anchor (e.g. an activation written out in a 16-bit dtype). The largest
    # such region speaks for the smaller ones inside it.
    rejected = sorted(((name, root, f) for (name, root), f in failures.items() if f.region),
                      key=lambda item: -item[2].depth)
    for name, root, f in rejected:
        if consumed.intersection(f.region) or any((name, n) in reported for n in f.region):
            continue
        reported.update((name, n) for n in f.region)
        misses.append(RegionMiss(name, module_path(root), root.name, f.reason))
    return misses


def _downstream(node: fx.Node, hops: int) -> list[fx.Node]:
    seen, frontier = [node], [node]
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.extend(frontier)
    return seen
