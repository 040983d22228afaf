"""Scheduled backfills with the input and the output in one bucket, on S3 (moto) and on GCS
(the shared fake-gcs-server), the same tests on each: crashes, stale commits, an ivfpq index
updated through the bucket, an object that changes during its read, and thousands of keys
listed in ranges. Their own file, so that `pytest -n 2 --dist loadfile` runs them beside the
local backfill tests."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import CORPUS, ROOT, check_output, ragbeam
from tests.test_backfill import (FILES, _chunk_rows, _copy, _crash, _manifest_row, _report,
                                 _top_k, _version)


@pytest.fixture(scope='module', params=['s3', 'gcs'])
def store(request):
    """moto's S3 or the GCS emulator: each test runs on both."""
    return request.getfixturevalue(request.param)


class BucketCorpus:
    """Input and output in one bucket (`src/`, `out`), with a local mirror of the input's
    final state for check_output."""

    def __init__(self, store, tmp_path):
        import uuid
        # no '-': delta-rs percent-encodes it in the XML API's bucket path, which the emulator
        # does not decode (GCS does)
        self.store, self.bucket = store, f'backfill{uuid.uuid4().hex[:8]}'
        store.create_bucket(self.bucket)
        self.src, self.tmp = _copy(tmp_path / 'src'), tmp_path
        for name in FILES[:4]:
            self.put(name)

    def uri(self, name: str) -> str:
        return f'{self.store.scheme}://{self.bucket}/{name}'

    def put(self, name: str) -> None:
        self.store.put(self.bucket, f'src/{name}', (self.src / name).read_bytes())

    def change(self) -> None:
        """One object changed, one added, one deleted (here and in the mirror)."""
        with open(self.src / 'rfc3986.txt', 'a') as f:
            f.write('\nAn appendix added after the first run, about fragment identifiers.\n')
        shutil.copy2(CORPUS / 'text' / 'pep-0263.rst', self.src / 'pep-0263.rst')
        (self.src / 'ru-koi8-r.txt').unlink()
        self.put('rfc3986.txt')
        self.put('pep-0263.rst')
        self.store.delete(self.bucket, ['src/ru-koi8-r.txt'])

    def run(self, out: str, *extra, check=True):
        return ragbeam('run', '--input', self.uri('src/**'), '--output', self.uri(out),
                       *self.store.endpoint_args, *extra, check=check)

    def crash(self, out: str, point: str, *extra) -> None:
        _crash(self.uri('src/**'), self.uri(out), point, *self.store.endpoint_args, *extra)

    def local(self, out: str):
        """A fresh local copy of an output (a Delta table's paths are relative)."""
        dest = self.tmp / f'copy-{out}'
        shutil.rmtree(dest, ignore_errors=True)
        self.store.download_tree(self.bucket, out, dest)
        return dest


STALE_COMMIT = """
import json, os, sys, time
from transforms.corpus import BackfillOptions, CommitError, Corpus, StagedRun
from transforms.store import StoreConfig
from transforms.types import MANIFEST_SCHEMA, chunk_schema
from pipeline.options import store_beam_args
from apache_beam.options.pipeline_options import PipelineOptions
from transforms import outputs

output, endpoint, signal, deleted = sys.argv[1:]
config = StoreConfig(**{('gcs' if output.startswith('gs://') else 's3') + '_endpoint_url': endpoint})
outputs.configure(PipelineOptions(store_beam_args(config, [])), config)
stale = Corpus(output, config.delta_storage_options(output))
open(signal + '.ready', 'w').close()
while not os.path.exists(signal + '.go'):
    time.sleep(0.2)
try:
    stale.commit(StagedRun('late', 'x', chunk_schema(384), MANIFEST_SCHEMA.empty_table(),
                           [deleted]), BackfillOptions())
except CommitError as e:
    print(e)
    sys.exit(3)
"""


