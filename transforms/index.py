"""The vector index over a run's chunks: built by streaming the chunk Parquet, then queried.

Types: `flat` (exact inner product), `hnsw` (graph, all vectors in memory) and `ivfpq`
(inverted lists of 48-byte PQ codes, re-ranked with 8-bit scalar-quantised vectors, ~440
bytes per chunk); `auto` picks by chunk count and --index-memory-mb. Every type is keyed by
id64 and adds each id once. Vectors are streamed in batches; IVF training uses a bounded,
reproducible reservoir sample.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.store import StoreConfig

INDEX_FILE = 'faiss.index'
BATCH_ROWS = 16384
EXACT_MAX_CHUNKS = 100_000   # auto: exact search below this
HNSW_BYTES_PER_DIM = 4       # float32 vectors, plus the graph below
HNSW_M = 32
IVF_RERANK = 64              # candidates per result re-ranked with the SQ8 vectors
IVF_NPROBE = 32

_log = logging.getLogger(__name__)


def choose_type(requested: str, count: int, dim: int, memory_mb: int) -> str:
    """The index type to build: the requested one, or for 'auto' the best that fits."""
    if requested != 'auto':
        return requested
    if count <= EXACT_MAX_CHUNKS:
        return 'flat'
    if count * (dim * HNSW_BYTES_PER_DIM + HNSW_M * 2 * 4 + 8) <= memory_mb << 20:
        return 'hnsw'
    return 'ivfpq'


def build_index(output: str, index_type: str, config: StoreConfig = StoreConfig(),
                memory_mb: int = 1024) -> dict:
    """Builds DIR/index from DIR/chunks; returns index.json's content."""
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config)
    dim, model, count = _dim_model_count(chunks)
    kind = choose_type(index_type, count, dim, memory_mb)
    index, search_params = _EMPTY[kind](chunks, dim, count)
    for ids, vectors in _unique_batches(chunks, dim):
        index.add_with_ids(vectors, ids)
    meta = {'type': kind, 'requested_type': index_type, 'metric': 'inner_product', 'dim': dim,
            'count': int(index.ntotal), 'model': model, 'file': INDEX_FILE,
            'search': search_params}
    _write_index(index, outputs.path(output, 'index', INDEX_FILE))
    outputs.write_json(outputs.path(output, 'index', 'index.json'), meta)
    _log.info('ragbeam: index %s of %d vectors written', kind, meta['count'])
    return meta


def _flat(chunks, dim: int, count: int):
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {}


def _hnsw(chunks, dim: int, count: int):
    graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 80
    return faiss.IndexIDMap2(graph), {'efSearch': 128}


def _ivfpq(chunks, dim: int, count: int):
    """IVF-PQ (PQ `m`x8, no residual-norm encoding) re-ranked by an SQ8 copy, trained once."""
    nlist = 2 ** round(math.log2(max(16, min(65536, 4 * math.sqrt(count)))))
    m = next(m for m in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0)
    coarse = faiss.index_factory(dim, f'IVF{nlist},PQ{m}x8np', faiss.METRIC_INNER_PRODUCT)
    refined = faiss.IndexRefine(coarse, faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT))
    sample = _reservoir(chunks, dim, max(40 * nlist, 20_000))
    refined.train(sample)
    return faiss.IndexIDMap2(refined), {'nprobe': IVF_NPROBE, 'k_factor': IVF_RERANK}


_EMPTY = {'flat': _flat, 'hnsw': _hnsw, 'ivfpq': _ivfpq}


