"""The vector index over a run's chunks: planned from the chunk Parquet, built, then queried.

Types: `flat` (exact inner product), `hnsw` (a graph over all vectors, in memory) and `ivfpq`
(inverted lists of 48-byte PQ codes in a memory-mapped file, re-ranked with 8-bit scalar
quantised vectors); `auto` picks by chunk count and --index-memory-mb. Every type is keyed by
id64 and adds each id once: the plan reads the id64 column first and skips repeated ids.

An ivfpq build is the FAISS way. The coarse quantizer, PQ codebooks and SQ8 ranges are
trained once on a bounded, reproducible sample. Then a Beam stage gives shards (small records
of row groups) to workers; each adds its rows to a copy of the trained index and writes its
inverted lists and its re-rank codes, sorted by id64. Last, the driver merges the lists into
one on-disk file (`merge_ondisk`). Files under DIR/index: index.json, faiss.index, and for
ivfpq faiss.ivfdata (the lists), rerank.sq8 (the quantizer), rerank-NNNNN.{ids,sq8}.npy.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from faiss.contrib.ondisk import merge_ondisk

from transforms import outputs
from transforms.store import StoreConfig, store_for
from transforms.types import ObjectRef

INDEX_FILE = 'faiss.index'
IVF_DATA_FILE = 'faiss.ivfdata'
CODEC_FILE = 'rerank.sq8'
TRAINED_FILE = 'trained.index'   # staging: the empty trained index the shards start from
SHARDS_DIR = 'shards'            # staging: each shard's inverted lists, merged then removed
BATCH_ROWS = 16384
SHARD_ROWS = 250_000             # vectors one worker adds (its memory: ~440 bytes each)
EXACT_MAX_CHUNKS = 100_000       # auto: exact search below this
IVF_MIN_CHUNKS = 1_000           # fewer cannot train 256-code PQ codebooks: flat instead
HNSW_BYTES_PER_DIM = 4           # float32 vectors, plus the graph below
HNSW_M = 32
IVF_RERANK = 64                  # candidates per result re-ranked with the SQ8 vectors
IVF_NPROBE = 32

_log = logging.getLogger(__name__)


def choose_type(requested: str, count: int, dim: int, memory_mb: int) -> str:
    """The index type to build: the requested one, or for 'auto' the best that fits."""
    if requested == 'ivfpq' and count < IVF_MIN_CHUNKS:
        _log.warning('ragbeam: %d chunks are too few to train ivfpq (needs %d); building flat',
                     count, IVF_MIN_CHUNKS)
        return 'flat'
    if requested != 'auto':
        return requested
    if count <= EXACT_MAX_CHUNKS:
        return 'flat'
    if count * (dim * HNSW_BYTES_PER_DIM + HNSW_M * 2 * 4 + 8) <= memory_mb << 20:
        return 'hnsw'
    return 'ivfpq'


@dataclass(frozen=True)
class RowGroups:
    """Consecutive row groups of one chunk file, and the rows of them not to add (their id64
    came earlier), counted from the first row of the first group."""
    ref: ObjectRef
    groups: tuple[int, ...]
    rows: int
    skip: tuple[int, ...] = ()

    @property
    def kept(self) -> int:
        return self.rows - len(self.skip)


@dataclass(frozen=True)
class Shard:
    """What one worker adds to its copy of the trained index."""
    number: int
    parts: tuple[RowGroups, ...]

    @property
    def vectors(self) -> int:
        return sum(p.kept for p in self.parts)


@dataclass(frozen=True)
class Plan:
    """The chunk files' row groups (one part each) in order, their embedding size, model and
    number of distinct ids."""
    parts: tuple[RowGroups, ...]
    dim: int
    model: Optional[str]
    count: int

    def shards(self, rows: int) -> list[Shard]:
        """The row groups in order, cut into shards of about `rows` vectors."""
        shards: list[list[RowGroups]] = [[]]
        filled = 0
        for part in self.parts:
            if filled >= rows:
                shards.append([])
                filled = 0
            shards[-1].append(part)
            filled += part.kept
        return [Shard(n, tuple(_join_consecutive(parts))) for n, parts in enumerate(shards)
                if parts]


def plan(chunks: outputs.ParquetFolder) -> Plan:
    """Reads only the id64 and model columns: every row group, and the repeated ids to skip."""
    dim = chunks.schema().field('embedding').type.list_size
    found: list[tuple[ObjectRef, int, int]] = []
    ids: list[np.ndarray] = []
    models: set[str] = set()
    for ref in chunks.refs:
        parquet = chunks.open(ref)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=['id64', 'model'])
            ids.append(table.column('id64').to_numpy())
            models.update(pc.unique(table.column('model')).to_pylist())
            found.append((ref, group, table.num_rows))
    if len(models) > 1:
        raise ValueError(f'chunks of several models cannot share one index: {sorted(models)}')
    every = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    _, first = np.unique(every, return_index=True)
    repeated = np.ones(len(every), dtype=bool)
    repeated[first] = False
    parts, offset = [], 0
    for ref, group, rows in found:
        skip = tuple(np.flatnonzero(repeated[offset:offset + rows]).tolist())
        parts.append(RowGroups(ref, (group,), rows, skip))
        offset += rows
    return Plan(tuple(parts), dim, models.pop() if models else None, len(first))


def _join_consecutive(parts: list[RowGroups]) -> Iterator[RowGroups]:
    """Row groups of one file that follow each other, as one part."""
    current = None
    for part in parts:
        if current and current.ref == part.ref and current.groups[-1] + 1 == part.groups[0]:
            current = RowGroups(current.ref, current.groups + part.groups,
                                current.rows + part.rows,
                                current.skip + tuple(s + current.rows for s in part.skip))
            continue
        if current:
            yield current
        current = part
    if current:
        yield current


def part_vectors(part: RowGroups, config: StoreConfig, dim: int) -> Iterator[tuple]:
    """(id64s, float32 vectors) of a part's rows, without the rows it skips."""
    parquet = outputs.open_parquet(part.ref, store_for(part.ref.uri, config))
    skip = np.asarray(part.skip, dtype=np.int64)
    offset = 0
    for batch in outputs.row_group_batches(parquet, part.groups, ['id64', 'embedding'],
                                           BATCH_ROWS):
        keep = np.ones(batch.num_rows, dtype=bool)
        keep[skip[(skip >= offset) & (skip < offset + batch.num_rows)] - offset] = False
        offset += batch.num_rows
        if keep.any():
            yield (np.ascontiguousarray(batch.column('id64').to_numpy()[keep]),
                   _embeddings(batch, dim)[keep])


