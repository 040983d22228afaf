"""What changed since the last commit, decided on the workers while they list.

Each input pattern's URI space is cut into ranges (`KeyRange`), planned on a worker from a
delimiter listing of the input's first levels and from the committed manifest's file
boundaries. After a Reshuffle, each range is listed page by page in URI order and merged
with the committed manifest's rows of the same range, which the worker reads from the
table's files itself (pruned by their URI stats). Both sides are sorted by URI, so the merge
needs no hash table, and nothing per object is held anywhere.

Only what is to be read (new, changed, retried objects) and the deletes leave a range;
unchanged objects are counted. An object matched by several patterns belongs to the first.
A range whose listing failed deletes nothing: its error is a record and a RangeStats.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.corpus.files import TableFile, rows_in, table_files
from transforms.corpus.options import BackfillOptions, in_window
from transforms.listing import scopes
from transforms.monitor import WORK
from transforms.store import StoreConfig, StoreError, glob_to_prefix, key_after_all, store_for
from transforms.types import CommittedObject, ErrorRecord, ObjectRef, record, typed

_log = logging.getLogger(__name__)

READ, CHANGES, RANGES, ERRORS = 'read', 'changes', 'ranges', 'errors'
CHILD_LIMIT = 10000  # names of one folder level the planner looks at
PLAN_DEPTH = 3  # folder levels the planner goes down while a level holds a single folder
COMMITTED_COLUMNS = ['uri', 'version', 'status', 'fingerprint']

_listed = Metrics.counter('ragbeam', 'objects_listed')
_listed_bytes = Metrics.counter('ragbeam', 'bytes_listed')
_unchanged = Metrics.counter('ragbeam', 'objects_unchanged')
_failed_ranges = Metrics.counter('ragbeam', 'list_ranges_failed')
TALLY_EVERY = 4096  # objects a range lists between two updates of the counters


class _Tally:
    """A range's counts of objects listed and found unchanged, passed on to Beam's counters
    and the progress line every TALLY_EVERY objects and at the range's end, not once per
    object: an unchanged object costs the diff little else."""

    def __init__(self):
        self.listed = self.bytes = self.unchanged = 0

    def list(self, size: int) -> None:
        self.listed += 1
        self.bytes += size
        if self.listed >= TALLY_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.listed:
            _listed.inc(self.listed)
            _listed_bytes.inc(self.bytes)
        if self.unchanged:
            _unchanged.inc(self.unchanged)
        if self.listed or self.unchanged:
            WORK.add(objects_listed=self.listed, bytes_listed=self.bytes,
                     objects_done=self.unchanged)
        self.listed = self.bytes = self.unchanged = 0


def scope_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether a listing of `patterns` is complete for a URI: the listing's own matching
    (store.glob_to_prefix), so an object the listing could never return is never deleted."""
    matchers = [glob_to_prefix(p)[1] for p in scopes(patterns)]
    return lambda uri: any(m(uri) for m in matchers)


@record
@dataclass(frozen=True)
class KeyRange:
    """URIs [lo, hi) of input pattern number `pattern` (None: open): the unit of listing."""
    pattern: int
    lo: Optional[str]
    hi: Optional[str]


@record
@dataclass(frozen=True)
class Change:
    """What the diff decided for one object beyond reading it: so far only `deleted`;
    `pattern` is the input it belongs to. (What is read is counted in RangeStats: a first
    run of millions of objects holds no record per object but its ref.)"""
    uri: str
    change: str
    pattern: int = -1


@record
@dataclass
class RangeStats:
    """What one range's listing and diff counted, and its listing's error if it failed."""
    pattern: int
    lo: Optional[str]
    hi: Optional[str]
    listed: int = 0
    new: int = 0
    changed: int = 0
    retried: int = 0
    unchanged: int = 0
    outside: int = 0
    deleted: int = 0
    committed: int = 0
    error: Optional[str] = None


@dataclass(frozen=True)
class ManifestAt:
    """Where the workers read the committed manifest: a table at a version (None: no table
    yet, so nothing is committed)."""
    table_path: str
    version: Optional[int]
    storage_options: Optional[tuple] = None  # dict items: a frozen dataclass is hashable

    def files(self) -> list[TableFile]:
        if self.version is None:
            return []
        from deltalake import DeltaTable
        table = DeltaTable(self.table_path, version=self.version,
                           storage_options=dict(self.storage_options or ()) or None)
        return table_files(table)


