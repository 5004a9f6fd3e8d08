"""Declarative patterns, one module per op family. ``DEFAULT_PATTERNS`` is the ordered list
``optimize()`` hands to the pass pipeline: larger regions first, so that a fused MLP is tried
before the activation inside it (and an adapted MLP before both; single adapted linears
before the activation too, since a 4-bit base reads the product through a cast of its own), the
gated unit before a lone activation (an activation whose output is multiplied is the gated unit's,
whether or not it matched; the ungated MLP's activation has a family of its own), and LayerNorm
before RMSNorm (a written-out LayerNorm ends in an RMSNorm of the centred input, which must not be
taken for one). The causal-mask rewrite comes last: the mask it removes is computed from positions
that other regions may share."""
from .activation import ACTIVATION
from .attention import CAUSAL_MASK
from .glu import GLU
from .lora import LORA, LORA_GLU_MLP
from .loss import LINEAR_CROSS_ENTROPY
from .norms import LAYER_NORM, RMS_NORM
from .rope import ROPE, ROPE_POLAR

DEFAULT_PATTERNS = [LINEAR_CROSS_ENTROPY, LORA_GLU_MLP, LORA, GLU, ACTIVATION, ROPE, ROPE_POLAR, LAYER_NORM,
                    RMS_NORM, CAUSAL_MASK]

__all__ = ["ACTIVATION", "CAUSAL_MASK", "DEFAULT_PATTERNS", "GLU", "LINEAR_CROSS_ENTROPY", "LORA", "LORA_GLU_MLP", "LAYER_NORM", "RMS_NORM", "ROPE", "ROPE_POLAR"]
