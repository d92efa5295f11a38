"""Features, the CTC alphabet, the trained-model checkpoint format and the Conformer's
training (masked) and export (split attention) paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.speech.conformer import ConformerCTC
from esc_ao.speech.features import CTC_ALPHABET, FbankNorm, ctc_decode, ctc_encode, fbank
from esc_ao.speech.pretrained import load_trained, save_checkpoint


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz '", min_size=1, max_size=40))
def test_ctc_decode_inverts_encode_with_blanks_between_repeats(text: str) -> None:
    labels = ctc_encode(text)
    frames = []
    for i in labels:  # each label twice (a repeat CTC merges) then a blank
        frames += [i, i, 0]
    logits = torch.full((len(frames) or 1, len(CTC_ALPHABET)), -5.0)
    for t, i in enumerate(frames):
        logits[t, i] = 5.0
    assert ctc_decode(logits) == " ".join(text.split())


def test_fbank_is_deterministic_floored_and_fixed_length() -> None:
    rng = np.random.default_rng(0)
    audio = np.zeros(16000, dtype=np.float32)
    audio[4000:8000] = 0.3 * rng.standard_normal(4000)  # speech-like burst in digital silence
    a, b = fbank(audio, 80), fbank(audio, 80)
    assert torch.equal(a, b) and a.shape == (98, 80)
    assert float(a.max() - a.min()) <= 8.0 * np.log(10) + 1e-4  # the 80 dB floor
    assert fbank(audio, 128, frames=100).shape == (100, 128)
    assert fbank(audio[:8000], 128, frames=100).shape == (100, 128)


def test_fbank_norm_standardises() -> None:
    frames = [torch.randn(50, 8) * 3 + 2 for _ in range(4)]
    norm = FbankNorm.fit(frames)
    x = norm(torch.cat(frames))
    assert torch.allclose(x.mean(0), torch.zeros(8), atol=1e-5) and torch.allclose(x.std(0), torch.ones(8), atol=1e-4)


def test_conformer_masked_path_equals_full_length_and_split_attention(seeded) -> None:
    model = ConformerCTC(n_mels=40, dim=32, heads=4, ffn=64, layers=2, kernel=7, split_attention=False).eval()
    x = torch.randn(1, 60, 40)
    padded = torch.cat([x, torch.zeros(1, 20, 40)], 1)
    with torch.no_grad():
        full = model(x)
        masked = model(padded, torch.tensor([60]))[:, : full.shape[1]]
        unmasked = model(padded)[:, : full.shape[1]]
        # The mask keeps padding out of attention; it still reaches the frames next to it
        # through the depthwise convolutions (torchaudio masks neither them nor the front
        # end), which is why the recipe buckets batches by length.
        assert (masked - full).norm() < 0.5 * (unmasked - full).norm()
        split = model.split_attention_()(x)
    assert torch.allclose(full, split, atol=1e-4)
    assert ConformerCTC.output_lengths(torch.tensor([60])).item() == full.shape[1]


def test_checkpoint_round_trip_is_float16_on_disk(tmp_path, seeded) -> None:
    model = ConformerCTC(n_mels=40, dim=32, heads=4, ffn=64, layers=2, kernel=7, split_attention=False)
    config = {"n_mels": 40, "dim": 32, "heads": 4, "ffn": 64, "layers": 2, "kernel": 7, "vocab": 32}
    norm = FbankNorm(torch.zeros(40), torch.ones(40))
    path = tmp_path / "c.pt"
    save_checkpoint(path, "conformer-ctc", model, config, 40, None, norm, list(CTC_ALPHABET), {"test_wer": 0.5})
    loaded = load_trained("conformer-ctc", path)
    assert loaded.summary == {"test_wer": 0.5} and loaded.labels == list(CTC_ALPHABET)
    x = torch.randn(1, 50, 40)
    with torch.no_grad():
        ref = model.eval().half().float()(x)  # what float16 storage keeps
        assert torch.allclose(loaded.model(x), ref, atol=1e-4)
    assert loaded.features(np.zeros(16000, dtype=np.float32)).shape == (1, 98, 40)


def test_missing_checkpoint_names_the_recipe(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="examples/train_ast.py"):
        load_trained("ast", tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="use one of conformer-ctc, ast"):
        load_trained("resnet")
