"""The committed corpus under --output: the Delta Lake tables chunks/ and manifest/, what
changed since their last commit, and the one commit that publishes a run.

- Workers write Parquet into run-scoped folders inside the tables (`chunks/run-<id>/`),
  which no reader sees: Delta readers read only the files the log names.
- The diff (`Diff`) joins the listing with the committed manifest on uri in Beam: only small
  records cross that shuffle. An object is read when it is new, its version or the settings
  fingerprint changed, or it failed before; deletes come only from a complete listing of an
  input pattern's scope.
- After the pipeline succeeded, the driver commits (`commit`): the staged files are added
  zero-copy, the committed files that hold rows of replaced or deleted objects are rewritten
  without them, and an object that failed contributes no rows (its earlier rows stay). The
  chunks table is committed first, then the manifest; an intent file makes the pair roll
  forward if the driver dies between the two.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.outputs import active_files, normal_uri as _normal
from transforms.store import glob_to_prefix
from transforms.types import (MANIFEST_SCHEMA, CommittedObject, ErrorRecord, ObjectRef, record,
                             typed)

_log = logging.getLogger(__name__)

READ, UNCHANGED, DELETED = 'read', 'unchanged', 'deleted'
RUN_PREFIX = 'run-'
PENDING = '_ragbeam/pending'  # one commit intent per run: <run id>.json
STALE_SECONDS = 6 * 3600  # another run's uncommitted staging younger than this may be live
COPIES_KEY = 'ragbeam_copies'  # commit metadata: {rewritten file: the file it copies}
CRASH_ENV = 'RAGBEAM_TEST_CRASH_AT'  # tests: die (os._exit) at a named point of the commit
DELAY_ENV = 'RAGBEAM_TEST_DELAY_AT'  # tests: POINT:SECONDS, wait there (another run commits)


class CommitError(OSError):
    """The run's result cannot be committed: another run committed first, or too many deletes."""


@dataclass(frozen=True)
class BackfillOptions:
    """How a run into a committed corpus decides what to redo."""
    full: bool = field(default=False, metadata={
        'flag': '--full',
        'help': 're-read every object and replace the whole corpus, still in one commit'})
    max_delete_fraction: float = field(default=0.5, metadata={
        'flag': '--max-delete-fraction', 'metavar': 'SHARE',
        'help': 'a run that would delete more than this share of the committed objects '
                'deletes nothing and exits non-zero'})
    modified_since: str = field(default='', metadata={
        'flag': '--modified-since', 'metavar': 'ISO_TIME', 'default_text': 'none',
        'help': 're-read only objects last modified at or after this time (2026-11-30, or '
                '2026-11-30T02:00; UTC unless it names a zone); such a run deletes nothing'})
    modified_before: str = field(default='', metadata={
        'flag': '--modified-before', 'metavar': 'ISO_TIME', 'default_text': 'none',
        'help': 're-read only objects last modified before this time; deletes nothing'})

    def validate(self) -> None:
        if not 0 <= self.max_delete_fraction <= 1:
            raise ValueError('--max-delete-fraction must be between 0 and 1')
        since, before = self.window()
        if self.full and self.windowed:
            raise ValueError('--full re-reads every object: it does not go with '
                             '--modified-since or --modified-before')
        if since is not None and before is not None and since >= before:
            raise ValueError(f'--modified-since {self.modified_since} is not before '
                             f'--modified-before {self.modified_before}')

    @property
    def windowed(self) -> bool:
        """Whether the run re-reads only a window of last-modified times (and deletes nothing)."""
        return bool(self.modified_since or self.modified_before)

    def window(self) -> tuple[Optional[float], Optional[float]]:
        """[since, before) as seconds since the epoch; None for an open end."""
        return (_epoch('--modified-since', self.modified_since),
                _epoch('--modified-before', self.modified_before))


def _epoch(flag: str, text: str) -> Optional[float]:
    """An ISO date or time as seconds since the epoch; UTC unless it names a zone."""
    if not text:
        return None
    from datetime import datetime, timezone
    try:
        moment = datetime.fromisoformat(text.strip().replace('Z', '+00:00'))
    except ValueError:
        raise ValueError(f'{flag} {text!r}: expected an ISO date or time, for example '
                         '2026-11-30 or 2026-11-30T02:00:00+01:00') from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def in_window(modified: float, window: tuple[Optional[float], Optional[float]]) -> bool:
    """Whether a last-modified time is in [since, before); an unknown time (0) always is."""
    since, before = window
    if not modified:
        return True
    return (since is None or modified >= since) and (before is None or modified < before)


