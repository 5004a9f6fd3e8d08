"""Time the RMSNorm kernels (kernels/rms_norm.py) over their launch parameters at one layer's
activation, against the bandwidth an elementwise kernel reaches on the same tensors.

    python3 bench/norm_tiles.py [--rows 8192] [--width 2048]

Forward: rows per program x num_warps. Backward (dx and dW): rows per tile x num_warps x
programs per SM x num_stages (each program walks its rows in a loop). Times are medians of CUDA
graph replays (``triton.testing.do_bench_cudagraph``), so that the host's launch is not in them;
the reference is ``torch.compile`` of ``x + y`` (read two, write one). GPU only; the pick goes
into the launch configs with the device, date and this command.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

import fastft  # noqa: F401  (before triton kernels are defined: selects the interpreter off the GPU)
from fastft.kernels.launch import cdiv, device_sm_count
from fastft.kernels.rms_norm import rms_norm_bwd_kernel, rms_norm_fwd_kernel


# The launchers' choices at 2,048 wide (launch.row_tile_config, rms_norm._bwd_config and
# launch.num_partial_programs; Triton's default num_stages is 3).
CURRENT_FWD = (2, 4)
CURRENT_BWD = (2, 4, 4, 3)


def _us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--width", type=int, default=2048)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/norm_tiles.py times GPU kernels: no GPU here")
    rows, n, dt = args.rows, args.width, torch.bfloat16
    x, dy = torch.randn(rows, n, device="cuda", dtype=dt), torch.randn(rows, n, device="cuda", dtype=dt)
    w = torch.randn(n, device="cuda", dtype=dt)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    unit = rows * n * x.element_size()
    add = torch.compile(lambda a, b: a + b)
    add(x, dy)
    t_add = _us(lambda: add(x, dy))
    print(f"{rows} x {n} bf16 on {torch.cuda.get_device_name()}: compiled x + y {t_add:.1f} us "
          f"({3 * unit / t_add / 1e3:.0f} GB/s)")

    fwd = []
    for br, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16)):
        def run():
            rms_norm_fwd_kernel[(cdiv(rows, br),)](
                x, w, y, rows, n, n, n, 1e-5, 0.0, HAS_WEIGHT=True, NORM_DTYPE=tl.bfloat16, OUT_DTYPE=tl.bfloat16,
                SUM_OF_SQUARES=False, BLOCK_ROWS=br, BLOCK_N=triton.next_power_of_2(n), num_warps=warps)
        try:
            fwd.append((_us(run), br, warps))
        except Exception as e:  # a configuration the compiler refuses
            print(f"  forward rows {br} warps {warps}: {type(e).__name__}")
    print("forward (read x, write y):")
    current = [f for f in fwd if f[1:] == CURRENT_FWD]
    for us, br, warps in sorted(fwd)[:8] + current:
        print(f"  {us:7.1f} us ({2 * unit / us / 1e3:.0f} GB/s)  rows/program {br}  num_warps {warps}"
              + ("  <- current" if (br, warps) == CURRENT_FWD else ""))

    bwd = []
    sms = device_sm_count(x.device)
    for br, warps, per_sm, stages in itertools.product((1, 2, 4), (4, 8, 16), (1, 2, 4, 8), (1, 2, 3)):
        blocks = cdiv(rows, br)
        g = min(blocks, per_sm * sms)
        per_program = cdiv(blocks, g)
        g = cdiv(blocks, per_program)
        partials = torch.empty((g, n), device="cuda")

        def run():
            rms_norm_bwd_kernel[(g,)](
                dy, x, w, dx, partials, rows, n, n, n, n, 1e-5, 0.0, per_program, HAS_WEIGHT=True,
                NORM_DTYPE=tl.bfloat16, DX_DTYPE=tl.bfloat16, COMPUTE_DX=True, COMPUTE_DW=True,
                SUM_OF_SQUARES=False, BLOCK_ROWS=br, BLOCK_N=triton.next_power_of_2(n), num_warps=warps,
                num_stages=stages)
            partials.sum(0)
        try:
            bwd.append((_us(run), br, warps, per_sm, stages))
        except Exception as e:
            print(f"  backward rows {br} warps {warps} per-SM {per_sm} stages {stages}: {type(e).__name__}")
    print("backward (read x and dy, write dx; dW partials and their sum):")
    current = [b for b in bwd if b[1:] == CURRENT_BWD]
    for us, br, warps, per_sm, stages in sorted(bwd)[:10] + current:
        print(f"  {us:7.1f} us ({3 * unit / us / 1e3:.0f} GB/s)  rows/tile {br}  num_warps {warps}  "
              f"programs/SM {per_sm}  num_stages {stages}"
              + ("  <- current" if (br, warps, per_sm, stages) == CURRENT_BWD else ""))


if __name__ == "__main__":
    main()
