"""The trained Conformer-CTC as an accuracy-benchmark task: WER of greedy CTC decoding on
the ``asr`` corpus's test split; ESC's objective is the CTC loss of the calibration
utterances against their texts.

ESC's search scores 80 of the 100 calibration utterances, its held-out check the other 20
(esc_ao.bench.tasks.holdout_split). Measured with 16 scored (to save time: about 4.5 min
instead of about 28 per ESC cell on one core), CMA-ES lowered the W8A8 CTC loss on those 16
from 0.512 to 0.481 while test WER rose from 41.0 % (its local-step start) to 45.4 % (float
40.8 %): 243 scales fitted to 16 utterances; with all 100 scored and no held-out check, the
W8A8 cell still ended at 42.2 %. The local step fits on LOCAL_UTTERANCES utterances (1 gave
a start of 42.0 % WER, 16 gave 41.0 %).
"""

from __future__ import annotations

import torch

from esc_ao.bench.tasks import Forward, Task, calibration_sample, load_eval_corpus, single_part, training_brief
from esc_ao.metrics import Estimate, wer
from esc_ao.search.objectives import CTCLoss

__all__ = ["LOCAL_UTTERANCES", "task"]

LOCAL_UTTERANCES = 16


def task(n_calibration: int, seed: int, eval_set: str = "tts") -> Task:
    from esc_ao.speech.features import ctc_decode, ctc_encode
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("conformer-ctc")
    corpus = load_eval_corpus("conformer-ctc", eval_set)
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    # one utterance per batch: their lengths differ and the graph has no padding mask
    batches = [(tm.features(u.audio()),) for u in calib]
    targets = [torch.tensor([ctc_encode(u.text)]) for u in calib]
    lengths = [torch.tensor([len(t[0])]) for t in targets]
    test = corpus.utterances("test")
    test_feats = [tm.features(u.audio()) for u in test]

    def evaluate(forward: Forward) -> Estimate:
        with torch.no_grad():
            hyps = [ctc_decode(forward(x)[0]) for x in test_feats]
        return wer([u.text for u in test], hyps, seed=seed)

    frames = torch.export.Dim("frames", min=16, max=3000)
    return single_part(
        "conformer-ctc",
        "wer",
        tm.model,
        batches,
        lambda idx: CTCLoss([targets[i] for i in idx], [lengths[i] for i in idx]),
        evaluate,
        {
            "test_utterances": len(test),
            "local_step_utterances": min(LOCAL_UTTERANCES, len(calib)),
            "training": training_brief(tm.summary),
        },
        dynamic_shapes=({1: frames},),
        local_batches=LOCAL_UTTERANCES,
    )
