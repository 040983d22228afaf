"""Buckets of many small objects: the graph and a run's memory stay flat in the number of
objects, a commit rewrites what changed, and an incremental run over a mix of changes,
adds and deletes equals a fresh run on the final state, however the listing is split."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pyarrow.parquet as pq


from bench.generate import (delete_small_objects, edit_small_objects, pick, small_object_name,
                            small_object_text, write_small_objects)
from tests.conftest import ROOT, check_output, ragbeam

N = 20_000
PER_FOLDER = 100
LEAN = ('--index-type', 'none', '--lexical-index', 'none')


def _report(out):
    return json.loads((out / 'report.json').read_text())


def _manifest_uris(out) -> set[str]:
    from deltalake import DeltaTable
    return set(DeltaTable(str(out / 'manifest')).to_pyarrow_table(columns=['uri'])
               .column('uri').to_pylist())


def _run_env(src, out, *extra, env=None):
    """`ragbeam run` in a subprocess with extra environment (test hooks)."""
    return subprocess.run([sys.executable, '-m', 'pipeline', 'run', '--input', str(src),
                           '--output', str(out), '--embedder', 'hash', *LEAN, *map(str, extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **(env or {})))


def _committed(root, n=N):
    """`n` small objects in folders of 100 under root/src, and their corpus after a first
    run in root/out (objects are named by their absolute path: a copied folder would be
    other objects)."""
    write_small_objects(root / 'src', n, PER_FOLDER)
    ragbeam('run', '--input', root / 'src', '--output', root / 'out', *LEAN)
    return root / 'src', root / 'out'


def test_the_graph_is_the_same_size_for_1000_and_20000_committed_objects(tmp_path):
    from pipeline.build import graph_bytes, prepare
    from pipeline.cli import run_options

    sizes = {}
    for name, n in (('1k', 1000), ('20k', N)):
        root = tmp_path / name
        _committed(root, n)
        opts = run_options(['--input', str(root / 'src'), '--output', str(root / 'out'),
                            '--embedder', 'hash', *LEAN])
        p, plan, corpus = prepare(opts)
        assert plan.manifest.version == 0
        sizes[name] = graph_bytes(p)
    assert abs(sizes['20k'] - sizes['1k']) < 10_000, sizes
    assert sizes['20k'] < 1 << 20, sizes


def _mix(src, edit: int):
    """1% of the objects changed in one prefix and 1% scattered, 50 added in a new folder
    and 50 among the old ones, 50 deleted here and there and one folder removed."""
    clustered, scattered = pick(N, N // 100, True), pick(N, N // 100, False, seed=edit)
    edit_small_objects(src, sorted(set(clustered) | set(scattered)), edit, PER_FOLDER)
    for i in range(50):
        for name in (f'new/a{i:03d}.txt', f'f{(i * 37) % (N // PER_FOLDER):06d}/zz{i}.txt'):
            (src / name).parent.mkdir(exist_ok=True)
            (src / name).write_text(small_object_text(N + i, edit=edit))
    gone = [i for i in pick(N, 50, False, seed=edit + 1) if i not in set(scattered)]
    delete_small_objects(src, gone, PER_FOLDER)
    shutil.rmtree(src / small_object_name(N - 1, PER_FOLDER).split('/')[0])


def test_a_mix_of_changes_equals_a_fresh_run_however_the_listing_is_split(tmp_path):
    """The same changes, listed in many ranges and in one (the latter after a kill between
    its two commits), give the tables of a fresh run on the final state."""
    src, many_out = _committed(tmp_path)
    one_out = tmp_path / 'one'
    shutil.copytree(many_out, one_out)  # the same committed corpus (its paths are relative)
    _mix(src, edit=1)
    many_src = one_src = src
    ragbeam('run', '--input', many_src, '--output', many_out, *LEAN, '--list-ranges', '64')
    report = _report(many_out)['run']
    names = [p.name for p in many_src.rglob('*.txt')]
    kept = sum(1 for n in names if n.startswith('o'))
    assert report['list_ranges'] > 16 and report['list_ranges_failed'] == 0
    assert report['objects_new'] == len(names) - kept and report['objects_deleted'] == N - kept
    assert report['objects_changed'] > N // 100
    assert report['objects_unchanged'] == kept - report['objects_changed']

    crashed = _run_env(one_src, one_out, '--list-ranges', '1',
                       env={'RAGBEAM_TEST_CRASH_AT': 'between-commits'})
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    ragbeam('run', '--input', one_src, '--output', one_out, *LEAN, '--list-ranges', '1')
    assert _report(one_out)['run']['list_ranges'] == 1

    fresh = tmp_path / 'fresh'
    ragbeam('run', '--input', many_src, '--output', fresh, *LEAN, '--list-ranges', '7')
    for out, src in ((many_out, many_src), (one_out, one_src)):
        check_output(out, '--input', src)
        check_output(out, '--same-as', fresh)
    assert _manifest_uris(many_out) == _manifest_uris(fresh)


def test_a_change_in_one_prefix_rewrites_only_the_files_around_it(tmp_path):
    from deltalake import DeltaTable

    from transforms.corpus.files import table_files
    from transforms.write import FILE_ROWS

    src, out = _committed(tmp_path)
    files = table_files(DeltaTable(str(out / 'chunks')))
    assert len(files) >= N // FILE_ROWS and all(f.rows <= FILE_ROWS for f in files)
    edit_small_objects(src, pick(N, 2 * PER_FOLDER, True), 2, PER_FOLDER)
    ragbeam('run', '--input', src, '--output', out, *LEAN)
    run = _report(out)['run']
    assert run['objects_changed'] == 2 * PER_FOLDER
    # the changed objects' rows lie in one or two files, each over a narrow URI range, and
    # only those are rewritten
    assert 1 <= run['chunk_files_rewritten'] <= 2 < len(files), (len(files), run)


def test_a_range_whose_listing_fails_deletes_nothing_and_the_next_run_does(tmp_path):
    src, out = _committed(tmp_path)
    failing, removed = 'f000010', 'f000150'
    for gone in (src / failing).iterdir():  # its objects deleted, but listing it fails
        gone.unlink()
    shutil.rmtree(src / removed)
    proc = _run_env(src, out, env={'RAGBEAM_TEST_LIST_FAIL': f'/{failing}/'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'nothing in them was deleted' in proc.stderr
    run = _report(out)['run']
    assert run['list_ranges_failed'] >= 1 and run['objects_deleted'] == PER_FOLDER
    uris = _manifest_uris(out)
    assert any(f'/{failing}/' in u for u in uris) and not any(f'/{removed}/' in u for u in uris)
    errors = [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
              for line in f.read_text().splitlines()]
    assert any(e['error_type'] == 'ListingFailed' and e['stage'] == 'list' for e in errors)

    ragbeam('run', '--input', src, '--output', out, *LEAN)
    assert _report(out)['run']['objects_deleted'] == PER_FOLDER
    assert not any(f'/{failing}/' in u for u in _manifest_uris(out))


def test_deleted_folders_count_against_max_delete_fraction_over_the_whole_run(tmp_path):
    src, out = _committed(tmp_path)
    for i in range(0, N // PER_FOLDER, 10):  # a tenth of the folders, spread over every range
        shutil.rmtree(src / f'f{i:06d}')
    proc = _run_env(src, out, '--max-delete-fraction', '0.05')
    assert proc.returncode == 2 and 'would delete 2000 of 20000' in proc.stderr, proc.stderr
    assert len(_manifest_uris(out)) == N


def test_a_first_run_and_an_unchanged_rerun_of_100k_objects_stay_under_512mb(tmp_path):
    """The whole process tree's peak, as the run's monitor samples it. The first run stages
    more manifest rows than the driver sorts at once (SPILL_ROWS): its manifest comes out of
    the external merge, whole and in uri order, in files of disjoint URI ranges."""
    from deltalake import DeltaTable

    from transforms.corpus import MANIFEST_FILE_ROWS
    from transforms.corpus.files import table_files
    from transforms.corpus.staged import SPILL_ROWS

    n = 100_000
    assert n > SPILL_ROWS
    write_small_objects(tmp_path / 'src', n, PER_FOLDER)
    ragbeam('run', '--input', tmp_path / 'src', '--output', tmp_path / 'out', *LEAN,
            timeout=900)
    first = _report(tmp_path / 'out')
    assert first['run']['objects_read'] == n and first['objects_ok'] == n
    assert first['peak_rss_mb'] < 512, first['peak_rss_mb']
    files = table_files(DeltaTable(str(tmp_path / 'out' / 'manifest')))
    assert sum(f.rows for f in files) == n and max(f.rows for f in files) <= MANIFEST_FILE_ROWS
    assert all(a.last < b.first for a, b in zip(files, files[1:]))
    for f in files:
        column = pq.read_table(f.path, columns=['uri']).column('uri').to_pylist()
        assert column == sorted(column) and (column[0], column[-1]) == (f.first, f.last)

    ragbeam('run', '--input', tmp_path / 'src', '--output', tmp_path / 'out', *LEAN,
            timeout=900)
    report = _report(tmp_path / 'out')
    assert report['run']['objects_unchanged'] == n and not report['run']['committed']
    assert report['peak_rss_mb'] < 512, report['peak_rss_mb']


def test_after_120_commits_the_tables_open_from_a_checkpoint(tmp_path):
    import numpy as np
    import pyarrow as pa
    from deltalake import DeltaTable

    from transforms.corpus import (CHECKPOINT_INTERVAL, BackfillOptions, Corpus, StagedRun,
                                   new_run_id, staging)
    from transforms.types import MANIFEST_SCHEMA, Chunk, ManifestRow, chunk_schema
    from transforms.write import chunk_table

    out = tmp_path / 'out'
    out.mkdir()
    for i in range(120):
        corpus, run_id, uri = Corpus(str(out)), new_run_id(), f'/objects/o{i:04d}.txt'
        path = os.path.join(staging(corpus.chunks_path, run_id), 'chunks.parquet')
        os.makedirs(os.path.dirname(path))
        import pyarrow.parquet as pq
        pq.write_table(chunk_table([Chunk(f'c{i}', i, uri, 'v1', 'text', None, 0, 5, 'hello',
                                          np.ones(8, np.float32).tobytes(), 'm')],
                                   chunk_schema(8)), path)
        row = ManifestRow(uri, 5, 'v1', 'ok', 1, 5, None, 'text', 'utf-8')
        corpus.commit(StagedRun(run_id, 'f', chunk_schema(8), pa.Table.from_pylist(
            [asdict(row)], schema=MANIFEST_SCHEMA), written=[path]), BackfillOptions())
    for table in ('chunks', 'manifest'):
        log = out / table / '_delta_log'
        last = json.loads((log / '_last_checkpoint').read_text())['version']
        after = [f for f in log.glob('*.json') if int(f.stem) > last]
        assert last >= 120 - CHECKPOINT_INTERVAL and len(after) < 20, (last, len(after))
        assert DeltaTable(str(out / table)).to_pyarrow_table().num_rows == 120


def test_compact_rewrites_small_files_and_the_index_follows(tmp_path):
    """Nightly runs that each change a few objects leave small chunk files; `ragbeam
    compact` rewrites them into fewer, sorted files in one commit: the same rows, a query
    finds the same chunks, and the index names the new table version."""
    from deltalake import DeltaTable

    n = 2000
    write_small_objects(tmp_path / 'src', n, PER_FOLDER)
    out = tmp_path / 'out'
    ragbeam('run', '--input', tmp_path / 'src', '--output', out, '--index-type', 'flat')
    for night in range(1, 6):
        edit_small_objects(tmp_path / 'src', pick(n, 7, False, seed=night), night, PER_FOLDER)
        ragbeam('run', '--input', tmp_path / 'src', '--output', out, '--index-type', 'flat')
    before_files = len(DeltaTable(str(out / 'chunks')).file_uris())
    before_rows = sorted(DeltaTable(str(out / 'chunks')).to_pyarrow_table(
        columns=['chunk_id']).column('chunk_id').to_pylist())
    query = ('query', '--output', out, '--json', '-k', '3', 'Object 1234 edit 0')
    hits = [h['chunk_id'] for h in json.loads(ragbeam(*query).stdout)]
    done = ragbeam('compact', '--output', out).stdout
    assert 'compacted' in done, done
    table = DeltaTable(str(out / 'chunks'))
    assert len(table.file_uris()) < before_files
    assert sorted(table.to_pyarrow_table(columns=['chunk_id']).column('chunk_id')
                  .to_pylist()) == before_rows
    assert json.loads((out / 'index' / 'index.json').read_text())['table_version'] == \
        table.version() == 6
    assert [h['chunk_id'] for h in json.loads(ragbeam(*query).stdout)] == hits
    check_output(out, '--input', tmp_path / 'src')
    assert 'nothing to compact' in ragbeam('compact', '--output', out).stdout


def test_a_flat_folder_is_cut_into_even_ranges_that_each_hold_their_share(tmp_path):
    """A folder of many files and no sub-folders: the planner's names are spread over the
    whole folder (not its first names), each range's listing holds only its own entries,
    and the ranges together list every file once, in URI order; a run listed in 8 ranges
    equals one listed in 1."""
    from transforms.store import LocalStore, store_for

    n = 3000
    write_small_objects(tmp_path / 'src', n, per_folder=n)
    (flat,) = [p for p in (tmp_path / 'src').iterdir()]
    root = str(flat) + '/'
    store = store_for(root)
    assert isinstance(store, LocalStore)
    everything = [r.uri for r in store.walk(root, None, None)]
    assert len(everything) == n and everything == sorted(everything)
    kids = store.children(root, 100)
    assert len(kids) == 100 and kids == sorted(kids) and kids == store.children(root, 100)
    spots = [everything.index(root + k) for k in kids]
    assert spots[0] < n // 10 and spots[-1] > n - n // 10  # spread, not the first 100
    cuts = [None] + [root + k for k in kids[::10]] + [None]
    listed = []
    for lo, hi in zip(cuts, cuts[1:]):
        held = store._entries(root, lo, hi)
        part = [r.uri for r in store.walk(root, lo, hi)]
        assert len(held) == len(part) < n // 3
        listed += part
    assert listed == everything

    ragbeam('run', '--input', flat, '--output', tmp_path / 'eight', *LEAN, '--list-ranges', '8')
    assert _report(tmp_path / 'eight')['run']['list_ranges'] == 8
    ragbeam('run', '--input', flat, '--output', tmp_path / 'one', *LEAN, '--list-ranges', '1')
    check_output(tmp_path / 'eight', '--input', flat)
    check_output(tmp_path / 'eight', '--same-as', tmp_path / 'one')
