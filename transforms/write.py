"""The sinks: chunks, manifest rows and error records, written as files under --output.

The chunk sink is the only place where Chunk records become Arrow: row groups bounded in
rows and bytes, in the schema derived from the record (transforms.types.chunk_schema).
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from transforms.batch import BatchBounded
from transforms.monitor import WORK, MonitorOptions, StageMonitor
from transforms.store import adapt_beam_filesystems
from transforms.types import Chunk, ErrorRecord, chunk_schema, embedding_dim

ROW_GROUP_ROWS = 4096
ROW_GROUP_BYTES = 16 << 20
FILE_ROWS = 2 * ROW_GROUP_ROWS  # a chunk file's rows at most: what a change may rewrite
FILE_BYTES = 64 << 20
# Rows per Parquet row group in a chunk file: a search reads back each hit's row by decoding
# the whole row group that holds it (transforms.index.search), so small groups keep that
# cheap; the batches that reach the writer are still ROW_GROUP_ROWS
LOOKUP_GROUP_ROWS = 512


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
    """Embedded Chunks -> Parquet files `<prefix>-<random>.parquet` of at most FILE_ROWS
    rows and FILE_BYTES, in row groups of bounded size; outputs the path of each file once
    it is closed. A file also ends where the URIs go back down, so that each file spans a
    narrow URI range (the readers follow the listing's URI order): a commit rewrites only
    the files whose range holds a replaced object, a bounded number of bytes.

    Only the listed files commit (`transforms.corpus.commit`): a bundle that the runner
    failed and ran again (a lost Flink TaskManager) leaves a file that is not listed. Beam's
    WriteToParquetBatched is not used: its writes take a side input, and Flink's fuser (Java's
    GreedyPipelineFuser) starts a new stage at every ParDo with a side input, which would send
    every chunk's text and embedding through the engine (there, 150 MB of text took the
    job server's JVM from 0.2 to 3.7 GB).
    """

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
                | 'Write' >> beam.ParDo(ParquetFileWriter(
                    self._prefix, schema, LOOKUP_GROUP_ROWS)).with_output_types(str))


class ParquetFileWriter(beam.DoFn):
    """Arrow tables -> Parquet files; a file's path is output when it is closed: when it is
    full, when the URIs go back down, and at the end of the bundle."""

    def __init__(self, prefix: str, schema: pa.Schema, group_rows: Optional[int] = None):
        self._prefix = prefix
        self._schema = schema
        self._group_rows = group_rows  # None: a row group per table written
        self._path = self._file = self._writer = None
        self._rows = self._bytes = 0
        self._last_uri = ''

    def setup(self):
        adapt_beam_filesystems()

    def start_bundle(self):
        self._path = self._file = self._writer = None

    def process(self, table: pa.Table) -> Iterator[str]:
        for run in _sorted_runs(table):
            first = run.column('uri')[0].as_py()
            if self._writer is not None and (first < self._last_uri
                                             or self._rows + run.num_rows > FILE_ROWS
                                             or self._bytes + run.nbytes > FILE_BYTES):
                yield self._close()
            if self._writer is None:
                self._path = f'{self._prefix}-{uuid.uuid4().hex}.parquet'
                self._file = FileSystems.create(self._path, mime_type='application/x-parquet')
                # the options Beam's Parquet sink used, so files and schema stay as they were
                self._writer = pq.ParquetWriter(self._file, self._schema, compression='zstd',
                                                use_compliant_nested_type=False)
                self._rows = self._bytes = 0
            self._writer.write_table(run, row_group_size=self._group_rows)
            self._rows += run.num_rows
            self._bytes += run.nbytes
            self._last_uri = run.column('uri')[-1].as_py()

    def _close(self) -> str:
        self._writer.close()
        self._file.close()
        path, self._path, self._file, self._writer = self._path, None, None, None
        return path

    def finish_bundle(self):
        if self._writer is not None:
            yield WindowedValue(self._close(), GlobalWindow().max_timestamp(), (GlobalWindow(),))
        self._path = self._file = self._writer = None


def _sorted_runs(table: pa.Table) -> Iterator[pa.Table]:
    """The table cut where its uri column goes back down (where one listing range's objects
    end and another's begin)."""
    import pyarrow.compute as pc
    column = table.column('uri')
    cuts = np.flatnonzero(pc.less(column[1:], column[:-1]).to_numpy(zero_copy_only=False)) + 1
    for start, stop in zip([0, *cuts], [*cuts, table.num_rows]):
        yield table.slice(start, stop - start)


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
