"""One shape + mode: every system's training steps side by side (one subprocess each)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from . import report, runner
from .shapes import CONFIGS, run_defaults

# torch.compile runs last by default: its compile time is the least predictable of the five,
# and what it leaves of the time budget would otherwise be taken from the others.
DEFAULT_ORDER = ("hf", "fastft", "liger", "unsloth", "compile")
PREPARE_TAG = "prepare"


def settings(args: Any) -> dict[str, Any]:
    d = run_defaults(args.shape, args.mode)
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else getattr(d, name)  # noqa: E731
    return {"batch": pick("batch"), "seq": pick("seq"), "warmup": pick("warmup"), "steps": pick("steps"),
            "checkpointing": pick("checkpointing"), "timeout_s": pick("timeout_s"),
            "prepare_timeout_s": pick("prepare_timeout_s"), "lr": args.lr, "seed": args.seed,
            "budget_s": args.budget_s, "optimizer": "torch.optim.AdamW", "dtype": "bfloat16"}


def model_dir(args: Any) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    return Path(tempfile.gettempdir()) / "fastft_train_step" / f"{args.shape}-seed{args.seed}"


class Session:
    """The work and log folders, the time budget, and the saved model every worker loads."""

    def __init__(self, args: Any, st: dict[str, Any]) -> None:
        self.args, self.st = args, st
        self.budget = runner.Budget(st["budget_s"])
        self.work = Path(tempfile.mkdtemp(prefix="train_step_"))
        self.logs = Path(args.logs) if args.logs else self.work / "logs"
        self.model_dir = model_dir(args)
        self.device = args.device  # "auto" until the prepare worker has looked
        self.prep: dict[str, Any] = {}

    def prepare(self) -> dict[str, Any]:
        spec = {"kind": "prepare", "shape": self.args.shape, "seed": self.st["seed"],
                "model_dir": str(self.model_dir), "device": self.args.device}
        print(f"[train_step] preparing {self.args.shape} (random weights) in {self.model_dir} ...", flush=True)
        self.prep = runner.run(spec, f"{self.args.shape}_{PREPARE_TAG}", self.budget.timeout(self.st["prepare_timeout_s"]),
                               self.work, self.logs, self.args.device)
        if self.prep.get("device"):
            self.device = self.prep["device"]
        print(f"[train_step]   {self.prep['status']} in {self.prep['wall_s']:.0f} s on {self.prep.get('device_name')}"
              + (f": {self.prep.get('error')}" if self.prep["status"] != "ok" else ""), flush=True)
        return self.prep

    def train_spec(self, system: str, batch: int, seq: int, warmup: int, steps: int,
                   tag: str | None = None, back_to_back: bool = True) -> dict[str, Any]:
        """One worker's spec; ``tag`` names its profile files (default: shape, mode and system).
        ``back_to_back``: time the timed steps' batches once more without synchronising between
        steps (worker._back_to_back)."""
        tag = tag or f"{self.args.shape}_{self.args.mode}_{system}"
        return {"kind": "train", "system": system, "shape": self.args.shape, "mode": self.args.mode,
                "model_dir": str(self.model_dir), "device": self.device, "batch": batch, "seq": seq,
                "warmup": warmup, "steps": steps, "back_to_back": back_to_back,
                "checkpointing": self.st["checkpointing"], "lr": self.st["lr"],
                "seed": self.st["seed"], "vocab": CONFIGS[self.args.shape][1]["vocab_size"],
                "memory_cap_gib": self.args.memory_cap_gib,
                "profile": str(self.logs / f"{tag}.profile.txt") if getattr(self.args, "profile", False) else None,
                "memory_profile": str(self.logs / f"{tag}.memory.txt")
                if getattr(self.args, "memory_profile", False) else None}


def run_compare(args: Any, systems: list[str]) -> dict[str, Any]:
    st = settings(args)
    s = Session(args, st)
    prep = s.prepare()
    rounds = max(1, args.rounds)
    results = []
    for i in range(rounds):
        # Alternating order (a, b; b, a; ...): a system does not always run first on a cold machine.
        for system in (systems if i % 2 == 0 else systems[::-1]):
            r = _run_system(s, st, system, f"{args.shape}_{args.mode}_{system}" + (f"_r{i + 1}" if rounds > 1 else ""),
                            prep)
            if rounds > 1:
                r["round"] = i + 1
            results.append(r)
    data = {"benchmark": "train_step", "shape": args.shape, "mode": args.mode, "systems": systems,
            **report.meta(args, prep, systems), "settings": {**st, "rounds": rounds},
            "config": CONFIGS[args.shape][1], "model": {k: prep.get(k) for k in ("model_dir", "parameters", "reused", "build_s")},
            "logs": str(s.logs), "results": results}
    return data


def _run_system(s: Session, st: dict[str, Any], system: str, tag: str, prep: dict[str, Any]) -> dict[str, Any]:
    if prep["status"] != "ok":
        return {"system": system, "status": "skipped", "error": f"model preparation {prep['status']}: "
                f"{prep.get('error', '')}"}
    timeout = s.budget.timeout(st["timeout_s"])
    if s.budget.timeout(20) < 20:
        return {"system": system, "status": "skipped", "error": "the time budget (--budget-s) was spent"}
    print(f"[train_step] {system}: {st['warmup']} + {st['steps']} steps of {st['batch']} x {st['seq']} "
          f"(timeout {timeout:.0f} s) ...", flush=True)
    t0 = time.monotonic()
    r = runner.run(s.train_spec(system, st["batch"], st["seq"], st["warmup"], st["steps"], tag),
                   tag, timeout, s.work, s.logs, s.device)
    r["system"] = system
    tps = r.get("tokens_per_s")
    print(f"[train_step]   {report.status_text(r)} in {time.monotonic() - t0:.0f} s"
          + (f": {tps:,.0f} tokens/s, step {r['step_s'] * 1e3:.1f} ms" if tps else "")
          + (f", back to back {r['back_to_back_step_s'] * 1e3:.1f} ms" if r.get("back_to_back_step_s") else "")
          + (f", peak {r['peak_allocated_bytes'] / report.GIB:.2f} GiB" if r.get("peak_allocated_bytes") else "")
          + (f": {r.get('error', '')[:300]}" if r.get("status") != "ok" else ""), flush=True)
    return r
