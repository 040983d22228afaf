"""How a commit changes the files of the two tables, in proportion to what changed.

- chunks/: the files that may hold a replaced or deleted object's rows are found from the
  log's URI stats; only those that do are rewritten without them (`remove_objects`).
- manifest/: the rows are kept sorted by uri in files of at most MANIFEST_FILE_ROWS, each
  covering its own URI range; a commit rewrites only the files whose range holds a changed
  object (`rewrite_manifest`), so an unchanged range's files are never read or written.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from transforms import outputs
from transforms.corpus.files import (TableFile, add_action, bounds_of, footer_bounds,
                                     open_parquet, remove_action, table_files, table_relpath,
                                     uris, without, write_table)
from transforms.corpus.staged import StagedManifest
from transforms.types import MANIFEST_SCHEMA
from transforms.write import LOOKUP_GROUP_ROWS

MANIFEST_FILE_ROWS = 32768  # a manifest file's rows: a change rewrites at most about this many


@dataclass
class Removal:
    """The actions that drop some objects' rows from a table: each committed file holding one
    is removed, and rewritten without them (`copies`: each rewrite -> the file it copies)."""
    adds: list = field(default_factory=list)
    removes: list = field(default_factory=list)
    rows: int = 0
    rewritten: int = 0
    bytes_written: int = 0
    copies: dict[str, str] = field(default_factory=dict)


def remove_objects(table_path: str, storage_options: Optional[dict], folder: str,
                   drop: set[str], every_row: bool = False) -> Removal:
    """The actions that drop the rows of the URIs `drop` (with `every_row`, all rows: the
    schema changed) from the table's committed files, rewriting into `folder` only the files
    that hold them; commit them with COPIES_KEY set to json of `copies`."""
    from deltalake import DeltaTable

    removal = Removal()
    if not DeltaTable.is_deltatable(table_path, storage_options=storage_options):
        return removal
    wanted = sorted(drop)
    value_set = pa.array(wanted, pa.string())
    files = table_files(DeltaTable(table_path, storage_options=storage_options))
    for n, f in enumerate(files):
        if not every_row and not f.may_hold(wanted):
            continue  # its URI range holds none of them: not even opened
        found = uris(f.path)
        hits = int(pc.sum(pc.is_in(found, value_set=value_set)).as_py() or 0)
        if not hits and not every_row:
            continue
        removal.removes.append(remove_action(table_path, f.path))
        if every_row:  # no row of the old schema can stay
            removal.rows += len(found)
            continue
        removal.rewritten += 1
        out = outputs.path(folder, f'rewrite-{n:05d}.parquet')
        count = without(f.path, value_set, out)
        removal.rows += len(found) - count
        if count:
            action = add_action(table_path, out, count, footer_bounds(open_parquet(out).metadata))
            removal.adds.append(action)
            removal.bytes_written += action.size
            removal.copies[table_relpath(table_path, out)] = table_relpath(table_path, f.path)
    return removal


@dataclass
class ManifestRewrite:
    """The manifest files a commit adds and removes, and what it kept of the old rows."""
    adds: list = field(default_factory=list)
    removes: list = field(default_factory=list)
    rows: int = 0  # rows of the new version
    bytes_written: int = 0

    @property
    def empty(self) -> bool:
        return not self.adds and not self.removes


def rewrite_manifest(table_path: str, files: Sequence[TableFile], folder: str,
                     staged: StagedManifest, fingerprint: str,
                     deleted: Sequence[str]) -> ManifestRewrite:
    """The manifest's new files: each old file whose URI range holds a staged or deleted
    object is rewritten with that change (a new object goes to the file whose range it
    falls in, or next to), split to at most MANIFEST_FILE_ROWS; the others stay.

    `staged` holds the rows of the objects read, given `fingerprint`. An object that
    failed keeps its committed row where that row is `ok` (its chunks stay too).
    """
    result = ManifestRewrite(rows=sum(f.rows for f in files))
    if not files:  # a new table: the staged rows as they stream, in uri order
        _write_sorted(table_path, folder, staged.batches(fingerprint), result, 0)
        return result
    staged = staged.table(fingerprint)  # a re-run's: in proportion to what it read
    firsts = [f.first or '' for f in files]
    touched: dict[int, list[str]] = {}
    for uri in sorted(set(staged.column('uri').to_pylist()) | set(deleted)):
        touched.setdefault(max(0, bisect.bisect_right(firsts, uri) - 1), []).append(uri)
    gone = pa.array(sorted(set(deleted)), pa.string())
    written = 0
    for at, part in sorted(touched.items()):
        mine = staged.filter(pc.is_in(staged.column('uri'), value_set=pa.array(part, pa.string())))
        old = _read_manifest(files[at].path)
        mine = mine.filter(pc.invert(pc.is_in(mine.column('uri'),
                                              value_set=_kept_ok(old, mine))))
        replaced = pc.is_in(old.column('uri'), value_set=pa.concat_arrays(
            [mine.column('uri').combine_chunks().cast(pa.string()), gone]))
        if not mine.num_rows and not int(pc.sum(replaced).as_py() or 0):
            continue  # failures that keep their rows, deletes of what was never here
        rows = pa.concat_tables([old.filter(pc.invert(replaced)), mine]).sort_by('uri')
        result.removes.append(remove_action(table_path, files[at].path))
        result.rows -= files[at].rows
        written = _write_sorted(table_path, folder, [rows], result, written)
    return result


def _write_sorted(table_path: str, folder: str, parts: Iterable[pa.Table],
                  result: ManifestRewrite, written: int, target_rows: int = MANIFEST_FILE_ROWS,
                  name: str = 'manifest', write=write_table) -> int:
    """Writes rows that come sorted, in parts of any size, as files `<name>-NNNNN.parquet` of
    `target_rows` (the last fewer), their add actions (with their URI ranges) into `result`;
    returns the count of files written. It holds at most a file's rows and a part."""
    held: list[pa.Table] = []
    count = 0

    def flush(rows: pa.Table) -> None:
        nonlocal written
        out = outputs.path(folder, f'{name}-{written:05d}.parquet')
        written += 1
        write(rows, out)
        action = add_action(table_path, out, rows.num_rows, bounds_of(rows.column('uri')))
        result.adds.append(action)
        result.bytes_written += action.size
        result.rows += rows.num_rows

    for part in parts:
        held.append(part)
        count += part.num_rows
        while count >= target_rows:
            rows = pa.concat_tables(held)
            flush(rows.slice(0, target_rows))
            held, count = [rows.slice(target_rows)], count - target_rows
    if count:
        flush(pa.concat_tables(held))
    return written


