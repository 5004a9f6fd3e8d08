"""Where a training step's peak memory goes: ``--memory-profile``.

One more step runs under the CUDA caching allocator's history recorder; the recorded allocs and
frees are replayed to find the moment of the peak, and the blocks live at that moment are summed
by the line of Python that allocated them (inside fastft's kernels, Inductor's generated code,
peft, bitsandbytes, transformers: the first frame outside torch's own dispatch machinery).
"""
from __future__ import annotations

import linecache
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

GIB = 2**30
_MACHINERY = ("/torch/", "/triton/", "/contextlib.py", "/functools.py", "<frozen", "/unsloth_zoo/compiler")


def profile_memory(path: str, step: Callable[[], Any], top: int = 30) -> dict[str, Any]:
    """Run ``step`` once under the allocator recorder; write the peak's breakdown to ``path``."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=2_000_000)
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    trace = [e for dev in snapshot["device_traces"] for e in dev]
    summary = peak_breakdown(trace, baseline)
    summary["max_memory_allocated_bytes"] = peak
    Path(path).write_text(render(summary, top))
    return {"baseline_bytes": baseline, "peak_bytes": summary["peak_bytes"],
            "top": summary["sites"][:top]}


def peak_breakdown(trace: list[dict[str, Any]], baseline: int) -> dict[str, Any]:
    """Replay alloc / free events from ``baseline`` bytes; the blocks live at the highest point,
    grouped by allocating site. A free of a block allocated before recording lowers the baseline."""
    live: dict[int, dict[str, Any]] = {}
    current = best = baseline
    base_now, best_base, best_live = baseline, baseline, {}
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            current += e["size"]
            if current > best:
                best, best_live, best_base = current, dict(live), base_now
        elif action == "free_completed":
            if live.pop(e["addr"], None) is None:
                base_now -= e["size"]
            current -= e["size"]
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in best_live.values():
        s = sites[site(e.get("frames", []))]
        s[0] += e["size"]
        s[1] += 1
    ranked = sorted(({"site": k, "bytes": v[0], "blocks": v[1]} for k, v in sites.items()),
                    key=lambda r: -r["bytes"])
    return {"baseline_bytes": baseline, "baseline_at_peak_bytes": best_base, "peak_bytes": best,
            "allocated_in_step_at_peak_bytes": best - best_base, "sites": ranked}


def site(frames: list[dict[str, Any]]) -> str:
    """The first frame (innermost first) outside torch's and triton's own code, with its source
    line, and its caller's name: enough to tell a saved activation from a kernel's workspace."""
    for i, f in enumerate(frames):
        name = f.get("filename", "")
        if any(m in name for m in _MACHINERY) and "torchinductor" not in name:
            continue
        src = linecache.getline(name, f.get("line", 0)).strip()[:90]
        caller = next((g.get("name") for g in frames[i + 1:]
                       if not any(m in g.get("filename", "") for m in _MACHINERY)), "?")
        return f"{_short(name)}:{f.get('line')} {f.get('name')} <- {caller} | {src}"
    return "(no Python frame outside torch)" if frames else "(no frames recorded)"


def _short(filename: str) -> str:
    parts = Path(filename).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else filename


def render(summary: dict[str, Any], top: int) -> str:
    lines = [f"peak while replaying one step: {summary['peak_bytes'] / GIB:.2f} GiB "
             f"(torch.cuda.max_memory_allocated: {summary['max_memory_allocated_bytes'] / GIB:.2f} GiB)",
             f"live before the step: {summary['baseline_bytes'] / GIB:.2f} GiB; of it still live at the peak: "
             f"{summary['baseline_at_peak_bytes'] / GIB:.2f} GiB; allocated during the step and live at the peak: "
             f"{summary['allocated_in_step_at_peak_bytes'] / GIB:.2f} GiB", "",
             f"{'GiB':>8} {'blocks':>7}  allocated at"]
    for r in summary["sites"][:top]:
        lines.append(f"{r['bytes'] / GIB:8.3f} {r['blocks']:7d}  {r['site']}")
    rest = summary["sites"][top:]
    if rest:
        lines.append(f"{sum(r['bytes'] for r in rest) / GIB:8.3f} {sum(r['blocks'] for r in rest):7d}  "
                     f"({len(rest)} more sites)")
    return "\n".join(lines) + "\n"
