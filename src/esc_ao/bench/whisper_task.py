"""Whisper (tiny.en or base), the whole model (encoder and decoder), as an accuracy-benchmark
task: ``task(n, seed, "tiny.en")`` is ``whisper-tiny.en``, ``task(n, seed, "base")``
``whisper-base``. The English-only tiny.en is prompted <|startoftranscript|><|notimestamps|>;
the multilingual base is told the language and task, <|startoftranscript|><|en|>
<|transcribe|><|notimestamps|>, as ``whisper.decode(..., language="en")`` does.

Two graphs, so greedy decoding costs one encoder pass per utterance:

- ``audio`` (WhisperAudio): log-mel -> every decoder block's cross-attention keys and
  values (the encoder plus those linears);
- ``text`` (WhisperTextStep): (tokens, keys, values) -> logits of every position; greedy
  decoding feeds the growing prefix (dynamic length) and takes the last position.

Both are quantized. Test metric: WER of greedy transcripts (Whisper's English text
normaliser, jiwer) on the ``asr`` corpus's test split. Greedy decoding suppresses what
openai-whisper's default decoding suppresses (non-speech symbols; blank and end-of-text
at the first step), checked to give the same transcripts as ``whisper.decode``.

ESC's objective: teacher-forced cross-entropy of the float model's own greedy transcripts
of the calibration utterances (their corpus texts are lower-case and unpunctuated, which
Whisper never outputs, so the float model's transcripts are the better target). The audio
part is scored through the float text part; the text part with the quantized audio part's
keys and values. A search evaluation runs the encoder on every utterance it scores (about
1-3 s each on 2 cores), so ESC's objective scores ``SEARCH_UTTERANCES`` of the calibration
utterances and its held-out check (esc_ao.bench.tasks.holdout_split) ``HOLDOUT_UTTERANCES``
others; observers see all of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from esc_ao.bench.tasks import Forward, Part, Task, calibration_sample, holdout_split, load_eval_corpus
from esc_ao.metrics import wer
from esc_ao.pipeline import Batch
from esc_ao.search.objectives import first_tensor

__all__ = ["HOLDOUT_UTTERANCES", "SEARCH_UTTERANCES", "greedy_transcribe", "task", "token_limit", "tokenizer"]

SEARCH_UTTERANCES = 8
HOLDOUT_UTTERANCES = 8
MAX_TOKENS = 96  # the graphs' longest prefix
# A transcript is cut at 16 + 8 tokens per second of audio. The corpus's texts need at most
# 5.5 tokens per second (measured over all 3 700 clips; the longest is 12 tokens), so only a
# decoding loop reaches the cut, and a collapsed quantized model's loop costs 16 + 8 s tokens
# of decoding (each one an insertion error) instead of MAX_TOKENS: a W4A4 baseline cell
# would otherwise decode 96 steps for every utterance (about 80 min per cell on one core).
_TOKENS_FIXED, _TOKENS_PER_SECOND = 16, 8.0


@dataclass(frozen=True)
class _Decoding:
    prompt: tuple[int, ...]
    eot: int
    suppress: tuple[int, ...]
    suppress_first: tuple[int, ...]


def tokenizer(model_name: str = "tiny.en") -> Any:
    """openai-whisper's tokenizer of the model: English-only, or multilingual set to English
    transcription (the language and task tokens of its prompt)."""
    from whisper.tokenizer import get_tokenizer

    from esc_ao.speech.ct2_whisper import is_multilingual

    # An English-only tokenizer ignores language and task (both None), so tiny.en's is get_tokenizer(False).
    return get_tokenizer(is_multilingual(model_name), language="en", task="transcribe")


@lru_cache(maxsize=None)
def _decoding(model_name: str = "tiny.en") -> _Decoding:
    # The special tokens' ids differ between the English-only and multilingual vocabularies
    # (one more token before them), so every list comes from the model's own tokenizer.
    tok = tokenizer(model_name)
    return _Decoding(
        tuple(tok.sot_sequence_including_notimestamps),
        tok.eot,
        tuple(
            sorted(
                set(tok.non_speech_tokens)
                | {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech, tok.no_timestamps}
            )
        ),
        tuple(tok.encode(" ") + [tok.eot]),
    )


def token_limit(seconds: float) -> int:
    """The longest transcript decoded for ``seconds`` of audio (see _TOKENS_PER_SECOND)."""
    return min(MAX_TOKENS, _TOKENS_FIXED + math.ceil(_TOKENS_PER_SECOND * seconds))


def greedy_transcribe(
    audio: Forward, text: Forward, mels: torch.Tensor, max_tokens: int = MAX_TOKENS, model_name: str = "tiny.en"
) -> list[list[int]]:
    """Greedy decoding of a batch of log-mels (B, 80, 3000) -> token lists (no prompt, no EOT),
    at most ``max_tokens`` each, with the prompt and suppressed tokens of ``model_name``."""
    dec = _decoding(model_name)
    keys, values = audio(mels)
    tokens = torch.tensor([list(dec.prompt)] * mels.shape[0])
    done = torch.zeros(mels.shape[0], dtype=torch.bool)
    for step in range(min(max_tokens, MAX_TOKENS)):
        logits = first_tensor(text(tokens, keys, values))[:, -1].float()
        logits[:, list(dec.suppress)] = -torch.inf
        if step == 0:
            logits[:, list(dec.suppress_first)] = -torch.inf
        nxt = logits.argmax(-1)
        nxt[done] = dec.eot
        done |= nxt == dec.eot
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
    out = []
    for row in tokens[:, len(dec.prompt) :].tolist():
        out.append(row[: row.index(dec.eot)] if dec.eot in row else row)
    return out


def encoder_transcripts(
    whisper: torch.nn.Module, encoder: torch.nn.Module, clips: Sequence[tuple[torch.Tensor, float]]
) -> list[str]:
    """Greedy transcripts of 16 kHz clips ``(audio, seconds)`` by Whisper tiny.en with
    ``encoder`` in place of its own and its float decoder: what an encoder does to text."""
    from esc_ao.speech import whisper_mel
    from esc_ao.speech.whisper import WhisperAudio, WhisperTextStep

    audio, text, tok = WhisperAudio(whisper).eval(), WhisperTextStep(whisper).eval(), tokenizer("tiny.en")
    audio.encoder = encoder
    with torch.no_grad():
        return [
            tok.decode(greedy_transcribe(audio, text, whisper_mel(wave), token_limit(seconds))[0])
            for wave, seconds in clips
        ]


@dataclass(frozen=True)
class TeacherForcedCE:
    """Mean cross-entropy of next-token logits against target token sequences, one (B, n)
    target tensor per batch (-100 where no prediction is scored, e.g. the prompt)."""

    targets: Sequence[torch.Tensor]

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        losses = [
            float(F.cross_entropy(first_tensor(o).float().flatten(0, 1), t.flatten(), ignore_index=-100))
            for o, t in zip(outputs, self.targets)
        ]
        return sum(losses) / max(len(losses), 1)


@dataclass(frozen=True)
class ThroughText:
    """The audio part's objective: teacher-forced cross-entropy of a fixed text part fed
    with the candidate's keys and values."""

    text: Forward
    tokens: Sequence[torch.Tensor]
    targets: TeacherForcedCE

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        with torch.no_grad():
            logits = [self.text(t, k, v) for t, (k, v) in zip(self.tokens, outputs)]
        return self.targets(logits, references)


