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

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of search queries, to score against `embed`'s of chunks (the same here)."""
        return self.embed(texts)


class HashEmbedder(Embedder):
    """Feature hashing of the word unigrams and bigrams present in a text (signed, presence
    not counts): deterministic, dependency-free, fast.

    A lexical baseline (no semantics), good for known-item lookups and for tests.

    Chunks are length-normalised with a pivot: a chunk with fewer than PIVOT features scores
    as if it had PIVOT (its vector's remaining length goes to dimension 0, which features and
    queries never use). Without it a chunk of few distinct tokens (a genome's `acgt` lines, a
    table of numbers) carries large weights on a few dimensions, and one hash collision with
    a query outscored the chunk that held the query's words. Queries (`embed_queries`) are
    unit vectors of their features alone.
    """
    name = 'hash-ngram-v3'

    _WORD = re.compile(r'\w+')
    _CACHE_LIMIT = 1 << 18
    PIVOT = 128

    def __init__(self, dim: int = 384, pivot: int = PIVOT):
        self.dim = dim
        self.pivot = pivot  # another pivot is another model: bench/hybrid.py measures them
        if pivot != self.PIVOT:
            self.name = f'{HashEmbedder.name}-pivot{pivot}'
        self._hashes = _TokenHashes()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectors(texts, self.pivot)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectors(texts, 0)

    def _vectors(self, texts: Sequence[str], pivot: int) -> np.ndarray:
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
        cells = (np.concatenate((rows, rows[:-1][same_text])) * self.dim + 1
                 + (h % np.uint64(self.dim - 1)).astype(np.int64))
        # presence, not counts: a word repeated in a chunk does not drown the others
        negative = (h >> np.uint64(63)).astype(np.int64)
        present = np.bincount(cells * 2 + negative, minlength=len(texts) * self.dim * 2) > 0
        out = (present[0::2].astype(np.float32) - present[1::2]).reshape(len(texts), self.dim)
        squared = np.einsum('ij,ij->i', out, out)  # the features' count (entries are +-1, 0)
        scale = np.maximum(squared, max(pivot, 1))
        out /= np.sqrt(scale)[:, None]
        out[:, 0] = np.sqrt(np.maximum(0.0, 1.0 - squared / scale))  # the rest of unit length
        return out


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
