"""Triton kernels, one module per op family, each registered as a ``torch.library`` custom op
(namespace ``fastft``) with a fake implementation and a hand-written backward.

Imports nothing of fastft: every op is usable on its own."""
import os

import torch

# Triton compiles for GPUs only; on a machine without one its interpreter is the only way the
# kernels run (slowly: tests and inspection). It must be chosen before the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import rms_norm  # noqa: E402,F401  (registers torch.ops.fastft.rms_norm)
