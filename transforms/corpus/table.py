"""The committed corpus under --output and the operations it owns: the commit of a run, the
roll-forward of a commit a dead driver left half-done, the cleanup of staging, and the
upkeep of the tables' logs.

- Workers write Parquet into run-scoped folders inside the tables (`chunks/run-<id>/`),
  which no reader sees: Delta readers read only the files the log names.
- The commit adds the staged chunk files zero-copy, rewrites only the committed files that
  hold rows of replaced or deleted objects, and rewrites only the manifest files whose URI
  range holds a change (transforms.corpus.layout). An object that failed contributes no rows
  (its earlier rows stay). The chunks table is committed first, then the manifest; an intent
  file makes the pair roll forward if the driver dies between the two.
- Every CHECKPOINT_INTERVAL versions both tables get a Delta checkpoint, and log files past
  the tables' retention are removed, so that opening a table stays cheap after years of
  nightly runs.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.corpus.diff import ManifestAt
from transforms.corpus.files import (add_action, footer_bounds, open_parquet, parquet_files,
                                     remove_action, table_files, table_relpath, uris, without,
                                     write_table)
from transforms.corpus.hooks import crash_point
from transforms.corpus.layout import (MANIFEST_FILE_ROWS, Dropped, ManifestRewrite,
                                      compact_files, remove_objects, rewrite_manifest)
from transforms.corpus.options import BackfillOptions
from transforms.corpus.staged import StagedManifest
from transforms.outputs import normal_uri
from transforms.types import MANIFEST_SCHEMA
from transforms.write import FILE_ROWS

_log = logging.getLogger(__name__)

RUN_PREFIX = 'run-'
PENDING = '_ragbeam/pending'  # one commit intent per run: <run id>.json
STALE_SECONDS = 6 * 3600  # another run's uncommitted staging younger than this may be live
COPIES_KEY = 'ragbeam_copies'  # commit metadata: {rewritten file: the file it copies}
CHECKPOINT_INTERVAL = 10  # versions between two checkpoints of each table
RECENT_COMMITS = 100  # commits a roll-forward looks back through for its run


class CommitError(OSError):
    """The run's result cannot be committed: another run committed first, or too many deletes."""


@dataclass
class CommitResult:
    """What one commit changed, and the bytes it wrote into the two tables."""
    version: Optional[int]
    committed: bool
    chunks_added: int = 0
    chunks_removed: int = 0
    objects_deleted: int = 0
    files_rewritten: int = 0
    seconds: float = 0.0
    bytes_added: int = 0  # the run's own new chunk files, committed zero-copy
    bytes_rewritten: int = 0  # chunk files rewritten without replaced rows, and manifest files


@dataclass
class StagedRun:
    """What a finished run hands to its commit: the manifest rows of the objects it read (a
    table is taken as a StagedManifest), the URIs it deletes, the chunk files of its
    finished bundles, and its summary."""
    run_id: str
    fingerprint: str
    schema: pa.Schema  # the chunk table's
    manifest: Union[StagedManifest, pa.Table]
    deleted: Sequence[str] = ()
    written: Sequence[str] = ()
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.manifest, pa.Table):
            self.manifest = StagedManifest(self.manifest)


def new_run_id() -> str:
    return time.strftime('%Y%m%dT%H%M%S') + '-' + uuid.uuid4().hex[:8]


def staging(table_path: str, run_id: str) -> str:
    """The run-scoped folder of a table where workers write what the commit adds."""
    return outputs.path(table_path, RUN_PREFIX + run_id)


def run_age(run_id: str) -> float:
    """Seconds since a run started, from its id (new_run_id)."""
    try:
        return time.time() - time.mktime(time.strptime(run_id.split('-', 1)[0], '%Y%m%dT%H%M%S'))
    except ValueError:
        return float('inf')


