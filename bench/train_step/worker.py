"""One measured run in its own process: ``python bench/train_step --worker SPEC.json --result R.json``.

Kinds of spec: ``prepare`` (build and save the random-weight model, report the device) and
``train`` (one system: load, apply, then warm-up + timed training steps). The result file is
written in every case the process survives: ok, oom, error (with traceback) or unavailable.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from .systems import Setting, Unavailable, early_import, fastft_summary, prepare_system


def run_worker(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"kind": spec["kind"], "system": spec.get("system"), "status": "running"}

    def save() -> None:  # progress, for a run killed at its timeout
        Path(result_path).write_text(json.dumps(result, indent=1, default=str))

    save()
    try:
        if spec["kind"] == "prepare":
            _prepare(spec, result)
        else:
            _train(spec, result, save)  # fills ``result`` as it goes: a failure keeps what was measured
    except Unavailable as e:
        result.update(status="unavailable", error=str(e))
    except BaseException as e:  # noqa: BLE001  (recorded, never raised: the parent reads the file)
        result.update(status="oom" if _is_oom(e) else "error", error=f"{type(e).__name__}: {_clip(str(e))}",
                      traceback=_clip(traceback.format_exc(), 6000))
    save()
    return 0


def _prepare(spec: dict[str, Any], out: dict[str, Any]) -> None:
    from .prepare import prepare

    device = _resolve_device(spec["device"])
    out.update(_device_info(device))
    out.update(prepare(spec["shape"], spec["seed"], Path(spec["model_dir"]), device))
    out["status"] = "ok"


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch_cuda": torch.version.cuda}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, total_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(device_name="cpu (Triton interpreter)", total_memory_bytes=None)
    return info


def _train(spec: dict[str, Any], out: dict[str, Any], save) -> None:
    out.update(batch=spec["batch"], seq=spec["seq"])
    early_import(spec["system"])  # before transformers and triton: see systems.py
    import torch

    device = spec["device"]
    cuda = device.startswith("cuda")
    out.update(_device_info(device))
    if cuda and spec.get("memory_cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] * 2**30 / total))
        out["memory_cap_gib"] = spec["memory_cap_gib"]

    t_load = time.perf_counter()
    setting = Setting(spec["system"], spec["mode"], spec["checkpointing"], device, spec["seq"], spec["seed"])
    prepared = prepare_system(Path(spec["model_dir"]), setting)
    model, step_model = prepared.model, prepared.step_model
    out["info"] = {**prepared.info, **_model_facts(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable_parameters"] = sum(p.numel() for p in params)
    out["trainable_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params})
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    batches = _batches(spec, device)
    out["setup_s"] = time.perf_counter() - t_load

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["ready_allocated_bytes"] = torch.cuda.memory_allocated()

    def sync_and_record() -> None:
        if cuda:  # the peak stats are reset after step 1: the peak is the larger of step 1's and the rest's
            torch.cuda.synchronize()
            now = torch.cuda.max_memory_allocated()
            first = out.get("peak_allocated_first_step_bytes")
            if first is not None:
                out["peak_allocated_steady_bytes"] = now
            out["peak_allocated_bytes"] = max(now, first or 0)
            out["peak_reserved_bytes"] = max(out.get("peak_reserved_bytes", 0), torch.cuda.max_memory_reserved())

    times: list[float] = []
    losses: list[float] = []
    out.update(completed_steps=0, losses=losses, step_times_s=times)
    save()
    t_ready = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            sync_and_record()
            t0 = time.perf_counter()
            loss = _step(step_model, optimizer, batch)
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            losses.append(float(loss.detach().float().item()))
            out["completed_steps"] = i + 1
            if i == 0:
                out["first_step_s"] = t1 - t_ready
                if cuda:  # step 1 includes capture and compilation; the steps after it are the steady state
                    torch.cuda.synchronize()
                    out["peak_allocated_first_step_bytes"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                if spec["system"].startswith("fastft"):
                    out["fastft_report"] = fastft_summary(model)
                    from torch._dynamo.utils import counters  # graphs Inductor would not record (and why: the log)

                    out["fastft_report"]["cudagraph_skips"] = counters["inductor"].get("cudagraph_skips", 0)
            if i >= spec["warmup"]:
                times.append(t1 - t0)
            save()
        if times and spec.get("back_to_back"):
            _back_to_back(out, step_model, optimizer, batches[spec["warmup"]:], cuda)
            save()
    finally:
        sync_and_record()
    if spec.get("profile") and cuda:
        _profile(spec["profile"], lambda b, mark: _step(step_model, optimizer, b, mark), batches[-2:], batches[-4:])
    if spec.get("memory_profile") and cuda:
        from .memory import profile_memory

        out["memory_profile"] = profile_memory(spec["memory_profile"],
                                               lambda: _step(step_model, optimizer, batches[-1]))
    if times:
        med = statistics.median(times)
        out.update(step_s=med, tokens_per_s=spec["batch"] * spec["seq"] / med)
    bad = [i + 1 for i, x in enumerate(losses + out.get("back_to_back_losses", [])) if not math.isfinite(x)]
    out["status"] = "ok" if not bad else "error"
    if bad:
        out["error"] = f"non-finite loss at step(s) {bad}"


def _back_to_back(out: dict[str, Any], step_model, optimizer, batches: list, cuda: bool) -> None:
    """The timed steps' batches once more, one step after the other with no synchronisation in
    between, as a training loop runs them: the host's work for a step overlaps the device's work
    for the steps before it. Its time per step is the block's wall time over its steps; the
    losses stay on the device until the end."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [_step(step_model, optimizer, b).detach() for b in batches]
    if cuda:
        torch.cuda.synchronize()
    out["back_to_back_step_s"] = (time.perf_counter() - t0) / len(batches)
    out["back_to_back_losses"] = torch.stack(losses).float().tolist()


