"""The trained AST as an accuracy-benchmark task: accuracy over the 37 classes of the
``kws`` corpus's test split; ESC's objective is the cross-entropy of the calibration clips
against their labels. The 100 clips form 5 batches of 20, batch j holding clips j, j+5, ...
of the (class-sorted) sample so every batch mixes classes; the search scores 4 batches,
its held-out check the fifth (esc_ao.bench.tasks.holdout_split); the local step fits on
the first."""

from __future__ import annotations

import torch

from esc_ao.bench.tasks import Forward, Task, calibration_sample, load_eval_corpus, single_part, training_brief
from esc_ao.metrics import Estimate, accuracy
from esc_ao.search.objectives import CrossEntropy

__all__ = ["task"]


def task(n_calibration: int, seed: int, batch: int = 20, eval_set: str = "tts") -> Task:
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("ast")
    corpus = load_eval_corpus("ast", eval_set)
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    feats = torch.cat([tm.features(u.audio()) for u in calib])
    ys = torch.tensor([tm.labels.index(u.label) for u in calib])
    if n_calibration % batch:  # the graph has a static batch
        raise ValueError(
            f"n_calibration={n_calibration} must be a multiple of the AST's batch of {batch} clips "
            f"(e.g. {max(batch, n_calibration - n_calibration % batch)})"
        )
    n_batches = n_calibration // batch
    batches = [(feats[j::n_batches],) for j in range(n_batches)]
    labels = [ys[j::n_batches] for j in range(n_batches)]
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

    return single_part(
        "ast",
        "accuracy",
        tm.model,
        batches,
        lambda idx: CrossEntropy([labels[i] for i in idx]),
        evaluate,
        {"test_clips": len(test), "batch": batch, "training": training_brief(tm.summary)},
    )