def _embeddings(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    flat = batch.column('embedding').flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


PipelineMaker = Callable[[], beam.Pipeline]


def build_index(output: str, index_type: str, config: StoreConfig = StoreConfig(),
                memory_mb: int = 1024, pipeline: Optional[PipelineMaker] = None,
                shard_rows: int = SHARD_ROWS) -> dict:
    """Builds DIR/index from DIR/chunks; returns index.json's content.

    `pipeline` makes the Beam pipeline that adds ivfpq shards in parallel (default: the
    in-process FnApiRunner).
    """
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config)
    chunk_plan = plan(chunks)
    kind = choose_type(index_type, chunk_plan.count, chunk_plan.dim, memory_mb)
    outputs.remove(output, ['index'])  # an earlier index's files, of any type
    index_dir = outputs.path(output, 'index')
    if kind == 'ivfpq':
        search = _build_ivfpq(index_dir, chunks, chunk_plan, config, pipeline, shard_rows)
    else:
        search = _build_in_memory(kind, index_dir, chunk_plan, config)
    meta = {'type': kind, 'requested_type': index_type, 'metric': 'inner_product',
            'dim': chunk_plan.dim, 'count': chunk_plan.count, 'model': chunk_plan.model,
            'file': INDEX_FILE, 'search': search}
    outputs.write_json(outputs.path(index_dir, 'index.json'), meta)
    _log.info('ragbeam: index %s of %d vectors written', kind, meta['count'])
    return meta


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
    with _writable(outputs.path(index_dir, INDEX_FILE)) as local:
        faiss.write_index(index, local)
    return search


