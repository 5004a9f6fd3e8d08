"""bench/train_step: the CPU smoke run (hf and fastft train the same tiny LoRA model in their own
processes), the max-context search logic, and a worker killed at its timeout."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bench" / "train_step"


def _package():
    """bench/train_step as the package ``train_step``, as its __main__ loads it (bench/ is not put
    on sys.path: bench/kernels.py would shadow the Hugging Face ``kernels`` package)."""
    if "train_step" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_step", PKG / "__init__.py",
                                                      submodule_search_locations=[str(PKG)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["train_step"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["train_step"]


def test_smoke_hf_and_fastft_train_the_same_tiny_lora(tmp_path):
    cmd = [sys.executable, str(PKG), "--shape", "tiny", "--mode", "lora", "--device", "cpu",
           "--systems", "hf,fastft", "--warmup", "0", "--steps", "2", "--seq", "32", "--batch", "2",
           "--out", str(tmp_path), "--model-dir", str(tmp_path / "model"), "--timeout-s", "120", "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "train_tiny_lora.json").read_text())
    assert (tmp_path / "train_tiny_lora.md").exists()
    results = {r["system"]: r for r in data["results"]}
    assert set(results) == {"hf", "fastft"}
    for name, r in results.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("log_tail"))
        assert len(r["step_times_s"]) == 2 and all(math.isfinite(t) and t > 0 for t in r["step_times_s"])
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["first_step_s"] > 0 and len(r["losses"]) == 2
        # the timed batches once more, back to back: two more steps, their losses still finite
        assert math.isfinite(r["back_to_back_step_s"]) and r["back_to_back_step_s"] > 0
        assert len(r["back_to_back_losses"]) == 2 and all(map(math.isfinite, r["back_to_back_losses"]))
    for step, (a, b) in enumerate(zip(results["hf"]["losses"], results["fastft"]["losses"]), 1):
        assert math.isfinite(a) and abs(a - b) <= 1e-3 * abs(a), f"step {step}: hf {a} vs fastft {b}"
    assert data["settings"]["checkpointing"] == "none" and data["versions"]["torch"]


def test_max_context_search_doubles_then_bisects(monkeypatch):
    pkg = _package()
    import train_step.max_context as mc
    from train_step import runner

    limit, seen = 5000, []

    def fake_run(spec, tag, timeout_s, workdir, logdir, device):
        seen.append(spec["seq"])
        assert spec["batch"] == 1 and spec["warmup"] == 0 and spec["steps"] == 1
        assert not spec["back_to_back"]  # a probe is one step: its memory, not a second one's
        ok = spec["seq"] <= limit
        return {"status": "ok" if ok else "oom", "wall_s": 0.1, "peak_allocated_bytes": spec["seq"] * 1000,
                "error": None if ok else "OutOfMemoryError: CUDA out of memory"}

    monkeypatch.setattr(runner, "run", fake_run)

    class S:  # the parts of a Session the search uses
        args = type("A", (), {"shape": "tiny", "mode": "lora"})()
        budget = runner.Budget(600)
        work = logs = Path(tempfile.gettempdir())
        device = "cuda"

        def train_spec(self, system, batch, seq, warmup, steps, back_to_back=True):
            return {"system": system, "batch": batch, "seq": seq, "warmup": warmup, "steps": steps,
                    "back_to_back": back_to_back}

    st = {"ctx_min": 1024, "ctx_max": 65536, "ctx_step": 1024, "probe_timeout_s": 100}
    out = mc._search(S(), "hf", runner.Budget(600), st)
    assert seen == [1024, 2048, 4096, 8192, 6144, 5120]
    assert out["max_ok"] == 4096 and out["min_fail"] == 5120 and out["note"] == ""
    assert pkg is sys.modules["train_step"]


def test_worker_past_its_timeout_is_killed_and_recorded(tmp_path):
    _package()
    from train_step import runner

    spec = {"kind": "prepare", "shape": "tiny", "seed": 0, "model_dir": str(tmp_path / "m"), "device": "cpu"}
    r = runner.run(spec, "slow", 0.5, tmp_path, tmp_path / "logs", "cpu")
    assert r["status"] == "timeout" and "timeout" in r["error"] and r["wall_s"] < 60


def test_memory_peak_replay_finds_the_live_blocks_at_the_highest_point():
    _package()
    memory = importlib.import_module("train_step.memory")
    here = str(ROOT / "bench" / "train_step" / "memory.py")
    act = [{"filename": here, "line": 1, "name": "save_activation"}]
    tmp = [{"filename": "/x/torch/_ops.py", "line": 5, "name": "__call__"},
           {"filename": here, "line": 2, "name": "workspace"}]
    trace = [
        {"action": "free_completed", "addr": 99, "size": 40},  # a gradient from before the step
        {"action": "alloc", "addr": 1, "size": 100, "frames": act},
        {"action": "alloc", "addr": 2, "size": 300, "frames": tmp},
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 3, "size": 50, "frames": act},
        {"action": "alloc", "addr": 4, "size": 200, "frames": tmp},  # 1000 - 40 + 100 + 50 + 200 = 1310
        {"action": "free_completed", "addr": 4, "size": 200},
    ]
    s = memory.peak_breakdown(trace, baseline=1000)
    assert s["peak_bytes"] == 1360  # 1000 - 40 + 100 + 300, above the later 1310
    assert s["baseline_at_peak_bytes"] == 960
    assert s["allocated_in_step_at_peak_bytes"] == 400
    by_site = {r["site"].split(" <-")[0]: r for r in s["sites"]}
    assert by_site["train_step/memory.py:2 workspace"]["bytes"] == 300  # torch's frame skipped, the caller named
    assert by_site["train_step/memory.py:1 save_activation"]["blocks"] == 1


def test_timeline_finds_idle_gaps_and_the_phase_that_ended_them():
    _package()
    timeline = importlib.import_module("train_step.timeline")
    S = timeline.Span
    phases = [S(0, 10, "step.zero_grad"), S(10, 100, "step.forward"), S(100, 200, "step.backward")]
    kernels = [S(30, 60, "fwd_a"), S(55, 80, "fwd_b"),  # overlapping: one busy interval 30-80
               S(82, 90, "fwd_c"),  # 2 us after: below the 5 us threshold
               S(150, 190, "bwd")]
    host = [S(100, 200, "autograd"), S(140, 151, "launch")]
    gaps = timeline.idle_gaps(kernels, phases)
    assert [(g.start_us, g.length_us, g.phase, g.next_kernel) for g in gaps] == [
        (0, 30, "step.forward", "fwd_a"), (90, 60, "step.backward", "bwd"), (190, 10, "step.backward", "(end of step)")]
    named = timeline.name_host_ops(gaps, host)
    assert named[1].host_op == "launch"  # the innermost op covering t=150
    text = timeline.summary(kernels, phases, host, steps=1)
    assert "GPU busy 0.10 ms" in text and "idle in gaps of 5 us or more 0.10 ms" in text


def test_host_waits_counts_long_synchronising_calls_by_phase():
    _package()
    timeline = importlib.import_module("train_step.timeline")
    S = timeline.Span
    phases = [S(0, 1000, "step.forward"), S(1000, 3000, "step.backward"),
              S(3000, 4000, "step.forward"), S(4000, 6000, "step.backward")]
    host = [S(100, 900, "cudaStreamSynchronize"), S(3100, 3500, "cudaStreamSynchronize"),  # 1.2 ms in 2 steps
            S(1500, 1510, "cudaMemcpyAsync"),  # 10 us: below the threshold, it did not wait
            S(4500, 4700, "cudaMemcpyAsync"),
            S(2000, 2900, "cudaLaunchKernel")]  # long, but not a call that waits
    text = timeline.host_waits(host, phases, steps=2)
    assert "cudaStreamSynchronize in step.forward: 1.0 calls, 0.60 ms (longest 0.80 ms)" in text
    assert "cudaMemcpyAsync in step.backward: 0.5 calls, 0.10 ms (longest 0.20 ms)" in text
    assert "cudaLaunchKernel" not in text
    assert text.index("cudaStreamSynchronize") < text.index("cudaMemcpyAsync")  # the larger total first
    assert "none" in timeline.host_waits(host[2:3], phases, steps=2)


def test_small_kernels_names_what_ran_before_frequent_short_kernels():
    _package()
    timeline = importlib.import_module("train_step.timeline")
    S = timeline.Span
    kernels = []
    for step in range(2):  # per step: gemm, memset 1 us later, gemm, 10 us later a long kernel
        t = step * 1000.0
        kernels += [S(t, t + 50, "gemm"), S(t + 51, t + 52, "Memset"), S(t + 52, t + 100, "gemm"),
                    S(t + 110, t + 400, "attention")]
    text = timeline.small_kernels(kernels, steps=2, min_per_step=1)
    assert "kernels a step: 4" in text
    assert "gaps under 5 us: 0.00 ms" in text  # 1 us a step: 0.001 ms; the 10 us gap does not count
    assert "Memset: 1 a step, 1.00 us mean\n    before: gemm (1)\n    after: gemm (1)" in text
    assert "attention:" not in text and "gemm:" not in text  # long on average


def test_step_spread_shows_a_median_among_slow_early_steps():
    _package()
    report = importlib.import_module("train_step.report")
    times = [0.127, 0.123, 0.125, 0.116, 0.117, 0.105, 0.104, 0.106]  # slow first half, then steady
    text = report.step_spread(times)
    assert "min 104.0" in text and "max 127.0" in text
    assert "median 116.5" in text and "median of the last 4 105.5" in text
    assert report.step_spread([0.1, 0.1, 0.1]) is None  # too few steps to say anything


def test_library_trees_name_the_commit_whose_code_ran(tmp_path):
    """A results file records the library directories' git trees as the files stand; they match
    the commit with that code, whatever commit the copy's .git names, and no other."""
    _package()
    provenance = importlib.import_module("train_step.provenance")
    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    (repo / "bench").mkdir()

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "kernels" / "a.py").write_text("x = 1\n")
    (repo / "bench" / "b.py").write_text("y = 1\n")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    first = git("rev-parse", "--short", "HEAD")
    (repo / "kernels" / "a.py").write_text("x = 2\n")
    git("commit", "-q", "-am", "second")
    second = git("rev-parse", "--short", "HEAD")

    info = provenance.git_info(repo)
    assert info["library"] == provenance.commit_trees(second, repo) and info["library_as_in_commit"]
    # The files go back to the first commit's code (the copy's .git still names the second), and a
    # bench file changes: the library is the first commit's, and the repository's index is untouched.
    (repo / "kernels" / "a.py").write_text("x = 1\n")
    (repo / "bench" / "b.py").write_text("y = 2\n")
    info = provenance.git_info(repo)
    assert info["commit"] == second and info["dirty"] and not info["library_as_in_commit"]
    assert provenance.find_commit(info["library"], repo) == first
    assert "--find-commit" in provenance.describe(info)
    assert git("diff", "--cached", "--name-only") == ""
    (repo / "kernels" / "c.py").write_text("z = 1\n")  # code no commit has
    assert provenance.find_commit(provenance.library_trees(repo), repo) is None


