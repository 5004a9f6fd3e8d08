"""Triton kernels, one module per op family, each registered as a ``torch.library`` custom op
(namespace ``fastft``) with a fake implementation and a hand-written backward.

Imports nothing of fastft: every op is usable on its own."""
import os
import sys
import warnings

import torch


def _select_triton_mode() -> None:
    # Triton compiles for GPUs only; on a machine without one its interpreter is the only way the
    # kernels run (slowly: tests and inspection). It must be chosen before triton itself is
    # imported: triton.language's own helpers are built at import time for one mode or the other.
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            warnings.warn("fastft: no GPU, and triton was imported before fastft without TRITON_INTERPRET=1; "
                          "the Triton kernels cannot run. Import fastft first, or set TRITON_INTERPRET=1.")
        os.environ["TRITON_INTERPRET"] = "1"


# Imported under another name (the repository root on sys.path, and transformers probing for the
# Hugging Face package also called "kernels"), this directory must stay an empty package: the ops
# are registered once, by fastft.kernels, and registering them again would fail.
if __name__ == "fastft.kernels":
    _select_triton_mode()
    from . import activation, glu, layer_norm, linear_cross_entropy, lora, nf4, rms_norm, rope  # noqa: E402,F401  (registers the ops)
