"""Running workers: one subprocess per measured run, with a timeout and a shared time budget.

A worker gets the parent's environment unchanged (on the GPU machine, PYTHONPATH points at the
wheels installed under /tmp/site); only where there is no GPU is TRITON_INTERPRET=1 added, so that
fastft's kernels run through Triton's interpreter. Its output goes to a log file, its result to a
JSON file it rewrites after every step: a run that is killed at its timeout still shows how far
it got. A timeout kills the worker's whole process group (Inductor compiles in child processes).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent  # run as a script directory: python bench/train_step


class Budget:
    """The time left for the whole command (a device call is limited to 10 minutes)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, wanted: float, reserve: float = 5.0) -> float:
        return max(0.0, min(wanted, self.left() - reserve))


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def run(spec: dict[str, Any], tag: str, timeout_s: float, workdir: Path, logdir: Path,
        device: str) -> dict[str, Any]:
    """Run one worker; return its result dict, with status ok | oom | error | unavailable |
    timeout | crash, and ``wall_s``."""
    workdir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    spec_file, result_file, log_file = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json", logdir / f"{tag}.log"
    spec_file.write_text(json.dumps(spec, indent=1))
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(PACKAGE_DIR), "--worker", str(spec_file), "--result", str(result_file)]
    t0 = time.monotonic()
    timed_out = False
    with open(log_file, "w") as log:
        # cwd: Unsloth writes its compiled cache into the working directory
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(device), cwd=str(workdir), start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _kill_group(proc)
    wall = time.monotonic() - t0
    result = _read(result_file)
    done = f" after {result['completed_steps']} finished step(s)" if "completed_steps" in result else \
        (" while loading" if result.get("kind") == "train" else "")
    if timed_out:
        result.update(status="timeout", error=f"no result within its timeout of {timeout_s:.0f} s{done} (killed)")
    elif "status" not in result or result.get("status") == "running":
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        result.update(status="crash", error=f"the worker process ended without a result{done} ({how})")
    result.update(wall_s=round(wall, 2), timeout_s=round(timeout_s, 1), returncode=rc, log=str(log_file))
    if result["status"] not in ("ok", "unavailable"):
        result["log_tail"] = _tail(log_file)
    return result


def _kill_group(proc: subprocess.Popen) -> int:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)  # the group this harness started for the worker
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode if proc.returncode is not None else -9


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, n: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:]
