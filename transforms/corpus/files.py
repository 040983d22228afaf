"""The Parquet files of the corpus tables: what the Delta log says of each (its URI range),
reading them column by column, writing them, and the add and remove actions that commit them.

Every file ragbeam commits records the smallest and largest `uri` it holds in its add
action's stats (Delta's minValues/maxValues, which DuckDB and Spark also prune with), so a
commit finds the files that may hold an object from the log alone, without opening the rest.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.outputs import normal_uri


@dataclass(frozen=True)
class TableFile:
    """One file of a table's current version: its URI, rows and the URIs it spans (None
    where the log has no stats, as in tables written before ragbeam recorded them)."""
    path: str
    rows: int
    size: int
    first: Optional[str]
    last: Optional[str]

    def overlaps(self, lo: Optional[str], hi: Optional[str]) -> bool:
        """Whether the file's URI range meets [lo, hi) (None: open)."""
        if self.first is None or self.last is None:
            return True
        return (lo is None or self.last >= lo) and (hi is None or self.first < hi)


def table_files(table) -> list[TableFile]:
    """The files of a DeltaTable's loaded version, ordered by their first URI; a file
    without stats gets them from its Parquet footer."""
    actions = pa.table(table.get_add_actions(flatten=True))
    root = table.table_uri.rstrip('/')
    has_bounds = 'min.uri' in actions.column_names
    found = []
    for row in actions.to_pylist():
        path = normal_uri(f'{root}/{row["path"]}')
        first, last = (row['min.uri'], row['max.uri']) if has_bounds else (None, None)
        if first is None or last is None:
            first, last = footer_bounds(open_parquet(path).metadata)
        found.append(TableFile(path, row['num_records'] or 0, row['size_bytes'], first, last))
    return sorted(found, key=lambda f: (f.first is not None, f.first or '', f.path))


def footer_bounds(meta: pq.FileMetaData) -> tuple[Optional[str], Optional[str]]:
    """The URI range of a Parquet file from its footer: its row groups' statistics (None
    when absent)."""
    if meta.num_rows == 0:
        return None, None
    at = meta.schema.to_arrow_schema().get_field_index('uri')
    lows, highs = [], []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(at).statistics
        if stats is None or not stats.has_min_max:
            return None, None
        lows.append(stats.min)
        highs.append(stats.max)
    return min(lows), max(highs)


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file opened for reading: the path itself when local, else Beam's seekable
    stream, so that only the footer and the columns asked for are read."""
    if outputs.is_local(path):
        return pq.ParquetFile(path)
    return pq.ParquetFile(FileSystems.open(path, compression_type='uncompressed'))


def uris(path: str) -> pa.Array:
    """The uri column of a table file (the only column read)."""
    return open_parquet(path).read(columns=['uri']).column('uri').combine_chunks()


def rows_in(path: str, columns: list[str], lo: Optional[str] = None,
            hi: Optional[str] = None) -> Iterator[pa.Table]:
    """A file's rows whose uri lies in [lo, hi), row group by row group; row groups whose
    statistics lie outside the range are not read."""
    source = open_parquet(path)
    meta = source.metadata
    at = meta.schema.to_arrow_schema().get_field_index('uri')
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(at).statistics
        if stats is not None and stats.has_min_max and (
                (lo is not None and stats.max < lo) or (hi is not None and stats.min >= hi)):
            continue
        table = between(source.read_row_group(group, columns=columns), lo, hi)
        if table.num_rows:
            yield table


def between(table: pa.Table, lo: Optional[str], hi: Optional[str]) -> pa.Table:
    """The rows of a table whose uri lies in [lo, hi) (None: open)."""
    if lo is None and hi is None:
        return table
    column = table.column('uri')
    return table.filter(pc.and_(pc.greater_equal(column, lo) if lo is not None else True,
                                pc.less(column, hi) if hi is not None else True))


def without(path: str, drop: pa.Array, out_path: str) -> int:
    """Writes the rows of `path` whose uri is not in `drop` to `out_path`, one row group at a
    time (memory stays that of a row group); returns their count (no file for none)."""
    source = open_parquet(path)
    kept, writer, sink = 0, None, None
    try:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            table = table.filter(pc.invert(pc.is_in(table.column('uri'), value_set=drop)))
            if not table.num_rows:
                continue
            if writer is None:
                sink = FileSystems.create(out_path)
                writer = pq.ParquetWriter(sink, source.schema_arrow, compression='zstd')
            writer.write_table(table)
            kept += table.num_rows
    finally:
        if writer is not None:
            writer.close()
            sink.close()
    return kept


def write_table(table: pa.Table, out_path: str) -> None:
    """Writes a small table as one Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression='zstd')
    with FileSystems.create(out_path) as f:
        f.write(sink.getvalue().to_pybytes())


def parquet_files(folder: str) -> list[str]:
    found = FileSystems.match([outputs.path(folder, '*.parquet')])[0].metadata_list
    return sorted(m.path for m in found)


def table_relpath(table_path: str, file_path: str) -> str:
    """A file's path relative to its table, as Delta's add and remove actions name it."""
    return os.path.relpath(normal_uri(file_path), normal_uri(table_path))


def add_action(table_path: str, file_path: str, rows: int,
               bounds: tuple[Optional[str], Optional[str]] = (None, None)):
    """The add action of a written file, with its row count and URI range as stats."""
    from deltalake.transaction import AddAction
    size = FileSystems.match([file_path])[0].metadata_list[0].size_in_bytes
    stats = {'numRecords': rows}
    if rows and bounds[0] is not None:
        stats.update(minValues={'uri': bounds[0]}, maxValues={'uri': bounds[1]},
                     nullCount={'uri': 0})
    return AddAction(table_relpath(table_path, file_path), size, {}, int(time.time() * 1000),
                     True, json.dumps(stats))


def remove_action(table_path: str, file_path: str):
    from deltalake.transaction import RemoveAction
    return RemoveAction(table_relpath(table_path, file_path), True, int(time.time() * 1000))


def bounds_of(column: pa.Array) -> tuple[Optional[str], Optional[str]]:
    """The smallest and largest of a uri column."""
    found = pc.min_max(column).as_py()
    return found['min'], found['max']