def fingerprint(settings: dict) -> str:
    """The settings fingerprint: what makes the same object give other chunks or vectors."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def crash_point(name: str) -> None:
    """Dies here when the tests ask for it (RAGBEAM_TEST_CRASH_AT=name): a SIGKILL's effect;
    or waits here (RAGBEAM_TEST_DELAY_AT=name:seconds), as a slow driver would."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)
    point, _, seconds = os.environ.get(DELAY_ENV, '').partition(':')
    if point == name:
        time.sleep(float(seconds))


# ---- the diff -----------------------------------------------------------------------------

def scopes(patterns: Iterable[str]) -> list[str]:
    """The input patterns as the listing's URIs spell them (local paths absolute)."""
    return [p if '://' in p else os.path.abspath(os.path.expanduser(p)) for p in patterns]


def scope_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether a listing of `patterns` is complete for a URI: the listing's own matching
    (store.glob_to_prefix), so an object the listing could never return is never deleted."""
    matchers = [glob_to_prefix(p)[1] for p in scopes(patterns)]
    return lambda uri: any(m(uri) for m in matchers)


@record
@dataclass(frozen=True)
class Change:
    """What the diff decided for one object: new, changed, retried, unchanged, deleted, or
    outside (listed, not committed, and outside the run's last-modified window)."""
    uri: str
    change: str


class _Classify(beam.DoFn):
    def __init__(self, fingerprint: str, patterns: list[str], options: BackfillOptions):
        self._fingerprint = fingerprint
        self._patterns = patterns
        self._full = options.full
        self._window = options.window() if options.windowed else None
        self._in_scope = None

    def setup(self) -> None:
        self._in_scope = scope_matcher(self._patterns)

    def process(self, joined):
        uri, groups = joined
        listed, committed = list(groups['listed']), list(groups['committed'])
        old = committed[0] if committed else None
        if not listed:
            if old is not None and self._window is None and self._in_scope(uri):
                yield beam.pvalue.TaggedOutput(DELETED, Change(uri, 'deleted'))
            return
        ref = listed[0]
        outside = self._window is not None and not in_window(ref.modified, self._window)
        if outside and (old is None or old.status != 'failed'):  # failures are always retried
            change = 'unchanged' if old is not None else 'outside'
            yield beam.pvalue.TaggedOutput(UNCHANGED, Change(uri, change))
            return
        if old is None:
            change = 'new'
        elif old.status == 'failed':
            change = 'retried'
        elif self._full or old.version != ref.version or old.fingerprint != self._fingerprint:
            change = 'changed'
        else:
            yield beam.pvalue.TaggedOutput(UNCHANGED, Change(uri, 'unchanged'))
            return
        yield beam.pvalue.TaggedOutput('changes', Change(uri, change))
        yield uri, ref


class Changes(NamedTuple):
    """The diff's named outputs: the refs to read, and one Change per object (new, changed,
    retried, unchanged or deleted)."""
    read: beam.PCollection
    changes: beam.PCollection


class Diff(beam.PTransform):
    """((uri, ObjectRef) listed, CommittedObjects) -> Changes, joined on uri.

    With a --modified-since/--modified-before window, a listed object outside it is not read
    (unchanged when committed, `outside` when not) unless it failed before, and nothing is
    deleted.
    """

    def __init__(self, fingerprint: str, patterns: list[str], options: BackfillOptions):
        super().__init__()
        self._args = (fingerprint, patterns, options)

    def expand(self, inputs):
        listed, committed = inputs
        joined = ({'listed': listed,
                   'committed': committed | 'KeyCommitted' >> beam.Map(
                       lambda c: (c.uri, c)).with_output_types(tuple[str, CommittedObject])}
                  | 'Join' >> beam.CoGroupByKey())
        out = typed(joined | 'Classify' >> beam.ParDo(_Classify(*self._args)).with_output_types(
            tuple[str, ObjectRef]).with_outputs('changes', UNCHANGED, DELETED, main=READ),
            changes=Change, unchanged=Change, deleted=Change)
        changes = ((out.changes, out[UNCHANGED], out[DELETED])
                   | 'AllChanges' >> beam.Flatten().with_output_types(Change))
        return Changes(out.read, changes)


# ---- the tables ---------------------------------------------------------------------------

class Corpus:
    """The committed state of an output: its two Delta tables, when they exist."""

    def __init__(self, output: str, storage_options: Optional[dict] = None):
        self.output = output
        self.chunks_path = outputs.path(output, 'chunks')
        self.manifest_path = outputs.path(output, 'manifest')
        self._options = storage_options or None
        self.chunks = self._open(self.chunks_path)
        self.manifest = self._open(self.manifest_path)

    def _open(self, table: str):
        from deltalake import DeltaTable
        if table.startswith('gs://'):  # no corpus tables on GCS yet (outputs.prepare)
            return None
        if DeltaTable.is_deltatable(table, storage_options=self._options):
            return DeltaTable(table, storage_options=self._options)
        return None

    @property
    def version(self) -> Optional[int]:
        """The chunks table's version: what the index names."""
        return None if self.chunks is None else self.chunks.version()

    def committed_objects(self) -> list[CommittedObject]:
        """The committed manifest as small records, for the diff."""
        if self.manifest is None:
            return []
        table = self.manifest.to_pyarrow_table(
            columns=['uri', 'version', 'status', 'fingerprint'])
        return [CommittedObject(**row) for row in table.to_pylist()]

    def manifest_rows(self) -> pa.Table:
        if self.manifest is None:
            return MANIFEST_SCHEMA.empty_table()
        return self.manifest.to_pyarrow_table().select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)

    def history(self) -> list[dict]:
        """The corpus's commits, newest first: version, time and what the run recorded."""
        if self.chunks is None:
            return []
        return self.chunks.history()


