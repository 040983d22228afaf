"""The vector index over a run's chunks: planned from the chunk Parquet, built, then queried.

Types: `flat` (exact inner product), `hnsw` (a graph over all vectors, in memory) and `ivfpq`
(inverted lists of 48-byte PQ codes in a memory-mapped file, re-ranked with 8-bit scalar
quantised vectors); `auto` picks by chunk count and --index-memory-mb. Every type is keyed by
id64 and adds each id once: the plan reads the id64 column first and skips repeated ids.

An ivfpq build is the FAISS way. The coarse quantizer, PQ codebooks and SQ8 ranges are
trained once on a bounded, reproducible sample. Then a Beam stage gives shards (small records
of row groups) to workers; each adds its rows to a copy of the trained index and writes its
inverted lists and its re-rank codes, sorted by id64. Last, the driver merges the lists into
one on-disk file (`merge_ondisk`). Each table version's index has its own folder DIR/index/vN:
index.json, faiss.index, and for ivfpq faiss.ivfdata (the lists), rerank.sq8 (the quantizer),
rerank-NNNNN.{ids,sq8}.npy; DIR/index/index.json, written last, names the current one.
After an incremental commit, an ivfpq index is updated rather than rebuilt (`update`): the
new version's folder holds only a delta of added vectors and tombstones over its base's.

Beside the vectors, a lexical BM25 index of the same table version (tantivy, `lexical`,
terms from `tokens`) in DIR/index/lexical/vN; a query fuses the two lists by reciprocal
rank (`search.query`, --mode hybrid|dense|lexical).
"""
import importlib

from transforms.index.plan import IndexOptions, MissingChunksError, choose_type

# FAISS (40 MB) loads with the first use of these, not with the options: a run imports it
# only for its index step, after the pipeline
_LAZY = {'build_index': 'build', 'Searcher': 'search', 'parse_entity': 'search',
         'query': 'search', 'index_meta': 'search', 'NoIndexError': 'search',
         'query_mode': 'search', 'LexicalSearcher': 'lexical'}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f'transforms.index.{_LAZY[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['IndexOptions', 'LexicalSearcher', 'MissingChunksError', 'NoIndexError', 'Searcher',
           'build_index', 'choose_type', 'index_meta', 'parse_entity', 'query', 'query_mode']
