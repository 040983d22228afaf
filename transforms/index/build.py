"""Building the index: flat and hnsw in the driver; ivfpq trained once, filled by a Beam stage
in shards, and merged on disk."""
from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Callable, Iterator, Optional

import apache_beam as beam
import faiss
import numpy as np
from apache_beam.io.filesystems import FileSystems
from faiss.contrib.ondisk import merge_ondisk

from transforms import outputs
from transforms.corpus import crash_point
from transforms.index import lexical as lexical_index
from transforms.index.files import (CODEC_FILE, INDEX_FILE, IVF_DATA_FILE, META_FILE,
                                    SHARDS_DIR, TRAINED_FILE, local_copy, prune, quiet_stdout,
                                    save_npy, version_dir, writable)
from transforms.index.plan import (BATCH_ROWS, HNSW_M, Plan, Shard, choose_type, embeddings,
                                   part_vectors, plan)
from transforms.index.update import try_update
from transforms.store import StoreConfig, adapt_beam_filesystems

SHARD_ROWS = 250_000             # vectors one worker adds (its memory: ~440 bytes each)
IVF_RERANK = 64                  # candidates per result re-ranked with the SQ8 vectors
IVF_NPROBE = 32

_log = logging.getLogger(__name__)


PipelineMaker = Callable[[], beam.Pipeline]


def build_index(output: str, index_type: str, config: StoreConfig = StoreConfig(),
                memory_mb: int = 1024, pipeline: Optional[PipelineMaker] = None,
                shard_rows: int = SHARD_ROWS, table_version: Optional[int] = None,
                keep_versions: int = 3, rebuild_fraction: float = 0.0,
                lexical: str = 'tantivy') -> dict:
    """Builds the index of DIR/chunks at `table_version` into its own folder DIR/index/vN,
    then makes it the current one (DIR/index/index.json, written last: a build that dies
    leaves the previous index current); keeps the newest `keep_versions`. Returns the meta.

    A current ivfpq index is updated instead (a delta and tombstones on its base,
    `transforms.index.update`) while they stay within `rebuild_fraction` of the base; 0
    always rebuilds. `pipeline` makes the Beam pipeline that adds ivfpq shards in parallel
    (default: the in-process FnApiRunner).

    With `lexical` 'tantivy' the BM25 index of the same table version is built beside it
    (`transforms.index.lexical`, updated the same way) and named in index.json's `lexical`.
    """
    started = time.time()
    root = outputs.path(output, 'index')
    current = _current(root)
    meta = None
    if current and current.get('requested_type') == index_type:
        meta = try_update(output, current, table_version, config, rebuild_fraction)
    if meta is None:
        meta = _build(output, root, index_type, config, memory_mb, pipeline, shard_rows,
                      table_version)
    if lexical != 'none':
        meta['lexical'] = lexical_index.build(output, table_version, config,
                                              (current or {}).get('lexical'), rebuild_fraction)
    else:
        meta.pop('lexical', None)
    meta['seconds'] = round(time.time() - started, 3)
    outputs.write_json(outputs.path(root, meta['dir'], META_FILE), meta)
    crash_point('index-before-switch')
    outputs.write_json(outputs.path(root, META_FILE), meta)  # now the current index
    prune(root, keep_versions, meta['dir'])
    _log.info('ragbeam: index %s of %d vectors written (%s)', meta['type'], meta['count'],
              meta['built'])
    return meta


def _current(root: str) -> Optional[dict]:
    current = outputs.path(root, META_FILE)
    return outputs.read_json(current) if FileSystems.exists(current) else None


def _build(output: str, root: str, index_type: str, config: StoreConfig, memory_mb: int,
           pipeline: Optional[PipelineMaker], shard_rows: int,
           table_version: Optional[int]) -> dict:
    """A full build: every vector of the table version."""
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config, table_version)
    chunk_plan = plan(chunks)
    kind = choose_type(index_type, chunk_plan.count, chunk_plan.dim, memory_mb)
    name = version_dir(table_version)
    outputs.remove(root, [name])  # what an earlier build of this version left
    index_dir = outputs.path(root, name)
    if kind == 'ivfpq':
        search = _build_ivfpq(index_dir, chunks, chunk_plan, config, pipeline, shard_rows)
    else:
        search = _build_in_memory(kind, index_dir, chunk_plan, config)
    return {'type': kind, 'requested_type': index_type, 'metric': 'inner_product',
            'dim': chunk_plan.dim, 'count': chunk_plan.count, 'model': chunk_plan.model,
            'file': INDEX_FILE, 'search': search, 'table_version': table_version, 'dir': name,
            'built': 'full'}


