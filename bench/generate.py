"""Deterministic generated text objects of any size, written in bounded pieces."""
from __future__ import annotations

import random

_WORDS = ('ingest bucket object chunk split window range worker runner beam parquet vector index '
          'query embedding manifest version retry memory bounded restriction offset page '
          'document corpus text byte stream shard merge train search model batch the a of to '
          'and in is for on with as by at from that this be are it or an was not').split()


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 8)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 24))]
        sentences.append(' '.join(words).capitalize() + rng.choice('.!?.'))
    return ' '.join(sentences) + '\n\n'


def write_text(path: str, size: int, seed: int = 7) -> None:
    """Writes exactly `size` bytes of ASCII paragraphs to `path`."""
    rng = random.Random(seed)
    written = 0
    with open(path, 'w', encoding='ascii', newline='') as f:
        while written < size:
            block = ''.join(paragraph(rng) for _ in range(2000))[:size - written]
            f.write(block)
            written += len(block)
