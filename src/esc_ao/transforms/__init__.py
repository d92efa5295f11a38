"""Float-exact transforms of an exported graph, applied before annotation so that any
PT2E quantizer (EscQuantizer, ExecuTorch's XNNPACKQuantizer) sees activations that suit a
per-tensor grid. Each returns one ``TransformRecord`` per site it considered: applied, or
skipped with the reason (never applied approximately)."""

from esc_ao.transforms.records import TransformRecord
from esc_ao.transforms.smooth import SMOOTH_ALPHAS, smooth

__all__ = ["SMOOTH_ALPHAS", "TransformRecord", "smooth"]
