"""Where a LoRA MLP adds its adapters' corrections: through the GEMMs' depth, whose wider operands
are copies of x, dY and the base weights, or inside the GLU kernels' tiles, one rank-r dot each.

    python3 bench/lora_mlp_corrections.py [--rows 8192] [--hidden 2048] [--width 8192] [--rank 16]

bf16, SiLU, eager bf16 roundings (the 1B LoRA step's MLP: 8,192 tokens, hidden 2,048, width
8,192, rank 16 on gate, up and down). Times, as ``kernels/lora.py`` could run them:

- forward (gate and up to h):
  - depth: x A^T, then g and u from GEMMs over [x A_g^T | x | x A_u^T] and the copies
    [s B_g | W_g], [W_u | s B_u], then the GLU kernel (what the MLP op does at this size);
  - tiles: the bases' GEMMs, then the LoRA GLU kernel adds the corrections as it reads G and U
    and writes h alone (G and U stay the bases' outputs);
- backward (dh and the GLU pass with the adapters' products):
  - depth: dh from one GEMM over [dY | dyb_d] and [W_d; A_d], then ``lora_glu_backward``;
  - dh in tiles: dh = dY W_d, and the pass adds dyb_d A_d to each tile;
  - all in tiles: that, and the pass corrects G and U too (after the forward "tiles").

Medians in CUDA graphs (``triton.testing.do_bench_cudagraph``: as the training step replays
them), and the largest difference from the "depth" results relative to their largest value.
GPU only.
"""
from __future__ import annotations

import argparse

import torch
import triton

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.adapter_grads import sum_partials
from fastft.kernels.concat import concat_columns
from fastft.kernels.glu import glu_forward
from fastft.kernels.lora_glu import lora_glu_backward, lora_glu_forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    n, d, w, r = args.rows, args.hidden, args.width, args.rank
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dt)

    x, dy = rand(n, d), rand(n, d)
    w_g, w_u, w_d = rand(w, d, scale=d ** -0.5), rand(w, d, scale=d ** -0.5), rand(d, w, scale=w ** -0.5)
    a_gu, a_d = rand(2 * r, d, scale=d ** -0.5), rand(r, w, scale=w ** -0.5)
    b_g, b_u, b_d = rand(w, r, scale=0.5), rand(w, r, scale=0.5), rand(d, r, scale=0.5)  # s B

    def forward_depth():
        xa = torch.mm(x, a_gu.t())
        wide = concat_columns(xa[:, :r], x, xa[:, r:])
        g = torch.mm(wide[:, :r + d], concat_columns(b_g, w_g).t())
        u = torch.mm(wide[:, r:], concat_columns(w_u, b_u).t())
        return glu_forward(g, u, "silu", dt, dt), g, u, xa

    def forward_tiles():
        xa = torch.mm(x, a_gu.t())
        g, u = torch.mm(x, w_g.t()), torch.mm(x, w_u.t())
        h = lora_glu_forward(g, u, xa[:, :r], xa[:, r:], b_g, b_u, 1.0, 1.0, "silu", dt, dt, write_corrected=False)
        return h, g, u, xa

    _, g_c, u_c, xa = forward_depth()  # corrected g and u
    _, g_b, u_b, _ = forward_tiles()  # the bases' outputs
    dyb_d = torch.mm(dy, b_d)

    def backward(dh_in_tiles: bool, bases: bool):
        g, u = (g_b, u_b) if bases else (g_c, u_c)
        if dh_in_tiles:
            dh = torch.mm(dy, w_d)
        else:
            dh = torch.mm(concat_columns(dy, dyb_d), torch.cat([w_d, a_d]))
        dyb, pending = dh.new_empty((n, 2 * r)), []
        res = lora_glu_backward(dh, g, u, xa[:, :r], xa[:, r:], b_g, b_u, dyb_d, 0.5, 2.0, "silu", dt, dt, dyb,
                                pending, dg_over_dh=True, a_down=a_d if dh_in_tiles else None, bases=bases)
        sum_partials(pending)
        return res.dg, res.du, dyb, res.db_gate, res.db_up, res.da_down

    def timed(fn) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

    def err(have, want) -> float:
        return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                   for a, b in zip(have, want))

    want_f, want_b = forward_depth()[:1], backward(False, False)
    print(f"rows {n}, hidden {d}, width {w}, rank {r}, bf16 silu, {torch.cuda.get_device_name()}")
    print("| variant | us | max rel diff vs depth |")
    print("|---|--:|--:|")
    for name, fn, want in [
            ("forward: depth (copies of x, W_g, W_u) + GLU", forward_depth, want_f),
            ("forward: tiles (bases' GEMMs + LoRA GLU, no write-back)", forward_tiles, want_f),
            ("backward: depth (copies of dY, W_d) + pass", lambda: backward(False, False), want_b),
            ("backward: dh in tiles + pass", lambda: backward(True, False), want_b),
            ("backward: dh, g and u in tiles + pass", lambda: backward(True, True), want_b)]:
        t = timed(fn)
        print(f"| {name} | {t:.1f} | {err(fn()[:len(want)], want):.1e} |", flush=True)


if __name__ == "__main__":
    main()
