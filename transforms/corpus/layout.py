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
from typing import Iterable, Iterator, Optional, Sequence, Union

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


class Dropped:
    """The URIs whose committed rows a commit drops: the deleted ones, and the staged objects
    that did not fail, looked up by a file's URI range (in the staged manifest's sorted
    file, when it has one), so that a run that read millions never holds them all."""

    def __init__(self, deleted: Iterable[str] = (), staged: Optional[StagedManifest] = None):
        self._deleted = sorted(set(deleted))
        self._staged = staged

    def between(self, first: Optional[str], last: Optional[str]) -> pa.Array:
        """Those in [first, last] (None: open)."""
        lo = 0 if first is None else bisect.bisect_left(self._deleted, first)
        hi = len(self._deleted) if last is None else bisect.bisect_right(self._deleted, last)
        found = pa.array(self._deleted[lo:hi], pa.string())
        if self._staged is None:
            return found
        return pa.concat_arrays([found, self._staged.read_whole(first, last)])


def remove_objects(table_path: str, storage_options: Optional[dict], folder: str,
                   drop: Union[Dropped, Iterable[str]], every_row: bool = False) -> Removal:
    """The actions that drop the rows of the URIs `drop` (with `every_row`, all rows: the
    schema changed) from the table's committed files, rewriting into `folder` only the files
    that hold them; commit them with COPIES_KEY set to json of `copies`."""
    from deltalake import DeltaTable

    removal = Removal()
    if not DeltaTable.is_deltatable(table_path, storage_options=storage_options):
        return removal
    if not isinstance(drop, Dropped):
        drop = Dropped(drop)
    files = table_files(DeltaTable(table_path, storage_options=storage_options))
    for n, f in enumerate(files):
        value_set = None if every_row else drop.between(f.first, f.last)
        if value_set is not None and not len(value_set):
            continue  # its URI range holds none of them: not even opened
        found = uris(f.path)
        hits = int(pc.sum(pc.is_in(found, value_set=value_set)).as_py() or 0) \
            if value_set is not None else 0
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

    `staged` holds the rows of the objects read, given `fingerprint`; they stream in uri
    order, each file's share merged with that file's rows as it comes, so the rows held are
    a file's and a batch's. An object that failed keeps its committed row where that row is
    `ok` (its chunks stay too).
    """
    result = ManifestRewrite(rows=sum(f.rows for f in files))
    writer = _SortedWriter(table_path, folder, result)
    if not files:  # a new table: the staged rows as they stream, in uri order
        for part in staged.batches(fingerprint):
            writer.add(part)
        writer.end_file()
        return result
    firsts = [f.first or '' for f in files]
    gone: dict[int, list[str]] = {}
    for uri in sorted(set(deleted)):
        gone.setdefault(_file_of(firsts, uri), []).append(uri)
    deletes_only = sorted(gone)  # files whose range holds a delete, till staged rows reach them
    merge: Optional[_FileMerge] = None

    def close(m: _FileMerge) -> None:
        if m.finish(writer):
            result.removes.append(remove_action(table_path, m.file.path))
            result.rows -= m.file.rows

    def start(at: int) -> _FileMerge:
        return _FileMerge(files[at], pa.array(gone.get(at, []), pa.string()))

    for at, part in _shares(firsts, staged.batches(fingerprint)):
        if merge is None or merge.file is not files[at]:
            if merge is not None:
                close(merge)
            while deletes_only and deletes_only[0] <= at:
                if (n := deletes_only.pop(0)) < at:
                    close(start(n))
            merge = start(at)
        merge.add(part, writer)
    if merge is not None:
        close(merge)
    for at in deletes_only:
        close(start(at))
    return result


def _file_of(firsts: Sequence[str], uri: str) -> int:
    """The manifest file whose range a URI falls in: the last that starts at or before it."""
    return max(0, bisect.bisect_right(firsts, uri) - 1)


def _shares(firsts: Sequence[str], batches: Iterable[pa.Table]) -> Iterator[tuple[int, pa.Table]]:
    """(file, rows) of sorted batches cut where the files' ranges start, in uri order."""
    for batch in batches:
        if not batch.num_rows:
            continue
        column = batch.column('uri')
        first = _file_of(firsts, column[0].as_py())
        last = _file_of(firsts, column[-1].as_py())
        start = 0
        for at in range(first, last + 1):
            end = batch.num_rows if at == last else \
                int(pc.sum(pc.less(column, firsts[at + 1])).as_py() or 0)
            if end > start:
                yield at, batch.slice(start, end - start)
            start = max(start, end)