class CommittedRows:
    """The committed manifest's rows of a URI range, in URI order, from the files whose URI
    range meets it (a worker loads the file list once)."""

    def __init__(self, manifest: ManifestAt):
        self._files = manifest.files()

    def boundaries(self) -> list[str]:
        return [f.first for f in self._files if f.first is not None]

    def rows(self, lo: Optional[str], hi: Optional[str]) -> Iterator[CommittedObject]:
        streams = [self._rows(f.path, lo, hi) for f in self._files if f.overlaps(lo, hi)]
        last = None
        for row in heapq.merge(*streams, key=lambda r: r.uri):
            if last is not None and row.uri <= last:
                raise ValueError(f'the committed manifest is not sorted by uri at {row.uri} '
                                 '(run `ragbeam compact` to rewrite it)')
            last = row.uri
            yield row

    @staticmethod
    def _rows(path: str, lo, hi) -> Iterator[CommittedObject]:
        for table in rows_in(path, COMMITTED_COLUMNS, lo, hi):
            for values in zip(*(table.column(c).to_pylist() for c in COMMITTED_COLUMNS)):
                yield CommittedObject(*values)


def _spread(bounds: list[str], count: int) -> list[str]:
    """At most `count` of the sorted `bounds`, evenly spaced."""
    if len(bounds) <= count:
        return bounds
    return sorted({bounds[(i * len(bounds)) // count] for i in range(count)})


class _PlanRanges(beam.DoFn):
    """Pattern number -> the KeyRanges that cover its URIs, cut at the first folder level
    with more than one entry and at the committed manifest's file boundaries."""

    def __init__(self, patterns: list[str], config: StoreConfig, max_ranges: int,
                 manifest: ManifestAt):
        self._patterns = scopes(patterns)
        self._config = config
        self._max = max_ranges
        self._manifest = manifest
        self._committed: Optional[CommittedRows] = None

    def setup(self):
        self._committed = CommittedRows(self._manifest)

    def process(self, index: int) -> Iterator[KeyRange]:
        pattern = self._patterns[index]
        literal = glob_to_prefix(pattern)[0]
        start, stop = literal or None, key_after_all(literal)
        bounds: set[str] = set()
        if self._max > 1:
            bounds.update(self._committed.boundaries())
            store = store_for(pattern, self._config)
            root = store.root(literal)
            try:
                for _ in range(PLAN_DEPTH):
                    kids = [k for k in store.children(root, CHILD_LIMIT)
                            if (root + k).startswith(literal) or literal.startswith(root + k)]
                    if len(kids) != 1 or not kids[0].endswith('/'):
                        bounds.update(root + k for k in kids)
                        break
                    root += kids[0]
            except StoreError as e:  # the ranges' own listings report it, range by range
                _log.warning('ragbeam: planning the listing of %s: %s', pattern, e)
        inner = sorted(b for b in bounds if (start is None or b > start)
                       and (stop is None or b < stop))
        cuts = [start] + _spread(inner, self._max - 1) + [stop]
        for lo, hi in zip(cuts, cuts[1:]):
            yield KeyRange(index, lo, hi)


class _ListAndDiff(beam.DoFn):
    """KeyRange -> (uri, ObjectRef) to read (new, changed, retried); a Change per deleted
    object on 'changes'; one RangeStats on 'ranges'; an ErrorRecord on 'errors' if its
    listing failed."""

    def __init__(self, patterns: list[str], config: StoreConfig, fingerprint: str,
                 options: BackfillOptions, manifest: ManifestAt):
        self._patterns = scopes(patterns)
        self._config = config
        self._fingerprint = fingerprint
        self._full = options.full
        self._window = options.window() if options.windowed else None
        self._manifest = manifest
        self._matchers: list = []
        self._committed: Optional[CommittedRows] = None

    def setup(self):
        self._matchers = [glob_to_prefix(p)[1] for p in self._patterns]
        self._committed = CommittedRows(self._manifest)

    def _owns(self, index: int, uri: str) -> bool:
        """Whether pattern `index` matches `uri` and no earlier pattern does."""
        return self._matchers[index](uri) and not any(m(uri) for m in self._matchers[:index])

    def process(self, rng: KeyRange):
        stats = RangeStats(rng.pattern, rng.lo, rng.hi)
        owns = lambda uri: self._owns(rng.pattern, uri)  # noqa: E731
        tally = _Tally()
        listed = self._listing(rng, owns, stats, tally)
        committed = (c for c in self._committed.rows(rng.lo, rng.hi) if owns(c.uri))
        deletes = []  # held until the listing of the range has completed
        for uri, ref, old in _merge(listed, committed):
            if old is not None:
                stats.committed += 1
            change = self._decide(ref, old)
            if change is None:
                continue
            setattr(stats, change, getattr(stats, change) + 1)
            if change in ('unchanged', 'outside'):
                tally.unchanged += 1
            elif change == 'deleted':
                deletes.append(Change(uri, change, rng.pattern))
            else:  # counted in the range's stats: only the ref goes on
                yield uri, ref
        tally.flush()
        if stats.error is None:
            yield from (beam.pvalue.TaggedOutput(CHANGES, d) for d in deletes)
        else:
            stats.deleted = 0
            _failed_ranges.inc()
            where = f'{self._patterns[rng.pattern]} [{rng.lo or ""}, {rng.hi or ""})'
            _log.warning('ragbeam: the listing of %s failed (%s): nothing in it is deleted; '
                         'the next run lists it again', where, stats.error)
            yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                where, 'list', 'ListingFailed', f'{stats.error}; nothing in this range was '
                'deleted'))
        yield beam.pvalue.TaggedOutput(RANGES, stats)

    def _listing(self, rng: KeyRange, owns, stats: RangeStats,
                 tally: _Tally) -> Iterator[ObjectRef]:
        """The range's objects in URI order; a store error ends it and is kept in stats."""
        pattern = self._patterns[rng.pattern]
        store = store_for(pattern, self._config)
        try:
            for ref in store.walk(store.root(glob_to_prefix(pattern)[0]), rng.lo, rng.hi):
                if owns(ref.uri):
                    stats.listed += 1
                    tally.list(ref.size)
                    yield ref
        except StoreError as e:
            stats.error = str(e)

    def _decide(self, ref: Optional[ObjectRef], old: Optional[CommittedObject]) -> Optional[str]:
        """new, changed, retried, unchanged, outside (not committed, outside the window),
        deleted, or None (committed, not listed, and not to be deleted)."""
        if ref is None:
            return 'deleted' if self._window is None else None
        outside = self._window is not None and not in_window(ref.modified, self._window)
        if outside and (old is None or old.status != 'failed'):  # failures are always retried
            return 'unchanged' if old is not None else 'outside'
        if old is None:
            return 'new'
        if old.status == 'failed':
            return 'retried'
        if self._full or old.version != ref.version or old.fingerprint != self._fingerprint:
            return 'changed'
        return 'unchanged'


def _merge(listed: Iterator[ObjectRef], committed: Iterator[CommittedObject]):
    """(uri, ref or None, committed row or None) of two URI-sorted streams, in URI order."""
    ref, old = next(listed, None), next(committed, None)
    last = None
    while ref is not None or old is not None:
        if old is None or (ref is not None and ref.uri < old.uri):
            uri, pair, ref = ref.uri, (ref, None), next(listed, None)
        elif ref is None or old.uri < ref.uri:
            uri, pair, old = old.uri, (None, old), next(committed, None)
        else:
            uri, pair = ref.uri, (ref, old)
            ref, old = next(listed, None), next(committed, None)
        if last is not None and uri <= last:
            raise ValueError(f'listing out of URI order at {uri} (after {last})')
        last = uri
        yield (uri,) + pair


class Changes(NamedTuple):
    """The diff's named outputs: the refs to read, one Change per object deleted, one
    RangeStats per range, and the error records of ranges whose listing failed."""
    read: beam.PCollection
    changes: beam.PCollection
    ranges: beam.PCollection
    errors: beam.PCollection


class Diff(beam.PTransform):
    """PBegin -> Changes: the input patterns listed in ranges on the workers, each range
    diffed against the committed manifest at `manifest`.

    With a --modified-since/--modified-before window, a listed object outside it is not read
    (unchanged when committed, `outside` when not) unless it failed before, and nothing is
    deleted. The graph holds the patterns and the manifest's version, nothing per object.
    """

    def __init__(self, patterns: list[str], config: StoreConfig, fingerprint: str,
                 options: BackfillOptions, manifest: ManifestAt):
        super().__init__()
        self._patterns = list(patterns)
        self._plan = _PlanRanges(self._patterns, config, options.list_ranges, manifest)
        self._diff = _ListAndDiff(self._patterns, config, fingerprint, options, manifest)

    def expand(self, pbegin):
        ranges = (pbegin
                  | 'Inputs' >> beam.Create(list(range(len(self._patterns))))
                  | 'Plan' >> beam.ParDo(self._plan).with_output_types(KeyRange)
                  | 'Spread' >> beam.Reshuffle())
        out = typed(ranges | 'ListAndDiff' >> beam.ParDo(self._diff).with_output_types(
            tuple[str, ObjectRef]).with_outputs(CHANGES, RANGES, ERRORS, main=READ),
            changes=Change, ranges=RangeStats, errors=ErrorRecord)
        return Changes(out[READ], out[CHANGES], out[RANGES], out[ERRORS])