def _teacher_forcing(prompt: Sequence[int], transcripts: list[list[int]], eot: int) -> tuple[list, list]:
    """One (1, n) input and target per utterance: prompt + transcript -> transcript + EOT."""
    inputs, targets = [], []
    for t in transcripts:
        seq = list(prompt) + t
        inputs.append(torch.tensor([seq]))
        targets.append(torch.tensor([[-100] * (len(prompt) - 1) + t + [eot]]))
    return inputs, targets


def task(n_calibration: int, seed: int, model_name: str = "tiny.en", eval_set: str = "tts") -> Task:
    """The benchmark task of Whisper ``model_name`` ('tiny.en' or 'base') on ``eval_set``
    (esc_ao.bench.tasks.load_eval_corpus)."""
    from esc_ao.speech import load_whisper, whisper_mel
    from esc_ao.speech.whisper import WhisperAudio, WhisperTextStep

    model = load_whisper(model_name).eval()
    audio, text = WhisperAudio(model).eval(), WhisperTextStep(model).eval()
    tok = tokenizer(model_name)
    dec = _decoding(model_name)
    corpus = load_eval_corpus(f"whisper-{model_name}", eval_set)
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    mels = [whisper_mel(torch.from_numpy(u.audio())) for u in calib]
    # One utterance per call throughout: the exported graphs have a static batch of 1 (a
    # dynamic batch cannot be exported from batch-1 examples, and teacher-forced sequences
    # differ in length).
    with torch.no_grad():  # the float model's transcripts: the teacher-forcing targets
        transcripts = [
            greedy_transcribe(audio, text, m, token_limit(u.meta["duration_s"]), model_name)[0]
            for u, m in zip(calib, mels)
        ]
    tf_inputs, tf_targets = _teacher_forcing(dec.prompt, transcripts, dec.eot)
    searched, held = holdout_split(len(mels))
    searched, held = searched[:SEARCH_UTTERANCES], held[:HOLDOUT_UTTERANCES]

    def scored(idx: Sequence[int]) -> TeacherForcedCE:
        return TeacherForcedCE([tf_targets[i] for i in idx])

    def text_batches(converted: dict[str, Forward]) -> list[Batch]:
        with torch.no_grad():
            kv = [converted["audio"](m) for m in mels]
        return [(t, k, v) for t, (k, v) in zip(tf_inputs, kv)]

    parts = [
        Part(
            "audio",
            audio,
            lambda _: [(m,) for m in mels],
            lambda _, idx: ThroughText(text, [tf_inputs[i] for i in idx], scored(idx)),
            searched,
            held,
        ),
        Part(
            "text",
            text,
            text_batches,
            lambda _, idx: scored(idx),
            searched,
            held,
            dynamic_shapes=({1: torch.export.Dim("tokens", min=2, max=MAX_TOKENS + 8)}, None, None),
        ),
    ]
    test = corpus.utterances("test")

    def evaluate(forwards: dict[str, Forward]) -> Any:
        hyps = []
        for u in test:
            mel = whisper_mel(torch.from_numpy(u.audio()))
            limit = token_limit(u.meta["duration_s"])
            hyps.append(tok.decode(greedy_transcribe(forwards["audio"], forwards["text"], mel, limit, model_name)[0]))
        est = wer([u.text for u in test], hyps, seed=seed)
        # the transcripts go into the cell: a decoding loop or an empty output is visible there
        return dataclasses.replace(est, details={**est.details, "hypotheses": dict(zip((u.id for u in test), hyps))})

    return Task(
        f"whisper-{model_name}",
        "wer",
        parts,
        evaluate,
        sum(p.numel() for p in model.parameters()),
        {
            "test_utterances": len(test),
            "search_utterances": len(searched),
            "holdout_utterances": len(held),
            "decoding": f"greedy, at most {_TOKENS_FIXED} + {_TOKENS_PER_SECOND:g} tokens per second of audio",
        },
    )
