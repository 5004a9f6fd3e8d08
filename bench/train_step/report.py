"""Results: the JSON (everything) and the Markdown table, with device, versions, command, date."""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from .provenance import describe, git_info
from .systems import package_versions

GIB = 2**30
MODE_TEXT = {
    "lora": "LoRA r16 alpha16 dropout 0 on q,k,v,o,gate,up,down (peft; bf16 base, peft's adapter dtype)",
    "qlora": "QLoRA: bitsandbytes 4-bit NF4 base with double quant, bf16 compute, the same LoRA",
    "full": "full fine-tuning (every parameter, bf16)",
}


def meta(args: Any, prep: dict[str, Any], systems: list[str]) -> dict[str, Any]:
    total = prep.get("total_memory_bytes")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": prep.get("device_name", prep.get("device")),
        "device_kind": prep.get("device"),
        "capability": prep.get("capability"),
        "total_memory_bytes": total,
        "memory_cap_gib": args.memory_cap_gib or (round(total / GIB, 2) if total else None),
        "memory_cap_source": "--memory-cap-gib" if args.memory_cap_gib else "the device's total memory",
        "torch_cuda": prep.get("torch_cuda"),
        "python": platform.python_version(),
        "versions": package_versions(systems),
        "git": git_info(),
    }


def write(out: Path, stem: str, data: dict[str, Any], md: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(data, indent=1, default=str) + "\n")
    m.write_text(md)
    return j, m


def _header(title: str, data: dict[str, Any]) -> list[str]:
    v = data["versions"]
    soft = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    missing = [k for k, val in v.items() if not val]
    git = data.get("git") or {}
    cap = data.get("memory_cap_gib")
    lines = [
        f"# {title}",
        "",
        f"- device: {data['device']}" + (f" (CUDA {data['torch_cuda']})" if data.get("torch_cuda") else "")
        + (f"; memory cap {cap} GiB ({data['memory_cap_source']})" if cap else "")
        + f"; date (UTC): {data['date_utc']}",
        f"- software: {soft}" + (f"; not installed: {', '.join(missing)}" if missing else "")
        + (f"; {describe(git)}" if git else ""),
        f"- command: `{data['command']}`",
    ]
    return lines


def _gib(x: Any) -> str:
    return f"{x / GIB:.2f}" if isinstance(x, (int, float)) else "-"


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def status_text(r: dict[str, Any]) -> str:
    s = r.get("status", "?")
    if s == "oom":
        return f"OOM (step {r.get('completed_steps', 0) + 1})" if "completed_steps" in r else "OOM (loading)"
    if s == "timeout":
        return f"timeout ({r.get('timeout_s', 0):.0f} s)"
    return s


