"""Match patterns in a captured graph (and every graph nested in it) and splice in fused ops."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .canonical import canonical, module_path
from .matcher import Failure, Match, match_at
from .pattern import Pattern

REWRITE_META = "fastft_rewrite"


@dataclass
class AppliedRewrite:
    pattern: Pattern
    module_path: str
    node: fx.Node  # the fused call in the rewritten graph
    region: fx.GraphModule  # the original subgraph; its inputs are the fused call's node args, in order


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
    for sub in list(gm.modules()):
        if isinstance(sub, fx.GraphModule):
            _rewrite_graph(sub, patterns, result)
    return result


def _rewrite_graph(gm: fx.GraphModule, patterns: list[Pattern], result: RewriteResult) -> None:
    graph = gm.graph
    consumed: set[fx.Node] = set()
    failures: dict[tuple[str, fx.Node], Failure] = {}
    changed = False
    for pattern in patterns:
        # From the output backwards, so that the largest region (the one ending in a final cast)
        # is seen before the smaller one inside it.
        for root in reversed(list(graph.nodes)):
            if root in consumed or root.op not in ("call_function", "call_method"):
                continue
            failure = failures.setdefault((pattern.name, root), Failure())
            accepted = _first_accepted(pattern, root, consumed, failure)
            if accepted is None:
                continue
            match, region = accepted
            _splice(gm, pattern, match, region, result)
            consumed.update(match.nodes)
            changed = True
    result.near_misses.extend(_near_misses(graph, patterns, consumed, failures))
    if changed:
        graph.lint()
        gm.recompile()


def _first_accepted(pattern: Pattern, root: fx.Node, consumed: set[fx.Node], failure: Failure):
    for match in match_at(pattern.expr, root, consumed, failure):
        reason = pattern.check(match)
        if reason is None:
            replacement = pattern.replace(match)
            inputs = [a for a in replacement.args if isinstance(a, fx.Node)]
            region, reason = extract_region(match, inputs)
            if region is not None:
                return match, (replacement, region)
        failure.note(len(match.nodes) + 100, reason)  # a full structural match outranks any partial one
    return None


def extract_region(match: Match, inputs: list[fx.Node]) -> tuple[fx.GraphModule | None, str | None]:
    """The matched nodes as a standalone GraphModule taking ``inputs``; or the reason it cannot be."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    inside = set(match.nodes)
    for node in match.root.graph.nodes:  # graph order is a topological order
        if node not in inside:
            continue
        for dep in node.all_input_nodes:
            if dep not in env:
                return None, (f"the region reads '{dep.name}', which is neither one of its inputs "
                              f"nor computed inside it")
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[match.root])
    return fx.GraphModule(torch.nn.Module(), graph), None


def _splice(gm: fx.GraphModule, pattern: Pattern, match: Match, prepared, result: RewriteResult) -> None:
    replacement, region = prepared
    graph = gm.graph
    root = match.root
    with graph.inserting_before(root):
        fused = graph.call_function(replacement.target, replacement.args)
    fused.meta.update({k: v for k, v in root.meta.items() if k != "fastft_canon"})
    path = _region_path(match.nodes)
    applied = AppliedRewrite(pattern=pattern, module_path=path, node=fused, region=region)
    fused.meta[REWRITE_META] = applied
    root.replace_all_uses_with(fused)
    for node in sorted(match.nodes, key=_position(graph), reverse=True):
        if not node.users:
            graph.erase_node(node)
    result.applied.append(applied)


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
    misses = []
    for anchor in graph.nodes:
        canon = canonical(anchor)
        if anchor in consumed or canon is None:
            continue
        for pattern in patterns:
            if canon.op not in pattern.anchors:
                continue
            best = Failure()
            for root in _downstream(anchor, hops=6):
                f = failures.get((pattern.name, root))
                if f is not None and f.depth > best.depth:
                    best = f
            reason = best.reason or "no part of the pattern matched around it"
            misses.append(RegionMiss(pattern.name, module_path(anchor), anchor.name, reason))
    return misses


def _downstream(node: fx.Node, hops: int) -> list[fx.Node]:
    seen, frontier = [node], [node]
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.extend(frontier)
    return seen
