"""Host-side helpers every kernel family's launcher uses: dtype checks and grid sizing."""
from __future__ import annotations

import functools
from typing import Optional

import torch

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


# triton.cdiv and triton.next_power_of_2 are constexpr functions: called from the host, each
# call goes through a wrapper that unwraps its arguments (a few microseconds, against well under
# one for the arithmetic). Launchers run once per op call, several of these each, on the host's
# critical path when the GPU waits for launches: they use these plain versions.
def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def empty_or(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``t``, or an empty tensor like ``like`` where it is None: a custom op returns tensors only,
    so a gradient that was not asked for comes back empty."""
    return t if t is not None else like.new_empty(0)


def check_dtype(op: str, arg: str, dtype: Optional[torch.dtype], allow_none: bool = False) -> None:
    """Raise a ValueError naming the op and the argument unless ``dtype`` has a kernel."""
    if dtype is None and allow_none:
        return
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"{op}: {arg} has unsupported dtype {dtype}; supported dtypes: {names}")


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: fp32 tensors get fp32 products, as
    cuBLAS gives them by default (no TF32); for 16-bit operands the setting is moot (the default
    is named)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_partial_programs(device: torch.device, n_blocks: int, block_n: int) -> int:
    """How many programs share a row reduction (each writes one fp32 partial row)."""
    if device.type == "cuda":
        # Enough resident programs to hide latency; narrow rows fit more programs per SM.
        target = (4 if block_n <= 2048 else 2) * device_sm_count(device)
    else:
        target = 8  # the interpreter runs programs one by one: few, but still more than one
    return max(1, min(n_blocks, target))


# Under Triton's interpreter (no GPU) programs run one after another and every op is a numpy call
# over the whole tile: few, large tiles make the CPU tests fast. What the kernels compute does
# not depend on the tiling (tests force small tiles where they check it).
INTERPRETER_TILE_ELEMS = 1 << 15


def interpreter_block_rows(device: torch.device, n_rows: int, n: int) -> Optional[int]:
    """Rows per tile off the GPU (about INTERPRETER_TILE_ELEMS elements); None on a GPU, where
    each kernel's own launch config decides."""
    if device.type == "cuda":
        return None
    return min(max(1, INTERPRETER_TILE_ELEMS // next_power_of_2(max(n, 1))),
               next_power_of_2(max(n_rows, 1)))


def interpreter_block_n(device: torch.device, n: int) -> Optional[int]:
    """Columns per tile off the GPU: the whole row up to INTERPRETER_TILE_ELEMS (a GPU tile's cap
    is smaller); None on a GPU."""
    if device.type == "cuda":
        return None
    return min(next_power_of_2(max(n, 1)), INTERPRETER_TILE_ELEMS)


def check_block_rows(op: str, block_rows: int) -> None:
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"{op}: block_rows must be a power of two, got {block_rows}")


def row_tile_config(op: str, n_rows: int, n: int, block_rows: Optional[int]) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps) of a one-pass row-wise kernel (a norm's forward): ~4K
    elements per tile, one row when wide, several short rows so loads stay wide."""
    block_n = next_power_of_2(n)
    if block_rows is None:
        block_rows = min(max(1, 4096 // block_n), 32, next_power_of_2(n_rows))
    check_block_rows(op, block_rows)
    num_warps = min(max(block_rows * block_n // 1024, 4), 32)
    return block_rows, block_n, num_warps
