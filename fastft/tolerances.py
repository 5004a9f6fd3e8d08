"""Every numeric tolerance the checker uses, in one place, per dtype.

``atol``/``rtol``: elementwise, for a rewritten region's output (one fused op against the
subgraph it replaced: the only difference is the order of float32 accumulation, plus one
rounding of the result for half types). ``rel_l2``: ‖optimised − original‖ / ‖original‖, for
gradients and for whole-model results, where many roundings add up and a few elements of a
large sum may legitimately differ by more than any elementwise bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    rel_l2: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    # float32: reassociated float32 sums differ by ~1e-7 relative; 1e-4 leaves room for deep models.
    torch.float32: Tolerance(atol=1e-5, rtol=1e-4, rel_l2=1e-4),
    # bfloat16 keeps 8 bits of mantissa (one ulp = 2^-8 ≈ 4e-3 relative): allow a few ulps.
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2, rel_l2=2e-2),
    # float16 keeps 11 bits (one ulp ≈ 5e-4 relative).
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, rel_l2=5e-3),
}


# A 16-bit model's whole-model results that miss rel_l2 are judged against a float32 run of the
# original (fastft/check.py). That run counts as the truth only where the original's own result
# is within this many rel_l2 tolerances of it: 0.2 for bfloat16, the size of its rounding over a
# deep gradient, and well below what a different random state (dropout) gives.
WITNESS_FACTOR: float = 10.0


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance defined for {dtype}; defined for {list(TOLERANCES)}")
    return TOLERANCES[dtype]
