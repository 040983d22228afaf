"""The staged manifest of a run: its stats records merged by an external sort (spilled
and merged in uri order) as a single merge would, in a bounded Arrow pool, and streamed into
the manifest files by the commit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from tests.conftest import ROOT


def _stats_files(folder, objects: int, files: int, seed: int = 3) -> list[str]:
    """Stats records of `objects` objects in random order over `files` Parquet files: some
    objects have several records (read in splits), a few failed or were skipped."""
    import random

    import pyarrow as pa

    from transforms.manifest import STATS_SCHEMA

    rng = random.Random(seed)
    rows = []
    for i in range(objects):
        uri = f'/bucket/{rng.randrange(10 ** 9):09d}-{i}.txt'
        for _ in range(rng.choice((1, 1, 1, 2, 5))):
            status = rng.choice(('failed', 'skipped')) if rng.random() < 0.02 else None
            rows.append({'uri': uri, 'size': 650, 'version': 'v1', 'chunks': rng.randrange(4),
                         'bytes_read': 650, 'errors': 0, 'ocr_needed': 0, 'status': status,
                         'reason': f'reason {rng.randrange(3)}' if status else None,
                         'encoding': 'utf-8', 'kind': 'text'})
    rng.shuffle(rows)
    table = pa.Table.from_pylist(rows, schema=STATS_SCHEMA)
    paths = []
    for n in range(files):
        path = str(folder / f'stats-{n}.parquet')
        start, end = n * len(rows) // files, (n + 1) * len(rows) // files
        pq.write_table(table.slice(start, end - start), path, row_group_size=3000)
        paths.append(path)
    return paths


def test_the_staged_manifest_merges_as_one_table_would_however_much_it_spills(tmp_path):
    """The external merge (sorted spills, merged in uri order) gives the rows, the totals and
    the failed objects that merging all the stats records at once gives."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.corpus.staged import StagedManifest, Totals
    from transforms.manifest import merge_stats

    paths = _stats_files(tmp_path, 20_000, 7)
    whole = merge_stats(pa.concat_tables([pq.read_table(p) for p in paths]))
    failed = sorted(whole.filter(pc.equal(whole['status'], 'failed'))['uri'].to_pylist())
    assert failed and whole.num_rows == 20_000
    for spill_rows in (None, 5000, 1500, 100):
        with StagedManifest.from_stats(paths, spill_rows) as staged:
            assert staged.table().equals(whole), spill_rows
            assert staged.totals == Totals.of(whole)
            assert sorted(staged.failed.to_pylist()) == failed
            assert staged.table('f').column('fingerprint').unique().to_pylist() == ['f']
            spilled = staged._folder
        assert spilled is None or not os.path.exists(spilled)