# ---- the commit ---------------------------------------------------------------------------

@dataclass
class CommitResult:
    """What one commit changed."""
    version: Optional[int]
    committed: bool
    chunks_added: int = 0
    chunks_removed: int = 0
    objects_deleted: int = 0
    files_rewritten: int = 0
    seconds: float = 0.0


def new_run_id() -> str:
    return time.strftime('%Y%m%dT%H%M%S') + '-' + uuid.uuid4().hex[:8]


def staging(table_path: str, run_id: str) -> str:
    """The run-scoped folder of a table where workers write what the commit adds."""
    return outputs.path(table_path, RUN_PREFIX + run_id)


def table_relpath(table_path: str, file_path: str) -> str:
    """A file's path relative to its table, as Delta's add and remove actions name it."""
    return os.path.relpath(_normal(file_path), _normal(table_path))


def copied_files(table_path: str, storage_options: Optional[dict], since: int,
                 until: int) -> dict[str, str]:
    """The files that ragbeam's commits after version `since`, up to `until`, wrote as
    copies of older rows (a committed file less a replaced object's rows, byte for byte),
    each with the file it copies as of `since` (a copy of a copy goes back to the first),
    as paths relative to the table."""
    from deltalake import DeltaTable
    origin: dict[str, str] = {}
    commits = DeltaTable(table_path, storage_options=storage_options).history()
    for commit in sorted(commits, key=lambda c: c['version']):
        if since < commit['version'] <= until:
            for new, old in json.loads(commit.get(COPIES_KEY) or '{}').items():
                origin[new] = origin.get(old, old)
    return origin


def _add_action(table_path: str, file_path: str, rows: int):
    from deltalake.transaction import AddAction
    size = FileSystems.match([file_path])[0].metadata_list[0].size_in_bytes
    return AddAction(table_relpath(table_path, file_path), size, {}, int(time.time() * 1000), True,
                     json.dumps({'numRecords': rows}))


def _remove_action(table_path: str, file_path: str):
    from deltalake.transaction import RemoveAction
    return RemoveAction(table_relpath(table_path, file_path), True, int(time.time() * 1000))


def _files(folder: str) -> list[str]:
    found = FileSystems.match([outputs.path(folder, '*.parquet')])[0].metadata_list
    return sorted(m.path for m in found)


