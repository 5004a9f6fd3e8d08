"""A PNG of a results JSON: ``python bench/train_step --plot bench/results/train_<shape>_<mode>.json``.
Needs matplotlib (the dev machine has it; the GPU machine may not): a separate step."""
from __future__ import annotations

import json
from pathlib import Path

from .report import label

GIB = 2**30


def plot(json_path: Path, out_dir: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    png = (out_dir or json_path.parent) / (json_path.stem + ".png")
    rows = data["results"]
    names = [label(r) for r in rows]
    title = f"{data['shape']}, {data['mode']} on {data.get('device')}"
    if data.get("benchmark") == "train_step_max_context":
        fig, ax = plt.subplots(figsize=(7, 4))
        vals = [r.get("max_ok") or 0 for r in rows]
        bars = ax.bar(names, vals, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:,}" if v else "-" for v in vals], fontsize=8)
        ax.set_ylabel("longest sequence trained (tokens, batch 1)")
        cap = data.get("memory_cap_gib")
        ax.set_title(f"{title}\nmemory cap {cap} GiB" if cap else title, fontsize=10)
    else:
        st = data["settings"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        tps = [r.get("tokens_per_s") or 0 for r in rows]
        bars = a1.bar(names, tps, color="tab:blue")
        a1.bar_label(bars, labels=[f"{v:,.0f}" if v else r.get("status", "") for v, r in zip(tps, rows)], fontsize=8)
        a1.set_ylabel("tokens/s (higher is better)")
        a1.set_title(f"throughput, batch {st['batch']} x {st['seq']}", fontsize=10)
        x = range(len(names))
        alloc = [(r.get("peak_allocated_bytes") or 0) / GIB for r in rows]
        resv = [(r.get("peak_reserved_bytes") or 0) / GIB for r in rows]
        a2.bar([i - 0.2 for i in x], alloc, width=0.4, label="peak allocated", color="tab:orange")
        a2.bar([i + 0.2 for i in x], resv, width=0.4, label="peak reserved", color="tab:gray")
        a2.set_xticks(list(x), names)
        a2.set_ylabel("GiB (lower is better)")
        a2.set_title(f"peak memory, checkpointing {st['checkpointing']}", fontsize=10)
        a2.legend(fontsize=8)
        if not any(alloc):
            a2.text(0.5, 0.5, "no device memory statistics (CPU run)", ha="center", transform=a2.transAxes)
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
