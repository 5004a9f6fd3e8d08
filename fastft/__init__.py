"""fastft: a compiler for fine-tuning. ``optimize(model)`` captures the model as torch.fx graphs,
replaces known subgraphs by their math with fused Triton kernels, and the same model object then
trains as before; ``check`` proves the rewritten model computes the same function."""
from . import kernels  # noqa: F401  (registers the torch.ops.fastft custom ops)
from .check import CheckResult, check
from .errors import CaptureError, CheckError, FastftError
from .optimize import optimize, report
from .report import Report

__all__ = ["optimize", "report", "check", "Report", "CheckResult", "FastftError", "CaptureError",
           "CheckError"]