def _build_ivfpq(index_dir: str, chunks: outputs.ParquetFolder, chunk_plan: Plan,
                 config: StoreConfig, pipeline: Optional[PipelineMaker], shard_rows: int) -> dict:
    """Train once; add shards in parallel (a Beam stage); merge the lists on disk."""
    trained, codec = _train_ivfpq(chunks, chunk_plan)
    with _writable(outputs.path(index_dir, TRAINED_FILE)) as local:
        faiss.write_index(trained, local)
    with _writable(outputs.path(index_dir, CODEC_FILE)) as local:
        faiss.write_index(codec, local)
    shards = chunk_plan.shards(shard_rows)
    _log.info('ragbeam: adding %d vectors to ivfpq in %d shards', chunk_plan.count, len(shards))
    p = pipeline() if pipeline else beam.Pipeline(runner=_in_process_runner())
    with p:
        _ = (p | 'Shards' >> beam.Create(shards)
             | 'Spread' >> beam.Reshuffle()
             | 'AddShard' >> beam.ParDo(AddShard(index_dir, config)))
    with tempfile.TemporaryDirectory(prefix='ragbeam-index-') as tmp, _quiet_stdout():
        shard_files = [_local_copy(outputs.path(index_dir, SHARDS_DIR, _shard_name(s.number)),
                                   tmp) for s in shards]
        with _writable(outputs.path(index_dir, IVF_DATA_FILE)) as ivfdata:
            merge_ondisk(trained, shard_files, ivfdata)  # still empty: the workers added to copies
            _check_count(trained.ntotal, chunk_plan.count)
            with _writable(outputs.path(index_dir, INDEX_FILE)) as local:
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
        for vector in _embeddings(batch, dim):
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

    def process(self, shard: Shard) -> Iterator[int]:
        with tempfile.TemporaryDirectory(prefix='ragbeam-shard-') as tmp:
            ivf = faiss.read_index(_local_copy(outputs.path(self._dir, TRAINED_FILE), tmp))
            codec = faiss.read_index(_local_copy(outputs.path(self._dir, CODEC_FILE), tmp))
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
        _save_npy(outputs.path(self._dir, f'{name}.ids.npy'), ids, order)
        _save_npy(outputs.path(self._dir, f'{name}.sq8.npy'), codes, order)
        del ids, codes
        with _writable(outputs.path(self._dir, SHARDS_DIR, _shard_name(shard.number))) as local:
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


