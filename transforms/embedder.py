"""What an embedder is, and the model-free one: feature hashing of words."""
from __future__ import annotations

import itertools
import re
import zlib
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class Embedder(ABC):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""
    name: str  # written to the chunk's `model` column and to index.json
    dim: int

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 array of shape (len(texts), dim), each row of unit length."""


class HashEmbedder(Embedder):
    """Feature hashing of the word unigrams and bigrams present in a text (signed, presence
    not counts): deterministic, dependency-free, fast.

    A lexical baseline (no semantics), good for known-item lookups and for tests.
    """
    name = 'hash-ngram-v2'

    _WORD = re.compile(r'\w+')
    _CACHE_LIMIT = 1 << 18

    def __init__(self, dim: int = 384):
        self.dim = dim
        self._hashes = _TokenHashes()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        words = [self._WORD.findall(t.lower()) or list(t.strip()) for t in texts]
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        if len(self._hashes) > self._CACHE_LIMIT:
            self._hashes.clear()
        uni = np.fromiter(map(self._hashes.__getitem__, itertools.chain.from_iterable(words)),
                          dtype=np.uint64, count=int(counts.sum()))
        rows = np.repeat(np.arange(len(texts)), counts)
        same_text = rows[:-1] == rows[1:]
        bi = (uni[:-1] * np.uint64(0x9E3779B97F4A7C15) + uni[1:] + np.uint64(1))[same_text]
        h = _mix(np.concatenate((uni, bi)))
        cells = (np.concatenate((rows, rows[:-1][same_text])) * self.dim
                 + (h % np.uint64(self.dim)).astype(np.int64))
        # presence, not counts: a word repeated in a chunk does not drown the others
        negative = (h >> np.uint64(63)).astype(np.int64)
        present = np.bincount(cells * 2 + negative, minlength=len(texts) * self.dim * 2) > 0
        out = (present[0::2].astype(np.float32) - present[1::2]).reshape(len(texts), self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        out[empty, 0], norms[empty] = 1.0, 1.0  # no features at all: a fixed unit vector
        return out / norms


class _TokenHashes(dict):
    """token -> crc32 of its UTF-8 bytes, computed on first use (lookups stay in C)."""

    def __missing__(self, token: str) -> int:
        value = self[token] = zlib.crc32(token.encode('utf-8'))
        return value


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads crc32 values over all 64 bits."""
    with np.errstate(over='ignore'):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))