def compare_markdown(data: dict[str, Any]) -> str:
    st = data["settings"]
    k_last = st["warmup"] + st["steps"]
    ckpt = {"none": "none", "layer": "each decoder layer (non-reentrant torch.utils.checkpoint)"}[st["checkpointing"]]
    lines = _header(f"Training step: {data['shape']}, {data['mode']}", data) + [
        f"- step: batch {st['batch']} x seq {st['seq']} = {st['batch'] * st['seq']} tokens; {MODE_TEXT[data['mode']]}; "
        f"bf16 weights, SDPA attention (Unsloth: its own); torch.optim.AdamW lr {st['lr']:g} over the trainable "
        f"parameters; random token ids (seed {st['seed']}), labels = input_ids; gradient checkpointing: {ckpt}",
        f"- {st['warmup']} warm-up + {st['steps']} timed steps, each system in its own process; step ms: median of the "
        "timed steps, the device synchronised before and after each; tokens/s = tokens per step / median step time; "
        "back-to-back ms: the timed steps' batches run once more with no synchronisation between steps (as a "
        "training loop runs them), the block's wall time per step",
        "- peak: torch.cuda.max_memory_allocated / max_memory_reserved from before step 1 (stats reset after loading) "
        "to the last step; steady peak: the same over steps 2 on (without capture and compilation); first step: from the model ready on the device through the end of step 1 (capture and "
        f"compilation included); loss @1: before any update (the same function for every system), @{k_last}: last step",
        "",
        f"| system | tokens/s | x vs hf | step ms | back-to-back ms | peak alloc GiB | steady peak GiB "
        f"| peak reserved GiB | first step s | loss @1 | loss @{k_last} | status |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    base = next((r.get("tokens_per_s") for r in data["results"] if r["system"] == "hf"), None)
    notes = []
    for r in data["results"]:
        tps = r.get("tokens_per_s")
        rel = f"{tps / base:.2f}x" if tps and base else "-"
        losses = r.get("losses") or []
        l1 = _num(losses[0], ".4f") if losses else "-"
        lk = _num(losses[k_last - 1], ".4f") if len(losses) >= k_last else "-"
        step_ms, b2b_ms = (r[k] * 1e3 if isinstance(r.get(k), (int, float)) else None
                           for k in ("step_s", "back_to_back_step_s"))
        lines.append(f"| {label(r)} | {_num(tps, ',.0f')} | {rel} | {_num(step_ms, '.1f')} | {_num(b2b_ms, '.1f')} | "
                     f"{_gib(r.get('peak_allocated_bytes'))} | {_gib(r.get('peak_allocated_steady_bytes'))} | "
                     f"{_gib(r.get('peak_reserved_bytes'))} | {_num(r.get('first_step_s'), '.2f')} | {l1} | {lk} | {status_text(r)} |")
        notes += _notes(r)
    if notes:
        lines += ["", "Notes:", ""] + notes
    lines += rounds_summary(data["results"])
    return "\n".join(lines) + "\n"


def label(r: dict[str, Any]) -> str:
    """A result's row name: the system, and its round where the systems ran several rounds."""
    return f"{r['system']} #{r['round']}" if "round" in r else r["system"]


def rounds_summary(results: list[dict[str, Any]]) -> list[str]:
    """With several rounds: each system's median step (and back-to-back step) per round and their
    median, and each round's ratio of every system's to the first's (rows of one round ran one
    after the other)."""
    rounds = sorted({r["round"] for r in results if "round" in r})
    if len(rounds) < 2:
        return []
    systems = list(dict.fromkeys(r["system"] for r in results))
    lines = ["", f"Rounds ({len(rounds)}, the order of the systems alternating):", ""]
    for key, what in (("step_s", "step"), ("back_to_back_step_s", "back-to-back step")):
        ms = {(r["system"], r["round"]): r[key] * 1e3 for r in results
              if r.get("status") == "ok" and isinstance(r.get(key), (int, float)) and "round" in r}
        if not ms:
            continue
        for system in systems:
            got = [ms[(system, i)] for i in rounds if (system, i) in ms]
            each = ", ".join(_num(ms.get((system, i)), ".1f") for i in rounds)
            lines.append(f"- {system}: {what} ms by round {each}"
                         + (f"; median {statistics.median(got):.1f}" if got else ""))
        first = systems[0]
        for system in systems[1:]:
            ratios = [ms[(system, i)] / ms[(first, i)] for i in rounds if (system, i) in ms and (first, i) in ms]
            if ratios:
                lines.append(f"- {system} {what} / {first} {what}, by round: "
                             + ", ".join(f"{x:.3f}" for x in ratios) + f"; median {statistics.median(ratios):.3f}")
    return lines


def step_spread(times_s: list[float]) -> str | None:
    """The timed steps' spread, and the median of their second half: a median among slow early
    steps (an allocator or autotuner settling) shows up as a gap between the two medians."""
    if len(times_s) < 4:
        return None
    ms = sorted(t * 1e3 for t in times_s)
    late = sorted(t * 1e3 for t in times_s[len(times_s) // 2:])
    return (f"step ms min {ms[0]:.1f}, median {statistics.median(ms):.1f}, max {ms[-1]:.1f}; "
            f"median of the last {len(late)} {statistics.median(late):.1f}")


def _notes(r: dict[str, Any]) -> list[str]:
    out = []
    name = label(r)
    spread = step_spread(r.get("step_times_s") or [])
    if spread:
        out.append(f"- {name}: {spread}")
    if r.get("error"):
        out.append(f"- {name}: {r['status']}: {r['error'].splitlines()[0][:400]}")
    if r.get("run_date_utc"):  # a table combined from several runs: say which run this row is from
        out.append(f"- {name}: from the run of {r['run_date_utc']}")
    rep = r.get("fastft_report")
    if rep:
        if "report_error" in rep:
            out.append(f"- {name}: report unavailable ({rep['report_error']})")
        else:
            out.append(f"- {name} rewrote {rep['rewrites'] or 'nothing'} in {rep['graphs_captured']} captured graph(s); "
                       f"{rep['graph_breaks']} graph break(s), {rep['near_misses']} near miss(es)"
                       + (f"; capture failed: {'; '.join(rep['capture_failures'])}" if rep["capture_failures"] else "")
                       + (f"; {rep['cudagraph_skips']} graph(s) Inductor did not record as CUDA graphs"
                          if rep.get("cudagraph_skips") else ""))
    info = r.get("info", {})
    if r.get("trainable_parameters"):
        out.append(f"- {name}: {r['trainable_parameters']:,} trainable parameters ({', '.join(r['trainable_dtypes'])}); "
                   f"{info.get('linears_4bit', 0)} 4-bit linears; {info.get('checkpointed_layers', 0)} layers with HF "
                   "gradient checkpointing" + (f", Unsloth use_gradient_checkpointing={info['unsloth_checkpointing']}"
                                               if "unsloth_checkpointing" in info else "")
                   + f"; setup (load + apply) {_num(r.get('setup_s'), '.1f')} s, process {_num(r.get('wall_s'), '.0f')} s")
    return out


def max_context_markdown(data: dict[str, Any]) -> str:
    st = data["settings"]
    lines = _header(f"Longest trainable sequence: {data['shape']}, {data['mode']}, batch 1", data) + [
        f"- one training step (forward, backward, AdamW step) at batch 1; {MODE_TEXT[data['mode']]}; gradient "
        f"checkpointing: {st['checkpointing']}; each probe a fresh process; searched over multiples of "
        f"{st['ctx_step']} from {st['ctx_min']} to {st['ctx_max']} (doubling, then bisection), "
        f"probe timeout {st['probe_timeout_s']} s, {st['budget_s']:.0f} s for the whole search",
        "",
        "| system | longest seq that trained | shortest that failed | probes | peak alloc GiB at the longest | note |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['system']} | {r.get('max_ok') or '-'} | {r.get('min_fail') or '-'} | {len(r.get('probes', []))} "
                     f"| {_gib(r.get('peak_allocated_bytes_at_max'))} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"
