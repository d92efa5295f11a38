"""The trained AST as an accuracy-benchmark task: accuracy over the 37 classes of the
``kws`` corpus's test split; ESC's objective is the cross-entropy of the calibration clips
against their labels (all of them, in batches of 25; the local step fits on the first)."""

from __future__ import annotations

import torch

from esc_ao.bench.tasks import Forward, Task, calibration_sample, single_part, training_brief
from esc_ao.corpus import load_corpus
from esc_ao.metrics import Estimate, accuracy
from esc_ao.objectives import CrossEntropy

__all__ = ["task"]


def task(n_calibration: int, seed: int, batch: int = 25) -> Task:
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("ast")
    corpus = load_corpus("kws")
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    feats = torch.cat([tm.features(u.audio()) for u in calib])
    ys = torch.tensor([tm.labels.index(u.label) for u in calib])
    batches = [(x,) for x in torch.split(feats, batch)]
    objective = CrossEntropy(list(torch.split(ys, batch)))
    test = corpus.utterances("test")
    x_test = torch.cat([tm.features(u.audio()) for u in test])
    y_test = torch.tensor([tm.labels.index(u.label) for u in test])

    def evaluate(forward: Forward) -> Estimate:
        preds = []
        with torch.no_grad():
            for x in torch.split(x_test, batch):
                n = x.shape[0]
                if n < batch:  # the graph has a static batch: pad with copies, drop their outputs
                    x = torch.cat([x, x[-1:].expand(batch - n, -1, -1)])
                preds.append(forward(x)[:n].argmax(-1))
        return accuracy((torch.cat(preds) == y_test).tolist())

    return single_part("ast", "accuracy", tm.model, batches, objective, evaluate,
                       {"test_clips": len(test), "batch": batch, "training": training_brief(tm.summary)})
