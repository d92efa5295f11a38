"""ESC's search over activation scales, after PT2E calibration.

Vocabulary: PT2E's *calibration* is running data through the prepared model so its
observers record statistics (``esc_ao.observe``); ESC's *search* (``esc_ao.calibrate``)
comes after it and before ``convert``: a local step sets each scale from the layer's own
output error, then CMA-ES moves all scales jointly against a task objective.

- ``calibrate``: the search (checkpointed, resumable, sharded over torchrun ranks);
- ``local_step``: the per-layer MSE start;
- ``space``: which observer scales are searched (one dimension per observer);
- ``objectives``: what the search minimises (output MSE, KL, task losses);
- ``checkpoint``: the search state on disk; ``distributed``: the ranks.
"""

from esc_ao.search.calibrate import CalibrationResult, NonFiniteObjectiveError, SearchState, calibrate

__all__ = ["CalibrationResult", "NonFiniteObjectiveError", "SearchState", "calibrate"]
