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
    if pc.count_distinct(stats.column('uri')).as_py() == stats.num_rows:
        # one record an object (small objects: one restriction each): nothing to aggregate
        merged = stats.rename_columns([f'{c}_sum' if c in _SUMS else f'{c}_min' if c in _LABELS
                                       else f'{c}_max' if c in ('size', 'version', 'pages')
                                       else c for c in stats.column_names])
    else:
        merged = stats.group_by('uri', use_threads=False).aggregate(
            [(c, 'sum') for c in _SUMS] + [(c, 'min') for c in _LABELS]
            + [('size', 'max'), ('version', 'max'), ('pages', 'max')])
    # the status and reason of the record that ranks first (failed, then skipped; then by
    # reason, as ObjectStats.merge sorts): only records with a status take part, and those
    # are few (a first run of millions of objects makes no string column per object here)
    marked = stats.filter(pc.is_valid(stats.column('status'))).select(['uri', 'status', 'reason'])
    rank = pc.index_in(marked.column('status'),
                       value_set=pa.array(sorted(STATUS_RANK, key=STATUS_RANK.get)))
    first = {}
    for uri, r, status, reason in sorted(zip(marked.column('uri').to_pylist(), rank.to_pylist(),
                                             marked.column('status').to_pylist(),
                                             marked.column('reason').to_pylist()),
                                         key=lambda row: (row[0], row[1], row[3] or '')):
        first.setdefault(uri, (status, reason))
    uris = pa.array(list(first), pa.string())
    at = pc.index_in(merged.column('uri'), value_set=uris)
    status = pc.fill_null(pc.take(pa.array([v[0] for v in first.values()], pa.string()), at),
                          'ok')
    reason = pc.take(pa.array([v[1] for v in first.values()], pa.string()), at)
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
