"""Declarative patterns, one module per op family. ``DEFAULT_PATTERNS`` is the ordered list
``optimize()`` hands to the pass pipeline: larger regions first, so that a fused MLP is tried
before the activation inside it."""
from .norms import RMS_NORM

DEFAULT_PATTERNS = [RMS_NORM]

__all__ = ["DEFAULT_PATTERNS", "RMS_NORM"]
