"""The Report: what was rewritten where, what almost matched and why, where capture broke."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field


def _natural(path: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


@dataclass(frozen=True)
class RewriteRecord:
    pattern: str
    family: str
    module_path: str
    kernel: str
    graph: str  # which captured graph it lives in (entry point and capture number)


@dataclass(frozen=True)
class NearMiss:
    region: str  # module path and node name
    pattern: str
    reason: str


@dataclass(frozen=True)
class GraphBreak:
    entry: str
    reason: str
    count: int = 1


@dataclass(frozen=True)
class CaptureFailure:
    entry: str
    error: str


@dataclass
class Report:
    """Filled as graphs are captured; read by ``fastft.report(model)`` and ``fastft-inspect``.

    A graph is captured again on a recompile (new shapes, train/eval); its records replace the
    earlier capture's instead of adding to them, so counts describe the model, not its history.
    """

    by_graph: dict[str, list[RewriteRecord]] = field(default_factory=dict)
    misses_by_graph: dict[str, list[NearMiss]] = field(default_factory=dict)
    graph_breaks: list[GraphBreak] = field(default_factory=list)
    capture_failures: list[CaptureFailure] = field(default_factory=list)
    graphs_captured: int = 0
    # Per graph, the joins made after autograd as Inductor compiled it (a live count: the
    # backward's are added at the first backward; none under eager lowering).
    joins_by_graph: dict[str, Counter] = field(default_factory=dict)

    @property
    def rewrites(self) -> list[RewriteRecord]:
        """One record per rewritten region of the model. The same region is captured again by a
        recompile (new shapes, train/eval, a call without labels) or by a second entry point (the
        backbone, called directly): per module, the graph with the most rewrites there counts."""
        best: dict[tuple, list[RewriteRecord]] = {}
        for records in self.by_graph.values():
            here: dict[tuple, list[RewriteRecord]] = {}
            for r in records:
                here.setdefault((r.pattern, r.module_path), []).append(r)
            for key, found in here.items():
                if len(found) > len(best.get(key, [])):
                    best[key] = found
        unique = [r for records in best.values() for r in records]
        return sorted(unique, key=lambda r: (r.family, _natural(r.module_path)))

    @property
    def near_misses(self) -> list[NearMiss]:
        seen = dict.fromkeys(m for misses in self.misses_by_graph.values() for m in misses)
        return list(seen)

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.family for r in self.rewrites))

    @property
    def lowered_joins(self) -> dict[str, int]:
        """Joins with the glue beside a fused op in the lowered graphs, by kind; as for rewrites,
        the graph with the most of a kind counts."""
        best: Counter = Counter()
        for joins in self.joins_by_graph.values():
            best |= joins
        return dict(sorted(best.items()))

    def record_graph(self, key: str, rewrites: list[RewriteRecord], misses: list[NearMiss],
                     joins: Counter | None = None) -> None:
        self.graphs_captured += 1
        self.by_graph[key] = rewrites
        self.misses_by_graph[key] = misses
        self.joins_by_graph[key] = joins if joins is not None else Counter()

    def record_graph_break(self, entry: str, reason: str, count: int) -> None:
        for i, old in enumerate(self.graph_breaks):
            if old.entry == entry and old.reason == reason:
                self.graph_breaks[i] = GraphBreak(entry, reason, old.count + count)
                return
        self.graph_breaks.append(GraphBreak(entry, reason, count))

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "rewrites": [asdict(r) for r in self.rewrites],
            "near_misses": [asdict(m) for m in self.near_misses],
            "graph_breaks": [asdict(g) for g in self.graph_breaks],
            "capture_failures": [asdict(f) for f in self.capture_failures],
            "graphs_captured": self.graphs_captured,
            "lowered_joins": self.lowered_joins,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        from .table import format_report

        return format_report(self)