def _vectors(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    flat = batch.column('embedding').flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


def _unique_batches(chunks: outputs.ParquetFolder, dim: int) -> Iterator[tuple]:
    """(ids, vectors) of every chunk, each id64 once (a retried run may repeat rows)."""
    seen: set[int] = set()
    for batch in chunks.batches(['id64', 'embedding'], BATCH_ROWS):
        ids = batch.column('id64').to_numpy()
        keep = np.fromiter((i not in seen for i in ids.tolist()), dtype=bool, count=len(ids))
        if keep.any():
            seen.update(ids[keep].tolist())
            yield np.ascontiguousarray(ids[keep]), _vectors(batch, dim)[keep]


def _reservoir(chunks: outputs.ParquetFolder, dim: int, size: int) -> np.ndarray:
    """A uniform sample of at most `size` vectors, streamed, the same on every run."""
    rng = np.random.default_rng(0)
    sample = np.empty((size, dim), dtype=np.float32)
    seen = 0
    for batch in chunks.batches(['embedding'], BATCH_ROWS):
        for vector in _vectors(batch, dim):
            if seen < size:
                sample[seen] = vector
            else:
                j = rng.integers(0, seen + 1)
                if j < size:
                    sample[j] = vector
            seen += 1
    return sample[:min(seen, size)]


def _dim_model_count(chunks: outputs.ParquetFolder) -> tuple[int, str, int]:
    dim = chunks.schema().field('embedding').type.list_size
    models = set()
    for batch in chunks.batches(['model'], BATCH_ROWS):
        models.update(pc.unique(batch.column('model')).to_pylist())
    if len(models) > 1:
        raise ValueError(f'chunks of several models cannot share one index: {sorted(models)}')
    return dim, (models.pop() if models else None), chunks.num_rows()


def _write_index(index, file_path: str) -> None:
    if outputs.is_local(file_path):
        os.makedirs(os.path.dirname(file_path), exist_ok=True)
        faiss.write_index(index, file_path)
        return
    with tempfile.NamedTemporaryFile(suffix='.index') as tmp:
        faiss.write_index(index, tmp.name)
        with open(tmp.name, 'rb') as src, FileSystems.create(file_path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


class Searcher:
    """A loaded index and the search settings it was built with."""

    def __init__(self, output: str):
        self.meta = outputs.read_json(outputs.path(output, 'index', 'index.json'))
        file_path = outputs.path(output, 'index', self.meta['file'])
        if outputs.is_local(file_path):
            self._index = faiss.read_index(file_path)
        else:
            with tempfile.NamedTemporaryFile(suffix='.index') as tmp:
                with FileSystems.open(file_path, compression_type='uncompressed') as src:
                    shutil.copyfileobj(src, tmp, 8 << 20)
                tmp.flush()
                self._index = faiss.read_index(tmp.name)
        self._params = self.meta.get('search') or {}

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, id64s) of the k nearest chunks of each vector; id -1 where there are fewer."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.meta['dim'])
        inner = faiss.downcast_index(self._index.index)
        if 'efSearch' in self._params:
            inner.hnsw.efSearch = max(self._params['efSearch'], k)
        if 'nprobe' in self._params:
            inner.k_factor = self._params['k_factor']
            faiss.extract_index_ivf(inner.base_index).nprobe = self._params['nprobe']
        return self._index.search(vectors, k)


RESULT_COLUMNS = ['id64', 'chunk_id', 'uri', 'page', 'start', 'end', 'text']
MAX_CANDIDATES = 10_000


def query(output: str, vector: np.ndarray, k: int, uri_prefix: str = '',
          config: StoreConfig = StoreConfig()) -> list[dict]:
    """The k nearest chunks to `vector` ({score, chunk_id, uri, page, start, end, text}),
    only from objects whose URI starts with `uri_prefix`.

    With a prefix, more candidates are drawn until k match or MAX_CANDIDATES were looked at.
    """
    searcher = Searcher(output)
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config)
    wanted = k * 10 if uri_prefix else k
    while True:
        scores, ids = searcher.search(vector, min(wanted, max(1, searcher.meta['count'])))
        hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i != -1]
        rows = chunks.rows_with('id64', pa.array([i for _, i in hits], type=pa.int64()),
                                RESULT_COLUMNS).to_pylist()
        by_id = {row.pop('id64'): row for row in rows}
        results = [dict(score=round(score, 6), **by_id[i]) for score, i in hits
                   if i in by_id and by_id[i]['uri'].startswith(uri_prefix)]
        if len(results) >= k or wanted >= min(MAX_CANDIDATES, searcher.meta['count']):
            return results[:k]
        wanted *= 4