def _build_in_memory(kind: str, index_dir: str, chunk_plan: Plan, config: StoreConfig) -> dict:
    """flat or hnsw: every vector added in the driver, the index written whole."""
    if kind == 'hnsw':
        graph = faiss.IndexHNSWFlat(chunk_plan.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        index, search = faiss.IndexIDMap2(graph), {'efSearch': 128}
    else:
        index, search = faiss.IndexIDMap2(faiss.IndexFlatIP(chunk_plan.dim)), {}
    for part in chunk_plan.parts:
        for ids, batch in part_vectors(part, config, chunk_plan.dim):
            index.add_with_ids(batch, ids)
    _check_count(index.ntotal, chunk_plan.count)
    with writable(outputs.path(index_dir, INDEX_FILE)) as local:
        faiss.write_index(index, local)
    return search


def _build_ivfpq(index_dir: str, chunks: outputs.ParquetFolder, chunk_plan: Plan,
                 config: StoreConfig, pipeline: Optional[PipelineMaker], shard_rows: int) -> dict:
    """Train once; add shards in parallel (a Beam stage); merge the lists on disk."""
    trained, codec = _train_ivfpq(chunks, chunk_plan)
    with writable(outputs.path(index_dir, TRAINED_FILE)) as local:
        faiss.write_index(trained, local)
    with writable(outputs.path(index_dir, CODEC_FILE)) as local:
        faiss.write_index(codec, local)
    shards = chunk_plan.shards(shard_rows)
    _log.info('ragbeam: adding %d vectors to ivfpq in %d shards', chunk_plan.count, len(shards))
    p = pipeline() if pipeline else beam.Pipeline(runner=_in_process_runner())
    with p:
        _ = (p | 'Shards' >> beam.Create(shards)
             | 'Spread' >> beam.Reshuffle()
             | 'AddShard' >> beam.ParDo(AddShard(index_dir, config)))
    with tempfile.TemporaryDirectory(prefix='ragbeam-index-') as tmp, quiet_stdout():
        shard_files = [local_copy(outputs.path(index_dir, SHARDS_DIR, _shard_name(s.number)),
                                   tmp) for s in shards]
        with writable(outputs.path(index_dir, IVF_DATA_FILE)) as ivfdata:
            merge_ondisk(trained, shard_files, ivfdata)  # still empty: the workers added to copies
            _check_count(trained.ntotal, chunk_plan.count)
            with writable(outputs.path(index_dir, INDEX_FILE)) as local:
                faiss.write_index(trained, local)
    outputs.remove(index_dir, [TRAINED_FILE, SHARDS_DIR])
    return {'nprobe': IVF_NPROBE, 'k_factor': IVF_RERANK, 'codec': CODEC_FILE,
            'rerank': [_rerank_name(s.number) for s in shards]}


def _train_ivfpq(chunks: outputs.ParquetFolder, chunk_plan: Plan):
    """IVF-PQ (PQ `m`x8, no residual-norm encoding) and the SQ8 re-rank codec, trained once."""
    dim, count = chunk_plan.dim, chunk_plan.count
    nlist = 2 ** round(math.log2(max(16, min(65536, 4 * math.sqrt(count)))))
    m = next(m for m in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0)
    ivf = faiss.index_factory(dim, f'IVF{nlist},PQ{m}x8np', faiss.METRIC_INNER_PRODUCT)
    codec = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit,
                                       faiss.METRIC_INNER_PRODUCT)
    sample = _reservoir(chunks, dim, max(40 * nlist, 20_000))
    ivf.train(sample)
    codec.train(sample)
    return ivf, codec


def _reservoir(chunks: outputs.ParquetFolder, dim: int, size: int) -> np.ndarray:
    """A uniform sample of at most `size` vectors, streamed, the same on every run."""
    rng = np.random.default_rng(0)
    sample = np.empty((size, dim), dtype=np.float32)
    seen = 0
    for batch in chunks.batches(['embedding'], BATCH_ROWS):
        for vector in embeddings(batch, dim):
            if seen < size:
                sample[seen] = vector
            else:
                j = rng.integers(0, seen + 1)
                if j < size:
                    sample[j] = vector
            seen += 1
    return sample[:min(seen, size)]


class AddShard(beam.DoFn):
    """A shard -> its vectors added to a copy of the trained index: writes the shard's
    inverted lists (staging) and its re-rank ids and SQ8 codes, sorted by id64."""

    def __init__(self, index_dir: str, config: StoreConfig):
        self._dir = index_dir
        self._config = config

    def setup(self):
        adapt_beam_filesystems()

    def process(self, shard: Shard) -> Iterator[int]:
        with tempfile.TemporaryDirectory(prefix='ragbeam-shard-') as tmp:
            ivf = faiss.read_index(local_copy(outputs.path(self._dir, TRAINED_FILE), tmp))
            codec = faiss.read_index(local_copy(outputs.path(self._dir, CODEC_FILE), tmp))
        ids = np.empty(shard.vectors, dtype=np.int64)
        codes = np.empty((shard.vectors, codec.sa_code_size()), dtype=np.uint8)
        filled = 0
        for part in shard.parts:
            for batch_ids, batch in part_vectors(part, self._config, ivf.d):
                ivf.add_with_ids(batch, batch_ids)
                ids[filled:filled + len(batch_ids)] = batch_ids
                codes[filled:filled + len(batch_ids)] = codec.sa_encode(batch)
                filled += len(batch_ids)
        order = np.argsort(ids, kind='stable')
        name = _rerank_name(shard.number)
        save_npy(outputs.path(self._dir, f'{name}.ids.npy'), ids, order)
        save_npy(outputs.path(self._dir, f'{name}.sq8.npy'), codes, order)
        del ids, codes
        with writable(outputs.path(self._dir, SHARDS_DIR, _shard_name(shard.number))) as local:
            faiss.write_index(ivf, local)
        yield filled


def _shard_name(number: int) -> str:
    return f'ivf-{number:05d}.index'


def _rerank_name(number: int) -> str:
    return f'rerank-{number:05d}'


def _check_count(added: int, expected: int) -> None:
    if added != expected:
        raise RuntimeError(f'index holds {added} vectors, the chunks have {expected} distinct ids')


def _in_process_runner():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    return FnApiRunner()