def _parquet(file_path: str):
    """A Parquet file opened for reading: the path itself when local, else Beam's seekable
    stream, so that only the footer and the columns asked for are read."""
    if outputs.is_local(file_path):
        return pq.ParquetFile(file_path)
    return pq.ParquetFile(FileSystems.open(file_path, compression_type='uncompressed'))


def _uris(file_path: str) -> pa.Array:
    """The uri column of a chunk file (the only column read)."""
    return _parquet(file_path).read(columns=['uri']).column('uri')


def _without(file_path: str, drop: set[str], out_path: str) -> int:
    """Writes the rows of `file_path` whose uri is not in `drop` to `out_path`, one row group
    at a time (memory stays that of a row group); returns their count."""
    import pyarrow.compute as pc
    source = _parquet(file_path)
    value_set = pa.array(sorted(drop))
    kept, writer, sink = 0, None, None
    try:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            table = table.filter(pc.invert(pc.is_in(table.column('uri'), value_set=value_set)))
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


def _write_parquet(table: pa.Table, out_path: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression='zstd')
    with FileSystems.create(out_path) as f:
        f.write(sink.getvalue().to_pybytes())


def check_staged(written: Sequence[str],
                 staged_manifest: pa.Table) -> tuple[pa.Table, list[ErrorRecord]]:
    """The staged manifest with every `ok` object whose rows in the `written` chunk files
    differ in number from the chunks its reader counted turned `failed` (rows were lost
    between the read and the write: it must not commit as complete, and the next run
    retries it), and an error record for each such object."""
    import pyarrow.compute as pc
    staged_rows: dict[str, int] = {}
    for path in written:
        for item in pc.value_counts(_uris(path)).to_pylist():
            staged_rows[item['values']] = staged_rows.get(item['values'], 0) + item['counts']
    rows, errors = [], []
    for row in staged_manifest.to_pylist():
        found = staged_rows.get(row['uri'], 0)
        if row['status'] == 'ok' and found != row['chunks']:
            message = (f'{found} of the {row["chunks"]} chunks its reader counted were staged '
                       '(rows lost between the read and the write)')
            _log.error('ragbeam: %s: %s; not committed, retried by the next run', row['uri'],
                       message)
            errors.append(ErrorRecord(row['uri'], 'commit', 'IncompleteObject', message,
                                      row['version']))
            row = dict(row, status='failed', reason=f'incomplete: {message}')
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=staged_manifest.schema), errors


@dataclass
class Removal:
    """The actions that drop some objects' rows from a table: each committed file holding one
    is removed, and rewritten without them (`copies`: each rewrite -> the file it copies)."""
    adds: list
    removes: list
    rows: int
    rewritten: int
    copies: dict[str, str]


def remove_objects(table_path: str, storage_options: Optional[dict], folder: str,
                   uris: set[str], every_row: bool = False) -> Removal:
    """The actions that drop the rows of `uris` (with `every_row`, all rows: the schema
    changed) from the table's committed files, rewriting only the files that hold them into
    `folder`; commit them with COPIES_KEY set to json of `copies`."""
    removal = Removal([], [], 0, 0, {})
    for n, uri in enumerate(sorted(active_files(table_path, storage_options) or ())):
        found = _uris(uri)
        drop = set(found.to_pylist()) & uris
        if not drop and not every_row:
            continue
        removal.removes.append(_remove_action(table_path, uri))
        if every_row:  # no row of the old schema can stay
            removal.rows += len(found)
            continue
        removal.rewritten += 1
        out = outputs.path(folder, f'rewrite-{n:05d}.parquet')
        count = _without(uri, drop, out)
        removal.rows += len(found) - count
        if count:
            removal.adds.append(_add_action(table_path, out, count))
            removal.copies[table_relpath(table_path, out)] = table_relpath(table_path, uri)
    return removal


