"""The trained Conformer-CTC as an accuracy-benchmark task: WER of greedy CTC decoding on
the ``asr`` corpus's test split; ESC's objective is the CTC loss of the calibration
utterances against their texts.

ESC scores every calibration utterance (the paper's fitness "over the calibration
samples"). Measured with 16 of the 100 (to save time: about 4.5 min instead of about 28 per
ESC cell on one core), CMA-ES lowered the W8A8 CTC loss on those 16 from 0.512 to 0.481
while test WER rose from 41.0 % (its local-step start) to 45.4 % (float 40.8 %): 243
scales fitted to 16 utterances. The local step fits on LOCAL_UTTERANCES utterances (1 gave
a start of 42.0 % WER, 16 gave 41.0 %).
"""

from __future__ import annotations

import torch

from esc_ao.bench.tasks import Forward, Task, calibration_sample, single_part, training_brief
from esc_ao.corpus import load_corpus
from esc_ao.metrics import Estimate, wer
from esc_ao.objectives import CTCLoss

__all__ = ["LOCAL_UTTERANCES", "task"]

LOCAL_UTTERANCES = 16


def task(n_calibration: int, seed: int) -> Task:
    from esc_ao.speech.features import ctc_decode, ctc_encode
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("conformer-ctc")
    corpus = load_corpus("asr")
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    # one utterance per batch: their lengths differ and the graph has no padding mask
    batches = [(tm.features(u.audio()),) for u in calib]
    targets = [torch.tensor([ctc_encode(u.text)]) for u in calib]
    objective = CTCLoss(targets, [torch.tensor([len(t[0])]) for t in targets])
    test = corpus.utterances("test")
    test_feats = [tm.features(u.audio()) for u in test]

    def evaluate(forward: Forward) -> Estimate:
        with torch.no_grad():
            hyps = [ctc_decode(forward(x)[0]) for x in test_feats]
        return wer([u.text for u in test], hyps, seed=seed)

    frames = torch.export.Dim("frames", min=16, max=3000)
    result = single_part("conformer-ctc", "wer", tm.model, batches, objective, evaluate,
                         {"test_utterances": len(test), "search_utterances": len(calib),
                          "local_step_utterances": min(LOCAL_UTTERANCES, len(calib)),
                          "training": training_brief(tm.summary)}, dynamic_shapes=({1: frames},))
    result.parts[0].local_batches = LOCAL_UTTERANCES
    return result