def _read_manifest(path: str) -> pa.Table:
    return open_parquet(path).read().select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def _kept_ok(old: pa.Table, staged: pa.Table) -> pa.Array:
    """The URIs of staged objects that failed now and were `ok` in `old`: their old rows stay."""
    failed = staged.filter(pc.equal(staged.column('status'), 'failed')).column('uri')
    ok = old.filter(pc.and_(pc.equal(old.column('status'), 'ok'),
                            pc.is_in(old.column('uri'), value_set=failed.combine_chunks())))
    return ok.column('uri').combine_chunks().cast(pa.string())


COMPACT_GROUP_BYTES = 64 << 20  # the files one rewrite reads into memory at most (as stored)


def compact_files(table_path: str, files: Sequence[TableFile], folder: str, target_rows: int,
                  sort_chunks: bool = False) -> ManifestRewrite:
    """The actions that rewrite a table's small or overlapping files into files of about
    `target_rows`, sorted by uri (chunks by uri, page and start): neighbours in URI order are
    grouped while a file is small (under half the target) or its range overlaps the group's,
    up to COMPACT_GROUP_BYTES; each group of two or more files, or a file that is not sorted,
    is read, sorted and written again. The rows do not change."""
    result = ManifestRewrite()
    written = 0
    for group in _groups(files, target_rows):
        if len(group) == 1 and _sorted(group[0]):
            continue
        rows = pa.concat_tables([open_parquet(f.path).read() for f in group])
        keys = [('uri', 'ascending')] + ([('page', 'ascending'), ('start', 'ascending')]
                                         if sort_chunks else [])
        result.removes += [remove_action(table_path, f.path) for f in group]
        written = _write_sorted(table_path, folder, [rows.sort_by(keys)], result, written,
                                target_rows, 'compact', _write_like_the_sink)
    return result


def _groups(files: Sequence[TableFile], target_rows: int) -> list[list[TableFile]]:
    groups: list[list[TableFile]] = []
    for f in files:
        last = groups[-1] if groups else None
        small = f.rows < target_rows // 2
        if last is not None and sum(g.size for g in last) + f.size <= COMPACT_GROUP_BYTES and (
                (small and all(g.rows < target_rows // 2 for g in last[-1:]))
                or (f.first is not None and last[-1].last is not None
                    and f.first <= max(g.last or '' for g in last))):
            last.append(f)
        else:
            groups.append([f])
    return groups


def _sorted(f: TableFile) -> bool:
    """Whether a file's uri column is in order (read only when it is not too big to rewrite)."""
    if f.size > COMPACT_GROUP_BYTES:
        return True  # not rewritten alone: too big to sort in memory
    column = uris(f.path)
    return len(column) < 2 or bool(pc.all(pc.less_equal(column[:-1], column[1:])).as_py())


def _write_like_the_sink(table: pa.Table, out_path: str) -> None:
    """A table's rows as one file, in the options of ragbeam's chunk sink (transforms.write)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.create(out_path) as sink:
        with pq.ParquetWriter(sink, table.schema, compression='zstd',
                              use_compliant_nested_type=False) as writer:
            writer.write_table(table, row_group_size=LOOKUP_GROUP_ROWS)
