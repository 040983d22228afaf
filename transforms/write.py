"""The sinks: chunks, manifest rows and error records, written as files under --output.

The chunk sink is the only place where Chunk records become Arrow: row groups bounded in
rows and bytes, in the schema derived from the record (transforms.types.chunk_schema).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.batch import BatchBounded
from transforms.monitor import WORK, MonitorOptions, StageMonitor
from transforms.types import MANIFEST_SCHEMA, Chunk, ErrorRecord, chunk_schema, embedding_dim

ROW_GROUP_ROWS = 4096
ROW_GROUP_BYTES = 16 << 20


def chunk_table(chunks: Sequence[Chunk], schema: pa.Schema) -> pa.Table:
    """The Arrow rows of embedded chunks, in `schema` (whose embedding field gives the size)."""
    columns = []
    for f in schema:
        if f.name == 'embedding':
            vectors = np.frombuffer(b''.join(c.embedding for c in chunks), dtype=np.float32)
            dim = embedding_dim(schema)
            if len(vectors) != dim * len(chunks):
                raise ValueError(f'embeddings of {len(vectors) // max(1, len(chunks))} floats '
                                 f'in a table of dim {dim}')
            offsets = np.arange(0, len(vectors) + 1, dim, dtype=np.int32)
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors)))
        elif f.name == 'entities':
            columns.append(pa.array([None if c.entities is None else
                                     [dataclasses.asdict(e) for e in c.entities]
                                     for c in chunks], type=f.type))
        else:
            columns.append(pa.array([getattr(c, f.name) for c in chunks], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _chunk_bytes(chunk: Chunk) -> int:
    return len(chunk.text) + len(chunk.embedding or b'') + 64


class WriteChunks(beam.PTransform):
    """Embedded Chunks -> Parquet files `<prefix>-*.parquet`, in row groups of bounded size."""

    def __init__(self, path_prefix: str, dim: int, monitor: MonitorOptions = MonitorOptions()):
        super().__init__()
        self._prefix = path_prefix
        self._schema = chunk_schema(dim)
        self._monitor = monitor

    def expand(self, chunks):
        schema = self._schema
        return (chunks
                | 'RowGroups' >> beam.ParDo(BatchBounded(ROW_GROUP_ROWS, ROW_GROUP_BYTES,
                                                         weight=_chunk_bytes))
                | 'ToArrow' >> beam.ParDo(_ToArrow(schema, self._monitor))
                | 'Write' >> beam.io.WriteToParquetBatched(
                    self._prefix, schema=schema, codec='zstd', file_name_suffix='.parquet'))


class _ToArrow(beam.DoFn):
    """A row group of chunks -> its Arrow table, watched as the write stage."""

    def __init__(self, schema: pa.Schema, monitor: MonitorOptions):
        self._schema = schema
        self._monitor = StageMonitor('write', monitor.memory_warn_mb)

    def process(self, chunks: list[Chunk]) -> Iterator[pa.Table]:
        with self._monitor.timed(chunks[0].uri):
            table = chunk_table(chunks, self._schema)
        WORK.add(chunks_written=len(chunks))
        yield table


class WriteManifest(beam.PTransform):
    """Writes ManifestRows as Parquet."""

    def __init__(self, path_prefix: str):
        super().__init__()
        self._prefix = path_prefix

    def expand(self, rows):
        return (rows
                | 'ToDict' >> beam.Map(dataclasses.asdict)
                | 'Write' >> beam.io.WriteToParquet(
                    self._prefix, schema=MANIFEST_SCHEMA, codec='zstd',
                    file_name_suffix='.parquet', num_shards=1))


def error_json(record: ErrorRecord) -> str:
    """One error record as a JSON line, without the fields that are unknown."""
    return json.dumps({k: v for k, v in dataclasses.asdict(record).items() if v is not None},
                      ensure_ascii=False, sort_keys=True)


class WriteErrors(beam.PTransform):
    """Writes ErrorRecords as JSON lines; no file at all when there are none."""

    def __init__(self, path_prefix: str):
        super().__init__()
        self._prefix = path_prefix

    def expand(self, records):
        return (records
                | 'ToJson' >> beam.Map(error_json)
                | 'Write' >> beam.io.WriteToText(self._prefix, file_name_suffix='.jsonl',
                                                 num_shards=1, skip_if_empty=True))
