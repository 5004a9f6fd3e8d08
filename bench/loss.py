"""Loss-step benchmark: fastft::linear_cross_entropy against the unfused PyTorch computation.

    python bench/loss.py [--smoke] [--out bench/results] [--only v128256_h4096,...]

The loss step is the projection to the vocabulary plus cross-entropy, forward and backward:

    (a) eager     F.cross_entropy((h @ W.T).float(), y)        (what eager models run)
    (b) compile   torch.compile of (a) (default mode, dynamic=False, warmed up)
    (c) fastft    torch.ops.fastft.linear_cross_entropy(h, W, None, y, -100, None, 1.0, "mean", None)
    (d) fastft+compile   torch.compile of a function calling (c) (informative: the op as the
                  compiler's Inductor lowering runs it)

Cases: 8,192 tokens, vocabulary 128,256 and 262,144, hidden 2,048 and 4,096, bf16, with the
projection weight trainable and frozen (then only the hidden states get a gradient, the
adapter-training case); hidden always requires grad; 10% of the labels are ignore_index (a
masked prompt). Per case and implementation:

- peak extra memory of one step: torch.cuda.max_memory_allocated() during the step minus the
  memory allocated before it (after gc, empty_cache and reset_peak_memory_stats; .grad reset
  to None first, so the new gradients count);
- time: median ms of triton.testing.do_bench of the step (forward + backward, .grad reset each
  iteration) and of CUDA-graph replays of it (GPU time without host overhead; None where capture
  fails);
- the loss and the rel L2 error of the loss and of the gradients (dh, and dW where trainable)
  against (a).

Targets (from the issue): fastft's peak extra memory <= 15% of (a)'s and its time <= 1.0x of
(a)'s. Results: bench/results/loss.json (all numbers, device, date, versions, command) and
bench/results/loss.md (a table, also printed). All eight cases take minutes (two torch.compile
runs each); ``--only v128256`` or ``--only v262144`` splits them. --smoke uses tiny sizes; on a
machine without a GPU it runs each path once through Triton's interpreter and checks it, without
timing:

    TRITON_INTERPRET=1 python bench/loss.py --smoke --out /tmp/losssmoke
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import sys
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DT = torch.bfloat16
IMPLS = ("eager", "compile", "fastft", "fastft+compile")
MEM_TARGET = 0.15  # fastft peak extra memory / eager's
TIME_TARGET = 1.0  # fastft time / eager's
ERR_BOUND = 2e-2  # rel L2 error of fastft's loss and gradients against eager bf16
REAL = dict(tokens=8192, vocabs=(128256, 262144), hiddens=(2048, 4096))
SMOKE = dict(tokens=64, vocabs=(300, 517), hiddens=(32, 48))
IGNORED_FRACTION = 0.1


def import_fastft() -> None:
    """Import fastft before triton (on CPU it selects Triton's interpreter). Where fastft is not
    installed (a bare GPU machine), map the repository's kernels/ as fastft.kernels."""
    try:
        import fastft  # noqa: F401
    except ImportError as e:
        print(f"note: `import fastft` failed ({e}); loading {ROOT / 'kernels'} as fastft.kernels")
        pkg = types.ModuleType("fastft")
        pkg.__path__ = [str(ROOT / "fastft")]
        sys.modules["fastft"] = pkg
        if "fastft.kernels" not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                "fastft.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
            mod = importlib.util.module_from_spec(spec)
            sys.modules["fastft.kernels"] = mod
            spec.loader.exec_module(mod)
        pkg.kernels = sys.modules["fastft.kernels"]
    importlib.import_module("fastft.kernels.linear_cross_entropy")  # registers the op


import_fastft()
import triton  # noqa: E402  (after fastft, see above)
import triton.testing  # noqa: E402


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------
def unfused_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), y)


def fastft_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastft.linear_cross_entropy(h, w, None, y, -100, None, 1.0, "mean", None)


