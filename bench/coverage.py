"""Architecture coverage: every causal-LM model_type transformers ships, tiny, through fastft.

    python bench/coverage.py [--only llama,gpt2,...] [--timeout 120] [--mem-gb 6] [--out bench/results]
                             [--jobs 1] [--resume] [--render]

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (sorted), a worker process
(``python bench/coverage.py --worker MODEL_TYPE``) builds a tiny random-weight instance from the
architecture's own config class (``fastft.tiny``: hidden 64, 2 layers; dropout set to 0.0 as the
tests do; float32; train mode) and a random batch (2 x 16 tokens, labels = inputs), then:

    eager     forward with labels + backward, unoptimised (does the tiny model itself run?)
    capture   fastft.optimize(model), forward with labels
    backward  loss.backward() through the rewritten graph
    report    fastft.report(model): graphs, graph breaks, capture failures, rewrites, near misses
    check     fastft.check(model, batch)

Each worker runs in its own process session with a wall-clock timeout and an address-space limit
(RLIMIT_AS, set in the child before it starts), so a crash, a hang or an out-of-memory becomes that
architecture's row, with its reason, and never stops the run. The worker prints its row as one
JSON line on stdout (prefixed ``@@ROW@@``) and a ``@@STAGE@@`` line as it enters each stage, so a
timeout still says where it was.

Results, rewritten after every architecture (a partial run is a valid, marked, table):
``OUT/coverage.json`` (rows + meta: date UTC, versions, command, limits) and ``OUT/coverage.md``
(headline, per-category summary, one row per architecture, failures grouped by reason).
``--resume`` keeps the rows already in ``OUT/coverage.json`` and runs only the missing ones;
``--render`` only rewrites ``coverage.md`` from ``coverage.json``.

Category of each architecture, derived from its config (and module classes), first match wins:
    multimodal       the config has vision/audio/image sub-configs, its text config is a separate
                     sub-config, or transformers maps the type to an image/audio/speech task
    encoder-decoder  ``config.is_encoder_decoder``
    state-space      SSM / linear-recurrence config keys (state_size, ssm_*, mamba_*, lru_width,
                     linear_conv_kernel_dim, ...), "linear_attention"/"mamba"/"hybrid" layer types,
                     or recurrent mixer module classes (Mamba, RWKV, xLSTM, RG-LRU, GatedDeltaNet,
                     ShortConv, ...); hybrids with attention layers are marked ``hybrid``
    encoder          a BERT-style config (``is_decoder`` False with ``add_cross_attention``) or a
                     masked-LM architecture
    decoder-only text  everything else
plus ``CATEGORY_OVERRIDES`` below for the few the heuristic cannot see.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROW_MARK = "@@ROW@@ "
STAGE_MARK = "@@STAGE@@ "
STAGES = ("config", "build", "eager", "capture", "backward", "report", "check")
CATEGORIES = ("decoder-only text", "encoder", "encoder-decoder", "state-space", "multimodal")
FAMILIES = ("rms_norm", "layer_norm", "rope", "glu_mlp", "mlp_act", "linear_cross_entropy")

# Architectures whose category the config does not reveal (documented, kept small):
CATEGORY_OVERRIDES = {
    "trocr": "multimodal",  # the text decoder of TrOCR, an image-to-text VisionEncoderDecoder
}

_MODALITY = re.compile(r"vision|audio|image|speech|video|vq|visual", re.I)
_MODALITY_TASKS = re.compile(r"IMAGE|VISION|AUDIO|SPEECH|VIDEO|MULTIMODAL|WAVEFORM|SPECTROGRAM|CTC|VISUAL")
_SSM_KEYS = re.compile(r"^(state_size|ssm_.*|.*_ssm.*|mamba_.*|.*_mamba_.*|n_mamba_heads|d_state|lru_width|"
                       r"conv_kernel|linear_conv_kernel_dim|short_conv_kernel_size|time_step_.*|rescale_every)$")
_SSM_LAYER_TYPES = re.compile(r"linear_attention|mamba|ssm|recurrent|conv|hybrid|deltanet", re.I)
# Case-sensitive: "Ssm" must not match "GptOssMLP".
_SSM_MODULES = re.compile(r"Mamba|SSM|Ssm(?=[A-Z]|$)|Rwkv|RWKV|xLSTM|[Rr]glru|Rg[Ll]ru|RecurrentBlock|DeltaNet|"
                          r"ShortConv|LinearAttention|Lightning|mLSTM|sLSTM")
_ATTENTION_MODULES = re.compile(r"(?<!Linear)(Self)?Attention$|Attn$")


# ----------------------------------------------------------------------------------------------
# Worker: one architecture, in this process.
# ----------------------------------------------------------------------------------------------

def categorize(model_type: str, config: Any, model: Any = None) -> tuple[str, bool]:
    """(category, hybrid) from the architecture's full config (before taking its text part)."""
    from transformers.models.auto import modeling_auto as ma

    if model_type in CATEGORY_OVERRIDES:
        return CATEGORY_OVERRIDES[model_type], False
    sub = set(getattr(config, "sub_configs", None) or {})
    try:
        text = config.get_text_config()
        separate_text = text is not config
    except ValueError:  # several text sub-configs (e.g. a text encoder and a decoder)
        separate_text = True
    tasks = [n for n in dir(ma) if n.endswith("_MAPPING_NAMES") and n != "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
             and _MODALITY_TASKS.search(n) and model_type in getattr(ma, n)]
    if any(_MODALITY.search(s) for s in sub) or (separate_text and sub) or tasks:
        return "multimodal", False
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder", False
    keys = config.to_dict()
    ssm = any(_SSM_KEYS.match(k) for k in keys)
    ssm |= any(_SSM_LAYER_TYPES.search(str(t)) for t in (keys.get("layer_types") or []))
    names = [type(m).__name__ for m in model.modules()] if model is not None else []
    ssm |= any(_SSM_MODULES.search(n) for n in names)
    if ssm:
        hybrid = any(_ATTENTION_MODULES.search(n) and not _SSM_MODULES.search(n) for n in names) or any(
            "attention" in str(t) and "linear" not in str(t) for t in (keys.get("layer_types") or []))
        return "state-space", hybrid
    if (keys.get("is_decoder") is False and "add_cross_attention" in keys) or \
            model_type in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder", False
    return "decoder-only text", False


