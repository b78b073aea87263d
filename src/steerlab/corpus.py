"""Text corpora and token activations for SAE training: moved to :mod:`steerlab.sae.corpus`;
this module re-exports it so that ``steerlab.corpus`` imports keep working."""

from __future__ import annotations

from steerlab.sae.corpus import (
    SHARD_TOKENS,
    ActivationShards,
    builtin_corpus,
    corpus_activations,
    load_corpus,
)

__all__ = ["SHARD_TOKENS", "ActivationShards", "builtin_corpus", "corpus_activations",
           "load_corpus"]
