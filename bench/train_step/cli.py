"""Command line of the training-step benchmark.

    python bench/train_step --shape llama-3.2-1b --mode lora [--systems hf,fastft,...] [--out DIR]
    python bench/train_step --shape llama-3.2-1b --mode lora --max-context [--ctx-min 1024 --ctx-max 131072]
    python bench/train_step --plot bench/results/train_llama-3.2-1b_lora.json
    python bench/train_step --combine run1/train_llama-3.1-8b_qlora.json run2/train_llama-3.1-8b_qlora.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .shapes import MODES, SHAPES
from .systems import EXTRA_SYSTEMS, SYSTEMS

ROOT = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    from .compare import DEFAULT_ORDER

    ap = argparse.ArgumentParser(prog="python bench/train_step", description=(
        "Whole training steps (forward, backward, AdamW) of random-weight models, one subprocess per "
        "system; results as JSON + Markdown (+ PNG where matplotlib imports)."))
    ap.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    ap.add_argument("--mode", choices=MODES, default="lora")
    ap.add_argument("--systems", default=",".join(DEFAULT_ORDER),
                    help=f"comma-separated, run in this order; known: {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g = ap.add_argument_group("step (defaults depend on shape and mode: see shapes.run_defaults)")
    g.add_argument("--batch", type=int)
    g.add_argument("--seq", type=int)
    g.add_argument("--warmup", type=int, help="untimed steps first (step 1 includes any compilation)")
    g.add_argument("--steps", type=int, help="timed steps after the warm-up")
    g.add_argument("--checkpointing", choices=["none", "layer"], help="gradient checkpointing, same for every system")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0, help="weights, adapters and data")
    g.add_argument("--rounds", type=int, default=1, help="run the systems this many times each, in alternating "
                   "order (a, b; b, a; ...), to show how much one system's step moves between processes")
    r = ap.add_argument_group("limits")
    r.add_argument("--timeout-s", type=int, help="one system's process (one probe's with --max-context)")
    r.add_argument("--prepare-timeout-s", type=int, help="building and saving the random-weight model")
    r.add_argument("--budget-s", type=float, default=540.0, help="the whole command (a device call has 600 s)")
    r.add_argument("--memory-cap-gib", type=float, help="torch.cuda.set_per_process_memory_fraction in each worker")
    m = ap.add_argument_group("max context")
    m.add_argument("--max-context", action="store_true", help="search each system's longest seq at batch 1")
    m.add_argument("--ctx-min", type=int, default=1024)
    m.add_argument("--ctx-max", type=int, default=131072)
    m.add_argument("--ctx-step", type=int, default=1024)
    o = ap.add_argument_group("output")
    o.add_argument("--out", help="folder for train_<shape>_<mode>[_maxctx].{json,md,png} (default: bench/results; "
                   "with --plot: the JSON's folder)")
    o.add_argument("--logs", help="keep each worker's output here (default: a temporary folder)")
    o.add_argument("--model-dir", help="where the random-weight model is saved and reused "
                   "(default: <tmp>/fastft_train_step/<shape>-seed<seed>)")
    o.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing results JSON")
    o.add_argument("--combine", nargs="+", metavar="JSON", help="merge results of the same shape + mode from "
                   "several runs (a later file's result for a system wins) into --out")
    o.add_argument("--no-plot", action="store_true", help="do not draw the PNG after a run")
    o.add_argument("--find-commit", metavar="JSON", help="only name the commit whose library code (fastft/, "
                   "kernels/, passes/, patterns/) a results JSON measured (bench/train_step/provenance.py)")
    o.add_argument("--profile", action="store_true", help="after the timed steps, profile 2 more under "
                   "torch.profiler; each system's top GPU kernels go to <logs>/<shape>_<mode>_<system>.profile.txt")
    o.add_argument("--memory-profile", action="store_true", help="after the timed steps, one more step under "
                   "the CUDA allocator's recorder; what is live at its peak, by allocating line, goes to "
                   "<logs>/<shape>_<mode>_<system>.memory.txt")
    o.add_argument("--worker", help=argparse.SUPPRESS)
    o.add_argument("--result", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        from .worker import run_worker

        return run_worker(args.worker, args.result)
    if args.plot:
        return _plot(Path(args.plot), Path(args.out) if args.out else None)
    if args.find_commit:
        return _find_commit(Path(args.find_commit))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS + EXTRA_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")

    from . import report

    if args.combine:
        from .combine import combine

        data = combine([Path(p) for p in args.combine])
        maxctx = data["benchmark"] == "train_step_max_context"
        stem = f"train_{data['shape']}_{data['mode']}" + ("_maxctx" if maxctx else "")
        md = report.max_context_markdown(data) if maxctx else report.compare_markdown(data)
    elif args.max_context:
        from .max_context import run_max_context

        data = run_max_context(args, systems)
        stem, md = f"train_{args.shape}_{args.mode}_maxctx", report.max_context_markdown(data)
    else:
        from .compare import run_compare

        data = run_compare(args, systems)
        stem, md = f"train_{args.shape}_{args.mode}", report.compare_markdown(data)
    j, m = report.write(Path(args.out or ROOT / "bench" / "results"), stem, data, md)
    print("\n" + md + f"\nwrote {j} and {m}")
    if not args.no_plot:
        _plot(j, None)
    return 0 if any(r.get("status", "ok") == "ok" or r.get("max_ok") for r in data["results"]) else 1


def _plot(json_path: Path, out: Path | None) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed here: draw the chart later with "
              f"`python bench/train_step --plot {json_path}` where it is")
        return 0 if json_path.exists() else 1
    from .plot import plot

    print(f"wrote {plot(json_path, out)}")
    return 0


def _find_commit(json_path: Path) -> int:
    from .provenance import find_commit

    trees = (json.loads(json_path.read_text()).get("git") or {}).get("library")
    if not trees:
        print(f"{json_path} records no library trees (a run from before they were recorded, or without git)")
        return 1
    commit = find_commit(trees)
    print(commit or "no commit among the last 1,000 of HEAD has this library code (uncommitted changes?)")
    return 0 if commit else 1
