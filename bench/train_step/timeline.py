"""Where a profiled step leaves the GPU idle.

The kernel table says how long the GPU worked; a step also holds the time the GPU waited on the
host (launches, guards, the optimizer's Python). This finds the gaps between consecutive kernels,
puts each in the step phase (zero_grad, forward, backward, optimizer, the closing synchronisation)
running on the host when the GPU started again, and names the innermost host op running then.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable

PHASES = ("step.zero_grad", "step.forward", "step.backward", "step.optimizer", "step.sync")


@dataclass(frozen=True)
class Span:
    start_us: float
    end_us: float
    name: str


@dataclass(frozen=True)
class Gap:
    start_us: float
    length_us: float
    phase: str  # the phase on the host when the GPU resumed; "outside" when none
    host_op: str  # the innermost host op at that moment
    next_kernel: str


def busy_union(kernels: Iterable[Span]) -> list[Span]:
    """Kernel intervals merged where they overlap (streams run side by side)."""
    merged: list[Span] = []
    for k in sorted(kernels, key=lambda s: s.start_us):
        if merged and k.start_us <= merged[-1].end_us:
            last = merged[-1]
            if k.end_us > last.end_us:
                merged[-1] = Span(last.start_us, k.end_us, last.name)
        else:
            merged.append(k)
    return merged


def _innermost(spans: list[Span], t: float) -> Span | None:
    return min((s for s in spans if s.start_us <= t <= s.end_us),
               key=lambda s: s.end_us - s.start_us, default=None)


def idle_gaps(kernels: list[Span], phases: list[Span], min_gap_us: float = 5.0) -> list[Gap]:
    """Gaps of at least min_gap_us between the GPU's busy intervals, from the first phase's start
    to the last phase's end (the time before the first kernel counts: the host was launching).
    host_op is left empty here: naming it is a scan of every host op, done for the longest only."""
    if not phases:
        return []
    t0 = min(p.start_us for p in phases)
    t1 = max(p.end_us for p in phases)
    busy = [b for b in busy_union(kernels) if b.end_us > t0 and b.start_us < t1]
    gaps = []
    prev_end = t0
    for b in busy + [Span(t1, t1, "(end of step)")]:
        length = b.start_us - prev_end
        if length >= min_gap_us:
            phase = _innermost(phases, b.start_us)
            gaps.append(Gap(prev_end, length, phase.name if phase else "outside", "", b.name))
        prev_end = max(prev_end, b.end_us)
    return gaps


def name_host_ops(gaps: list[Gap], host_ops: list[Span]) -> list[Gap]:
    """The gaps with host_op set: the innermost host op running when the GPU resumed."""
    out = []
    for g in gaps:
        op = _innermost(host_ops, g.start_us + g.length_us)
        out.append(Gap(g.start_us, g.length_us, g.phase, op.name if op else "-", g.next_kernel))
    return out


def summary(kernels: list[Span], phases: list[Span], host_ops: list[Span], steps: int,
            top: int = 15) -> str:
    """A text table: per step, wall time, GPU busy time, idle time by phase; then the longest gaps."""
    if not phases:
        return "no step phases recorded\n"
    t0 = min(p.start_us for p in phases)
    t1 = max(p.end_us for p in phases)
    busy = sum(min(b.end_us, t1) - max(b.start_us, t0) for b in busy_union(kernels)
               if b.end_us > t0 and b.start_us < t1)
    gaps = idle_gaps(kernels, phases)
    lines = [f"per step (mean of {steps}): wall {(t1 - t0) / steps / 1e3:.2f} ms, GPU busy "
             f"{busy / steps / 1e3:.2f} ms, idle in gaps of 5 us or more "
             f"{sum(g.length_us for g in gaps) / steps / 1e3:.2f} ms"]
    by_phase: dict[str, float] = {}
    for g in gaps:
        by_phase[g.phase] = by_phase.get(g.phase, 0.0) + g.length_us
    for name, us in sorted(by_phase.items(), key=lambda kv: -kv[1]):
        wall = sum(p.end_us - p.start_us for p in phases if p.name == name)
        lines.append(f"  idle while the host is in {name}: {us / steps / 1e3:.2f} ms per step"
                     + (f" (phase wall {wall / steps / 1e3:.2f} ms)" if wall else ""))
    lines.append(f"longest gaps (of {len(gaps)}):")
    lines.append("  gap us | phase | innermost host op when the GPU resumed | next kernel")
    for g in name_host_ops(sorted(gaps, key=lambda g: -g.length_us)[:top], host_ops):
        lines.append(f"  {g.length_us:8.1f} | {g.phase} | {g.host_op[:70]} | {g.next_kernel[:60]}")
    return "\n".join(lines) + "\n"


# Runtime calls that can hold the host until the GPU has caught up (a copy to pageable host memory
# returns only when the data is there). In steps run back to back, one of these in a phase keeps
# the host from running ahead, and the GPU then waits on the host's next launches.
WAIT_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync")


def host_waits(host_ops: list[Span], phases: list[Span], steps: int, min_us: float = 50.0) -> str:
    """Host calls in WAIT_CALLS that lasted ``min_us`` or more (shorter ones are taken as not
    having waited), by call and by the phase they ran in: count and host time per step."""
    rows: dict[tuple[str, str], list[float]] = {}
    for op in host_ops:
        length = op.end_us - op.start_us
        if op.name in WAIT_CALLS and length >= min_us:
            phase = _innermost(phases, op.start_us)
            rows.setdefault((op.name, phase.name if phase else "outside"), []).append(length)
    if not rows:
        return f"host calls that waited on the GPU ({min_us:.0f} us or more): none\n"
    lines = [f"host calls that waited on the GPU ({min_us:.0f} us or more), per step:"]
    for (name, phase), lengths in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {name} in {phase}: {len(lengths) / steps:.1f} calls, {sum(lengths) / steps / 1e3:.2f} ms "
                     f"(longest {max(lengths) / 1e3:.2f} ms)")
    return "\n".join(lines) + "\n"


def small_kernels(kernels: list[Span], steps: int, max_mean_us: float = 5.0, min_per_step: float = 16.0,
                  top: int = 8) -> str:
    """Kernels short on average (max_mean_us) and frequent (min_per_step), with the kernels that
    ran just before and just after them: a memset or a copy has no name of its own that says
    whose it is. Also the GPU's idle time in gaps under 5 us (the idle table's threshold), which
    grows with the number of kernels."""
    ordered = sorted(kernels, key=lambda s: s.start_us)
    stats: dict[str, list[float]] = defaultdict(list)
    before: dict[str, Counter] = defaultdict(Counter)
    after: dict[str, Counter] = defaultdict(Counter)
    small_gaps = 0.0
    for prev, k in zip([None] + ordered, ordered):
        stats[k.name].append(k.end_us - k.start_us)
        if prev is not None:
            gap = k.start_us - prev.end_us
            if 0 < gap < 5.0:
                small_gaps += gap
            before[k.name][prev.name] += 1
            after[prev.name][k.name] += 1
    lines = [f"kernels a step: {len(ordered) / steps:.0f}; GPU idle in gaps under 5 us: "
             f"{small_gaps / steps / 1e3:.2f} ms a step",
             f"short frequent kernels (mean under {max_mean_us:.0f} us, {min_per_step:.0f}+ a step), "
             f"what ran before them and after:"]
    rows = [(name, times) for name, times in stats.items()
            if len(times) / steps >= min_per_step and sum(times) / len(times) < max_mean_us]

    def top3(counts: Counter) -> str:
        return ", ".join(f"{n[:50]} ({c / steps:.0f})" for n, c in counts.most_common(3))

    for name, times in sorted(rows, key=lambda r: -sum(r[1]))[:top]:
        lines.append(f"  {name[:60]}: {len(times) / steps:.0f} a step, {sum(times) / len(times):.2f} us mean")
        lines.append(f"    before: {top3(before[name])}")
        lines.append(f"    after: {top3(after[name])}")
    return "\n".join(lines) + "\n"


def from_profiler(prof, steps: int) -> str:
    """summary() and host_waits() over a finished torch.profiler run whose steps were marked with
    PHASES."""
    from torch.autograd import DeviceType

    kernels, phases, host = [], [], []
    for e in prof.events():
        span = Span(e.time_range.start, e.time_range.end, e.name)
        if e.device_type == DeviceType.CUDA:
            # Ranges the profiler marks on the device (record_function, "## Call CompiledFxGraph")
            # span whole graphs, gaps included: only kernels, copies and memsets count as work.
            if not (e.is_user_annotation or e.name.startswith("## ") or e.name in PHASES):
                kernels.append(span)
        elif e.name in PHASES:
            phases.append(span)
        elif e.time_range.end > e.time_range.start:
            host.append(span)
    return summary(kernels, phases, host, steps) + host_waits(host, phases, steps) + small_kernels(kernels, steps)
