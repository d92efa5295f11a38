"""Speech models in export-friendly form, their inputs, and the bundled clips."""

from esc_ao.speech.ast import AST
from esc_ao.speech.attention import SplitHeadAttention
from esc_ao.speech.audio import Clip, bundled_clips, read_wav
from esc_ao.speech.conformer import ConformerCTC, ExportableConformer
from esc_ao.speech.ct2_whisper import WhisperWeightsError, load_whisper, load_whisper_tiny_en
from esc_ao.speech.wav2vec2 import ExportableWav2Vec2
from esc_ao.speech.whisper import WhisperDecoderForScoring, WhisperEncoder, whisper_mel

__all__ = [
    "AST",
    "ConformerCTC",
    "SplitHeadAttention",
    "Clip",
    "ExportableConformer",
    "ExportableWav2Vec2",
    "WhisperDecoderForScoring",
    "WhisperEncoder",
    "WhisperWeightsError",
    "bundled_clips",
    "load_whisper",
    "load_whisper_tiny_en",
    "read_wav",
    "whisper_mel",
]