def _first_line(text: Any, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:  # "Validation error for 'x':" and the error itself below
        line = f"{line} {lines[1]}"
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _error_info(stage: str, error: BaseException) -> dict:
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{_short_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    ours = [f for f in frames if any(f"{ROOT}/{d}/" in f.filename for d in ("fastft", "passes", "patterns", "kernels"))]
    fastft_frame = (f"{_short_path(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name}" if ours else None)
    message = _first_line(error) or "(no message)"
    oom = isinstance(error, MemoryError) or bool(re.search(r"can't allocate memory|bad_alloc|out of memory",
                                                           str(error), re.I))
    return {"stage": stage, "type": type(error).__name__, "message": message, "where": where,
            "fastft_frame": fastft_frame, "oom": oom}


def _no_dropout(config: Any) -> dict:
    return {k: 0.0 for k, v in config.to_dict().items()
            if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}


def _eager_step(model: Any, batch: dict) -> Any:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise RuntimeError(f"{type(model).__name__} returned no loss for labels")
    out.loss.backward()
    return out


def _stage(name: str, row: dict) -> None:
    """Enter a stage; the line also carries what is known so far, for a worker that never finishes."""
    row["stage"] = name
    known = {k: row.get(k) for k in ("category", "hybrid", "model_class") if row.get(k) is not None}
    print(STAGE_MARK + name + " " + json.dumps(known), flush=True)


def run_worker(model_type: str, batch_size: int = 2, seq: int = 16) -> dict:
    """Build, optimise, train one step and check one architecture; the row, never an exception."""
    import fastft  # first: it chooses Triton's interpreter before triton loads, where there is no GPU

    import torch

    from fastft.tiny import build_tiny_model, random_batch, tiny_config

    started = time.perf_counter()
    row: dict = {"model_type": model_type, "status": None, "stage": None, "model_class": None,
                 "category": None, "hybrid": False, "error": None, "times": {}}
    mark = started

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        row["times"][name] = round(now - mark, 2)
        mark = now

    try:
        _stage("config", row)
        from transformers import AutoConfig

        try:
            full = AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - the category then comes from the tiny config alone
            full = None
        if full is not None:  # known even where the tiny config fails
            row["category"], row["hybrid"] = categorize(model_type, full)
        config = tiny_config(model_type)
        overrides = _no_dropout(config)
        keys = config.to_dict()
        if keys.get("is_decoder") is False and not getattr(config, "is_encoder_decoder", False):
            overrides["is_decoder"] = True  # an encoder used as a causal LM, as its LM-head class asks
        row["overrides"] = sorted(overrides)
        row["config_class"] = type(config).__name__
        row["category"], row["hybrid"] = categorize(model_type, full if full is not None else config)
        lap("config")

        _stage("build", row)
        model = build_tiny_model(model_type, **overrides)
        model.train()
        row["model_class"] = type(model).__name__
        names = [type(m).__name__ for m in model.modules()]
        row["category"], row["hybrid"] = categorize(model_type, full if full is not None else config, model)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["norm_modules"] = {"rms_norm": sum(n.endswith("RMSNorm") for n in names),
                               "layer_norm": sum(n.endswith("LayerNorm") for n in names)}
        row["num_hidden_layers"] = getattr(model.config, "num_hidden_layers", None)
        batch = random_batch(model, batch=batch_size, seq=seq)
        lap("build")

        _stage("eager", row)
        try:
            out = _eager_step(model, batch)
        except Exception as error:  # noqa: BLE001
            if not getattr(model.config, "use_cache", False):
                raise
            # Some tiny configs size the KV cache from one layer count and build another (e.g. an
            # encoder-decoder's decoder_layers): training needs no cache, so try once without it.
            row["eager_fallback"] = {"override": "use_cache=False",
                                     "error": f"{type(error).__name__}: {_first_line(error, 200)}"}
            overrides["use_cache"] = False
            model = build_tiny_model(model_type, **overrides)
            model.train()
            batch = random_batch(model, batch=batch_size, seq=seq)
            out = _eager_step(model, batch)
        row["eager_loss"] = float(out.loss.detach())
        model.zero_grad(set_to_none=True)
        del out
        lap("eager")

        _stage("capture", row)
        fastft.optimize(model)
        out = model(**batch)
        row["loss"] = float(out.loss.detach())
        lap("capture")

        _stage("backward", row)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        del out
        lap("backward")

        _stage("report", row)
        report = fastft.report(model)
        breaks = report.graph_breaks
        row.update({
            "graphs_captured": report.graphs_captured,
            "graph_breaks": sum(b.count for b in breaks),
            "graph_break_reasons": [f"{b.entry}: {_first_line(b.reason, 240)} (x{b.count})" for b in breaks[:5]],
            "capture_failures": [f"{f.entry}: {_first_line(f.error, 240)}" for f in report.capture_failures],
            "counts": {k: v for k, v in report.counts().items()},
            "near_misses_total": len(report.near_misses),
            "near_misses": [{"pattern": m.pattern, "reason": _first_line(m.reason, 240), "region": m.region}
                            for m in report.near_misses[:8]],
            "near_miss_kinds": dict(Counter(f"{m.pattern}: {_first_line(m.reason, 160)}"
                                            for m in report.near_misses)),
        })
        row["one_graph"] = bool(report.graphs_captured) and not breaks and not report.capture_failures
        lap("report")

        _stage("check", row)
        result = fastft.check(model, batch)
        row["check"] = {"ok": result.ok, "summary": _first_line(str(result)),
                        "regions_checked": result.regions_checked,
                        "problems": [_first_line(p, 240) for p in result.problems[:5]],
                        "errors": [_first_line(str(c), 240) for c in result.errors[:5]],
                        "errors_total": len(result.errors)}
        lap("check")
        row["stage"] = "done"
        if row["capture_failures"]:
            row["status"] = "capture-failed"
        elif not result.ok:
            row["status"] = "check-failed"
        else:
            row["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 - everything becomes the row's reason
        if isinstance(error, KeyboardInterrupt):
            raise
        lap(row["stage"] or "config")
        row["error"] = _error_info(row["stage"] or "config", error)
        row["status"] = "oom" if row["error"]["oom"] else "error"
    try:
        import resource

        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    except Exception:  # noqa: BLE001
        pass
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def worker_main(model_type: str, batch_size: int, seq: int) -> int:
    row = run_worker(model_type, batch_size, seq)
    sys.stdout.write(ROW_MARK + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# Runner: one subprocess per architecture, limits, results.
# ----------------------------------------------------------------------------------------------

def _limit_memory(mem_bytes: int | None):
    def apply() -> None:
        if mem_bytes:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    return apply


def run_in_subprocess(model_type: str, timeout: float = 120, mem_gb: float | None = 6, seq: int = 16,
                      batch_size: int = 2, python: str = sys.executable, script: str | None = None) -> dict:
    """Run one worker; a crash, a timeout or an out-of-memory comes back as the row's reason."""
    cmd = [python, script or str(Path(__file__).resolve()), "--worker", model_type,
           "--seq", str(seq), "--batch", str(batch_size)]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    mem = int(mem_gb * 2**30) if mem_gb else None
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(ROOT), start_new_session=True, preexec_fn=_limit_memory(mem))
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its children only
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
    seconds = round(time.perf_counter() - started, 1)
    rows = [ln[len(ROW_MARK):] for ln in stdout.splitlines() if ln.startswith(ROW_MARK)]
    stages = [ln[len(STAGE_MARK):].strip().split(" ", 1) for ln in stdout.splitlines() if ln.startswith(STAGE_MARK)]
    if rows and not timed_out:
        row = json.loads(rows[-1])
        row["wall_seconds"] = seconds
        return row
    stage = stages[-1][0] if stages else "startup"
    try:
        known = json.loads(stages[-1][1]) if stages and len(stages[-1]) > 1 else {}
    except ValueError:
        known = {}
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-12:]
    if timed_out:
        status, error = "timeout", {"type": "Timeout", "message": f"no result after {timeout:g} s (in stage {stage})"}
    else:
        rc = proc.returncode
        oom = rc == -signal.SIGKILL or any(re.search(r"MemoryError|can't allocate memory|bad_alloc|out of memory",
                                                     ln, re.I) for ln in tail)
        if rc is not None and rc < 0:
            how = f"killed by {signal.Signals(-rc).name}"
        else:
            how = f"exit status {rc}"
        last = next((ln for ln in reversed(tail) if re.match(r"^\w[\w.]*(Error|Exception|Interrupt)\b", ln)),
                    tail[-1] if tail else "")
        status = "oom" if oom else "crash"
        error = {"type": "Crash", "message": _first_line(f"{how} in stage {stage}: {last}".rstrip(": "))}
    error.update(stage=stage, where="", fastft_frame=None, oom=status == "oom")
    return {"model_type": model_type, "status": status, "stage": stage, "model_class": known.get("model_class"),
            "category": known.get("category"), "hybrid": known.get("hybrid", False), "error": error, "stderr_tail": tail[-5:], "seconds": seconds, "wall_seconds": seconds}


# ----------------------------------------------------------------------------------------------
# Summaries and the markdown table.
# ----------------------------------------------------------------------------------------------

def is_failure(row: dict) -> bool:
    return row.get("status") != "ok"


def _normalise(text: str, limit: int = 110) -> str:
    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    text = re.sub(r"(?<=[A-Za-z0-9])_\d+\b", "_N", text)  # fx node names: cat_10, l_logits_3
    text = re.sub(r"(?<![\w])\d+(\.\d+)?(e-?\d+)?", "N", text)
    text = re.sub(r"\b[A-Z][A-Za-z0-9]*?(?=(RMSNorm|LayerNorm|Attention|DecoderLayer|Model|MLP|Config|"
                  r"ForCausalLM|RotaryEmbedding|Block|Mixer|Experts|MoE|SparseMoeBlock)\b)", "*", text)
    text = re.sub(r"(model|layers|layer|h|blocks)\.N\.", r"\1.N.", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def failure_reason(row: dict) -> str:
    """The row's failure, with names and numbers generalised so that alike failures group."""
    status = row.get("status")
    if status == "ok":
        return ""
    err = row.get("error")
    if status in ("timeout", "crash") or (status == "oom" and err and err.get("type") == "Crash"):
        return f"{status} in {err.get('stage')}" + ("" if status == "timeout" else f": {_normalise(err['message'].split(': ', 1)[-1], 80)}")
    if err:
        return f"{err['stage']}: {err['type']}: {_normalise(err['message'])}"
    if status == "capture-failed":
        return "capture failed: " + _normalise(row["capture_failures"][0].split(": ", 1)[-1])
    if status == "check-failed":
        check = row.get("check") or {}
        if check.get("problems"):
            return "check: " + _normalise(re.sub(r"^.*?: ", "", check["problems"][0]) if "@" in check["problems"][0]
                                          else check["problems"][0])
        first = (check.get("errors") or ["?"])[0]
        name = first.split(" [", 1)[0].removeprefix("FAIL ").strip()
        if "@" in name:  # a region: pattern@module:node output|grad[k]
            what = f"region {name.split('@', 1)[0]} {name.rsplit(' ', 1)[-1]}"
        elif name.startswith("grad "):
            what = "model gradients"
        else:
            what = f"model {name.split('.', 1)[0]}"
        return f"check: {what} differ"
    return status or "?"


def _truncate(text: str, limit: int) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _ran_eagerly(row: dict) -> bool:
    """The tiny model itself built and trained a step unoptimised: fastft's part could start."""
    if row.get("stage") in ("config", "build", "eager", "startup", None):
        return False
    return True


def summarise(rows: list[dict]) -> dict:
    by_cat: dict[str, dict] = {}
    for cat in CATEGORIES + ("unknown",):
        sel = [r for r in rows if (r.get("category") or "unknown") == cat]
        if not sel:
            continue
        by_cat[cat] = {
            "architectures": len(sel),
            "eager_ok": sum(_ran_eagerly(r) for r in sel),
            "ran": sum(r.get("stage") == "done" for r in sel),
            "one_graph": sum(bool(r.get("one_graph")) for r in sel),
            "rewritten": sum(sum((r.get("counts") or {}).values()) > 0 for r in sel),
            "check_ok": sum(bool((r.get("check") or {}).get("ok")) for r in sel),
            "ok": sum(r.get("status") == "ok" for r in sel),
        }
    total = {k: sum(c[k] for c in by_cat.values()) for k in ("architectures", "eager_ok", "ran", "one_graph",
                                                               "rewritten", "check_ok", "ok")}
    return {"by_category": by_cat, "total": total,
            "status": dict(Counter(r.get("status") for r in rows))}


def render_markdown(rows: list[dict], meta: dict) -> str:
    s = summarise(rows)
    out = ["# Architecture coverage", ""]
    out.append(f"Generated by `{meta['command']}` on {meta['date_utc']} (UTC); torch {meta['torch']}, "
               f"transformers {meta['transformers']}, {meta['device']}. Each architecture: a tiny random-weight "
               f"model from its own config class ({meta['tiny']}), float32, train mode, dropout 0, batch "
               f"{meta['batch']} x {meta['seq']} tokens; eager forward+backward, `fastft.optimize`, forward with "
               f"labels + backward, `fastft.report`, `fastft.check`. One process per architecture, limits: "
               f"{meta['timeout_s']:g} s, {meta['mem_gb']:g} GB address space.")
    out.append("")
    if meta.get("partial"):
        out += [f"**PARTIAL RUN: {meta['done']} of {meta['planned']} architectures done.**", ""]
    dec = s["by_category"].get("decoder-only text")
    t = s["total"]
    if dec:
        out.append(f"**{dec['one_graph']} of {dec['architectures']} decoder-only text architectures captured in one "
                   f"graph / {dec['rewritten']} rewritten / {dec['check_ok']} checked equivalent** "
                   f"({dec['ok']} with no failure at all; {dec['eager_ok']} of the {dec['architectures']} tiny "
                   f"models run unoptimised, the others fail before fastft is involved).")
    out.append(f"All {t['architectures']} architectures: {t['eager_ok']} tiny models run unoptimised, "
               f"{t['ran']} ran end to end, {t['one_graph']} in one graph, "
               f"{t['rewritten']} rewritten, {t['check_ok']} checked equivalent, {t['ok']} with no failure. "
               f"Status: " + ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items(), key=lambda kv: -kv[1]))
               + ".")
    out += ["", "## By category", "",
            "| category | architectures | tiny model runs unoptimised | ran end to end | one graph | rewritten | "
            "check PASS | no failure |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cat, c in s["by_category"].items():
        out.append(f"| {cat} | {c['architectures']} | {c['eager_ok']} | {c['ran']} | {c['one_graph']} | {c['rewritten']} | "
                   f"{c['check_ok']} | {c['ok']} |")
    out += ["", "## Architectures", "",
            "Graphs: captured graphs, and graph breaks if any (`1` = one graph). Rewrites per family: rms = "
            "RMSNorm, ln = LayerNorm, rope, glu = gated MLP, act = activation of an ungated MLP, ce = linear + "
            "cross-entropy; `norms` = rewritten norms / norm modules in the model. Near misses: how many, and the "
            "first reason.", "",
            "| model_type | model class | category | graphs | rms | ln | rope | glu | act | ce | norms | near misses | "
            "check | s | failure |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|"]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        c = r.get("counts") or {}
        cat = (r.get("category") or "?") + (" (hybrid)" if r.get("hybrid") else "")
        if r.get("graphs_captured") is None:
            graphs = "–"
        else:
            graphs = str(r["graphs_captured"])
            if r.get("graph_breaks"):
                graphs += f", {r['graph_breaks']} break" + ("s" if r["graph_breaks"] > 1 else "")
        fam = [str(c.get(f, "")) if r.get("counts") is not None else "–" for f in FAMILIES]
        nm = r.get("norm_modules") or {}
        norms = (f"{c.get('rms_norm', 0) + c.get('layer_norm', 0)}/{nm.get('rms_norm', 0) + nm.get('layer_norm', 0)}"
                 if r.get("counts") is not None else "–")
        misses = "–"
        if r.get("near_misses_total") is not None:
            misses = str(r["near_misses_total"])
            if r["near_misses"]:
                m = r["near_misses"][0]
                misses += f": {m['pattern']}: {_truncate(m['reason'], 60)}"
        check = r.get("check")
        verdict = "–" if not check else ("PASS" if check["ok"] else "FAIL")
        out.append(f"| {r['model_type']} | {r.get('model_class') or '–'} | {cat} | {graphs} | " + " | ".join(fam)
                   + f" | {norms} | {_truncate(misses, 90)} | {verdict} | {r.get('wall_seconds', r.get('seconds', ''))}"
                   f" | {_truncate(failure_reason(r), 90)} |")
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if is_failure(r):
            groups[failure_reason(r)].append(r["model_type"])
    out += ["", f"## Failures by reason ({sum(map(len, groups.values()))} architectures, {len(groups)} reasons)", "",
            "Each reason starts with the stage it happened in. `config`, `build` and `eager` come before fastft "
            "is involved: the tiny config or the unoptimised model itself fails. `capture`, `backward`, `check` "
            "and `capture failed` (fastft fell back to eager for an entry point) are fastft's; `timeout` / "
            "`oom` / `crash` name the stage the worker had reached.", ""]
    for reason, types_ in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        out.append(f"- **{_truncate(reason, 160)}** ({len(types_)}): {', '.join(sorted(types_))}")
    if not groups:
        out.append("None.")
    breaks: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for b in r.get("graph_break_reasons") or []:
            key = _normalise(re.sub(r" \(x\d+\)$", "", b.split(": ", 1)[-1]), 120)
            if r["model_type"] not in breaks[key]:
                breaks[key].append(r["model_type"])
    if breaks:
        out += ["", "## Graph breaks by reason (first reasons per architecture)", ""]
        for reason, types_ in sorted(breaks.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            out.append(f"- {_truncate(reason, 140)} ({len(types_)}): {', '.join(sorted(types_))}")
    unrewritten = []
    for r in sorted(rows, key=lambda r: r["model_type"]):
        c, nm = r.get("counts"), r.get("norm_modules") or {}
        if c is not None and sum(nm.values()) > c.get("rms_norm", 0) + c.get("layer_norm", 0):
            unrewritten.append(f"{r['model_type']} ({c.get('rms_norm', 0) + c.get('layer_norm', 0)}/"
                               f"{sum(nm.values())})")
    if unrewritten:
        out += ["", "## Fewer norms rewritten than norm modules (some may be unused by the forward)", "",
                ", ".join(unrewritten)]
    fallbacks = sorted(f"{r['model_type']} ({_truncate(r['eager_fallback']['error'], 60)})"
                       for r in rows if r.get("eager_fallback")
                       and not (r.get("error") and r["error"].get("stage") in ("eager", "build")))
    if fallbacks:
        out += ["", "## Tiny models that run only with `use_cache=False`", "",
                "Their tiny config fails an eager forward with the cache on (a tiny-config problem, not "
                "fastft's); they were rebuilt with `use_cache=False`, as training runs them: "
                + ", ".join(fallbacks)]
    misses: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for kind in (r.get("near_miss_kinds") or {}):
            key = _normalise(kind, 140)
            if r["model_type"] not in misses[key]:
                misses[key].append(r["model_type"])
    if misses:
        out += ["", "## Near misses by pattern and reason", ""]
        for reason, types_ in sorted(misses.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            out.append(f"- {_truncate(reason, 150)} ({len(types_)}): {', '.join(sorted(types_))}")
    out.append("")
    return "\n".join(out)


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "done": len(rows), "summary": summarise(rows)}
    data = {"meta": meta, "rows": sorted(rows, key=lambda r: r["model_type"])}
    for name, text in (("coverage.json", json.dumps(data, indent=1, default=str) + "\n"),
                       ("coverage.md", render_markdown(rows, meta))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def catalogue() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: the whole catalogue)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per architecture")
    parser.add_argument("--mem-gb", type=float, default=6, help="address-space limit per worker (0: none)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--jobs", type=int, default=1, help="architectures run at once")
    parser.add_argument("--resume", action="store_true", help="keep rows already in OUT/coverage.json")
    parser.add_argument("--rerun", default="", help="comma-separated model types to run again; every other "
                        "row is kept from OUT/coverage.json (the table's header names both runs)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="only rewrite OUT/coverage.md from OUT/coverage.json")
    parser.add_argument("--worker", metavar="MODEL_TYPE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.batch, args.seq)
    if args.render:
        data = json.loads((Path(args.out) / "coverage.json").read_text())
        write_results(data["rows"], data["meta"], Path(args.out))
        return 0

    import torch
    import transformers

    from fastft.tiny import TINY_SIZES

    everything = catalogue()
    wanted = [t.strip() for t in args.only.split(",") if t.strip()] or everything
    out_dir = Path(args.out)
    rows: dict[str, dict] = {}
    if args.resume and (out_dir / "coverage.json").exists():
        rows = {r["model_type"]: r for r in json.loads((out_dir / "coverage.json").read_text())["rows"]
                if r["model_type"] in wanted}
    rerun = [t.strip() for t in args.rerun.split(",") if t.strip()]
    earlier: dict | None = None
    if rerun:
        data = json.loads((out_dir / "coverage.json").read_text())
        earlier = data["meta"]
        rows = {r["model_type"]: r for r in data["rows"] if r["model_type"] not in rerun}
    todo = [t for t in wanted if t not in rows]
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/coverage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "device": "CUDA" if torch.cuda.is_available() else "CPU only, Triton interpreter",
        "timeout_s": args.timeout, "mem_gb": args.mem_gb, "jobs": args.jobs, "seq": args.seq, "batch": args.batch,
        "tiny": ", ".join(f"{k} {v}" for k, v in TINY_SIZES.items() if k in ("hidden_size", "num_hidden_layers",
                                                                              "num_attention_heads", "vocab_size")),
        "catalogue_size": len(everything), "only": args.only or None, "planned": len(wanted), "partial": True,
    }
    if earlier is not None:  # the rows kept come from the earlier run: say so in the header
        meta["command"] = f"{earlier['command']}` on {earlier['date_utc']}, then `{meta['command']}"
    lock = threading.Lock()
    write_results(list(rows.values()), meta, out_dir)

    def one(model_type: str) -> None:
        row = run_in_subprocess(model_type, timeout=args.timeout, mem_gb=args.mem_gb or None, seq=args.seq,
                                batch_size=args.batch)
        with lock:
            rows[model_type] = row
            write_results(list(rows.values()), meta, out_dir)
            print(f"[{len(rows)}/{len(wanted)}] {model_type}: {row['status']}"
                  + (f" ({failure_reason(row)})" if is_failure(row) else "")
                  + f" {row.get('wall_seconds', '')}s", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    meta["partial"] = len(rows) < len(wanted)
    write_results(list(rows.values()), meta, out_dir)
    print(render_markdown(list(rows.values()), {**meta, "done": len(rows)}).split("\n## By category")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
