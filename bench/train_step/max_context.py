"""The longest sequence each system trains for one step at batch 1 without running out of memory.

Each probe is a fresh process (one forward, backward and AdamW step at batch 1, sequence L):
after an out-of-memory error an allocator is not a fair witness for the next length. The search
doubles L from --ctx-min until a probe fails or --ctx-max is reached, then bisects between the
longest length that trained and the shortest that failed, over multiples of --ctx-step. The time
budget is shared out between the systems still to search; a search cut short reports its bracket.
"""
from __future__ import annotations

from typing import Any

from . import report, runner
from .compare import Session, settings
from .shapes import CONFIGS


def run_max_context(args: Any, systems: list[str]) -> dict[str, Any]:
    st = settings(args)
    step = args.ctx_step
    st.update(ctx_min=_round(args.ctx_min, step), ctx_max=_round(args.ctx_max, step), ctx_step=step,
              probe_timeout_s=st["timeout_s"], batch=1, warmup=0, steps=1)
    s = Session(args, st)
    prep = s.prepare()
    results = []
    for i, system in enumerate(systems):
        if prep["status"] != "ok":
            results.append({"system": system, "note": f"model preparation {prep['status']}: {prep.get('error', '')}",
                            "probes": []})
            continue
        share = runner.Budget(s.budget.left() / (len(systems) - i))
        results.append(_search(s, system, share, st))
    return {"benchmark": "train_step_max_context", "shape": args.shape, "mode": args.mode, "systems": systems,
            **report.meta(args, prep, systems), "settings": st, "config": CONFIGS[args.shape][1],
            "logs": str(s.logs), "results": results}


def _round(n: int, step: int) -> int:
    return max(step, (n // step) * step)


def _search(s: Session, system: str, budget: runner.Budget, st: dict[str, Any]) -> dict[str, Any]:
    step, hi_bound = st["ctx_step"], st["ctx_max"]
    out: dict[str, Any] = {"system": system, "max_ok": None, "min_fail": None, "probes": []}
    failing: dict[str, Any] = {}

    def probe(seq: int) -> str | None:
        timeout = min(budget.timeout(st["probe_timeout_s"], reserve=1), s.budget.timeout(st["probe_timeout_s"]))
        if timeout < 15:
            return None
        print(f"[train_step] {system}: seq {seq} (timeout {timeout:.0f} s) ...", flush=True)
        # One step per probe, as before: a probe measures its memory, not a second step's.
        r = runner.run(s.train_spec(system, 1, seq, 0, 1, back_to_back=False),
                       f"{s.args.shape}_{s.args.mode}_{system}_ctx{seq}", timeout, s.work, s.logs, s.device)
        out["probes"].append({"seq": seq, "status": r.get("status"), "wall_s": r.get("wall_s"),
                              "peak_allocated_bytes": r.get("peak_allocated_bytes"),
                              "peak_reserved_bytes": r.get("peak_reserved_bytes"),
                              "step_s": r.get("step_s"), "error": (r.get("error") or "").splitlines()[:1]})
        print(f"[train_step]   {report.status_text(r)} in {r.get('wall_s', 0):.0f} s", flush=True)
        if r.get("status") == "ok":
            out["max_ok"] = seq
            out["peak_allocated_bytes_at_max"] = r.get("peak_allocated_bytes")
            out["peak_reserved_bytes_at_max"] = r.get("peak_reserved_bytes")
        else:
            if r.get("status") != "unavailable":
                out["min_fail"] = seq
            failing.clear()
            failing.update(r)
        return r.get("status")

    seq, status = st["ctx_min"], None
    while True:  # doubling
        status = probe(seq)
        if status != "ok" or seq >= hi_bound:
            break
        seq = min(_round(seq * 2, step), hi_bound)
    while status is not None and status != "unavailable" and out["max_ok"] and out["min_fail"] \
            and out["min_fail"] - out["max_ok"] > step:  # bisection
        seq = max(out["max_ok"] + step, _round((out["max_ok"] + out["min_fail"]) // 2, step))
        status = probe(seq)
    out["note"] = _note(out, status, failing, st)
    return out


def _note(out: dict[str, Any], status: str | None, failing: dict[str, Any], st: dict[str, Any]) -> str:
    if failing.get("status") == "unavailable":
        return f"unavailable: {failing.get('error', '')[:200]}"
    parts = []
    if out["max_ok"] == st["ctx_max"]:
        parts.append("trained at the upper bound (--ctx-max): the real limit is higher")
    if failing and failing.get("status") != "oom":
        parts.append(f"the failure at {out['min_fail']} was {report.status_text(failing)}, not OOM: "
                     f"{(failing.get('error') or '').splitlines()[0][:200] if failing.get('error') else ''}")
    if status is None:
        parts.append("time budget spent before the search converged")
    if out["max_ok"] is None and out["min_fail"] == st["ctx_min"]:
        parts.append("did not train at the lower bound (--ctx-min)")
    return "; ".join(parts)
