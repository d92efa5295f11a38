"""esc-ao: ESC calibration and full integer quantization of speech models in PT2E."""

from esc_ao import _quiet  # noqa: F401 - first: filters an import-time notice of torchao
from esc_ao.config import METHODS, QuantConfig, SearchConfig
from esc_ao.observers import (
    EntropyObserver,
    EscObserver,
    MaxObserver,
    MSEObserver,
    NonFiniteActivationError,
    PercentileObserver,
    PerChannelWeightObserver,
    observer_mode,
)
from esc_ao.pipeline import CalibrationDataError, ExportError, convert, export_model, load_program, observe, prepare
from esc_ao.quantizer import EscQuantizer
from esc_ao.search.calibrate import CalibrationResult, calibrate

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CalibrationDataError",
    "EntropyObserver",
    "EscObserver",
    "EscQuantizer",
    "ExportError",
    "MSEObserver",
    "MaxObserver",
    "NonFiniteActivationError",
    "PerChannelWeightObserver",
    "PercentileObserver",
    "QuantConfig",
    "SearchConfig",
    "CalibrationResult",
    "calibrate",
    "__version__",
    "convert",
    "export_model",
    "load_program",
    "observe",
    "observer_mode",
    "prepare",
]