def commit(corpus: Corpus, run_id: str, fingerprint_value: str, schema: pa.Schema,
           staged_manifest: pa.Table, changes: dict[str, str], options: BackfillOptions,
           summary: dict, written: Sequence[str] = ()) -> CommitResult:
    """Publishes a finished run: one commit of the chunks table, then one of the manifest.

    `staged_manifest` holds the rows of the objects this run read; `changes` the diff's
    decision per object; `written` the chunk files of the bundles that finished
    (transforms.write.WriteChunks). The run's other staged files, left by bundles that the
    runner failed and ran again, are deleted. Raises CommitError and commits nothing when
    another run committed since this one started, or when the deletes pass
    --max-delete-fraction.
    """
    from deltalake import CommitProperties, Schema
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import create_table_with_add_actions

    started = time.time()
    old = {r['uri']: r for r in corpus.manifest_rows().to_pylist()}
    deleted = {u for u, c in changes.items() if c == 'deleted'}
    if old and len(deleted) > options.max_delete_fraction * len(old):
        raise CommitError(f'this run would delete {len(deleted)} of {len(old)} committed objects, '
                          f'more than --max-delete-fraction {options.max_delete_fraction:g}: '
                          'nothing was committed (check the --input patterns, or raise the limit)')
    staged = {r['uri']: r for r in staged_manifest.to_pylist()}
    failed = {u for u, r in staged.items() if r['status'] == 'failed'}
    keep_old = {u for u in failed if u in old and old[u]['status'] == 'ok'}
    replaced = ({u for u in staged if u in old} - keep_old) | deleted
    rows = dict(old)
    for u in replaced | set(staged):
        rows.pop(u, None)
    for u, r in staged.items():
        rows[u] = old[u] if u in keep_old else dict(r, fingerprint=fingerprint_value)
    table_path = corpus.chunks_path
    adds, removes, added_rows, removed_rows, rewritten = [], [], 0, 0, 0
    folder = staging(table_path, run_id)
    listed = {_normal(p) for p in written}
    retried = [p for p in _files(folder) if _normal(p) not in listed]
    if retried:
        _log.warning('ragbeam: %d staged chunk files of bundles the runner ran again are not '
                     'committed (deleted)', len(retried))
        FileSystems.delete(retried)
    for n, path in enumerate(sorted(written)):
        uris = set(_uris(path).to_pylist())
        if uris & failed:  # a failed object contributes no rows
            kept = outputs.path(folder, f'kept-{n:05d}.parquet')
            count = _without(path, failed, kept)
            FileSystems.delete([path])
            if count:
                adds.append(_add_action(table_path, kept, count))
                added_rows += count
        else:
            count = _parquet(path).metadata.num_rows
            if count:  # a reader that had nothing to write leaves an empty file
                adds.append(_add_action(table_path, path, count))
                added_rows += count
    if corpus.chunks is None and not adds:  # a table with no rows still has its schema
        empty = outputs.path(folder, 'empty.parquet')
        _write_parquet(schema.empty_table(), empty)
        adds.append(_add_action(table_path, empty, 0))
    schema_changed = (corpus.chunks is not None and
                      pa.schema(corpus.chunks.schema().to_arrow()).remove_metadata()
                      != schema.remove_metadata())
    copies: dict[str, str] = {}
    if corpus.chunks is not None and (replaced or schema_changed):
        removed = remove_objects(table_path, corpus._options, folder, replaced, schema_changed)
        adds += removed.adds
        removes += removed.removes
        removed_rows, rewritten, copies = removed.rows, removed.rewritten, removed.copies
    nothing = not adds and not removes and rows == old
    meta = {'ragbeam_run': run_id, 'ragbeam_fingerprint': fingerprint_value,
            'ragbeam_summary': json.dumps(summary, sort_keys=True),
            COPIES_KEY: json.dumps(copies, sort_keys=True)}
    if nothing and corpus.chunks is not None:
        _log.info('ragbeam: nothing changed; no commit')
        return CommitResult(corpus.version, False, seconds=round(time.time() - started, 3))
    manifest_table = pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r['uri']),
                                          schema=MANIFEST_SCHEMA)
    manifest_file = outputs.path(staging(corpus.manifest_path, run_id), 'manifest.parquet')
    _write_parquet(manifest_table, manifest_file)
    intent_path = outputs.path(corpus.output, PENDING, f'{run_id}.json')
    outputs.write_json(intent_path,
                       {'run': run_id, 'manifest_file': manifest_file,
                        'rows': manifest_table.num_rows, 'meta': meta})
    crash_point('before-chunks-commit')
    properties = CommitProperties(custom_metadata=meta, max_commit_retries=0)
    try:
        if corpus.chunks is None:
            create_table_with_add_actions(table_path, Schema.from_arrow(schema), adds,
                                          mode='error', storage_options=corpus._options,
                                          commit_properties=properties)
        else:
            corpus.chunks.create_write_transaction(adds + removes, 'append' if not schema_changed
                                                   else 'overwrite', schema,
                                                   commit_properties=properties)
    except CommitFailedError as e:
        FileSystems.delete([intent_path])
        raise CommitError(f'another run committed to {corpus.output} while this one ran; '
                          f'nothing was committed, run again ({e})')
    crash_point('between-commits')
    roll_forward(corpus.output, corpus._options, run_id)
    version = Corpus(corpus.output, corpus._options).version
    return CommitResult(version, True, added_rows, removed_rows, len(deleted), rewritten,
                        round(time.time() - started, 3))


