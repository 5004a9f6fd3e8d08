"""kernels/launch.py: the host-side helpers every launcher shares."""
from __future__ import annotations

import fastft  # noqa: F401  (selects Triton's interpreter off the GPU before triton loads)


def test_host_grid_helpers_agree_with_triton():
    """kernels/launch.py's cdiv and next_power_of_2 (plain Python, cheap to call from the host)
    give what Triton's give, on every size up to 2^14 and around the powers of two above."""
    import triton

    from fastft.kernels.launch import cdiv, next_power_of_2

    sizes = list(range(0, 1 << 14)) + [(1 << k) + d for k in range(14, 40) for d in (-1, 0, 1)]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_interpreter_tiles_cover_wide_rows_in_few_programs():
    """Off the GPU a tile is about INTERPRETER_TILE_ELEMS elements whatever the row width (the
    interpreter's cost is per program); on a GPU the kernels' own configs decide."""
    import torch

    from fastft.kernels.launch import INTERPRETER_TILE_ELEMS, interpreter_block_n, interpreter_block_rows

    cpu = torch.device("cpu")
    for n in (1, 3, 100, 2048, 10240, 50000):
        block_n = interpreter_block_n(cpu, n)
        block_rows = interpreter_block_rows(cpu, 1000, n)
        assert block_n >= min(n, INTERPRETER_TILE_ELEMS) and block_n & (block_n - 1) == 0
        assert block_rows * block_n <= 2 * INTERPRETER_TILE_ELEMS or block_rows == 1
    assert interpreter_block_n(torch.device("cuda"), 10240) is None
