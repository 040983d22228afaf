"""Planning an index build from the chunk Parquet: which row groups, which ids, which type."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import outputs
from transforms.store import StoreConfig, store_for
from transforms.types import ObjectRef, embedding_dim

INDEX_TYPES = ('flat', 'hnsw', 'ivfpq', 'auto', 'none')
LEXICAL_TYPES = ('tantivy', 'none')
BATCH_ROWS = 16384
EXACT_MAX_CHUNKS = 100_000       # auto: exact search below this
IVF_MIN_CHUNKS = 1_000           # fewer cannot train 256-code PQ codebooks: flat instead
HNSW_BYTES_PER_DIM = 4           # float32 vectors, plus the graph below
HNSW_M = 32

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexOptions:
    """Which vector index is built over the chunks, and the memory `auto` keeps it within."""
    type: str = field(default='auto', metadata={
        'flag': '--index-type', 'choices': INDEX_TYPES,
        'help': 'flat (exact), hnsw, ivfpq (PQ codes re-ranked with 8-bit vectors), none; '
                'auto picks by chunk count and --index-memory-mb'})
    lexical: str = field(default='tantivy', metadata={
        'flag': '--lexical-index', 'choices': LEXICAL_TYPES,
        'help': 'tantivy: a BM25 index of the chunk text beside the vectors, for ragbeam query '
                '--mode hybrid|lexical; none: vectors only'})
    memory_mb: int = field(default=1024, metadata={
        'flag': '--index-memory-mb', 'help': 'memory budget that auto keeps the index within'})
    versions: int = field(default=3, metadata={
        'flag': '--index-versions',
        'help': 'how many table versions keep their index under DIR/index (the newest), for '
                'ragbeam query --as-of'})
    rebuild_fraction: float = field(default=0.1, metadata={
        'flag': '--index-rebuild-fraction', 'metavar': 'FRACTION',
        'help': 'an incremental run updates an ivfpq index (adds the new vectors, masks the '
                'removed ones) until those pass this fraction of its last full build, then '
                'rebuilds it; 0 always rebuilds'})

    def validate(self) -> None:
        if self.memory_mb < 1:
            raise ValueError('--index-memory-mb must be positive')
        if self.versions < 1:
            raise ValueError('--index-versions must be at least 1 (the current index)')
        if not 0 <= self.rebuild_fraction <= 1:
            raise ValueError('--index-rebuild-fraction must be between 0 and 1')


class MissingChunksError(ValueError):
    """The output has no chunk table to index."""


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
    schema = chunks.schema()
    if schema is None:
        raise MissingChunksError(f'no chunk table in {chunks.folder} '
                                 '(run `ragbeam run` into this output first)')
    dim = embedding_dim(schema)
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


def part_batches(part: RowGroups, config: StoreConfig, columns: list[str]
                 ) -> Iterator[pa.RecordBatch]:
    """Batches of `columns` of a part's rows, without the rows it skips."""
    parquet = outputs.open_parquet(part.ref, store_for(part.ref.uri, config))
    skip = np.asarray(part.skip, dtype=np.int64)
    offset = 0
    for batch in outputs.row_group_batches(parquet, part.groups, columns, BATCH_ROWS):
        keep = np.ones(batch.num_rows, dtype=bool)
        keep[skip[(skip >= offset) & (skip < offset + batch.num_rows)] - offset] = False
        offset += batch.num_rows
        if keep.all():
            yield batch
        elif keep.any():
            yield batch.filter(pa.array(keep))


def part_vectors(part: RowGroups, config: StoreConfig, dim: int) -> Iterator[tuple]:
    """(id64s, float32 vectors) of a part's rows, without the rows it skips."""
    for batch in part_batches(part, config, ['id64', 'embedding']):
        yield np.ascontiguousarray(batch.column('id64').to_numpy()), embeddings(batch, dim)


def embeddings(batch: pa.RecordBatch, dim: int) -> np.ndarray:
    flat = batch.column('embedding').flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


