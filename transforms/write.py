"""Parquet schemas and the writers of chunks, manifest and error records."""
from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
import pyarrow as pa

from transforms.batch import BatchBounded
from transforms.embed import EMBEDDERS, EmbedChunks
from transforms.types import ErrorRecord

ROW_GROUP_ROWS = 4096
ROW_GROUP_BYTES = 16 << 20


def chunk_schema(dim: int) -> pa.Schema:
    """The chunk table of DESIGN.md section 3."""
    return pa.schema([
        ('chunk_id', pa.string()),
        ('id64', pa.int64()),
        ('uri', pa.string()),
        ('version', pa.string()),
        ('kind', pa.string()),
        ('page', pa.int32()),
        ('start', pa.int64()),
        ('end', pa.int64()),
        ('text', pa.string()),
        ('embedding', pa.list_(pa.float32(), dim)),
        ('model', pa.string()),
        ('encoding', pa.string()),
    ])


MANIFEST_SCHEMA = pa.schema([
    ('uri', pa.string()),
    ('size', pa.int64()),
    ('version', pa.string()),
    ('status', pa.string()),
    ('chunks', pa.int64()),
    ('bytes_read', pa.int64()),
    ('reason', pa.string()),
    ('kind', pa.string()),
    ('encoding', pa.string()),
    ('errors', pa.int64()),
    ('pages', pa.int64()),
    ('ocr_needed_pages', pa.int64()),
])


class EmbedAndWrite(beam.PTransform):
    """Chunks -> batches bounded in count and text bytes -> embeddings -> Parquet files."""

    def __init__(self, path_prefix: str, embedder: str, batch_size: int, batch_bytes: int,
                 device: str = 'auto'):
        super().__init__()
        self._prefix = path_prefix
        self._embedder = embedder
        self._batch = (batch_size, batch_bytes)
        self._device = device

    def expand(self, chunks):
        schema = chunk_schema(EMBEDDERS[self._embedder]().dim)
        return (chunks
                | 'Batches' >> beam.ParDo(BatchBounded(*self._batch, weight=lambda c: len(c.text)))
                | 'Embed' >> beam.ParDo(EmbedChunks(self._embedder, schema, self._device))
                | 'Write' >> WriteChunkTables(self._prefix, schema))


class WriteChunkTables(beam.PTransform):
    """Writes pyarrow Tables of chunk rows as Parquet, in row groups of bounded size."""

    def __init__(self, path_prefix: str, schema: pa.Schema):
        super().__init__()
        self._prefix = path_prefix
        self._schema = schema

    def expand(self, tables):
        return (tables
                | 'RowGroups' >> beam.ParDo(BatchBounded(ROW_GROUP_ROWS, ROW_GROUP_BYTES,
                                                         weight=lambda t: t.nbytes))
                | 'Concat' >> beam.Map(pa.concat_tables)
                | 'Write' >> beam.io.WriteToParquetBatched(
                    self._prefix, schema=self._schema, codec='zstd',
                    file_name_suffix='.parquet'))


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
