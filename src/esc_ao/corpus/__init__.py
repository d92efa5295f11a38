"""Offline speech corpora from text-to-speech voices (see esc_ao.corpus.builder)."""

from esc_ao.corpus.builder import (CORPORA, TEST_ONLY_VOICES, TRAIN_VOICES, Corpus, CorpusSpec, Utterance,
                                   cache_root, load_corpus, plan_digest, render_items, verify)
from esc_ao.corpus.voices import MissingEngineError, Voice

__all__ = ["CORPORA", "Corpus", "CorpusSpec", "MissingEngineError", "TEST_ONLY_VOICES", "TRAIN_VOICES",
           "Utterance", "Voice", "cache_root", "load_corpus", "plan_digest", "render_items", "verify"]