def test_an_incremental_run_survives_crashes_and_stale_commits_and_equals_a_fresh_run(
        store, tmp_path):
    """With input and output in a bucket: runs killed before the chunks commit, between the
    two commits (the intent file in the bucket lets the next run finish the pair) and before
    the new index is made current; a commit from a handle opened
    before another run committed (refused: delta-rs's conditional put, which moto and the
    emulator honour as S3 and GCS do), and an ivfpq index updated through the bucket; the end state equals a fresh
    run's."""
    small = ('--index-type', 'ivfpq', '--chunk-size', '300', '--chunk-overlap', '30',
             '--index-rebuild-fraction', '1')  # enough chunks to train ivfpq; always update
    corpus = BucketCorpus(store, tmp_path)
    corpus.run('out', *small)
    before = _chunk_rows(corpus.local('out'))
    signal = tmp_path / 'stale'
    stale = subprocess.Popen([sys.executable, '-c', STALE_COMMIT, corpus.uri('out'),
                              store.endpoint, str(signal), corpus.uri('src/pep-0008.rst')],
                             cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not os.path.exists(f'{signal}.ready'):
        assert stale.poll() is None, stale.stderr.read()[-2000:]
        time.sleep(0.2)
    corpus.change()
    corpus.crash('out', 'before-chunks-commit', *small)
    out = corpus.local('out')
    assert _version(out) == 0 and _chunk_rows(out) == before
    corpus.crash('out', 'between-commits', *small)  # chunks committed, manifest not yet
    assert _version(corpus.local('out')) == 1
    corpus.crash('out', 'index-before-switch', *small)  # finishes the pair, indexes, dies
    assert _report(corpus.local('out'))['index']['table_version'] == 0
    hits = json.loads(ragbeam('query', '--output', corpus.uri('out'), *store.endpoint_args,
                              '--json', 'percent encoding').stdout)
    assert hits and {h['chunk_id'] for h in hits} <= {r['chunk_id'] for r in before}
    converged = corpus.run('out', *small)
    assert 'nothing to commit, table version 1' in converged.stdout  # committed before
    (tmp_path / 'stale.go').touch()
    assert stale.wait(timeout=300) == 3, stale.stderr.read()[-2000:]
    assert 'another run committed' in stale.stdout.read()
    corpus.run('fresh', *small)
    out, fresh = corpus.local('out'), corpus.local('fresh')
    assert _version(out) == 1
    check_output(out, '--input', corpus.src, '--chunk-size', '300', '--chunk-overlap', '30')
    check_output(out, '--same-as', fresh)
    index = _report(out)['index']
    assert (index['type'], index['built'], index['table_version']) == ('ivfpq', 'update', 1)
    assert index['count'] == _report(fresh)['index']['count']
    assert 0 < index['delta']['count'] and 0 < index['tombstones']['count']
    from deltalake import DeltaTable

    from transforms.index import Searcher
    table = DeltaTable(str(out / 'chunks')).to_pyarrow_table(columns=['id64', 'chunk_id'])
    assert Searcher(str(out)).ids().tolist() == sorted(table.column('id64').to_pylist())
    # the lexical index was updated through the bucket too: the base's segments copied
    # within the store, the lost ids deleted, the new rows added
    from transforms.index import LexicalSearcher
    lexical = index['lexical']
    assert (lexical['built'], lexical['table_version']) == ('update', 1)
    assert lexical['deleted'] > 0 and lexical['added'] > 0
    assert LexicalSearcher(str(out), lexical).ids().tolist() == sorted(
        table.column('id64').to_pylist())
    live = set(table.column('chunk_id').to_pylist())
    assert all(len(ids) == 10 and set(ids) <= live for ids in _top_k(out, 10))
    hits = json.loads(ragbeam('query', '--output', corpus.uri('out'), *store.endpoint_args,
                              '--json', '-k', '10', '--uri-prefix',
                              corpus.uri('src/pep-0263.rst'), 'source code encoding').stdout)
    assert len(hits) == 10 and {h['chunk_id'] for h in hits} <= live  # the new object
    assert not json.loads(ragbeam('query', '--output', corpus.uri('out'), *store.endpoint_args,
                                  '--json', '--uri-prefix',
                                  corpus.uri('src/ru-koi8-r.txt'), 'text').stdout)  # deleted


def test_an_object_that_changes_during_its_read_keeps_its_old_rows_and_is_retried(
        store, tmp_path):
    from tests.servers import FaultProxy

    corpus = BucketCorpus(store, tmp_path)
    corpus.run('out')
    uri = corpus.uri('src/rfc3986.txt')
    old = sorted(r['chunk_id'] for r in _chunk_rows(corpus.local('out')) if r['uri'] == uri)
    first = _manifest_row(corpus.local('out'), uri)
    with open(corpus.src / 'rfc3986.txt', 'a') as f:
        f.write('\nA second version.\n')
    corpus.put('rfc3986.txt')  # what the next listing sees
    with open(corpus.src / 'rfc3986.txt', 'a') as f:
        f.write('\nA third version, written while the second is read.\n')
    proxy = FaultProxy(store.port, faults=False)
    proxy.hooks['src/rfc3986.txt'] = lambda: corpus.put('rfc3986.txt')
    try:
        ragbeam('run', '--input', corpus.uri('src/**'), '--output', corpus.uri('out'),
                store.endpoint_args[0], proxy.endpoint)
    finally:
        proxy.stop()
    out = corpus.local('out')
    assert _report(out)['run']['objects_read_failed'] == 1
    assert sorted(r['chunk_id'] for r in _chunk_rows(out) if r['uri'] == uri) == old
    # the manifest still describes the committed rows (the first version), errors/ the failure
    assert _manifest_row(out, uri) == first
    error, = [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
              for line in f.read_text().splitlines()]
    assert (error['uri'], error['stage'], error['error_type']) == (uri, 'read',
                                                                   'ObjectChangedError')
    again = corpus.run('out')  # retried, and read whole this time
    assert 'changed 1' in again.stdout and _report(corpus.local('out'))['run']['objects_read_failed'] == 0
    check_output(corpus.local('out'), '--input', corpus.src)


def test_a_mix_of_changes_over_5000_keys_equals_a_fresh_run_however_listed(store, tmp_path):
    """5,000 keys in 50 prefixes: changes in one prefix and scattered, adds, deletes and a
    removed prefix, listed in many key ranges (S3's StartAfter, GCS's start and end offsets)
    and in one, give a fresh run's tables."""
    import uuid

    from bench.generate import pick, small_object_name, small_object_text

    n, bucket = 5000, f'scale{uuid.uuid4().hex[:8]}'
    store.create_bucket(bucket)

    def put(items):
        store.put_bodies(bucket, ((f'src/{name}', text.encode()) for name, text in items))

    put((small_object_name(i), small_object_text(i)) for i in range(n))
    src = f'{store.scheme}://{bucket}/src/'
    lean = (*store.endpoint_args, '--index-type', 'none', '--lexical-index', 'none')
    many, one, fresh = tmp_path / 'many', tmp_path / 'one', tmp_path / 'fresh'
    ragbeam('run', '--input', src, '--output', many, *lean)
    shutil.copytree(many, one)
    edits = sorted(set(pick(n, 50, True)) | set(pick(n, 50, False)))
    put((small_object_name(i), small_object_text(i, edit=1)) for i in edits)
    put((f'f{i:06d}/new.txt', small_object_text(n + i)) for i in range(0, 50, 5))
    gone = sorted({i for i in pick(n, 30, False, seed=3) if i not in edits}
                  | set(range(n - 100, n)))  # and the last prefix
    store.delete(bucket, (f'src/{small_object_name(i)}' for i in gone))
    ragbeam('run', '--input', src, '--output', many, *lean, '--list-ranges', '64')
    run = _report(many)['run']
    assert (run['objects_changed'], run['objects_new'], run['objects_deleted']) == (
        len([i for i in edits if i < n - 100]), 10, len(gone))
    assert run['list_ranges'] > 16 and run['list_ranges_failed'] == 0
    ragbeam('run', '--input', src, '--output', one, *lean, '--list-ranges', '1')
    ragbeam('run', '--input', src, '--output', fresh, *lean)
    check_output(many, '--same-as', fresh)
    check_output(one, '--same-as', fresh)


def test_two_concurrent_runs_into_the_bucket_end_as_one_serial_order(store, tmp_path):
    """Two processes commit into one output in the bucket at once, the slower one held before
    its commit: delta-rs's conditional put (S3's If-None-Match, GCS's
    x-goog-if-generation-match: 0 on the log entry) lets one commit, the other commits nothing
    and says so; run again, it converges to the serial state."""
    corpus = BucketCorpus(store, tmp_path)
    store.put(corpus.bucket, 'more/pep-0263.rst', (CORPUS / 'text' / 'pep-0263.rst').read_bytes())
    first, second = corpus.uri('src/**'), corpus.uri('more/**')

    def start(src, out, **env):
        return subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', '--input', src,
                                 '--output', corpus.uri(out), *store.endpoint_args,
                                 '--embedder', 'hash', '--max-delete-fraction', '1'],
                                cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, **env))

    def run(src, out):
        proc = start(src, out)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]

    run(first, 'out')
    with open(corpus.src / 'rfc3986.txt', 'a') as f:
        f.write('\nA paragraph added while another run ran.\n')
    corpus.put('rfc3986.txt')
    slow = start(second, 'out', RAGBEAM_TEST_DELAY_AT='before-chunks-commit:15')
    fast = start(first, 'out')
    assert fast.wait(timeout=600) == 0, fast.stderr.read()[-2000:]
    assert slow.wait(timeout=600) == 2
    assert 'another run committed' in slow.stderr.read()
    out = corpus.local('out')
    assert _version(out) == 1  # only the fast run's commit
    assert {os.path.basename(r['uri']) for r in _chunk_rows(out)} == set(FILES[:4])
    run(second, 'out')  # the loser, run again
    run(first, 'both')
    run(second, 'both')
    check_output(corpus.local('out'), '--same-as', corpus.local('both'))
