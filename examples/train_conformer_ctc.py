"""Recipe: train the benchmark's Conformer-CTC on the ``asr`` corpus (sets a + b).

    python examples/train_conformer_ctc.py [--max-minutes 50] [--patience 3] [--seed 0]

80-bin Kaldi fbank (torchaudio), normalised with the train split's statistics; SpecAugment;
character CTC (blank, space, apostrophe, a-z); AdamW with warm-up and cosine decay; greedy
CTC decoding. Held-out error = WER on the calibration split (never trained on); training
stops when it has not improved for ``--patience`` epochs or the time is up, and the best
epoch is kept. Then the test split's WER (with a 95 % bootstrap interval) is measured and
the checkpoint (src/esc_ao/data/models/conformer_ctc.pt) and log
(docs/results/training/conformer_ctc.log) are written. Resumes from its work folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _recipe import Run, SpecAugment, buckets, pad, parser, start  # noqa: E402

from esc_ao.corpus import load_corpus
from esc_ao.metrics import wer
from esc_ao.speech.conformer import ConformerCTC
from esc_ao.speech.features import CTC_ALPHABET, FbankNorm, ctc_decode, ctc_encode, fbank
from esc_ao.speech.pretrained import save_checkpoint

CONFIG = {"n_mels": 80, "dim": 144, "heads": 4, "ffn": 576, "layers": 6, "kernel": 15, "vocab": 32}


def transcribe(model: ConformerCTC, feats: list[torch.Tensor]) -> list[str]:
    model.eval()
    out = []
    with torch.no_grad():
        for f in feats:  # one at a time: exactly what the deployed model sees (no padding)
            out.append(ctc_decode(model(f.unsqueeze(0))[0]))
    return out


def main() -> None:
    ap = parser("train_conformer_ctc", "conformer-ctc", max_minutes=50.0, max_epochs=30, min_epochs=8, lr=2e-3)
    ap.add_argument("--max-frames", type=int, default=12000, help="padded frames per batch")
    args = ap.parse_args()
    gen, log = start(args)
    corpus = load_corpus("asr")
    t0 = time.perf_counter()
    train, dev = corpus.utterances("train"), corpus.utterances("calibration")
    raw = [fbank(u.audio(), CONFIG["n_mels"]) for u in train]
    norm = FbankNorm.fit(raw)
    feats = [norm(f) for f in raw]
    dev_feats = [norm(fbank(u.audio(), CONFIG["n_mels"])) for u in dev]
    labels = [torch.tensor(ctc_encode(u.text)) for u in train]
    log(
        "data",
        train=len(train),
        dev=len(dev),
        feature_seconds=round(time.perf_counter() - t0, 1),
        train_hours=round(sum(f.shape[0] for f in feats) / 360000, 2),
        config=CONFIG,
        args={k: str(v) for k, v in vars(args).items()},
    )

    model = ConformerCTC(**CONFIG, split_attention=False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    augment = SpecAugment(freq=15, time=25)
    lengths = [f.shape[0] for f in feats]
    steps_per_epoch = len(buckets(lengths, args.max_frames, torch.Generator().manual_seed(0)))
    total_steps = steps_per_epoch * args.max_epochs
    run = Run(args.work, model, opt, gen, log, args, "dev_wer")
    log("model", params=sum(p.numel() for p in model.parameters()), steps_per_epoch=steps_per_epoch)
    while run.running:
        model.train()
        t_epoch, losses = time.perf_counter(), []
        for batch in buckets(lengths, args.max_frames, gen):
            x, xl = pad([feats[i] for i in batch])
            y = torch.cat([labels[i] for i in batch])
            yl = torch.tensor([len(labels[i]) for i in batch])
            logp = F.log_softmax(model(augment(x), xl), -1).transpose(0, 1)
            loss = F.ctc_loss(logp, y, ConformerCTC.output_lengths(xl), yl, blank=0, zero_infinity=True)
            run.update(loss, losses, 200, total_steps)
        run.end_epoch(losses, wer([u.text for u in dev], transcribe(model, dev_feats)).value, t_epoch)

    model = run.best_model()
    test = corpus.utterances("test")
    hyps = transcribe(model, [norm(fbank(u.audio(), CONFIG["n_mels"])) for u in test])
    refs = [u.text for u in test]
    test_wer = wer(refs, hyps, seed=args.seed)
    unseen = [i for i, u in enumerate(test) if u.voice in corpus.manifest["voices"]["test_only"]]
    unseen_wer = wer([refs[i] for i in unseen], [hyps[i] for i in unseen], seed=args.seed)
    summary = {
        **run.summary("examples/train_conformer_ctc.py", corpus.manifest["fingerprint"]),
        "test_wer": test_wer.as_dict(),
        "test_wer_unseen_voices": unseen_wer.as_dict(),
    }
    log("test", wer=test_wer.as_dict(), unseen_voices=unseen_wer.as_dict())
    save_checkpoint(args.out, "conformer-ctc", model, CONFIG, CONFIG["n_mels"], None, norm, list(CTC_ALPHABET), summary)
    for h, r in list(zip(hyps, refs))[:5]:
        log("sample", ref=r, hyp=h)
    log("wrote", checkpoint=str(args.out))


if __name__ == "__main__":
    main()