def _step(step_model, optimizer, batch, mark=None):
    """One training step; mark(name) gives a context manager around each phase (the profiler's)."""
    mark = mark or (lambda name: contextlib.nullcontext())
    with mark("step.zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    with mark("step.forward"):
        loss = step_model(input_ids=batch, labels=batch, use_cache=False).loss
    with mark("step.backward"):
        loss.backward()
    with mark("step.optimizer"):
        optimizer.step()
    return loss


def _profile(path: str, step, batches: list, back_to_back_batches: list) -> None:
    """GPU kernels of a few more steps, by total GPU time, and where the GPU sat idle (not part of
    the timed result); then where it sat idle in steps run back to back, and which host calls
    waited on it there."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .timeline import from_profiler

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for batch in batches:  # synchronised as the timed steps are: each step's window ends when its GPU work does
            step(batch, record_function)
            with record_function("step.sync"):
                torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", max_name_column_width=90, row_limit=45)
    # The same ops split by input shapes: which GEMM (or copy) of the layer the time goes to.
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total",
                                                                 max_name_column_width=40, row_limit=60)
    idle = from_profiler(prof, len(batches))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in back_to_back_batches:  # as _back_to_back runs them: one synchronisation, at the end
            step(batch, record_function)
        with record_function("step.sync"):
            torch.cuda.synchronize()
    idle_b2b = from_profiler(prof, len(back_to_back_batches))
    host = _host_forward(step, batches[-1])
    Path(path).write_text(f"{len(batches)} steps\n{idle}\n"
                          f"{len(back_to_back_batches)} steps back to back (the first starts on an idle GPU)\n"
                          f"{idle_b2b}\n{host}\n{table}\nBy input shapes:\n{shapes}")


def _host_forward(step, batch) -> str:
    """The host's time in a step's forward call (the GPU waits for its first launch), then where
    it goes: cProfile of one more step's forward call, by own time and by cumulative time."""
    import cProfile
    import io
    import pstats

    import torch

    times: list[float] = []
    prof = cProfile.Profile()

    def clock(profiled: bool):
        @contextlib.contextmanager
        def mark(name):
            if name != "step.forward":
                yield
                return
            t0 = time.perf_counter()
            if profiled:
                prof.enable()
            yield
            if profiled:
                prof.disable()
            times.append(time.perf_counter() - t0)
        return mark

    for _ in range(3):
        step(batch, clock(False))
        torch.cuda.synchronize()
    median = statistics.median(times)
    phases = _forward_phases(step, batch)
    step(batch, clock(True))
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return (f"host time in the forward call, no profiler: median {median * 1e3:.2f} ms of 3\n"
            f"{phases}\nthe forward call under cProfile:\n{text.getvalue()}")


# Calls inside a compiled forward that split its host time into phases (owner module, class, method).
_PHASE_CALLS = (("fastft.passes.capture", "CapturedGraph", "__call__"),
                ("torch._inductor.output_code", "CompiledFxGraph", "__call__"),
                ("torch._inductor.cudagraph_trees", "CUDAGraphNode", "run"),
                ("torch.cuda.graphs", "CUDAGraph", "replay"),
                ("torch._inductor.cudagraph_trees", "CUDAGraphNode", "reconstruct_outputs"))


def _forward_phases(step, batch, repeats: int = 5) -> str:
    """Host time of the forward call split at the calls in _PHASE_CALLS (a timer around each,
    installed for these steps only): median over ``repeats`` steps of each call's time, and of the
    time before the first one starts. A call that never runs is reported as such."""
    import importlib

    import torch

    events: list[tuple[str, float, float]] = []
    patched = []
    for module, cls_name, attr in _PHASE_CALLS:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
            original = getattr(cls, attr)
        except (ImportError, AttributeError):
            continue

        def timed(*args, _orig=original, _name=f"{cls_name}.{attr}", **kwargs):
            t0 = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                events.append((_name, t0, time.perf_counter()))
        setattr(cls, attr, timed)
        patched.append((cls, attr, original))
    rows: dict[str, list[float]] = {}
    try:
        for _ in range(repeats):
            events.clear()
            starts: list[float] = []

            @contextlib.contextmanager
            def mark(name):
                if name == "step.forward":
                    starts.append(time.perf_counter())
                yield
                if name == "step.forward":
                    starts.append(time.perf_counter())
            step(batch, mark)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0, t1 = starts[0], starts[1]
            inside = [e for e in events if t0 <= e[1] <= t1]
            rows.setdefault("whole forward call", []).append(t1 - t0)
            if inside:
                rows.setdefault("before the first timed call", []).append(min(e[1] for e in inside) - t0)
            for name, a, b in inside:
                rows.setdefault(name, []).append(b - a)
    finally:
        for cls, attr, original in patched:
            setattr(cls, attr, original)
    lines = [f"the forward call's host time by phase (median of {repeats} steps, ms; nested calls include their callees):"]
    for name, values in rows.items():
        lines.append(f"  {name}: {statistics.median(values) * 1e3:.3f} (x{len(values) // repeats} a call)")
    missing = [f"{c}.{a}" for _, c, a in _PHASE_CALLS if f"{c}.{a}" not in rows]
    if missing:
        lines.append(f"  not called (or not found) in the forward: {', '.join(missing)}")
    return "\n".join(lines)


def _model_facts(model) -> dict[str, int]:
    """What the system actually built, to check that every system trains the same thing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    mods = list(model.modules())
    return {"linears_4bit": sum(type(m).__module__.startswith("bitsandbytes") and "4bit" in type(m).__name__
                                for m in mods),
            "checkpointed_layers": sum(isinstance(m, GradientCheckpointingLayer) and bool(m.gradient_checkpointing)
                                       for m in mods)}


def _batches(spec: dict[str, Any], device: str) -> list:
    """Random token ids, a fixed seed per step: every system sees the same data."""
    import torch

    batches = []
    for i in range(spec["warmup"] + spec["steps"]):
        g = torch.Generator().manual_seed(spec["seed"] * 100003 + 1000 + i)
        batches.append(torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g).to(device))
    return batches


def _is_oom(e: BaseException) -> bool:
    import torch

    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # compile errors wrap the OOM that caused them
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "inner_exception", None)
    return False


def _clip(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else text[: n // 4] + "\n...\n" + text[-(3 * n) // 4:]

