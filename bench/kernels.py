"""Kernel benchmark: each fastft op against PyTorch eager and torch.compile of the same reference.

    python bench/kernels.py [--smoke] [--out bench/results] [--only rms_norm,glu,...]

Per case and per implementation (eager reference, torch.compile(reference), fastft op), forward
(under no_grad) and forward+backward (random output grads, input .grad reset each iteration):
median time from triton.testing.do_bench (warm-up, CUDA events, L2 flushed between runs) and of
CUDA-graph replays of the same step (GPU time without host overhead), achieved
GB/s = minimal bytes moved (each input read once, each output written once) / time, and that as a
fraction of the device's measured copy bandwidth. Before timing, each path is checked once
against the reference math run on fp32 copies of the inputs (rel L2 error of outputs and input
grads); fastft's row FAILs above a bf16 bound, and eager bf16's own error shows the noise floor.

Sizes: 16,384 tokens, hidden 4,096, 32 query / 8 kv heads of dim 128, MLP width 14,336 (an
8B-class decoder layer), bf16. --smoke uses tiny sizes; on a machine without a GPU it runs each
path once and checks it (Triton's interpreter), without timing.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DT = torch.bfloat16
ERR_BOUND = 1e-2  # rel L2 error a bf16 result may have against the fp32 reference
IMPLS = ("eager", "compile", "fastft")
MODES = ("fwd", "fwd+bwd")
REAL = dict(tokens=16384, hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336)
SMOKE = dict(tokens=64, hidden=128, heads=4, kv_heads=2, head_dim=16, mlp=256)


def import_fastft() -> None:
    """Import fastft before triton (on CPU it selects Triton's interpreter). Where fastft is not
    installed (a bare GPU machine), map the repository's kernels/ as fastft.kernels, as pyproject does."""
    try:
        import fastft  # noqa: F401
        return
    except ImportError as e:
        print(f"note: `import fastft` failed ({e}); loading {ROOT / 'kernels'} as fastft.kernels")
    pkg = types.ModuleType("fastft")
    pkg.__path__ = [str(ROOT / "fastft")]
    sys.modules["fastft"] = pkg
    if "fastft.kernels" not in sys.modules:  # a failed `import fastft` may have loaded it already
        spec = importlib.util.spec_from_file_location(
            "fastft.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastft.kernels"] = mod
        spec.loader.exec_module(mod)
    pkg.kernels = sys.modules["fastft.kernels"]


import_fastft()
import triton  # noqa: E402  (after fastft, see above)
import triton.testing  # noqa: E402


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    family: str  # module under fastft.kernels that registers the op
    make: Callable[[], list[torch.Tensor]]  # random inputs; trainable ones require grad
    ref: Callable[..., Any]  # eager PyTorch math (also what torch.compile gets)
    fused: Callable[..., Any]  # the fastft op
    bytes_fwd: int
    bytes_bwd: int  # the backward alone; fwd+bwd moves bytes_fwd + bytes_bwd


def _rand(*shape: int, dev: str, scale: float = 1.0, shift: float = 0.0, grad: bool = False) -> torch.Tensor:
    return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale + shift).to(DT).requires_grad_(grad)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def glu_silu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def glu_gelu_tanh_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def glu_packed_silu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def build_cases(s: dict[str, int], dev: str) -> list[Case]:
    """All cases; ops are looked up at call time, so a family that is missing fails only its own cases."""
    T, N, H, KV, D, M = s["tokens"], s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["mlp"]
    b = 2  # bytes per bf16 element
    ops = lambda: torch.ops.fastft  # noqa: E731
    cases: list[Case] = []

    def rms_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from fastft.kernels.rms_norm import rms_norm_reference
        # "normalise in fp32, cast back, multiply": the common module form
        return rms_norm_reference(x, w, 1e-6, 0.0, DT, DT)

    cases.append(Case(
        "rms_norm", "rms_norm",
        lambda: [_rand(T, N, dev=dev, grad=True), _rand(N, dev=dev, scale=0.1, shift=1.0, grad=True)],
        rms_ref, lambda x, w: ops().rms_norm(x, w, 1e-6, 0.0, DT, DT),
        bytes_fwd=b * (2 * T * N + N), bytes_bwd=b * (3 * T * N + 2 * N)))

    def ln_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, bias, 1e-5)  # what models call

    cases.append(Case(
        "layer_norm", "layer_norm",
        lambda: [_rand(T, N, dev=dev, grad=True), _rand(N, dev=dev, scale=0.1, shift=1.0, grad=True),
                 _rand(N, dev=dev, scale=0.1, grad=True)],
        ln_ref, lambda x, w, bias: ops().layer_norm(x, w, bias, 1e-5, None, DT),
        bytes_fwd=b * (2 * T * N + 2 * N), bytes_bwd=b * (3 * T * N + 3 * N)))

    def make_rope() -> list[torch.Tensor]:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
        freqs = torch.outer(torch.arange(T, device=dev, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[None, None]  # [1, 1, T, D]
        # q/k as the attention sees them: [1, T, H, D] projection outputs transposed to [1, H, T, D]
        q = _rand(1, T, H, D, dev=dev).transpose(1, 2).requires_grad_()
        k = _rand(1, T, KV, D, dev=dev).transpose(1, 2).requires_grad_()
        return [q, k, emb.cos().to(DT), emb.sin().to(DT)]

    qk = (H + KV) * T * D
    cases.append(Case(
        "rope", "rope", make_rope, rope_reference,
        lambda q, k, cos, sin: ops().rope(q, k, cos, sin, False, DT, DT),
        bytes_fwd=b * (2 * qk + 2 * T * D), bytes_bwd=b * (2 * qk + 2 * T * D)))

    make_glu = lambda: [_rand(T, M, dev=dev, grad=True), _rand(T, M, dev=dev, grad=True)]  # noqa: E731
    for act, ref in (("silu", glu_silu_reference), ("gelu_tanh", glu_gelu_tanh_reference)):
        cases.append(Case(
            f"glu_{act}", "glu", make_glu, ref,
            lambda g, u, act=act: ops().glu(g, u, act, DT, DT),
            bytes_fwd=b * 3 * T * M, bytes_bwd=b * 5 * T * M))
    cases.append(Case(
        "glu_packed_silu", "glu", lambda: [_rand(T, 2 * M, dev=dev, grad=True)], glu_packed_silu_reference,
        lambda gu: ops().glu_packed(gu, "silu", DT, DT),
        bytes_fwd=b * 3 * T * M, bytes_bwd=b * 5 * T * M))
    return cases


# --------------------------------------------------------------------------------------------
# Running, checking, timing
# --------------------------------------------------------------------------------------------
def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def forward(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():  # inference-style forward: no autograd graph, nothing saved
        return as_tuple(fn(*inputs))


def train_step(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    torch.autograd.backward(as_tuple(fn(*inputs)), list(grads))


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    err = (torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()
    return err if err == err else float("inf")  # NaN never passes


def check(fn: Callable[..., Any], inputs: list[torch.Tensor], grads: list[torch.Tensor],
          ref_out: tuple[torch.Tensor, ...], ref_grads: list[torch.Tensor]) -> tuple[float, float]:
    """(output error, max input-grad error) of fn against the fp32 reference; also warms fn up."""
    out = forward(fn, inputs)
    if len(out) != len(ref_out) or any(o.shape != r.shape for o, r in zip(out, ref_out)):
        raise RuntimeError(f"output shapes {[tuple(o.shape) for o in out]} != reference {[tuple(r.shape) for r in ref_out]}")
    err_fwd = max(rel_l2(o, r) for o, r in zip(out, ref_out))
    trainable = [t for t in inputs if t.requires_grad]
    for t in trainable:
        t.grad = None
    train_step(fn, inputs, grads)
    err_bwd = max(rel_l2(t.grad, r) for t, r in zip(trainable, ref_grads))
    for t in trainable:
        t.grad = None
    return err_fwd, err_bwd


def bench_ms(fn: Callable[[], Any], grad_to_none: Optional[list[torch.Tensor]] = None) -> float:
    # warmup / rep are milliseconds of running fn; the median resists stray slow iterations
    return triton.testing.do_bench(fn, warmup=100, rep=500, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn: Callable[[], Any], grad_to_none: Optional[list[torch.Tensor]] = None) -> Optional[float]:
    """Median ms of replaying ``fn`` captured in a CUDA graph: the GPU's time without the host's
    launch and dispatch overhead (which do_bench includes, and which a training step hides behind
    the GPU work of the layers around the op). None, with the reason printed, if capture fails."""
    def reset() -> None:
        for t in grad_to_none or []:
            t.grad = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                reset()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    except Exception as e:  # noqa: BLE001  (a path that cannot be captured keeps its do_bench time)
        print(f"    CUDA graph capture failed: {type(e).__name__}: {e}")
        return None


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written: the practical ceiling."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def run_case(case: Case, timed: bool, copy_gbps: Optional[float]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": case.name, "family": case.family, "status": "ok",
                           "bytes": {"fwd": case.bytes_fwd, "fwd+bwd": case.bytes_fwd + case.bytes_bwd}}
    torch.manual_seed(0)
    inputs = case.make()
    row["shapes"] = [list(t.shape) for t in inputs]
    trainable = [t for t in inputs if t.requires_grad]
    # The oracle: the same reference math on fp32 copies of the inputs (the explicit dtype
    # arguments it has still round where the modules do). Eager bf16 is checked against it too,
    # which shows the bf16 noise floor fastft's error should sit near.
    ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    ref_out = forward(case.ref, ref_inputs)
    # One per output, laid out as the output is (as the next op's backward would give it): a
    # contiguous gradient for a transposed output costs every implementation a layout copy.
    grads = [torch.randn_like(o, dtype=DT) for o in ref_out]
    train_step(case.ref, ref_inputs, [g.to(o.dtype) for g, o in zip(grads, ref_out)])
    ref_grads = [t.grad for t in ref_inputs if t.requires_grad]
    compiled = torch.compile(case.ref, dynamic=False)
    fns = {"eager": case.ref, "compile": compiled, "fastft": case.fused}

    row["rel_err"] = {}
    for impl, fn in fns.items():  # also compiles / warms up every path before any timing
        e_f, e_b = check(fn, inputs, grads, ref_out, ref_grads)
        row["rel_err"][impl] = {"fwd": e_f, "fwd+bwd": e_b}
        print(f"  {case.name:16s} {impl:8s} rel L2 err vs fp32: out {e_f:.2e}, grads {e_b:.2e}", flush=True)
        if max(e_f, e_b) > ERR_BOUND:
            row["status"] = "FAIL" if impl == "fastft" else row["status"]
            row.setdefault("note", []).append(f"{impl} error above {ERR_BOUND:g}")
    del ref_inputs, ref_out, ref_grads

    if timed:
        row["timings"] = {m: {} for m in MODES}
        for impl, fn in fns.items():
            for mode in MODES:
                if mode == "fwd":
                    step, reset = (lambda fn=fn: forward(fn, inputs)), None
                else:
                    step, reset = (lambda fn=fn: train_step(fn, inputs, grads)), trainable
                ms = bench_ms(step, grad_to_none=reset)
                g_ms = graph_ms(step, reset)
                gbps = row["bytes"][mode] / ms / 1e6
                row["timings"][mode][impl] = {
                    "ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps, "graph_ms": g_ms,
                    "graph_pct_copy": 100 * row["bytes"][mode] / g_ms / 1e6 / copy_gbps if g_ms else None}
        row["fastft_vs_compile"] = {m: row["timings"][m]["compile"]["ms"] / row["timings"][m]["fastft"]["ms"]
                                    for m in MODES}
        fb = row["timings"]["fwd+bwd"]
        # the targets: fwd+bwd at least as fast as torch.compile and >= 70% of copy
        # bandwidth; judged on GPU time (CUDA graph) where both paths could be captured
        if fb["fastft"]["graph_ms"] and fb["compile"]["graph_ms"]:
            row["meets_target"] = (fb["fastft"]["graph_ms"] <= fb["compile"]["graph_ms"]
                                   and fb["fastft"]["graph_pct_copy"] >= 70.0)
        else:
            row["meets_target"] = row["fastft_vs_compile"]["fwd+bwd"] >= 1.0 and fb["fastft"]["pct_copy"] >= 70.0
    del inputs, grads, trainable, fns, compiled
    return row


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    bw = meta["copy_bandwidth_gbps"]
    lines = [
        "# fastft kernel benchmark",
        "",
        f"- device: {meta['device']}; date (UTC): {meta['date_utc']}",
        f"- torch {meta['torch']}, triton {meta['triton']}; sizes: {meta['sizes']}",
        f"- command: `{meta['command']}`",
        f"- measured copy bandwidth (read + write): {bw:.0f} GB/s" if bw else "- copy bandwidth: not measured (no GPU)",
        f"- times: median ms of triton.testing.do_bench (host overhead included); graph ms: median of "
        f"CUDA-graph replays (GPU time only); GB/s = minimal bytes / time; fwd under no_grad; "
        f"err = max rel L2 error of outputs (fwd) / input grads (fwd+bwd) vs the reference in fp32, "
        f"fastft / eager bf16 (FAIL above {ERR_BOUND:g}); target (fwd+bwd): "
        f">= compile and >= 70% of copy bandwidth",
        "",
        "| case | mode | eager ms | compile ms | fastft ms | eager GB/s | compile GB/s | fastft GB/s "
        "| fastft % copy | vs compile | graph ms compile / fastft | graph fastft % copy | err fastft / eager | status |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    notes = []
    for r in rows:
        if r["status"] in ("skipped", "error"):
            notes.append(f"- {r['name']}: {r['status']}: {r.get('note', '')}")
            continue
        for mode in MODES:
            err = f"{r['rel_err']['fastft'][mode]:.1e} / {r['rel_err']['eager'][mode]:.1e}"
            status = r["status"]
            if mode == "fwd+bwd" and "meets_target" in r:
                status += ", target met" if r["meets_target"] else ", target missed"
            t = r.get("timings", {}).get(mode)
            if t:
                cells = [f"{t[i]['ms']:.3f}" for i in IMPLS] + [f"{t[i]['gbps']:.0f}" for i in IMPLS]
                cells += [f"{t['fastft']['pct_copy']:.0f}%", f"{r['fastft_vs_compile'][mode]:.2f}x"]
                g_c, g_f = t["compile"]["graph_ms"], t["fastft"]["graph_ms"]
                cells += [f"{g_c:.3f} / {g_f:.3f}" if g_c and g_f else "-",
                          f"{t['fastft']['graph_pct_copy']:.0f}%" if g_f else "-"]
            else:
                cells = ["-"] * 10
            lines.append(f"| {r['name']} | {mode} | " + " | ".join(cells) + f" | {err} | {status} |")
        if r.get("note"):
            notes.append(f"- {r['name']}: {'; '.join(r['note'])}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; on CPU: run and check once, no timing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for kernels.json / kernels.md")
    ap.add_argument("--only", default="", help="comma-separated case or family names (e.g. rms_norm,glu)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sizes = SMOKE if args.smoke else REAL
    if not cuda and not args.smoke:
        print("no GPU: the full-size benchmark needs one; use --smoke to check the script here")
        return 2
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv), "sizes": sizes, "dtype": "bfloat16",
        "smoke": args.smoke, "err_bound": ERR_BOUND, "copy_bandwidth_gbps": None,
    }
    if cuda:
        meta["copy_bandwidth_gbps"] = copy_bandwidth_gbps()
        print(f"{meta['device']}: copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s", flush=True)

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    cases = [c for c in build_cases(sizes, dev) if not only or c.name in only or c.family in only]
    rows: list[dict[str, Any]] = []
    for case in cases:
        try:  # the families are written independently: use whichever exist
            importlib.import_module(f"fastft.kernels.{case.family}")
        except Exception as e:  # noqa: BLE001
            print(f"skip {case.name}: fastft.kernels.{case.family} not importable ({type(e).__name__}: {e})")
            rows.append({"name": case.name, "family": case.family, "status": "skipped", "note": f"{type(e).__name__}: {e}"})
            continue
        print(f"{case.name} ...", flush=True)
        try:
            rows.append(run_case(case, timed=cuda, copy_gbps=meta["copy_bandwidth_gbps"]))
        except Exception as e:  # noqa: BLE001  (one broken case must not lose the others' numbers)
            traceback.print_exc()
            rows.append({"name": case.name, "family": case.family, "status": "error", "note": f"{type(e).__name__}: {e}"})
        torch._dynamo.reset()  # drop compiled graphs and their cached buffers between cases
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({**meta, "cases": rows}, indent=2) + "\n")
    md = markdown(meta, rows)
    (out / "kernels.md").write_text(md)
    print("\n" + md + f"\nwrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 1 if any(r["status"] in ("FAIL", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
