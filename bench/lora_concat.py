"""Adding a LoRA correction through the GEMM's depth instead of a pass over its output.

    python3 bench/lora_concat.py [--rows 8192] [--hidden 2048] [--width 8192] [--rank 16]

y = x W^T + s (x A^T) B^T is one GEMM of depth in + r: [x | s x A^T] times [W | B]^T. The
copies that build the two operands are of x's and W's size; the pass it saves reads and writes
y, which in a gated MLP is four times larger. This times, at one MLP's size:

- forward, gate and up: the bases' GEMMs then the LoRA GLU kernel (what fastft does now)
  against GEMMs over the concatenated operands then the plain GLU kernel;
- backward, dh = dy W_down + (s dy B_down) A_down: GEMM then ``addmm_`` against one GEMM
  over [dy | s dy B] and [W_down; A_down];

each beside the bare GEMMs (no adapters), with the max abs difference from the current path;
then the operands' copies alone, three ways.
GPU only (``triton.testing.do_bench``, median ms).
"""
from __future__ import annotations

import argparse

import torch
import triton

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.glu import glu_forward
from fastft.kernels.lora_glu import lora_glu_forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    n, d, w, r = args.rows, args.hidden, args.width, args.rank
    dt, s = torch.bfloat16, 2.0

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dt)

    x, wg, wu, wd = rand(n, d), rand(w, d, scale=d ** -0.5), rand(w, d, scale=d ** -0.5), rand(d, w, scale=w ** -0.5)
    a_gu, bg, bu = rand(2 * r, d, scale=d ** -0.5), rand(w, r), rand(w, r)
    a_d, b_d, dy = rand(r, w, scale=w ** -0.5), rand(d, r), rand(n, d)

    def fwd_now():
        xa = x @ a_gu.t()
        g, u = x @ wg.t(), x @ wu.t()
        return lora_glu_forward(g, u, xa[:, :r], xa[:, r:], bg, bu, s, s, "silu", None, dt)

    def fwd_concat(pad: int):
        xa = x @ a_gu.t()
        zeros = x.new_zeros(w, r)
        extra = [x.new_zeros(n, pad)] if pad else []
        xc = torch.cat([x, xa * s] + extra, dim=1)
        wg_c = torch.cat([wg, bg, zeros] + ([x.new_zeros(w, pad)] if pad else []), dim=1)
        wu_c = torch.cat([wu, zeros, bu] + ([x.new_zeros(w, pad)] if pad else []), dim=1)
        return glu_forward(xc @ wg_c.t(), xc @ wu_c.t(), "silu", None, dt)

    def fwd_bare():
        return glu_forward(x @ wg.t(), x @ wu.t(), "silu", None, dt)

    def bwd_now():
        dyb = (dy @ b_d).mul_(s)
        return (dy @ wd).addmm_(dyb, a_d)

    def bwd_concat():
        dyb = (dy @ b_d).mul_(s)
        return torch.cat([dy, dyb], dim=1) @ torch.cat([wd, a_d], dim=0)

    def bwd_bare():
        return dy @ wd

    pad64 = (-(d + 2 * r)) % 64
    ref_f, ref_b = fwd_now().float(), bwd_now().float()
    print(f"rows {n}, hidden {d}, width {w}, rank {r}, bf16, {torch.cuda.get_device_name()}")
    print("variant                               ms    max|diff| vs current")
    for name, fn, ref in [("fwd: GEMMs + LoRA GLU kernel (now)", fwd_now, ref_f),
                          ("fwd: concat depth + GLU", lambda: fwd_concat(0), ref_f),
                          (f"fwd: concat depth padded +{pad64} + GLU", lambda: fwd_concat(pad64), ref_f),
                          ("fwd: bare GEMMs + GLU (no adapters)", fwd_bare, None),
                          ("bwd dh: GEMM + addmm_ (now)", bwd_now, ref_b),
                          ("bwd dh: concat depth", bwd_concat, ref_b),
                          ("bwd dh: bare GEMM (no adapter)", bwd_bare, None)]:
        t = triton.testing.do_bench(fn)
        diff = f"{(fn().float() - ref).abs().max().item():.3g}" if ref is not None else "-"
        print(f"{name:36s} {t:6.3f}  {diff}", flush=True)
    _time_copies(x, x @ a_gu.t(), wg, bg)


def _time_copies(x: torch.Tensor, xa: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """The operands' copies alone: [x | x A^T] and [W | B] by copy_ into column slices, by
    torch.cat and by the library's Triton kernel (kernels/concat.py)."""
    from fastft.kernels.concat import concat_columns

    def by_slices(*parts):
        out = parts[0].new_empty((parts[0].shape[0], sum(p.shape[1] for p in parts)))
        start = 0
        for p in parts:
            out[:, start:start + p.shape[1]].copy_(p)
            start += p.shape[1]
        return out

    print("copies                                ms    equal to torch.cat")
    for what, parts in ((f"[x | xA^T] {list(x.shape)}", (x, xa)), (f"[W | B] {list(w.shape)}", (w, b))):
        ref = torch.cat(parts, dim=1)
        for name, fn in (("copy_ into slices", by_slices), ("torch.cat", lambda *p: torch.cat(p, dim=1)),
                         ("concat_columns (Triton)", concat_columns)):
            t = triton.testing.do_bench(lambda: fn(*parts))
            print(f"{what} {name:24s} {t:6.3f}  {torch.equal(fn(*parts), ref)}", flush=True)


if __name__ == "__main__":
    main()
