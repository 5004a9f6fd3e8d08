"""Plain-text rendering of a Report (and a check verdict) for ``fastft-inspect`` and ``str()``."""
from __future__ import annotations

from collections import defaultdict

from .report import Report


def format_report(report: Report) -> str:
    lines = [f"graphs captured: {report.graphs_captured}", "", "rewrites:"]
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in report.rewrites:
        grouped[(r.pattern, r.kernel)].append(r.module_path or "<model>")
    if not grouped:
        lines.append("  (none)")
    else:
        rows = [("pattern", "count", "kernel", "where")]
        for (pattern, kernel), where in sorted(grouped.items()):
            rows.append((pattern, str(len(where)), kernel, _summarise(where)))
        lines += _table(rows)
    if report.lowered_joins:
        lines += ["", "joined after autograd (in the graphs Inductor compiled in this process; one it took from its "
                  "cache is not counted):"]
        lines += [f"  {kind}: {count}" for kind, count in report.lowered_joins.items()]
    lines += ["", "near misses:"]
    lines += [f"  {m.pattern} at {m.region}: {m.reason}" for m in report.near_misses] or ["  (none)"]
    lines += ["", "graph breaks:"]
    lines += [f"  {g.entry}: {g.reason} (x{g.count})" for g in report.graph_breaks] or ["  (none)"]
    if report.capture_failures:
        lines += ["", "capture failures (these run unoptimised):"]
        lines += [f"  {f.entry}: {f.error}" for f in report.capture_failures]
    return "\n".join(lines)


def _summarise(paths: list[str], limit: int = 4) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... (+{len(paths) - limit})" if len(paths) > limit else "")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
