"""Known-item retrieval: a 12-word span from the middle of a chunk must find that chunk in the
top 10. Shared by the tests (which assert the rates) and bench/bench_index.py (which reports
them)."""
from __future__ import annotations

import random
from dataclasses import dataclass


SPAN_WORDS = 12
MIN_WORDS = 2 * SPAN_WORDS


def chunk_rows(output: str, columns: list[str]) -> list[dict]:
    """The current chunk table's rows (through its Delta log, never a glob of its files)."""
    from transforms import outputs

    return outputs.ParquetFolder(outputs.path(str(output), 'chunks')).table(columns).to_pylist()


@dataclass(frozen=True)
class Probe:
    """A query span and the chunk it was cut from."""
    chunk_id: str
    text: str


def probes(output: str, count: int, seed: int = 2026) -> list[Probe]:
    """`count` chunks of at least MIN_WORDS whitespace words, drawn with `seed`, and the span
    of SPAN_WORDS words from the middle of each."""
    rows = chunk_rows(output, ['chunk_id', 'text'])
    candidates = sorted((r for r in rows if len(r['text'].split()) >= MIN_WORDS),
                        key=lambda r: r['chunk_id'])
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    found = []
    for row in chosen:
        words = row['text'].split()
        middle = len(words) // 2 - SPAN_WORDS // 2
        found.append(Probe(row['chunk_id'], ' '.join(words[middle:middle + SPAN_WORDS])))
    return found


def recall_at_10(output: str, embedder, mode: str, found: list[Probe],
                 fusion: str = 'convex') -> float:
    """The share of `found` whose chunk is in the top 10 of a `mode` query of its span."""
    from transforms.index.search import Retriever, query_mode

    retriever = Retriever(output)
    mode = query_mode(retriever.meta, mode)
    vectors = (embedder.embed_queries([p.text for p in found]) if mode != 'lexical'
               else [None] * len(found))
    hits = sum(probe.chunk_id in {r['chunk_id'] for r in retriever.search(
        10, vector, probe.text, mode, fusion=fusion)} for probe, vector in zip(found, vectors))
    return hits / max(1, len(found))
