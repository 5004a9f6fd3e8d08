"""Architecture coverage, a fast sample: ``bench/coverage.py``'s worker on a few architectures that
tests/test_models.py does not cover, and its runner turning crashes and hangs into rows.

The whole catalogue: ``python bench/coverage.py`` (bench/results/coverage.md)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from helpers import count_modules, tiny

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    # Loaded under its own name: "coverage" would shadow coverage.py, the test-coverage package.
    spec = importlib.util.spec_from_file_location("fastft_bench_coverage", ROOT / "bench" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

# Families besides the norms: rotary attention in every layer, a gated MLP in every layer (else an
# ungated one: its activation is mlp_act's); the fused loss is expected in all four (one graph,
# logits straight from lm_head).
SAMPLE = {
    "starcoder2": dict(rope=True, glu=False),  # LayerNorm with bias, plain GELU MLP
    "stablelm": dict(rope=True, glu=True),  # LayerNorm, partial rotary (25% of the head dim)
    "cohere": dict(rope=True, glu=True),  # bias-free LayerNorm, interleaved rotary, logit scale
    "glm": dict(rope=True, glu=True),  # RMSNorm, packed gate_up, partial interleaved rotary
}


@pytest.mark.parametrize("model_type", SAMPLE)
def test_sample_architecture_captured_rewritten_checked(model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {model_type}")
    model = tiny(model_type)  # counted independently of the worker's own bookkeeping
    layers = model.config.num_hidden_layers
    expected = {"rms_norm": count_modules(model, "RMSNorm"), "layer_norm": count_modules(model, "LayerNorm"),
                "rope": layers if SAMPLE[model_type]["rope"] else 0,
                "glu_mlp": layers if SAMPLE[model_type]["glu"] else 0,
                "mlp_act": 0 if SAMPLE[model_type]["glu"] else layers, "linear_cross_entropy": 1}
    expected = {k: v for k, v in expected.items() if v}
    del model

    row = bench.run_worker(model_type)
    assert row["error"] is None, row["error"]
    assert row["stage"] == "done" and row["status"] == "ok", row
    assert row["category"] == "decoder-only text"
    assert row["capture_failures"] == []
    assert row["graphs_captured"] >= 1 and row["graph_breaks"] == 0 and row["one_graph"]
    assert row["counts"] == expected, row
    assert row["near_misses"] == [], row["near_misses"]
    assert row["check"]["ok"], row["check"]
    assert row["check"]["regions_checked"] == sum(expected.values())
    assert abs(row["loss"] - row["eager_loss"]) <= 1e-4 * abs(row["eager_loss"]) + 1e-5


def test_runner_turns_failures_into_rows(tmp_path):
    # A model type transformers does not know: the real worker, in its own process, reports why.
    row = bench.run_in_subprocess("no_such_model_type", timeout=120, mem_gb=6)
    assert row["status"] == "error" and row["error"]["stage"] == "config"
    assert "no_such_model_type" in row["error"]["message"]
    assert bench.failure_reason(row).startswith("config: ValueError: unknown model type")

    # A worker that dies by a signal, and one that hangs: rows with the reason, the stage reached.
    crash = tmp_path / "crash.py"
    crash.write_text("import os, signal\nprint('@@STAGE@@ capture', flush=True)\n"
                     "os.kill(os.getpid(), signal.SIGSEGV)\n")
    row = bench.run_in_subprocess("crashing", timeout=60, mem_gb=None, script=str(crash))
    assert row["status"] == "crash" and row["stage"] == "capture", row
    assert "SIGSEGV" in row["error"]["message"]

    hang = tmp_path / "hang.py"
    hang.write_text("import time\nprint('@@STAGE@@ check', flush=True)\ntime.sleep(600)\n")
    hung = bench.run_in_subprocess("hanging", timeout=2, mem_gb=None, script=str(hang))
    assert hung["status"] == "timeout" and hung["stage"] == "check", hung

    # A worker over its memory limit.
    hog = tmp_path / "hog.py"
    hog.write_text("print('@@STAGE@@ build', flush=True)\nx = bytearray(2 * 2**30)\n")
    hogged = bench.run_in_subprocess("hog", timeout=60, mem_gb=0.5, script=str(hog))
    assert hogged["status"] == "oom" and hogged["stage"] == "build", hogged

    # All of them still make a table, with the failures grouped by reason.
    ok = {"model_type": "fine", "status": "ok", "stage": "done", "category": "decoder-only text",
          "model_class": "FineForCausalLM", "counts": {"rms_norm": 5}, "norm_modules": {"rms_norm": 5},
          "graphs_captured": 1, "graph_breaks": 0, "one_graph": True, "near_misses_total": 0,
          "near_misses": [], "check": {"ok": True}, "seconds": 1.0}
    rows = [ok, hung, hogged]
    meta = {"command": "test", "date_utc": "now", "torch": "x", "transformers": "y", "device": "cpu",
            "tiny": "tiny", "batch": 2, "seq": 16, "timeout_s": 2, "mem_gb": 0.5, "partial": True, "done": 3,
            "planned": 5}
    bench.write_results(rows, meta, tmp_path / "out")
    md = (tmp_path / "out" / "coverage.md").read_text()
    assert "PARTIAL RUN: 3 of 5" in md
    assert "**1 of 1 decoder-only text architectures captured in one graph / 1 rewritten / 1 checked" in md
    assert "timeout in check" in md and "oom in build" in md
    assert "| fine | FineForCausalLM |" in md