def test_library_trees_that_cannot_be_recorded_keep_the_commit_and_say_why(monkeypatch):
    _package()
    provenance = importlib.import_module("train_step.provenance")

    def refuse(root):
        raise subprocess.CalledProcessError(128, ["git", "add"], stderr="unable to write new object")

    monkeypatch.setattr(provenance, "library_trees", refuse)
    info = provenance.git_info()
    assert info["commit"] and "library" not in info and "CalledProcessError" in info["library_error"]
    assert "could not be recorded" in provenance.describe(info)


def test_rounds_alternate_the_order_and_summarise_each_round(monkeypatch, tmp_path):
    """--rounds 3 runs a, b; b, a; a, b, each worker under its own tag, and the table gives every
    round's row, each system's median per round and the ratio of the two in each round."""
    _package()
    import train_step.compare as compare
    from train_step import report, runner
    from train_step.cli import parser

    ran = []
    steps_ms = {("fastft-cg", 1): 96.0, ("unsloth", 1): 112.0, ("unsloth", 2): 110.0, ("fastft-cg", 2): 95.0,
                ("fastft-cg", 3): 97.0, ("unsloth", 3): 107.0}

    def fake_run(spec, tag, timeout_s, workdir, logdir, device):
        if spec["kind"] == "prepare":
            return {"status": "ok", "wall_s": 0.1, "device": "cuda", "device_name": "fake"}
        ran.append((spec["system"], tag, spec["profile"]))
        step = steps_ms[(spec["system"], len(ran) // 2 + len(ran) % 2)] / 1e3
        return {"status": "ok", "wall_s": 1.0, "step_s": step, "tokens_per_s": 8192 / step,
                "step_times_s": [step] * 4, "back_to_back_step_s": step - 0.005 * (spec["system"] == "unsloth")}

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(report, "meta", lambda args, prep, systems: {})
    args = parser().parse_args(["--shape", "tiny", "--systems", "fastft-cg,unsloth", "--rounds", "3", "--profile",
                                "--logs", str(tmp_path)])
    data = compare.run_compare(args, ["fastft-cg", "unsloth"])
    assert [(system, tag) for system, tag, _ in ran] == [
        ("fastft-cg", "tiny_lora_fastft-cg_r1"), ("unsloth", "tiny_lora_unsloth_r1"),
        ("unsloth", "tiny_lora_unsloth_r2"), ("fastft-cg", "tiny_lora_fastft-cg_r2"),
        ("fastft-cg", "tiny_lora_fastft-cg_r3"), ("unsloth", "tiny_lora_unsloth_r3")]
    assert len({profile for _, _, profile in ran}) == 6  # one profile file per run, none overwritten
    assert [r["round"] for r in data["results"]] == [1, 1, 2, 2, 3, 3] and data["settings"]["rounds"] == 3
    summary = report.rounds_summary(data["results"])
    assert "- fastft-cg: step ms by round 96.0, 95.0, 97.0; median 96.0" in summary
    assert "- unsloth: step ms by round 112.0, 110.0, 107.0; median 110.0" in summary
    assert "- unsloth step / fastft-cg step, by round: 1.167, 1.158, 1.103; median 1.158" in summary
    assert "- unsloth: back-to-back step ms by round 107.0, 105.0, 102.0; median 105.0" in summary
    assert ("- unsloth back-to-back step / fastft-cg back-to-back step, by round: 1.115, 1.105, 1.052; median 1.105"
            in summary)
    table = report.compare_markdown({**data, "date_utc": "-", "command": "-", "versions": {}, "device": "-"})
    assert "| unsloth #2 | 74,473 | - | 110.0 | 105.0 |" in table
    assert report.label(data["results"][2]) == "unsloth #2"
    assert report.rounds_summary([{**r, "round": 1} for r in data["results"][:2]]) == []  # one round: nothing
