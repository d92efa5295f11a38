"""Offline speech corpora: text-to-speech voices (esc_ao.corpus.builder) and real human
recordings from pinned packages (esc_ao.corpus.real)."""

from esc_ao.corpus.builder import (
    CORPORA,
    TEST_ONLY_VOICES,
    TRAIN_VOICES,
    Corpus,
    CorpusSpec,
    Utterance,
    cache_root,
    load_corpus,
    plan_digest,
    render_items,
    verify,
)
from esc_ao.corpus.real import MissingSourceError, SourceHashError, keyword_clips, load_real_corpus, source_digest
from esc_ao.corpus.voices import MissingEngineError, Voice

__all__ = [
    "CORPORA",
    "Corpus",
    "CorpusSpec",
    "MissingEngineError",
    "MissingSourceError",
    "SourceHashError",
    "TEST_ONLY_VOICES",
    "TRAIN_VOICES",
    "Utterance",
    "Voice",
    "cache_root",
    "keyword_clips",
    "load_corpus",
    "load_real_corpus",
    "plan_digest",
    "render_items",
    "source_digest",
    "verify",
]
