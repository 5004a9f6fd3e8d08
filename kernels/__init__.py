"""Triton kernels, one module per op family, each registered as a ``torch.library`` custom op
(namespace ``fastft``) with a fake implementation and a hand-written backward.

Imports nothing of fastft: every op is usable on its own."""
from . import rms_norm  # noqa: F401  (registers torch.ops.fastft.rms_norm)