def run_age(run_id: str) -> float:
    """Seconds since a run started, from its id (new_run_id)."""
    try:
        return time.time() - time.mktime(time.strptime(run_id.split('-', 1)[0], '%Y%m%dT%H%M%S'))
    except ValueError:
        return float('inf')


def roll_forward(output: str, storage_options: Optional[dict] = None,
                 run_id: Optional[str] = None) -> None:
    """Finishes commits that a dead driver left half-done (or this run's, `run_id`): for each
    intent whose run the chunks table holds, its manifest is committed now. Another run's
    intent without a commit may be a live run's and stays, unless older than STALE_SECONDS."""
    found = FileSystems.match([outputs.path(output, PENDING, '*.json')])[0].metadata_list
    for meta in sorted(found, key=lambda m: m.path):
        name = os.path.basename(meta.path)[:-len('.json')]
        if run_id is None or name == run_id:
            _roll_forward(output, storage_options, meta.path, mine=name == run_id)


def _roll_forward(output: str, storage_options: Optional[dict], intent_path: str,
                  mine: bool) -> None:
    from deltalake import CommitProperties, Schema
    from deltalake.transaction import create_table_with_add_actions

    intent = outputs.read_json(intent_path)
    corpus = Corpus(output, storage_options)
    runs = {h.get('ragbeam_run') for h in corpus.chunks.history()} if corpus.chunks else set()
    if intent['run'] not in runs:
        if mine or run_age(intent['run']) > STALE_SECONDS:
            FileSystems.delete([intent_path])
        return
    manifest = corpus.manifest
    done = manifest is not None and manifest.history(1)[0].get('ragbeam_run') == intent['run']
    if not done:
        properties = CommitProperties(custom_metadata=intent['meta'])
        add = _add_action(corpus.manifest_path, intent['manifest_file'], intent['rows'])
        if manifest is None:
            create_table_with_add_actions(corpus.manifest_path, Schema.from_arrow(
                MANIFEST_SCHEMA), [add], mode='error', storage_options=storage_options,
                commit_properties=properties)
        else:
            removes = [_remove_action(corpus.manifest_path, u)
                       for u in active_files(corpus.manifest_path, storage_options)]
            manifest.create_write_transaction([add] + removes, 'append', MANIFEST_SCHEMA,
                                              commit_properties=properties)
    FileSystems.delete([intent_path])


def clean_staging(output: str, storage_options: Optional[dict] = None,
                  run_id: Optional[str] = None) -> None:
    """Deletes the run folders of both tables that no commit names: this run's (`run_id`),
    and those older than STALE_SECONDS (runs that died or failed before their commit; a
    younger one may belong to a run still going). Files of older versions stay (Delta's time travel; a
    reader of an older version may be reading them): `DeltaTable.vacuum` removes those."""
    from deltalake import DeltaTable
    for table in ('chunks', 'manifest'):
        table_path = outputs.path(output, table)
        names = {n for n in outputs.children(table_path) if n.startswith(RUN_PREFIX)}
        if not names:
            continue
        committed = set()
        if DeltaTable.is_deltatable(table_path, storage_options=storage_options):
            committed = {h.get('ragbeam_run') for h in
                         DeltaTable(table_path, storage_options=storage_options).history()}
        outputs.remove(table_path, sorted(
            name for name in names if (run := name[len(RUN_PREFIX):]) not in committed
            and (run == run_id or run_age(run) > STALE_SECONDS)))
