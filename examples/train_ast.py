"""Recipe: train the benchmark's AST keyword classifier on the ``kws`` corpus (set c).

    python examples/train_ast.py [--max-minutes 45] [--patience 3] [--seed 0]

128-bin Kaldi fbank (torchaudio) of 1 s clips (100 frames), normalised with the train
split's statistics; SpecAugment; 37 classes (35 Speech Commands keywords, unknown,
silence); AdamW with warm-up and cosine decay, label smoothing 0.1. Held-out error = error
on the calibration split (never trained on); training stops when it has not improved
for ``--patience`` epochs or the time is up, keeping the best epoch. Then test accuracy
(95 % Wilson interval) is measured and the checkpoint (src/esc_ao/data/models/ast.pt) and
log (docs/results/training/ast.log) are written. Resumes from its work folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _recipe import Run, SpecAugment, batches_of, parser, start  # noqa: E402

from esc_ao.corpus import load_corpus
from esc_ao.metrics import accuracy
from esc_ao.speech.ast import AST
from esc_ao.speech.features import FbankNorm, fbank
from esc_ao.speech.pretrained import save_checkpoint

N_MELS, FRAMES = 128, 100
CONFIG = {"classes": 37, "n_mels": N_MELS, "frames": FRAMES, "dim": 192, "layers": 4, "heads": 3, "mlp": 768}


def predict(model: AST, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b).argmax(-1) for b in torch.split(x, 64)])


def main() -> None:
    ap = parser("train_ast", "ast", max_minutes=45.0, max_epochs=10, min_epochs=4, lr=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    gen, log = start(args)
    corpus = load_corpus("kws")
    classes = corpus.labels
    t0 = time.perf_counter()

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
        utts = corpus.utterances(split)
        x = torch.stack([fbank(u.audio(), N_MELS, FRAMES) for u in utts])
        y = torch.tensor([classes.index(u.label) for u in utts])
        return x, y, utts

    x_train, y_train, _ = load("train")
    norm = FbankNorm.fit(list(x_train))
    x_train = norm(x_train)
    x_dev, y_dev, _ = load("calibration")
    x_dev = norm(x_dev)
    log(
        "data",
        train=len(y_train),
        dev=len(y_dev),
        feature_seconds=round(time.perf_counter() - t0, 1),
        config=CONFIG,
        args={k: str(v) for k, v in vars(args).items()},
    )

    model = AST(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    augment = SpecAugment(freq=24, time=20)
    steps_per_epoch = -(-len(y_train) // args.batch)
    total_steps = steps_per_epoch * args.max_epochs
    run = Run(args.work, model, opt, gen, log, args, "dev_error")
    log("model", params=sum(p.numel() for p in model.parameters()), steps_per_epoch=steps_per_epoch)
    while run.running:
        model.train()
        t_epoch, losses = time.perf_counter(), []
        for idx in batches_of(torch.randperm(len(y_train), generator=gen).tolist(), args.batch):
            loss = F.cross_entropy(model(augment(x_train[idx])), y_train[idx], label_smoothing=0.1)
            run.update(loss, losses, 300, total_steps)
        run.end_epoch(losses, 1.0 - float((predict(model, x_dev) == y_dev).float().mean()), t_epoch)

    model = run.best_model()
    x_test, y_test, test = load("test")
    pred = predict(model, norm(x_test))
    right = pred == y_test
    acc = accuracy(right.tolist())
    unseen = torch.tensor([u.voice in corpus.manifest["voices"]["test_only"] for u in test])
    acc_unseen = accuracy(right[unseen].tolist())
    summary = {
        **run.summary("examples/train_ast.py", corpus.manifest["fingerprint"]),
        "test_accuracy": acc.as_dict(),
        "test_accuracy_unseen_voices": acc_unseen.as_dict(),
    }
    log("test", accuracy=acc.as_dict(), unseen_voices=acc_unseen.as_dict())
    save_checkpoint(args.out, "ast", model, CONFIG, N_MELS, FRAMES, norm, classes, summary)
    log("wrote", checkpoint=str(args.out))


if __name__ == "__main__":
    main()
