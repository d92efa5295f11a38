"""Offline speech corpora from text-to-speech voices (see esc_ao.corpus.builder)."""

from esc_ao.corpus.builder import (CORPORA, TEST_ONLY_VOICES, TRAIN_VOICES, Corpus, CorpusSpec, Utterance,
                                   built_digest, cache_root, load_corpus, render_items, verify)
from esc_ao.corpus.voices import MissingEngineError, Voice

__all__ = ["CORPORA", "Corpus", "CorpusSpec", "MissingEngineError", "TEST_ONLY_VOICES", "TRAIN_VOICES",
           "Utterance", "Voice", "built_digest", "cache_root", "load_corpus", "render_items", "verify"]
