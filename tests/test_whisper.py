"""Pretrained Whisper tiny.en: the CTranslate2 loader against the CTranslate2 runtime,
the export helpers, and full quantization of the real encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.report import output_sqnr
from esc_ao.speech import WhisperDecoderForScoring, WhisperEncoder, bundled_clips, load_whisper_tiny_en, whisper_mel
from esc_ao.speech.ct2_whisper import ct2_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_whisper_tiny_en()


@pytest.fixture(scope="module")
def mels() -> list[torch.Tensor]:
    return [whisper_mel(c.audio) for c in bundled_clips()[:2] + bundled_clips("heldout")[:1]]


def test_encoder_matches_ctranslate2_runtime(model, mels) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    runtime = ctranslate2.models.Whisper(str(ct2_model_dir()), device="cpu", compute_type="float32")
    ref = np.array(runtime.encode(ctranslate2.StorageView.from_array(mels[0].numpy()), to_cpu=True))
    with torch.no_grad():
        ours = model.encoder(mels[0]).numpy()
    # float32 on both sides, different kernels: measured max difference 5e-5 on features of magnitude ~11.
    assert np.abs(ref - ours).max() < 1e-3


def test_greedy_decoding_matches_ctranslate2(model, mels) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    runtime = ctranslate2.models.Whisper(str(ct2_model_dir()), device="cpu", compute_type="float32")
    prompt = [50257, 50362]  # <|startoftranscript|> <|notimestamps|> of tiny.en
    ref = runtime.generate(ctranslate2.StorageView.from_array(mels[0].numpy()), [prompt], beam_size=1,
                           max_length=40, return_scores=False)[0].sequences_ids[0]
    scorer = WhisperDecoderForScoring(model).eval()
    tokens = list(prompt)
    with torch.no_grad():
        features = model.encoder(mels[0])
        for _ in range(len(ref) + 1):
            nxt = int(scorer(torch.tensor([tokens]), features)[0, -1].argmax())
            if nxt == 50256:  # <|endoftext|>
                break
            tokens.append(nxt)
    assert tokens[len(prompt):] == ref


def test_decoder_scorer_exports_and_quantizes(model, mels) -> None:
    scorer = WhisperDecoderForScoring(model).eval()
    with torch.no_grad():
        features = model.encoder(mels[0])
    tokens = torch.tensor([[50257, 50362, 440, 2068, 7586]])
    prepared = prepare(export_model(scorer, (tokens, features)), EscQuantizer(QuantConfig(method="mse")))
    observe(prepared, [(tokens, features)])
    converted = convert(prepared)
    ops = [str(n.target) for n in converted.graph.nodes]
    assert "aten.scaled_dot_product_attention.default" not in ops  # decomposed, so quantizable
    assert ops.count("aten.matmul.default") == 4 * 2 * 2  # 4 blocks x (self, cross) x (scores, context)
    ref = scorer(tokens, features)
    assert converted(tokens, features).shape == ref.shape


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


def test_audio_and_text_halves_decode_like_whisper_decode(model, mels) -> None:
    """The two graphs of the accuracy benchmark's Whisper task, with greedy decoding,
    give openai-whisper's own greedy transcript."""
    import whisper

    from esc_ao.bench.whisper_task import greedy_transcribe
    from esc_ao.speech.whisper import WhisperAudio, WhisperTextStep
    from whisper.tokenizer import get_tokenizer

    audio, text = WhisperAudio(model).eval(), WhisperTextStep(model).eval()
    with torch.no_grad():
        ours = get_tokenizer(False).decode(greedy_transcribe(audio, text, mels[0])[0])
        ref = whisper.decode(model, mels[0][0], whisper.DecodingOptions(language="en", without_timestamps=True,
                                                                        fp16=False)).text
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
