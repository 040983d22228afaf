"""Accounting: one manifest row per listed object, merged from its stats records.

Route gives every object it routes a first stats record (empty, or `skipped` with the
reason), and each reader one per restriction it reads. The records are written as Parquet
where they are made (`WriteStats`: no shuffle, so a run over millions of objects holds none
of them), and the driver merges each object's records in Arrow (`merge_stats`), as
`ObjectStats.merge` would: counts summed, the first of each label, and the status of the
record that ranks first (failed, then skipped, then none; ties by reason).
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from transforms.batch import BatchBounded
from transforms.types import MANIFEST_SCHEMA, STATUS_RANK, ObjectRef, ObjectStats, arrow_schema
from transforms.write import ROW_GROUP_ROWS, ParquetFileWriter

STATS_SCHEMA = pa.schema([('uri', pa.string()), ('size', pa.int64()), ('version', pa.string())]
                         + list(arrow_schema(ObjectStats)))
_SUMS = ('chunks', 'bytes_read', 'errors', 'ocr_needed')
_LABELS = ('encoding', 'kind', 'extractor')


def stats_table(records: list[tuple[ObjectRef, ObjectStats]]) -> pa.Table:
    """(ref, stats) records as rows of STATS_SCHEMA."""
    rows = [dict(dataclasses.asdict(stats), uri=ref.uri, size=ref.size, version=ref.version)
            for ref, stats in records]
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


class WriteStats(beam.PTransform):
    """(ObjectRef, ObjectStats) -> Parquet files of STATS_SCHEMA rows `<prefix>-<random>`;
    outputs the path of each file once it is closed (only the listed files count, as for
    the chunk files: a bundle the runner ran again leaves one that is not)."""

    def __init__(self, path_prefix: str):
        super().__init__()
        self._prefix = path_prefix

    def expand(self, records):
        return (records
                | 'Batch' >> beam.ParDo(BatchBounded(ROW_GROUP_ROWS, 8 << 20, weight=lambda r: 256))
                | 'ToArrow' >> beam.Map(stats_table)
                | 'Write' >> beam.ParDo(ParquetFileWriter(self._prefix, STATS_SCHEMA))
                .with_output_types(str))


def merge_stats(stats: pa.Table) -> pa.Table:
    """Each object's stats rows merged into its manifest row (MANIFEST_SCHEMA), in Arrow."""
    if not stats.num_rows:
        return MANIFEST_SCHEMA.empty_table()
    rank = pc.fill_null(pc.cast(pc.index_in(stats.column('status'), value_set=pa.array(
        sorted(STATUS_RANK, key=STATUS_RANK.get))), pa.int64()), len(STATUS_RANK))
    # the record that ranks first decides status and reason: rank, then reason (as merge sorts)
    order = pc.binary_join_element_wise(pc.cast(rank, pa.string()),
                                        pc.fill_null(stats.column('reason'), ''), '\x00')
    keyed = stats.append_column('order', order)
    merged = keyed.group_by('uri', use_threads=False).aggregate(
        [(c, 'sum') for c in _SUMS] + [(c, 'min') for c in _LABELS]
        + [('size', 'max'), ('version', 'max'), ('pages', 'max'), ('order', 'min')])
    first = merged.column('order_min')
    parts = pc.split_pattern(first, '\x00', max_splits=1)
    status_rank = pc.cast(pc.list_element(parts, 0), pa.int64())
    reason = pc.list_element(parts, 1)
    names = pa.array(sorted(STATUS_RANK, key=STATUS_RANK.get) + ['ok'])
    status = pc.take(names, status_rank)
    reason = pc.if_else(pc.equal(reason, ''), pa.scalar(None, pa.string()), reason)
    columns = {
        'uri': merged.column('uri'), 'size': merged.column('size_max'),
        'version': merged.column('version_max'), 'status': status,
        'chunks': merged.column('chunks_sum'), 'bytes_read': merged.column('bytes_read_sum'),
        'reason': reason, 'kind': merged.column('kind_min'),
        'encoding': merged.column('encoding_min'), 'errors': merged.column('errors_sum'),
        'pages': merged.column('pages_max'),
        'ocr_needed_pages': merged.column('ocr_needed_sum'),
        'fingerprint': pa.nulls(merged.num_rows, pa.string()),
        'extractor': merged.column('extractor_min')}
    return pa.table([pc.cast(columns[f.name], f.type) for f in MANIFEST_SCHEMA],
                     schema=MANIFEST_SCHEMA).sort_by('uri')

