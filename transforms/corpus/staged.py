"""The staged manifest: one row per object a run read, merged from the stats files its
bundles wrote (transforms.manifest), in uri order, as the commit takes it.

A first run over ten million objects stages ten million rows. Merged in one Arrow table
they would sit in the driver at a few hundred bytes an object, so the merge is an external
sort: the stats rows are read a row group at a time, every SPILL_ROWS of them sorted and
spilled to a local temporary Parquet file, and the spills merged in uri order into one
sorted file of manifest rows, a row group of each spill at a time. The driver holds at most
SPILL_ROWS stats rows and a row group of each spill, whatever the run read. A run that staged
fewer than SPILL_ROWS rows (a nightly re-run of what changed) keeps them in memory.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms.corpus.files import between, open_parquet, rows_in, uris
from transforms.manifest import STATS_SCHEMA, merge_stats
from transforms.types import MANIFEST_SCHEMA, ErrorRecord

_log = logging.getLogger(__name__)

SPILL_ROWS = 65536  # stats rows sorted in memory at once
SPILL_GROUP_ROWS = 1024  # a spill's row groups: the least the merge reads of one at once
MERGE_ROWS = 8192  # rows read from the stats files, and from the merged file, at once


@dataclass(frozen=True)
class Totals:
    """What the commit and the report need of all the staged rows, counted as they merge."""
    rows: int = 0
    failed: int = 0
    chunks: int = 0  # of every object read
    chunks_ok: int = 0  # of the objects read whole: the rows their chunk files must hold
    bytes_read: int = 0

    @classmethod
    def of(cls, rows: pa.Table) -> 'Totals':
        status = rows.column('status')
        failed = pc.equal(status, 'failed')
        return cls(rows.num_rows, _sum(failed), _sum(rows.column('chunks')),
                   _sum(pc.filter(rows.column('chunks'), pc.equal(status, 'ok'))),
                   _sum(rows.column('bytes_read')))

    def __add__(self, other: 'Totals') -> 'Totals':
        return Totals(*(a + b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other))))


class StagedManifest:
    """The manifest rows (MANIFEST_SCHEMA, fingerprint unset) of the objects a run read,
    sorted by uri: in memory, or in one local file that `close` deletes."""

    def __init__(self, rows: Optional[pa.Table] = None, path: Optional[str] = None,
                 totals: Optional[Totals] = None, failed: Optional[pa.Array] = None,
                 folder: Optional[str] = None):
        if rows is not None:
            rows = rows.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).sort_by('uri')
            totals = Totals.of(rows)
            failed = _failed_uris(rows)
        self._rows, self._path, self._folder = rows, path, folder
        self.totals = totals or Totals()
        # the URIs of the objects that failed: few, and the commit keeps their old rows
        self.failed = failed if failed is not None else pa.array([], pa.string())

    @classmethod
    def from_stats(cls, paths: Iterable[str],
                   spill_rows: Optional[int] = None) -> 'StagedManifest':
        """Merges the stats files at `paths` (each object's records may lie in several),
        sorting at most `spill_rows` (default SPILL_ROWS) in memory at once."""
        spill_rows = spill_rows or SPILL_ROWS
        held: list[pa.Table] = []
        count = 0
        folder = None
        spills: list[str] = []
        for path in paths:
            for batch in open_parquet(path).iter_batches(batch_size=MERGE_ROWS):
                held.append(pa.Table.from_batches([batch]).cast(STATS_SCHEMA))
                count += batch.num_rows
                if count >= spill_rows:
                    folder = folder or tempfile.mkdtemp(prefix='ragbeam-staged-')
                    spills.append(_spill(held, folder, len(spills)))
                    held, count = [], 0
        if not spills:
            stats = pa.concat_tables(held) if held else STATS_SCHEMA.empty_table()
            return cls(merge_stats(stats))
        if held:
            spills.append(_spill(held, folder, len(spills)))
        del held
        return _merge_spills(spills, folder, max(SPILL_GROUP_ROWS, spill_rows // len(spills)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def batches(self, fingerprint: Optional[str] = None) -> Iterator[pa.Table]:
        """The rows in uri order, at most MERGE_ROWS at a time, with `fingerprint` set."""
        if self._rows is not None:
            parts = (self._rows.slice(at, MERGE_ROWS)
                     for at in range(0, self._rows.num_rows, MERGE_ROWS))
        elif self._path is not None:
            parts = (pa.Table.from_batches([b]) for b in
                     pq.ParquetFile(self._path).iter_batches(batch_size=MERGE_ROWS))
        else:
            parts = iter(())
        for part in parts:
            yield part if fingerprint is None else _with_fingerprint(part, fingerprint)

    def table(self, fingerprint: Optional[str] = None) -> pa.Table:
        """All the rows at once (tests, and the check of a run that lost rows)."""
        parts = list(self.batches(fingerprint))
        return pa.concat_tables(parts) if parts else MANIFEST_SCHEMA.empty_table()

    def read_whole(self, first: Optional[str], last: Optional[str]) -> pa.Array:
        """The URIs in [first, last] (None: open) of the objects that did not fail: those
        whose committed rows the run replaces. From a file, only its row groups whose uri
        statistics meet the range are read."""
        hi = None if last is None else last + '\0'  # no string sorts between the two
        if self._path is not None:
            parts = list(rows_in(self._path, ['uri', 'status'], first, hi))
        else:
            parts = [between(self._rows, first, hi)] if self._rows is not None else []
        found = [pc.filter(rows.column('uri'), pc.not_equal(rows.column('status'), 'failed'))
                 .combine_chunks() for rows in parts]
        return pa.concat_arrays(found).cast(pa.string()) if found else pa.array([], pa.string())


def _spill(tables: list[pa.Table], folder: str, n: int) -> str:
    """Stats rows sorted by uri, written as a local Parquet file; its path."""
    path = os.path.join(folder, f'spill-{n:05d}.parquet')
    pq.write_table(pa.concat_tables(tables).sort_by('uri'), path,
                   row_group_size=SPILL_GROUP_ROWS)
    return path


def _merge_spills(spills: list[str], folder: str, read_rows: int) -> StagedManifest:
    """The spills (stats rows, each file sorted by uri) merged into manifest rows, written to
    one sorted file, with their totals and the failed URIs; `read_rows` of each spill are
    read at once (all of them together about a spill's worth)."""
    path = os.path.join(folder, 'staged.parquet')
    totals, failed, held = Totals(), [], []
    with pq.ParquetWriter(path, MANIFEST_SCHEMA) as writer:
        for stats in _in_uri_order(spills, read_rows):
            rows = merge_stats(stats)
            totals += Totals.of(rows)
            failed.append(_failed_uris(rows))
            held.append(rows)
            if sum(t.num_rows for t in held) >= MERGE_ROWS:  # row groups of a useful size
                writer.write_table(pa.concat_tables(held), row_group_size=MERGE_ROWS)
                held = []
        if held:
            writer.write_table(pa.concat_tables(held), row_group_size=MERGE_ROWS)
    for spill in spills:
        os.remove(spill)
    return StagedManifest(path=path, totals=totals, folder=folder,
                          failed=pa.concat_arrays(failed) if failed else None)


def _in_uri_order(spills: Sequence[str], read_rows: int) -> Iterator[pa.Table]:
    """The rows of files each sorted by uri, in tables such that every row of a uri is in
    the same table, in uri order.

    Each step takes, from every file's buffer, the rows below the smallest last uri among
    the buffers of files not yet read to their end: no row still unread can come before it.
    A buffer holding one uri only is read on first, so that each step takes something."""
    readers = [pq.ParquetFile(p).iter_batches(batch_size=read_rows) for p in spills]
    buffers: list[pa.Table] = [STATS_SCHEMA.empty_table() for _ in spills]
    ended = [False] * len(spills)

    def read_on(i: int) -> None:
        batch = next(readers[i], None)
        if batch is None:
            ended[i] = True
        else:
            buffers[i] = pa.concat_tables([buffers[i], pa.Table.from_batches([batch])])

    while True:
        for i in range(len(spills)):
            while not ended[i] and (not buffers[i].num_rows or buffers[i]['uri'][0].as_py()
                                    == buffers[i]['uri'][-1].as_py()):
                read_on(i)
        going = [buffers[i]['uri'][-1].as_py() for i in range(len(spills))
                 if not ended[i] and buffers[i].num_rows]
        if not going:
            rest = [b for b in buffers if b.num_rows]
            if rest:
                yield pa.concat_tables(rest)
            return
        bound = min(going)
        taken = []
        for i, buffer in enumerate(buffers):
            below = _sum(pc.less(buffer['uri'], bound))  # sorted: the first `below` rows
            if below:
                taken.append(buffer.slice(0, below))
                buffers[i] = buffer.slice(below)
        if taken:
            yield pa.concat_tables(taken)


def check_staged(written: Sequence[str], staged: Union[StagedManifest, pa.Table]
                 ) -> tuple[StagedManifest, list[ErrorRecord]]:
    """The staged manifest with every `ok` object whose rows in the `written` chunk files
    differ in number from the chunks its reader counted turned `failed` (rows were lost
    between the read and the write: it must not commit as complete, and the next run
    retries it), and an error record for each such object.

    A chunk file commits whole or not at all, and a bundle the runner ran again never lists
    its first attempt's file, so rows can only go missing, never be doubled: when the files
    hold, less the rows of objects that failed, as many rows as the readers counted of the
    objects read whole, no object lost any, and nothing per object is made. Only when rows
    were lost are they counted per object, in memory."""
    if isinstance(staged, pa.Table):
        staged = StagedManifest(staged)
    found = 0
    for path in written:
        rows = open_parquet(path).metadata.num_rows
        if rows and len(staged.failed):
            rows -= _sum(pc.is_in(uris(path), value_set=staged.failed))
        found += rows
    if found == staged.totals.chunks_ok:
        return staged, []
    return _fail_incomplete(written, staged)


def _fail_incomplete(written: Sequence[str], staged: StagedManifest
                     ) -> tuple[StagedManifest, list[ErrorRecord]]:
    manifest = staged.table()
    columns = [uris(p) for p in written]
    found = (pa.table({'uri': pa.chunked_array(columns, pa.string())})
             .group_by('uri').aggregate([('uri', 'count')])
             .rename_columns(['uri', 'staged_rows'])) if columns else \
        pa.table({'uri': pa.array([], pa.string()), 'staged_rows': pa.array([], pa.int64())})
    joined = manifest.join(found, 'uri', join_type='left outer')
    staged_rows = pc.fill_null(joined.column('staged_rows'), 0)
    bad_mask = pc.and_(pc.equal(joined.column('status'), 'ok'),
                       pc.not_equal(staged_rows, pc.cast(joined.column('chunks'), pa.int64())))
    errors, reasons = [], {}
    for row in joined.filter(bad_mask).to_pylist():
        message = (f'{row["staged_rows"] or 0} of the {row["chunks"]} chunks its reader counted '
                   'were staged (rows lost between the read and the write)')
        _log.error('ragbeam: %s: %s; not committed, retried by the next run', row['uri'], message)
        errors.append(ErrorRecord(row['uri'], 'commit', 'IncompleteObject', message,
                                  row['version']))
        reasons[row['uri']] = f'incomplete: {message}'
    bad = pc.is_in(manifest.column('uri'), value_set=pa.array(list(reasons), pa.string()))
    fixed = pa.Table.from_pylist(
        [dict(r, status='failed', reason=reasons[r['uri']])
         for r in manifest.filter(bad).to_pylist()], schema=manifest.schema)
    staged.close()
    return StagedManifest(pa.concat_tables([manifest.filter(pc.invert(bad)), fixed])), errors


def _with_fingerprint(rows: pa.Table, fingerprint: str) -> pa.Table:
    at = rows.schema.get_field_index('fingerprint')
    return rows.set_column(at, 'fingerprint', pa.array([fingerprint] * rows.num_rows,
                                                       pa.string()))


def _failed_uris(rows: pa.Table) -> pa.Array:
    return rows.filter(pc.equal(rows.column('status'), 'failed')).column(
        'uri').combine_chunks().cast(pa.string())


def _sum(values) -> int:
    return int(pc.sum(values).as_py() or 0)