@contextlib.contextmanager
def _writable(file_path: str) -> Iterator[str]:
    """A local path to write `file_path` at: itself, or a temporary file copied up after."""
    if outputs.is_local(file_path):
        os.makedirs(os.path.dirname(file_path), exist_ok=True)
        yield file_path
        return
    with tempfile.TemporaryDirectory(prefix='ragbeam-upload-') as tmp:
        local = os.path.join(tmp, os.path.basename(file_path))
        yield local
        with open(local, 'rb') as src, FileSystems.create(file_path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def _local_copy(file_path: str, folder: str) -> str:
    """`file_path` itself when local, else a copy of it in `folder`."""
    if outputs.is_local(file_path):
        return file_path
    local = os.path.join(folder, os.path.basename(file_path))
    with FileSystems.open(file_path, compression_type='uncompressed') as src, \
            open(local, 'wb') as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    return local


def _save_npy(file_path: str, array: np.ndarray, order: np.ndarray) -> None:
    """Writes `array[order]` as a .npy file, in blocks of rows (no second copy of it)."""
    with _writable(file_path) as local, open(local, 'wb') as f:
        np.lib.format.write_array_header_1_0(f, {
            'descr': np.lib.format.dtype_to_descr(array.dtype), 'fortran_order': False,
            'shape': (len(order),) + array.shape[1:]})
        for start in range(0, len(order), BATCH_ROWS):
            f.write(array[order[start:start + BATCH_ROWS]].tobytes())


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """FAISS's on-disk lists print to the C stdout, which `query --json` keeps for JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


CACHE_ENV = 'RAGBEAM_CACHE'


def cached_copy(index_dir: str) -> str:
    """A local copy of a bucket's index folder under $RAGBEAM_CACHE (default ~/.cache/ragbeam),
    fetched again only when the folder's files, sizes or times changed."""
    files = sorted(FileSystems.match([outputs.path(index_dir, '*')])[0].metadata_list,
                   key=lambda m: m.path)
    stamp = json.dumps([(m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in files])
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'ragbeam')
    folder = os.path.join(root, 'index-' + hashlib.sha256(index_dir.encode()).hexdigest()[:16])
    stamp_file = os.path.join(folder, '.stamp')
    if os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
        return folder
    os.makedirs(root, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix='fetching-', dir=root)
    for m in files:
        _local_copy(m.path, fresh)
    with open(os.path.join(fresh, '.stamp'), 'w') as f:
        f.write(stamp)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(fresh, folder)
    except OSError:  # another query put its copy there first
        shutil.rmtree(fresh, ignore_errors=True)
    return folder


class Searcher:
    """A loaded index and the search settings it was built with.

    ivfpq's lists and re-rank codes stay on disk, memory-mapped; an output in a bucket is
    searched from a local copy of its index folder (`cached_copy`).
    """

    def __init__(self, output: str):
        index_dir = outputs.path(output, 'index')
        folder = index_dir if outputs.is_local(index_dir) else cached_copy(index_dir)
        self.meta = outputs.read_json(os.path.join(folder, 'index.json'))
        self._params = self.meta.get('search') or {}
        with _quiet_stdout():
            self._index = faiss.read_index(os.path.join(folder, self.meta['file']),
                                           faiss.IO_FLAG_ONDISK_SAME_DIR)
        self._rerank = None
        if 'nprobe' in self._params:
            faiss.extract_index_ivf(self._index).nprobe = self._params['nprobe']
            self._rerank = _Rerank(folder, self._params['codec'], self._params['rerank'])
        if 'efSearch' in self._params:
            self._hnsw = faiss.downcast_index(self._index.index).hnsw

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, id64s) of the k nearest chunks of each query; id -1 where there are fewer."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta['dim'])
        if 'efSearch' in self._params:
            self._hnsw.efSearch = max(self._params['efSearch'], k)
        if self._rerank is None:
            return self._index.search(queries, k)
        _, candidates = self._index.search(queries, k * self._params['k_factor'])
        return self._rerank.top(queries, candidates, k)

    def ids(self) -> np.ndarray:
        """Every id64 the index holds, sorted."""
        if self._rerank is None:
            return np.sort(faiss.vector_to_array(self._index.id_map))
        lists = faiss.extract_index_ivf(self._index).invlists
        return np.sort(np.concatenate([np.empty(0, dtype=np.int64)] + [
            faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
            for n in range(lists.nlist) if lists.list_size(n)]))


class _Rerank:
    """SQ8 codes of every vector, in per-shard files sorted by id64, memory-mapped."""

    def __init__(self, folder: str, codec: str, shards: list[str]):
        self._codec = faiss.read_index(os.path.join(folder, codec))
        self._shards = [(np.load(os.path.join(folder, f'{s}.ids.npy'), mmap_mode='r'),
                         np.load(os.path.join(folder, f'{s}.sq8.npy'), mmap_mode='r'))
                        for s in shards]

    def top(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple:
        """The k best candidates of each query by their decoded vectors' inner product."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found != -1]
            codes = self._codes(found)
            exact = self._codec.sa_decode(codes) @ query
            best = np.argsort(-exact, kind='stable')[:k]
            scores[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return scores, ids

    def _codes(self, wanted: np.ndarray) -> np.ndarray:
        codes = np.empty((len(wanted), self._codec.sa_code_size()), dtype=np.uint8)
        missing = np.ones(len(wanted), dtype=bool)
        for shard_ids, shard_codes in self._shards:
            if not len(shard_ids):
                continue
            at = np.minimum(np.searchsorted(shard_ids, wanted), len(shard_ids) - 1)
            hit = missing & (shard_ids[at] == wanted)
            codes[hit] = shard_codes[at[hit]]
            missing &= ~hit
        if missing.any():
            raise RuntimeError(f'{int(missing.sum())} ids of the index have no re-rank codes')
        return codes


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