class Corpus:
    """The committed state of an output, its two Delta tables when they exist, and the
    operations that change them."""

    def __init__(self, output: str, storage_options: Optional[dict] = None):
        self.output = output
        self.chunks_path = outputs.path(output, 'chunks')
        self.manifest_path = outputs.path(output, 'manifest')
        self.storage_options = storage_options or None
        self.chunks = self._open(self.chunks_path)
        self.manifest = self._open(self.manifest_path)

    def _open(self, table: str):
        from deltalake import DeltaTable
        if DeltaTable.is_deltatable(table, storage_options=self.storage_options):
            return DeltaTable(table, storage_options=self.storage_options)
        return None

    @property
    def version(self) -> Optional[int]:
        """The chunks table's version: what the index names."""
        return None if self.chunks is None else self.chunks.version()

    def manifest_at(self) -> ManifestAt:
        """Where the workers read this committed manifest."""
        return ManifestAt(self.manifest_path,
                          None if self.manifest is None else self.manifest.version(),
                          tuple(sorted((self.storage_options or {}).items())) or None)

    def committed_count(self) -> int:
        """Objects in the committed manifest, from its log (no file is read)."""
        return 0 if self.manifest is None else sum(f.rows for f in table_files(self.manifest))

    def objects_made_otherwise(self, fingerprint: str) -> int:
        """Committed objects whose settings fingerprint is not `fingerprint` (a scan of one
        column, a row group at a time)."""
        if self.manifest is None:
            return 0
        found = 0
        for batch in self.manifest.to_pyarrow_dataset().to_batches(columns=['fingerprint']):
            found += int(pc.sum(pc.fill_null(pc.not_equal(batch.column('fingerprint'),
                                                          fingerprint), True)).as_py() or 0)
        return found

    def history(self, limit: Optional[int] = None) -> list[dict]:
        """The corpus's commits, newest first: version, time and what the run recorded."""
        if self.chunks is None:
            return []
        return self.chunks.history(limit)

    # ---- the commit ---------------------------------------------------------------------

    def commit(self, run: StagedRun, options: BackfillOptions) -> CommitResult:
        """Publishes a finished run: one commit of the chunks table, then one of the manifest.

        The run's staged files other than `run.written`, left by bundles that the runner
        failed and ran again, are deleted. Raises CommitError and commits nothing when
        another run committed since this one started, or when the deletes pass
        --max-delete-fraction.
        """
        started = time.time()
        deleted = sorted(set(run.deleted))
        total = self.committed_count()
        if total and len(deleted) > options.max_delete_fraction * total:
            raise CommitError(
                f'this run would delete {len(deleted)} of {total} committed objects, more than '
                f'--max-delete-fraction {options.max_delete_fraction:g}: nothing was committed '
                '(check the --input patterns, or raise the limit)')
        staged = run.manifest
        table_path = self.chunks_path
        folder = staging(table_path, run.run_id)
        adds, added_rows, added_bytes = self._stage_chunks(run, folder, staged.failed)
        if self.chunks is None and not adds:  # a table with no rows still has its schema
            empty = outputs.path(folder, 'empty.parquet')
            write_table(run.schema.empty_table(), empty)
            adds.append(add_action(table_path, empty, 0))
        schema_changed = (self.chunks is not None and
                          pa.schema(self.chunks.schema().to_arrow()).remove_metadata()
                          != run.schema.remove_metadata())
        # the rows of the objects read again (not of those that failed: theirs stay) and of
        # the deleted ones; a new table has none
        drop = Dropped() if self.chunks is None else Dropped(deleted, staged)
        removal = remove_objects(table_path, self.storage_options, folder, drop, schema_changed)
        manifest_files = [] if self.manifest is None else table_files(self.manifest)
        rewrite = rewrite_manifest(self.manifest_path, manifest_files,
                                   staging(self.manifest_path, run.run_id), staged,
                                   run.fingerprint, deleted)
        if self.manifest is None and not rewrite.adds:
            empty = outputs.path(staging(self.manifest_path, run.run_id), 'empty.parquet')
            write_table(MANIFEST_SCHEMA.empty_table(), empty)
            rewrite.adds.append(add_action(self.manifest_path, empty, 0))
        if not adds and removal.adds == removal.removes == [] and rewrite.empty \
                and self.chunks is not None:
            _log.info('ragbeam: nothing changed; no commit')
            return CommitResult(self.version, False, seconds=round(time.time() - started, 3))
        meta = {'ragbeam_run': run.run_id, 'ragbeam_fingerprint': run.fingerprint,
                'ragbeam_summary': json.dumps(run.summary, sort_keys=True),
                COPIES_KEY: json.dumps(removal.copies, sort_keys=True)}
        self._publish(run.run_id, meta, run.schema, adds + removal.adds + removal.removes,
                      rewrite, 'overwrite' if schema_changed else 'append')
        after = Corpus(self.output, self.storage_options)
        return CommitResult(after.version, True, added_rows, removal.rows, len(deleted),
                            removal.rewritten, round(time.time() - started, 3),
                            bytes_added=added_bytes,
                            bytes_rewritten=removal.bytes_written + rewrite.bytes_written)

    def _publish(self, run_id: str, meta: dict, schema: pa.Schema, chunk_actions: list,
                 manifest: ManifestRewrite, mode: str = 'append') -> None:
        """Commits the chunks table, then the manifest, through an intent that a later run
        rolls forward if this driver dies between the two; then the tables' upkeep."""
        from deltalake import CommitProperties, Schema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import create_table_with_add_actions

        intent_path = outputs.path(self.output, PENDING, f'{run_id}.json')
        outputs.write_json(intent_path, {
            'run': run_id, 'meta': meta,
            'manifest_adds': [[a.path, json.loads(a.stats)] for a in manifest.adds],
            'manifest_removes': [r.path for r in manifest.removes]})
        crash_point('before-chunks-commit')
        properties = CommitProperties(custom_metadata=meta, max_commit_retries=0)
        try:
            if self.chunks is None:
                create_table_with_add_actions(self.chunks_path, Schema.from_arrow(schema),
                                              chunk_actions, mode='error',
                                              storage_options=self.storage_options,
                                              commit_properties=properties)
            else:
                self.chunks.create_write_transaction(chunk_actions, mode, schema,
                                                     commit_properties=properties)
        except CommitFailedError as e:
            FileSystems.delete([intent_path])
            raise CommitError(f'another run committed to {self.output} while this one ran; '
                              f'nothing was committed, run again ({e})')
        crash_point('between-commits')
        self.roll_forward(run_id)
        Corpus(self.output, self.storage_options).maintain()

    def compact(self, run_id: str) -> CommitResult:
        """Rewrites the small or fragmented files of both tables into well-sized ones, sorted
        by uri (transforms.corpus.layout.compact_files), in one commit of each table: the
        rows stay the same, readers of the old version keep their files."""
        if self.chunks is None:
            raise CommitError(f'no committed corpus in {self.output} (run `ragbeam run` first)')
        started = time.time()
        chunks = compact_files(self.chunks_path, table_files(self.chunks),
                               staging(self.chunks_path, run_id), FILE_ROWS, sort_chunks=True)
        manifest = compact_files(self.manifest_path, table_files(self.manifest),
                                 staging(self.manifest_path, run_id), MANIFEST_FILE_ROWS)
        if chunks.empty and manifest.empty:
            return CommitResult(self.version, False, seconds=round(time.time() - started, 3))
        meta = {'ragbeam_run': run_id, 'ragbeam_operation': 'compact',
                'ragbeam_fingerprint': self.chunks.history(1)[0].get('ragbeam_fingerprint'),
                'ragbeam_summary': json.dumps({'compacted_files': len(chunks.removes),
                                               'written_files': len(chunks.adds)})}
        self._publish(run_id, meta, pa.schema(self.chunks.schema().to_arrow()),
                      chunks.adds + chunks.removes, manifest)
        return CommitResult(Corpus(self.output, self.storage_options).version, True,
                            files_rewritten=len(chunks.removes) + len(manifest.removes),
                            seconds=round(time.time() - started, 3),
                            bytes_rewritten=chunks.bytes_written + manifest.bytes_written)

    def _stage_chunks(self, run: StagedRun, folder: str, failed: pa.Array) -> tuple[list, int, int]:
        """The add actions of the run's written chunk files (a failed object's rows taken
        out), their rows and bytes; the staged files no finished bundle listed are deleted."""
        listed = {normal_uri(p) for p in run.written}
        retried = [p for p in parquet_files(folder) if normal_uri(p) not in listed]
        if retried:
            _log.warning('ragbeam: %d staged chunk files of bundles the runner ran again are '
                         'not committed (deleted)', len(retried))
            FileSystems.delete(retried)
        adds, rows, size = [], 0, 0
        for n, path in enumerate(sorted(run.written)):
            meta = open_parquet(path).metadata
            if not meta.num_rows:  # a reader that had nothing to write leaves an empty file
                continue
            if len(failed) and pc.any(pc.is_in(uris(path), value_set=failed)).as_py():
                kept = outputs.path(folder, f'kept-{n:05d}.parquet')
                count = without(path, failed, kept)
                FileSystems.delete([path])
                if not count:
                    continue
                path, meta = kept, open_parquet(kept).metadata
            # the rows and the URI range from the footer: no column is read
            count = meta.num_rows
            action = add_action(self.chunks_path, path, count, footer_bounds(meta))
            adds.append(action)
            rows += count
            size += action.size
        return adds, rows, size

    # ---- after a crash --------------------------------------------------------------------

    def roll_forward(self, run_id: Optional[str] = None) -> None:
        """Finishes commits that a dead driver left half-done (or this run's, `run_id`): for
        each intent whose run the chunks table holds, its manifest is committed now. Another
        run's intent without a commit may be a live run's and stays, unless older than
        STALE_SECONDS."""
        found = FileSystems.match([outputs.path(self.output, PENDING, '*.json')])[0].metadata_list
        for meta in sorted(found, key=lambda m: m.path):
            name = os.path.basename(meta.path)[:-len('.json')]
            if run_id is None or name == run_id:
                self._roll_forward(meta.path, mine=name == run_id)

    def _roll_forward(self, intent_path: str, mine: bool) -> None:
        from deltalake import CommitProperties, Schema
        from deltalake.transaction import AddAction, create_table_with_add_actions

        intent = outputs.read_json(intent_path)
        now = Corpus(self.output, self.storage_options)
        runs = {h.get('ragbeam_run') for h in now.history(RECENT_COMMITS)}
        if intent['run'] not in runs:
            if mine or run_age(intent['run']) > STALE_SECONDS:
                FileSystems.delete([intent_path])
            return
        manifest = now.manifest
        done = manifest is not None and manifest.history(1)[0].get('ragbeam_run') == intent['run']
        if not done:
            stamp = int(time.time() * 1000)
            adds = [AddAction(path, _size(outputs.path(now.manifest_path, path)), {}, stamp, True,
                              json.dumps(stats)) for path, stats in intent['manifest_adds']]
            removes = [remove_action(now.manifest_path, outputs.path(now.manifest_path, path))
                       for path in intent['manifest_removes']]
            properties = CommitProperties(custom_metadata=intent['meta'])
            if manifest is None:
                create_table_with_add_actions(now.manifest_path, Schema.from_arrow(
                    MANIFEST_SCHEMA), adds, mode='error', storage_options=self.storage_options,
                    commit_properties=properties)
            else:
                manifest.create_write_transaction(adds + removes, 'append', MANIFEST_SCHEMA,
                                                  commit_properties=properties)
        FileSystems.delete([intent_path])

    def clean_staging(self, run_id: Optional[str] = None) -> None:
        """Deletes the run folders of both tables that no commit names: this run's (`run_id`),
        and those older than STALE_SECONDS (runs that died or failed before their commit; a
        younger one may belong to a run still going). Files of older versions stay (Delta's
        time travel; a reader of an older version may be reading them): `vacuum` removes
        those."""
        from deltalake import DeltaTable
        for table_path in (self.chunks_path, self.manifest_path):
            names = {n for n in outputs.children(table_path) if n.startswith(RUN_PREFIX)}
            candidates = {n for n in names
                          if (run := n[len(RUN_PREFIX):]) == run_id or run_age(run) > STALE_SECONDS}
            if not candidates:
                continue
            committed = set()
            if DeltaTable.is_deltatable(table_path, storage_options=self.storage_options):
                committed = {h.get('ragbeam_run') for h in DeltaTable(
                    table_path, storage_options=self.storage_options).history()}
            outputs.remove(table_path, sorted(
                n for n in candidates if n[len(RUN_PREFIX):] not in committed))

    # ---- upkeep ---------------------------------------------------------------------------

    def maintain(self) -> None:
        """A checkpoint of each table every CHECKPOINT_INTERVAL versions, and the log files
        past the table's retention (delta.logRetentionDuration, 30 days by default) removed:
        a table opens from its last checkpoint and the commits after it."""
        for table in (self.chunks, self.manifest):
            if table is not None and table.version() > 0 \
                    and table.version() % CHECKPOINT_INTERVAL == 0:
                table.create_checkpoint()
                table.cleanup_metadata()


def _size(file_path: str) -> int:
    return FileSystems.match([file_path])[0].metadata_list[0].size_in_bytes


def copied_files(table_path: str, storage_options: Optional[dict], since: int,
                 until: int) -> dict[str, str]:
    """The files that ragbeam's commits after version `since`, up to `until`, wrote as
    copies of older rows (a committed file less a replaced object's rows, byte for byte),
    each with the file it copies as of `since` (a copy of a copy goes back to the first),
    as paths relative to the table."""
    from deltalake import DeltaTable
    origin: dict[str, str] = {}
    table = DeltaTable(table_path, storage_options=storage_options)
    commits = table.history(max(1, table.version() - since))
    for commit in sorted(commits, key=lambda c: c['version']):
        if since < commit['version'] <= until:
            for new, old in json.loads(commit.get(COPIES_KEY) or '{}').items():
                origin[new] = origin.get(old, old)
    return origin


__all__ = ['CHECKPOINT_INTERVAL', 'COPIES_KEY', 'CommitError', 'CommitResult', 'Corpus',
           'StagedRun', 'copied_files', 'new_run_id', 'run_age', 'staging',
           'table_relpath']