def make_inputs(tokens: int, vocab: int, hidden: int, trainable: bool, dev: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(tokens, hidden, device=dev, generator=gen).to(DT).requires_grad_()
    # logits of a few units, as a trained model's
    w = (torch.randn(vocab, hidden, device=dev, generator=gen) * (3.0 / hidden ** 0.5)).to(DT)
    w.requires_grad_(trainable)
    y = torch.randint(0, vocab, (tokens,), device=dev, generator=gen)
    y[: int(tokens * IGNORED_FRACTION)] = -100
    return h, w, y


def step(fn: Callable, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = fn(h, w, y)
    loss.backward()
    return loss


def reset_grads(*ts: torch.Tensor) -> None:
    for t in ts:
        t.grad = None


def rel_l2(a: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[float]:
    """||a - ref|| / ||ref|| in fp64, a slice at a time (a [262144, 4096] dW upcast whole would
    need tens of GB)."""
    if a is None or ref is None:
        return None
    a, ref = a.reshape(-1), ref.reshape(-1)
    num = den = 0.0
    step = 1 << 24
    for i in range(0, a.numel(), step):
        x, r = a[i: i + step].double(), ref[i: i + step].double()
        num += torch.sum((x - r) ** 2).item()
        den += torch.sum(r * r).item()
    err = (num ** 0.5) / max(den ** 0.5, 1e-30)
    return err if err == err else float("inf")  # NaN never passes


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def peak_extra_bytes(run: Callable[[], Any], h: torch.Tensor, w: torch.Tensor) -> int:
    reset_grads(h, w)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    reset_grads(h, w)
    return peak


def bench_ms(fn: Callable[[], Any], grad_to_none: list[torch.Tensor]) -> float:
    return triton.testing.do_bench(fn, warmup=200, rep=1000, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn: Callable[[], Any], grad_to_none: list[torch.Tensor]) -> Optional[float]:
    """Median ms of CUDA-graph replays of ``fn`` (GPU time only); None, with the reason, if the
    capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                reset_grads(*grad_to_none)
                fn()
        torch.cuda.current_stream().wait_stream(side)
        reset_grads(*grad_to_none)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        del graph
        return ms
    except Exception as e:  # noqa: BLE001
        print(f"    CUDA graph capture failed: {type(e).__name__}: {e}")
        return None


def run_case(tokens: int, vocab: int, hidden: int, trainable: bool, cuda: bool) -> dict[str, Any]:
    dev = "cuda" if cuda else "cpu"
    name = f"v{vocab}_h{hidden}_{'trainable' if trainable else 'frozen'}"
    row: dict[str, Any] = {"name": name, "tokens": tokens, "vocab": vocab, "hidden": hidden,
                           "weight_trainable": trainable, "status": "ok",
                           "logits_bytes_bf16": tokens * vocab * 2}
    h, w, y = make_inputs(tokens, vocab, hidden, trainable, dev)
    trainable_ts = [h, w] if trainable else [h]
    fns = {
        "eager": unfused_loss,
        "compile": torch.compile(unfused_loss, dynamic=False),
        "fastft": fastft_loss,
        "fastft+compile": torch.compile(fastft_loss, dynamic=False),
    }

    # Correctness (also compiles and warms every path up): loss and gradients against eager.
    results: dict[str, tuple] = {}
    for impl, fn in fns.items():
        reset_grads(h, w)
        loss = step(fn, h, w, y).detach()
        results[impl] = (loss, h.grad, w.grad)
        reset_grads(h, w)
    ref = results["eager"]
    row["loss"], row["rel_err"] = {}, {}
    for impl, (loss, dh, dw) in results.items():
        row["loss"][impl] = loss.item()
        row["rel_err"][impl] = {"loss": rel_l2(loss, ref[0]), "dh": rel_l2(dh, ref[1]), "dw": rel_l2(dw, ref[2])}
        errs = [e for e in row["rel_err"][impl].values() if e is not None]
        print(f"  {name:28s} {impl:15s} loss {loss.item():.6f}  rel err vs eager: "
              + ", ".join(f"{k} {v:.2e}" for k, v in row["rel_err"][impl].items() if v is not None), flush=True)
        if impl.startswith("fastft") and max(errs) > ERR_BOUND:
            row["status"] = "FAIL"
            row.setdefault("note", []).append(f"{impl} error above {ERR_BOUND:g}")
    del results, ref

    if cuda:
        row["peak_extra_bytes"], row["ms"], row["graph_ms"] = {}, {}, {}
        for impl, fn in fns.items():
            run = lambda fn=fn: step(fn, h, w, y)  # noqa: E731
            row["peak_extra_bytes"][impl] = peak_extra_bytes(run, h, w)
            row["ms"][impl] = bench_ms(run, trainable_ts)
            row["graph_ms"][impl] = graph_ms(run, trainable_ts)
            print(f"  {name:28s} {impl:15s} peak extra {row['peak_extra_bytes'][impl] / 2**30:7.3f} GiB, "
                  f"{row['ms'][impl]:8.3f} ms (graph {row['graph_ms'][impl] or float('nan'):8.3f} ms)", flush=True)
        e, f = "eager", "fastft"
        row["mem_ratio"] = row["peak_extra_bytes"][f] / row["peak_extra_bytes"][e]
        row["time_ratio"] = row["ms"][f] / row["ms"][e]
        if row["graph_ms"][f] and row["graph_ms"][e]:
            row["graph_time_ratio"] = row["graph_ms"][f] / row["graph_ms"][e]
        row["meets_target"] = row["mem_ratio"] <= MEM_TARGET and row["time_ratio"] <= TIME_TARGET
    del h, w, y, fns
    return row


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    gib = 2 ** 30
    lines = [
        "# fastft loss-step benchmark (projection + cross-entropy, forward + backward)",
        "",
        f"- device: {meta['device']}; date (UTC): {meta['date_utc']}",
        f"- torch {meta['torch']}, triton {meta['triton']}; {meta['tokens']} tokens, bf16, "
        f"{int(IGNORED_FRACTION * 100)}% of labels ignored, reduction mean",
        f"- command: `{meta['command']}`",
        "- eager: `F.cross_entropy((h @ W.T).float(), y)`; compile: torch.compile of it; fastft: "
        "`torch.ops.fastft.linear_cross_entropy`; fastft+compile: torch.compile of a function calling it",
        "- peak: max_memory_allocated during one step minus memory allocated before it (GiB); ms: "
        "median of triton.testing.do_bench (graph: of CUDA-graph replays); err: rel L2 vs eager of "
        "loss / dh / dW",
        f"- targets: fastft peak <= {MEM_TARGET:.0%} of eager's, fastft time <= {TIME_TARGET:.1f}x eager's",
        "",
        "| case | peak GiB eager / compile / fastft / fastft+compile | fastft / eager peak "
        "| ms eager / compile / fastft / fastft+compile | fastft / eager time | graph ms eager / fastft "
        "| loss eager / fastft | err fastft (loss / dh / dW) | status |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    notes = []
    for r in rows:
        if r["status"] == "error":
            notes.append(f"- {r['name']}: error: {r.get('note', '')}")
            continue
        err = r["rel_err"]["fastft"]
        err_s = " / ".join("-" if err[k] is None else f"{err[k]:.1e}" for k in ("loss", "dh", "dw"))
        loss_s = f"{r['loss']['eager']:.5f} / {r['loss']['fastft']:.5f}"
        status = r["status"]
        if "peak_extra_bytes" in r:
            pk, ms, gm = r["peak_extra_bytes"], r["ms"], r["graph_ms"]
            peak_s = " / ".join(f"{pk[i] / gib:.2f}" for i in IMPLS)
            ms_s = " / ".join(f"{ms[i]:.2f}" for i in IMPLS)
            g_s = (f"{gm['eager']:.2f} / {gm['fastft']:.2f}" if gm["eager"] and gm["fastft"] else "-")
            status += ", target met" if r["meets_target"] else ", target missed"
            cells = [peak_s, f"{r['mem_ratio']:.1%}", ms_s, f"{r['time_ratio']:.2f}x", g_s]
        else:
            cells = ["-"] * 5
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {loss_s} | {err_s} | {status} |")
        if r.get("note"):
            notes.append(f"- {r['name']}: {'; '.join(r['note'])}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; on CPU: run and check once, no timing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for loss.json / loss.md")
    ap.add_argument("--only", default="", help="comma-separated case names or prefixes (e.g. v128256_h4096)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no GPU: the full-size benchmark needs one; use --smoke to check the script here")
        return 2
    sizes = SMOKE if args.smoke else REAL
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv), "smoke": args.smoke,
        "tokens": sizes["tokens"], "vocabs": list(sizes["vocabs"]), "hiddens": list(sizes["hiddens"]),
        "dtype": "bfloat16", "ignored_fraction": IGNORED_FRACTION,
        "targets": {"mem_ratio_max": MEM_TARGET, "time_ratio_max": TIME_TARGET}, "err_bound": ERR_BOUND,
    }
    if cuda:
        meta["total_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows: list[dict[str, Any]] = []
    for vocab in sizes["vocabs"]:
        for hidden in sizes["hiddens"]:
            for trainable in (True, False):
                name = f"v{vocab}_h{hidden}_{'trainable' if trainable else 'frozen'}"
                if only and not any(name.startswith(o) for o in only):
                    continue
                print(f"{name} ...", flush=True)
                try:
                    rows.append(run_case(sizes["tokens"], vocab, hidden, trainable, cuda))
                except Exception as e:  # noqa: BLE001  (one broken case must not lose the others)
                    traceback.print_exc()
                    rows.append({"name": name, "status": "error", "note": f"{type(e).__name__}: {e}"})
                torch._dynamo.reset()
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss.json").write_text(json.dumps({**meta, "cases": rows}, indent=2) + "\n")
    md = markdown(meta, rows)
    (out / "loss.md").write_text(md)
    print("\n" + md + f"\nwrote {out / 'loss.json'} and {out / 'loss.md'}")
    return 1 if any(r["status"] in ("FAIL", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