def test_the_staged_manifest_of_400k_objects_is_merged_in_a_bounded_arrow_pool(tmp_path):
    """The driver's merge holds a spill's worth of rows, not the run's: Arrow's peak
    allocation while 400,000 objects' records merge stays under 48 MB (merged all at once,
    the same records need more than twice that)."""
    import numpy as np
    import pyarrow as pa

    from transforms.manifest import STATS_SCHEMA

    n = 400_000
    order = np.random.default_rng(5).permutation(n)
    given = {'uri': pa.array([f'/bucket/f{i // 100:06d}/o{i:09d}.txt' for i in order]),
             'size': pa.array(np.full(n, 650)), 'version': pa.array(['v1'] * n),
             'chunks': pa.array(np.ones(n, np.int64)), 'bytes_read': pa.array(np.full(n, 650)),
             'kind': pa.array(['text'] * n), 'encoding': pa.array(['utf-8'] * n)}
    table = pa.table([given.get(f.name, pa.nulls(n, f.type)).cast(f.type)
                      for f in STATS_SCHEMA], schema=STATS_SCHEMA)
    paths = []
    for k in range(4):
        paths.append(str(tmp_path / f'stats-{k}.parquet'))
        pq.write_table(table.slice(k * n // 4, n // 4), paths[-1], row_group_size=4096)
    code = ('import sys, pyarrow as pa\n'
            'from transforms.corpus.staged import StagedManifest\n'
            'with StagedManifest.from_stats(sys.argv[1:]) as staged:\n'
            '    rows = sum(b.num_rows for b in staged.batches("f"))\n'
            'print(rows, pa.default_memory_pool().max_memory())\n')
    proc = subprocess.run([sys.executable, '-c', code, *paths], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=True)
    rows, peak = map(int, proc.stdout.split())
    assert rows == 400_000
    assert peak < 48 << 20, peak


def test_a_commit_merges_a_staged_manifest_of_any_size_into_the_manifest_files(tmp_path):
    """The manifest side of a re-run's commit streams: the staged rows (here from the
    external merge's file) are cut at the committed files' ranges and merged file by file,
    a batch at a time. Changes, adds before, between and after every committed file (more
    than a file's worth after the last), deletes, a failure that keeps its old row and one
    whose object was new give the rows a plain recount gives, in files of disjoint ranges."""
    import pyarrow as pa
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import create_table_with_add_actions

    from transforms.corpus.files import table_files
    from transforms.corpus.layout import MANIFEST_FILE_ROWS, Dropped, rewrite_manifest
    from transforms.corpus.staged import StagedManifest
    from transforms.manifest import STATS_SCHEMA, merge_stats
    from transforms.types import MANIFEST_SCHEMA

    table = str(tmp_path / 'manifest')

    def row(uri, version, status=None):
        return {'uri': uri, 'size': 1, 'version': version, 'chunks': 0 if status else 1,
                'bytes_read': 1, 'errors': 0, 'ocr_needed': 0, 'status': status,
                'reason': 'broken' if status else None, 'encoding': 'utf-8', 'kind': 'text'}

    committed = [f'/b/m{i:06d}' for i in range(0, 140_000, 2)]  # 70,000 rows: 3 files
    first = rewrite_manifest(table, [], os.path.join(table, 'run-1'), StagedManifest(
        merge_stats(pa.Table.from_pylist([row(u, 'v1') for u in committed], STATS_SCHEMA))),
        'f1', [])
    create_table_with_add_actions(table, Schema.from_arrow(MANIFEST_SCHEMA), first.adds,
                                  mode='error')
    files = table_files(DeltaTable(table))
    assert [f.rows for f in files] == [MANIFEST_FILE_ROWS, MANIFEST_FILE_ROWS, 4464]
    staged_rows = ([row(f'/b/a{i:06d}', 'v2') for i in range(50)]  # before every file
                   + [row(f'/b/m{i:06d}', 'v2') for i in range(1, 400, 2)]  # between rows
                   + [row(f'/b/m{i:06d}', 'v2') for i in range(1000, 1100, 2)]  # changed
                   + [row('/b/m002000', 'v2', 'failed'),  # keeps its ok row
                      row('/b/m000003', 'v2', 'failed'),  # new and failed: a failed row
                      row('/b/m080000', 'v2', 'failed')]  # the second file's only change
                   + [row(f'/b/z{i:06d}', 'v2') for i in range(MANIFEST_FILE_ROWS + 500)])
    paths = []
    for n in range(3):
        path = str(tmp_path / f'stats-{n}.parquet')
        pq.write_table(pa.Table.from_pylist(staged_rows[n::3], STATS_SCHEMA), path)
        paths.append(path)
    deleted = ([f'/b/m{i:06d}' for i in range(132_000, 132_100, 2)]
               + ['/b/m080001', '/b/never'])  # never committed
    with StagedManifest.from_stats(paths, spill_rows=5000) as staged:
        assert staged._rows is None  # from the spills' merged file
        rewrite = rewrite_manifest(table, files, os.path.join(table, 'run-2'), staged, 'f2', deleted)
        dropped = Dropped(deleted, staged).between('/b/m001000', '/b/m001098')
        assert sorted(dropped.to_pylist()) == [f'/b/m{i:06d}' for i in range(1000, 1100, 2)]

    got = pa.concat_tables([pq.read_table(os.path.join(table, a.path)) for a in rewrite.adds])
    expect = {u: 'v1' for u in committed}
    for r in staged_rows:
        if not (r['status'] and r['uri'] in expect):
            expect[r['uri']] = r['version']
    for u in deleted:
        expect.pop(u, None)
    assert [a.path for a in rewrite.removes] == [os.path.relpath(files[n].path, table)
                                                 for n in (0, 2)]
    unchanged = pq.read_table(files[1].path)
    got = pa.concat_tables([got, unchanged.select(got.column_names)]).sort_by('uri')
    assert dict(zip(got['uri'].to_pylist(), got['version'].to_pylist())) == expect
    assert got['uri'].to_pylist() == sorted(expect) and rewrite.rows == len(expect)
    bounds = sorted([(json.loads(a.stats)['minValues']['uri'],
                      json.loads(a.stats)['maxValues']['uri']) for a in rewrite.adds]
                    + [(files[1].first, files[1].last)])
    assert all(a[1] < b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(json.loads(a.stats)['numRecords'] for a in rewrite.adds) <= MANIFEST_FILE_ROWS
    fingerprints = dict(zip(got['uri'].to_pylist(), got['fingerprint'].to_pylist()))
    assert fingerprints['/b/z000000'] == 'f2' and fingerprints['/b/m002000'] == 'f1'
