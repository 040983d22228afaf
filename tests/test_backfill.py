"""Scheduled backfills: a versioned corpus (Delta tables) that every run updates atomically and
incrementally, and that a crash never leaves half-done."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import CORPUS, ROOT, check_output, ragbeam

FILES = ['rfc3986.txt', 'pep-0008.rst', 'alice29-crlf.txt', 'ru-koi8-r.txt', 'pep-0263.rst']
QUERIES = ['uniform resource identifier syntax', 'the queen was in a furious passion',
           'indentation and tabs', 'source code encoding declaration', 'percent encoding',
           'maximum line length', 'white rabbit', 'naming conventions', 'scheme authority path',
           'russian text', 'relative reference resolution', 'comments in code',
           'mock turtle', 'imports at the top', 'fragment identifier', 'hatter and hare',
           'utf-8 default', 'query component', 'whitespace in expressions', 'cheshire cat']


def _copy(folder, names=FILES[:4]):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(CORPUS / 'text' / name, folder / name)
    return folder


def _run(src, out, *extra, check=True):
    return ragbeam('run', '--input', src, '--output', out, *extra, check=check)


def _report(out):
    return json.loads((out / 'report.json').read_text())


def _top_k(out, k=5):
    """The chunk ids of each query's top k, searched here with the code `ragbeam query` runs
    (one process for all the queries: a command per query costs a second and a half each)."""
    from transforms.embed import embedder_for_model
    from transforms.index import index_meta, query

    embedder = embedder_for_model(index_meta(str(out))['model'])
    return [sorted(h['chunk_id'] for h in query(str(out), embedder.embed_queries([q])[0], k))
            for q in QUERIES]


def _chunk_rows(out):
    from deltalake import DeltaTable
    return DeltaTable(str(out / 'chunks')).to_pyarrow_table(
        columns=['uri', 'chunk_id', 'text']).to_pylist()


def _chunk_rows_at(out, version):
    from deltalake import DeltaTable
    return DeltaTable(str(out / 'chunks'), version=version).to_pyarrow_table(
        columns=['uri', 'chunk_id']).to_pylist()


def _manifest_row(out, uri):
    from deltalake import DeltaTable
    row, = [r for r in DeltaTable(str(out / 'manifest')).to_pyarrow_table().to_pylist()
            if r['uri'] == uri]
    return row


def _version(out):
    from deltalake import DeltaTable
    return DeltaTable(str(out / 'chunks')).version()


@pytest.fixture
def changed_corpus(tmp_path):
    """A first run; then one object changed, one added, one deleted."""
    src = _copy(tmp_path / 'src')
    out = tmp_path / 'out'
    _run(src, out)
    with open(src / 'rfc3986.txt', 'a') as f:
        f.write('\nAn appendix added after the first run, about fragment identifiers.\n')
    shutil.copy2(CORPUS / 'text' / 'pep-0263.rst', src / 'pep-0263.rst')
    (src / 'ru-koi8-r.txt').unlink()
    return src, out


def test_an_incremental_run_equals_a_fresh_run_on_the_final_state(changed_corpus, tmp_path):
    src, out = changed_corpus
    second = _run(src, out)
    assert 'new 1, changed 1, retried 0, unchanged 2, deleted 1' in second.stdout
    fresh = tmp_path / 'fresh'
    _run(src, fresh)
    check_output(out, '--input', src)
    check_output(out, '--same-as', fresh)
    report, other = _report(out), _report(fresh)
    assert report['index']['count'] == other['index']['count'] == report['chunks']
    assert report['index']['table_version'] == _version(out) == 1
    assert _top_k(out) == _top_k(fresh)
    # the first version's index is kept: queries --as-of 0 search it, and read its rows
    first = {r['chunk_id'] for r in _chunk_rows_at(out, 0)}
    for q in QUERIES[:5]:
        old = json.loads(ragbeam('query', '--output', out, '--json', '--as-of', '0', q).stdout)
        assert old and {h['chunk_id'] for h in old} <= first
    deleted = str(src / 'ru-koi8-r.txt')
    for as_of, found in (([], False), (['--as-of', '0'], True)):  # deleted in version 1
        hits = json.loads(ragbeam('query', '--output', out, '--json', '--uri-prefix', deleted,
                                  *as_of, 'text').stdout)
        assert bool(hits) == found
    gone = ragbeam('query', '--output', out, '--as-of', '7', 'percent', check=False)
    assert gone.returncode == 2 and 'no index of table version 7 is kept' in gone.stderr
    assert 'kept: 0, 1' in gone.stderr


def test_an_incremental_run_reads_and_embeds_only_what_changed(changed_corpus):
    src, out = changed_corpus
    _run(src, out)
    report = _report(out)
    changed = [src / 'rfc3986.txt', src / 'pep-0263.rst']
    assert 0 < report['bytes_read'] <= 1.2 * sum(p.stat().st_size for p in changed)
    rows = _chunk_rows(out)
    expected = sum(1 for r in rows if r['uri'] in {str(p) for p in changed})
    assert report['chunks_embedded'] == expected
    assert report['run']['chunks_removed'] > 0 and report['run']['objects_deleted'] == 1


def test_a_rerun_of_an_unchanged_bucket_reads_and_commits_nothing(tmp_path):
    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    before = (_version(out), _report(out)['index'])
    proc = _run(src, out)
    report = _report(out)
    assert report['bytes_read'] == 0 and report['chunks_embedded'] == 0
    assert report['run']['committed'] is False and 'nothing to commit' in proc.stdout
    assert (_version(out), report['index']) == before
    check_output(out, '--input', src)


def test_changing_the_chunk_size_rechunks_everything(tmp_path):
    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    _run(src, out, '--chunk-size', '500', '--index-versions', '1')
    assert _report(out)['run']['objects_changed'] == 4
    assert sorted(p.name for p in (out / 'index').iterdir()) == ['index.json', 'lexical',
                                                                  'v00000001']
    assert [p.name for p in (out / 'index' / 'lexical').iterdir()] == ['v00000001']
    fresh = tmp_path / 'fresh'
    _run(src, fresh, '--chunk-size', '500')
    check_output(out, '--same-as', fresh)
    check_output(out, '--input', src, '--chunk-size', '500')


def test_too_many_deletes_delete_nothing(tmp_path):
    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    rows = _chunk_rows(out)
    for name in FILES[1:4]:
        (src / name).unlink()
    proc = _run(src, out, check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ragbeam: error: this run would delete 3 of 4 committed objects')
    assert _version(out) == 0 and _chunk_rows(out) == rows
    # the user says so: the deletes go through
    _run(src, out, '--max-delete-fraction', '1')
    assert {r['uri'] for r in _chunk_rows(out)} == {str(src / FILES[0])}


def test_an_emptied_input_folder_deletes_nothing(tmp_path):
    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    for name in FILES[:4]:
        (src / name).unlink()
    proc = _run(src, out, check=False)
    assert proc.returncode == 2 and 'matches no files' in proc.stderr
    assert _version(out) == 0 and len({r['uri'] for r in _chunk_rows(out)}) == 4


def test_objects_outside_the_input_patterns_are_never_touched(tmp_path):
    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    _run(src / 'rfc3986.txt', out)  # a narrower pattern: nothing else is deleted
    assert _report(out)['run']['objects_deleted'] == 0
    assert len({r['uri'] for r in _chunk_rows(out)}) == 4


def test_an_object_that_fails_keeps_its_old_rows_and_is_retried(tmp_path):
    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    target = str(src / 'pep-0008.rst')
    old = sorted(r['chunk_id'] for r in _chunk_rows(out) if r['uri'] == target)
    (src / 'pep-0008.rst').write_bytes(bytes(range(256)) * 64)  # no text encoding fits
    _run(src, out)
    report = _report(out)
    assert report['run']['objects_read_failed'] == 1
    assert sorted(r['chunk_id'] for r in _chunk_rows(out) if r['uri'] == target) == old
    again = _run(src, out)  # retried: read again, still failing, old rows still there
    assert 'changed 1' in again.stdout and _report(out)['run']['objects_read_failed'] == 1
    shutil.copy2(CORPUS / 'text' / 'pep-0008.rst', src / 'pep-0008.rst')
    os.utime(src / 'pep-0008.rst')
    _run(src, out)
    check_output(out, '--input', src)


def _crash(src, out, point, *extra):
    proc = subprocess.run([sys.executable, '-m', 'pipeline', 'run', '--input', str(src),
                           '--output', str(out), '--embedder', 'hash', *map(str, extra)],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, RAGBEAM_TEST_CRASH_AT=point))
    assert proc.returncode == 137, proc.stderr[-2000:]


def test_a_crash_at_any_point_leaves_the_last_version_and_the_next_run_converges(
        changed_corpus, tmp_path):
    """Killed before the chunks commit, then between the two commits, then before the index
    update: readers keep the last version until a commit, and the next run converges."""
    src, out = changed_corpus
    before = _chunk_rows(out)
    _crash(src, out, 'before-chunks-commit')
    assert _version(out) == 0 and _chunk_rows(out) == before
    assert json.loads(ragbeam('query', '--output', out, '--json', 'percent encoding').stdout)
    _crash(src, out, 'between-commits')  # chunks committed, manifest not yet
    assert _version(out) == 1
    _crash(src, out, 'before-index')  # finishes the manifest commit first, then dies
    _crash(src, out, 'index-before-switch')  # version 1's index written, not yet current
    assert _report(out)['index']['table_version'] == 0
    hits = json.loads(ragbeam('query', '--output', out, '--json', 'percent encoding').stdout)
    assert {h['chunk_id'] for h in hits} <= {r['chunk_id'] for r in before}  # version 0's rows
    _run(src, out)
    fresh = tmp_path / 'fresh'
    _run(src, fresh)
    check_output(out, '--input', src)
    check_output(out, '--same-as', fresh)
    assert _report(out)['index']['count'] == _report(fresh)['index']['count']
    assert _report(out)['index']['table_version'] == _version(out)


def test_a_commit_after_another_runs_commit_fails_and_changes_nothing(tmp_path):
    """Optimistic concurrency: a run whose view of the table is stale cannot commit."""
    from transforms.corpus import BackfillOptions, CommitError, Corpus, StagedRun
    from transforms.types import MANIFEST_SCHEMA, chunk_schema

    src, out = _copy(tmp_path / 'src'), tmp_path / 'out'
    _run(src, out)
    stale = Corpus(str(out))
    (src / 'extra.txt').write_text('another object. ' * 100)
    _run(src, out)  # the other run commits version 1
    with pytest.raises(CommitError, match='another run committed'):
        stale.commit(StagedRun('late', 'x', chunk_schema(384), MANIFEST_SCHEMA.empty_table(),
                               [str(src / 'ru-koi8-r.txt')]), BackfillOptions())
    assert _version(out) == 1


def test_history_lists_the_commits(changed_corpus):
    src, out = changed_corpus
    _run(src, out)
    rows = json.loads(ragbeam('history', '--output', out, '--json').stdout)
    assert [r['version'] for r in rows] == [1, 0]
    assert rows[0]['objects_new'] == 1 and rows[0]['objects_deleted'] == 1
    assert rows[1]['objects_new'] == 4 and rows[0]['fingerprint'] == rows[1]['fingerprint']
    text = ragbeam('history', '--output', out).stdout
    assert text.splitlines()[0].split()[:3] == ['version', 'time', 'fingerprint']


def test_duckdb_reads_the_committed_chunks_table(changed_corpus):
    import duckdb
    import duckdb_extension_delta

    src, out = changed_corpus
    _run(src, out)
    extension = next(p for p in (os.path.dirname(duckdb_extension_delta.__file__),)
                     for p in [os.path.join(root, f) for root, _, fs in os.walk(p) for f in fs
                               if f.endswith('.duckdb_extension')])
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    count, = con.execute(f"SELECT count(*) FROM delta_scan('{out / 'chunks'}')").fetchone()
    assert count == _report(out)['index']['count'] == len(_chunk_rows(out))


def test_deletes_are_scoped_as_the_listing_matches():
    """A glob's `*` stays within one path segment, as in the listing: an object below it was
    never listed by it, so it is never deleted by its absence."""
    from transforms.corpus import scope_matcher

    in_scope = scope_matcher(['/d/*.txt', 's3://b/p'])
    assert in_scope('/d/a.txt') and in_scope('s3://b/p/x/y.pdf') and in_scope('s3://b/p')
    assert not in_scope('/d/sub/a.txt') and not in_scope('s3://b/pq/x')


def test_a_date_range_backfill_rereads_only_its_window_and_deletes_nothing(tmp_path):
    src = _copy(tmp_path / 'src')
    out = tmp_path / 'out'
    old, recent = 1_700_000_000, 1_790_000_000  # 2023-11-14 and 2026-09-21, UTC
    for name in FILES[:4]:
        os.utime(src / name, (old, old))
    _run(src, out)
    before = {r['chunk_id'] for r in _chunk_rows(out) if r['uri'].endswith('pep-0008.rst')}
    for name, when in (('rfc3986.txt', recent), ('pep-0008.rst', old + 60)):
        with open(src / name, 'a') as f:
            f.write('\nA paragraph added after the first run.\n')
        os.utime(src / name, (when, when))
    shutil.copy2(CORPUS / 'text' / 'pep-0263.rst', src / 'pep-0263.rst')
    os.utime(src / 'pep-0263.rst', (old, old))  # new, but outside the window: not read
    (src / 'ru-koi8-r.txt').unlink()  # a windowed run never deletes
    second = _run(src, out, '--modified-since', '2026-01-01')
    assert ('new 0, changed 1, retried 0, unchanged 2, deleted 0, outside the window 1'
            in second.stdout), second.stdout
    report = _report(out)
    assert report['bytes_read'] == (src / 'rfc3986.txt').stat().st_size
    uris = {os.path.basename(r['uri']) for r in _chunk_rows(out)}
    assert uris == {'rfc3986.txt', 'pep-0008.rst', 'alice29-crlf.txt', 'ru-koi8-r.txt'}
    # pep-0008 changed outside the window: its committed rows stay as they were
    assert {r['chunk_id'] for r in _chunk_rows(out)
            if r['uri'].endswith('pep-0008.rst')} == before
    # the window's other end, and settings that changed: a windowed run would mix them
    third = _run(src, out, '--modified-before', '2023-11-15T00:00:00Z')
    assert 'new 1, changed 1' in third.stdout and 'deleted 0' in third.stdout
    mixed = _run(src, out, '--modified-since', '2026-01-01', '--chunk-size', '700', check=False)
    assert mixed.returncode == 2 and 'mix of old and new settings' in mixed.stderr
    bad = _run(src, out, '--modified-since', 'last tuesday', check=False)
    assert bad.returncode == 2 and 'expected an ISO date' in bad.stderr


def test_two_concurrent_runs_never_mix_and_lose_nothing(tmp_path):
    """Two real processes into one output, each with its own input: the one that finds the
    table moved on commits nothing and says so; run again, it converges to the serial state."""
    first, second = _copy(tmp_path / 'a', FILES[:2]), _copy(tmp_path / 'b', FILES[2:4])
    out = tmp_path / 'out'
    _run(first, out)

    def start(src, **env):
        return subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', '--input', str(src),
                                 '--output', str(out), '--embedder', 'hash',
                                 '--max-delete-fraction', '1'], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, **env))

    with open(first / 'rfc3986.txt', 'a') as f:
        f.write('\nA paragraph added while another run ran.\n')
    slow = start(second, RAGBEAM_TEST_DELAY_AT='before-chunks-commit:15')
    fast = start(first)
    assert fast.wait(timeout=600) == 0, fast.stderr.read()[-2000:]
    assert slow.wait(timeout=600) == 2
    assert 'another run committed' in slow.stderr.read()
    assert _version(out) == 1  # only the fast run's commit
    assert {os.path.basename(r['uri']) for r in _chunk_rows(out)} == set(FILES[:2])
    _run(second, out)  # the loser, run again
    both = tmp_path / 'both'
    _run(first, both)
    _run(second, both)
    check_output(out, '--same-as', both)
    assert _report(out)['index']['count'] == len(_chunk_rows(out))


def test_an_object_whose_rows_were_lost_before_the_commit_fails_instead_of_committing(tmp_path):
    """The commit's integrity check: staged rows per object against its reader's count (a
    runner that drops a bundle, a writer that loses rows), so a short object never commits
    as complete."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.corpus import check_staged, staging
    from transforms.types import MANIFEST_SCHEMA, Chunk, chunk_schema
    from transforms.write import chunk_table

    table = tmp_path / 'chunks'
    folder = tmp_path / os.path.relpath(staging(str(table), 'r1'), tmp_path)
    folder.mkdir(parents=True)
    vector = np.ones(4, dtype=np.float32).tobytes()
    chunks = [Chunk(f'{u}{n}', n, u, 'v1', 'text', None, n, n + 1, 'x', vector, 'm', 'utf-8')
              for u, count in (('a', 3), ('b', 2)) for n in range(count)]
    pq.write_table(chunk_table(chunks, chunk_schema(4)), folder / 'text-00000.parquet')
    manifest = pa.Table.from_pylist([
        {'uri': 'a', 'version': 'v1', 'status': 'ok', 'chunks': 3},
        {'uri': 'b', 'version': 'v1', 'status': 'ok', 'chunks': 4},
        {'uri': 'c', 'version': 'v1', 'status': 'failed', 'chunks': 0, 'reason': 'not found: x'},
    ], schema=MANIFEST_SCHEMA)
    checked, errors = check_staged([str(folder / 'text-00000.parquet')], manifest)
    rows = {r['uri']: (r['status'], r['reason']) for r in checked.table().to_pylist()}
    assert rows['a'] == ('ok', None) and rows['c'] == ('failed', 'not found: x')
    assert rows['b'][0] == 'failed' and rows['b'][1].startswith(
        'incomplete: 2 of the 4 chunks its reader counted were staged')
    assert [(e.uri, e.stage, e.error_type) for e in errors] == [('b', 'commit', 'IncompleteObject')]