class _FileMerge:
    """A manifest file's rows with its share of the staged rows in and the `gone` URIs out.
    Each part of the share (sorted) is merged with the file's rows up to its last uri, so a
    share of millions (a new folder that sorts after every committed one) streams through."""

    def __init__(self, f: TableFile, gone: pa.Array):
        self.file = f
        self._old = _read_manifest(f.path)
        self._held = self._old.filter(pc.invert(pc.is_in(self._old.column('uri'),
                                                         value_set=gone)))
        self._changed = self._held.num_rows < self._old.num_rows
        self._taken = 0  # rows of _held written

    def add(self, part: pa.Table, writer: '_SortedWriter') -> None:
        """A staged row (less the failures that keep their old `ok` row) changes the file."""
        part = part.filter(pc.invert(pc.is_in(part.column('uri'),
                                              value_set=_kept_ok(self._old, part))))
        if not part.num_rows:
            return
        self._changed = True
        upto = int(pc.sum(pc.less_equal(self._held.column('uri'), part.column('uri')[-1]))
                   .as_py() or 0)
        mine = self._held.slice(self._taken, upto - self._taken)
        self._taken = upto
        mine = mine.filter(pc.invert(pc.is_in(mine.column('uri'), value_set=part.column('uri'))))
        writer.add(pa.concat_tables([mine, part]).sort_by('uri'))

    def finish(self, writer: '_SortedWriter') -> bool:
        """Writes the rest; whether the file changed (and must be removed). Failures that
        keep their rows, and deletes of what was never here, change nothing, and nothing was
        written for them."""
        if not self._changed:
            return False
        writer.add(self._held.slice(self._taken))
        writer.end_file()
        return True


class _SortedWriter:
    """Writes rows that come sorted, in parts of any size, as files `<name>-NNNNN.parquet` of
    `target_rows` (the last of each run of adds fewer: `end_file`), their add actions (with
    their URI ranges) into `result`. It holds at most a file's rows and a part."""

    def __init__(self, table_path: str, folder: str, result: ManifestRewrite,
                 target_rows: int = MANIFEST_FILE_ROWS, name: str = 'manifest',
                 write=write_table):
        self._table_path, self._folder, self._result = table_path, folder, result
        self._target, self._name, self._write = target_rows, name, write
        self._held: list[pa.Table] = []
        self._count = 0
        self._written = 0

    def add(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        self._held.append(rows)
        self._count += rows.num_rows
        while self._count >= self._target:
            rows = pa.concat_tables(self._held)
            self._flush(rows.slice(0, self._target))
            self._held, self._count = [rows.slice(self._target)], self._count - self._target

    def end_file(self) -> None:
        """Writes what is held as a file of its own (the next add starts a new file)."""
        if self._count:
            self._flush(pa.concat_tables(self._held))
        self._held, self._count = [], 0

    def _flush(self, rows: pa.Table) -> None:
        out = outputs.path(self._folder, f'{self._name}-{self._written:05d}.parquet')
        self._written += 1
        self._write(rows, out)
        action = add_action(self._table_path, out, rows.num_rows, bounds_of(rows.column('uri')))
        self._result.adds.append(action)
        self._result.bytes_written += action.size
        self._result.rows += rows.num_rows


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
    writer = _SortedWriter(table_path, folder, result, target_rows, 'compact',
                           _write_like_the_sink)
    for group in _groups(files, target_rows):
        if len(group) == 1 and _sorted(group[0]):
            continue
        rows = pa.concat_tables([open_parquet(f.path).read() for f in group])
        keys = [('uri', 'ascending')] + ([('page', 'ascending'), ('start', 'ascending')]
                                         if sort_chunks else [])
        result.removes += [remove_action(table_path, f.path) for f in group]
        writer.add(rows.sort_by(keys))
        writer.end_file()
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
