"""Merge results of the same shape + mode from several runs (e.g. one device call per system):
``python bench/train_step --combine a.json b.json [--out DIR]``. A later file's result for a
system replaces an earlier one's; each result keeps the command and date of its own run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_SAME = ("benchmark", "shape", "mode", "device")


def combine(paths: list[Path]) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]
    for p, r in zip(paths[1:], runs[1:]):
        diff = [k for k in _SAME if r.get(k) != first.get(k)]
        diff += [f"settings.{k}" for k in set(first["settings"]) | set(r["settings"])
                 if k not in ("timeout_s", "prepare_timeout_s", "budget_s", "probe_timeout_s")
                 and first["settings"].get(k) != r["settings"].get(k)]
        if diff:
            raise SystemExit(f"{p} differs from {paths[0]} in {', '.join(diff)}: not the same comparison")
    by_system: dict[str, dict[str, Any]] = {}
    for r in runs:
        for res in r["results"]:
            by_system[res["system"]] = {**res, "run_command": r["command"], "run_date_utc": r["date_utc"]}
    order = [s for r in runs for s in r["systems"]]
    systems = list(dict.fromkeys(s for s in order if s in by_system))
    versions: dict[str, Any] = {}
    for r in runs:
        versions.update({k: v for k, v in r["versions"].items() if v or k not in versions})
    return {**runs[-1], "systems": systems, "results": [by_system[s] for s in systems], "versions": versions,
            "command": " + ".join(dict.fromkeys(r["command"] for r in runs)),
            "date_utc": " / ".join(dict.fromkeys(r["date_utc"] for r in runs)),
            "combined_from": [{"command": r["command"], "date_utc": r["date_utc"], "systems": r["systems"]}
                              for r in runs]}
