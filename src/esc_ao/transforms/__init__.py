"""Float-exact transforms of an exported graph, applied before annotation so that any
PT2E quantizer (EscQuantizer, ExecuTorch's XNNPACKQuantizer) sees activations that suit a
per-tensor grid (smoothing, Hadamard rotation of the residual stream), and GPTQ rounding
of weights (not float-exact: it puts the weights on their grid). Each returns one
``TransformRecord`` per site it considered: applied, or skipped with the reason (never
applied approximately)."""

from esc_ao.transforms.gptq import gptq
from esc_ao.transforms.records import TransformRecord
from esc_ao.transforms.rotate import ROTATION_KEY, rotate
from esc_ao.transforms.smooth import SMOOTH_ALPHAS, smooth

__all__ = ["ROTATION_KEY", "SMOOTH_ALPHAS", "TransformRecord", "gptq", "rotate", "smooth"]
