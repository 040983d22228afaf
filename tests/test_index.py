"""Index types: auto's choice, recall against exact search, shard-wise builds, filtered queries."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import apache_beam as beam
import faiss
import pyarrow as pa
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from tests.conftest import CORPUS, check_output, ragbeam
from transforms.index import Searcher, build_index, choose_type
from transforms.types import Chunk, chunk_schema
from transforms.write import chunk_table

DIM = 384


def test_auto_picks_by_count_and_memory():
    assert choose_type('auto', 50_000, DIM, 1024) == 'flat'
    assert choose_type('auto', 500_000, DIM, 1024) == 'hnsw'
    assert choose_type('auto', 5_000_000, DIM, 1024) == 'ivfpq'
    assert choose_type('hnsw', 10, DIM, 1) == 'hnsw'


def _clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors like sentence embeddings: clusters in a low-dimensional subspace, plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((48, DIM)).astype(np.float32)
    centres = rng.standard_normal((512, 48)).astype(np.float32)
    latent = centres[rng.integers(0, 512, n)] + 0.6 * rng.standard_normal((n, 48)).astype(np.float32)
    x = latent @ basis + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_chunks(folder, vectors: np.ndarray, ids: np.ndarray, files: int,
                  model: str = 'synthetic') -> None:
    """Chunk files as the sink writes them (chunk_table), of synthetic chunks and vectors."""
    folder.mkdir(parents=True)
    schema = chunk_schema(DIM)
    for n, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        chunks = [Chunk(f'{ids[i]:x}', int(ids[i]), f'file:///synthetic/{i % 97}.txt', 'v',
                        'text', None, int(i), int(i) + 1, 'x', vectors[i].tobytes(), model,
                        'utf-8') for i in part]
        pq.write_table(chunk_table(chunks, schema), folder / f'part-{n:03d}.parquet',
                       row_group_size=4096)


def _recall_at_10(output, queries: np.ndarray, truth: np.ndarray) -> float:
    _, found = Searcher(str(output)).search(queries, 10)
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    n = 100_000
    vectors, queries = np.split(_clustered(n + 200, 1), [n])  # queries from the same clusters
    ids = np.random.default_rng(2).integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    _, nearest = exact.search(queries, 10)
    root = tmp_path_factory.mktemp('synthetic')
    return vectors, ids, queries, ids[nearest], root


def _two_workers() -> beam.Pipeline:
    return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(
        ['--direct_num_workers=2', '--direct_running_mode=multi_processing']))


def test_sharded_ivfpq_build_equals_a_single_shot_build(synthetic):
    vectors, ids, queries, truth, root = synthetic
    builds = {}
    for files, shard_rows, pipeline in ((1, len(ids), None), (8, 12_500, _two_workers)):
        out = root / f'files-{files}'
        _write_chunks(out / 'chunks', vectors, ids, files)
        meta = build_index(str(out), 'ivfpq', pipeline=pipeline, shard_rows=shard_rows)
        assert meta['type'] == 'ivfpq' and meta['count'] == len(ids)
        assert len(meta['search']['rerank']) == len(ids) // shard_rows
        assert not (out / 'index' / 'v00000000' / 'shards').exists()  # merged into one on-disk file
        builds[files] = (out, Searcher(str(out)).ids())
    assert np.array_equal(builds[1][1], builds[8][1]) and np.array_equal(builds[1][1], np.sort(ids))
    for out, _ in builds.values():
        assert _recall_at_10(out, queries, truth) >= 0.95


def test_a_repeated_id_is_added_once(synthetic, tmp_path):
    vectors, ids, *_ = synthetic
    repeated = np.concatenate([ids[:3000], ids[1000:2000]])  # as a retried write could leave
    _write_chunks(tmp_path / 'chunks', vectors[:4000], repeated, 3)
    for kind in ('ivfpq', 'flat'):
        meta = build_index(str(tmp_path), kind, shard_rows=1000)
        assert meta['count'] == 3000
        assert np.array_equal(Searcher(str(tmp_path)).ids(), np.sort(ids[:3000]))
    # a rebuild leaves nothing of the earlier type's files (a plain Parquet folder has no
    # table versions: its index has one folder)
    assert sorted(p.name for p in (tmp_path / 'index').iterdir()) == ['index.json', 'lexical', 'unversioned']
    assert sorted(p.name for p in (tmp_path / 'index' / 'unversioned').iterdir()) == [
        'faiss.index', 'index.json']


def test_too_few_vectors_for_ivfpq_build_flat(synthetic, tmp_path):
    vectors, ids, *_ = synthetic
    _write_chunks(tmp_path / 'chunks', vectors[:500], ids[:500], 1)
    meta = build_index(str(tmp_path), 'ivfpq')
    assert (meta['type'], meta['requested_type'], meta['count']) == ('flat', 'ivfpq', 500)


def test_hnsw_recall(synthetic):
    vectors, ids, queries, truth, root = synthetic
    out = root / 'hnsw'
    _write_chunks(out / 'chunks', vectors[:50_000], ids[:50_000], 2)
    build_index(str(out), 'hnsw')
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors[:50_000])
    _, nearest = exact.search(queries, 10)
    assert _recall_at_10(out, queries, ids[:50_000][nearest]) >= 0.95


@pytest.fixture(scope='module')
def ivfpq_run(text_run, tmp_path_factory) -> Path:
    """A copy of the text run with its index rebuilt as ivfpq by two worker processes."""
    out = tmp_path_factory.mktemp('ivfpq') / 'out'
    shutil.copytree(text_run, out)
    ragbeam('index', '--output', out, '--index-type', 'ivfpq', '--direct_num_workers=2',
            '--direct_running_mode=multi_processing')
    return out


def test_ivfpq_over_a_run_meets_the_contracts(ivfpq_run):
    check_output(ivfpq_run, '--input', CORPUS / 'text')
    meta = json.loads((ivfpq_run / 'index' / 'index.json').read_text())
    assert meta['dir'] == 'v00000000'
    assert meta['type'] == 'ivfpq' and sorted(p.name for p in (ivfpq_run / 'index' / meta['dir']).iterdir()) == [
        'faiss.index', 'faiss.ivfdata', 'index.json', 'rerank-00000.ids.npy',
        'rerank-00000.sq8.npy', 'rerank.sq8']


@pytest.mark.parametrize('run', ['text_run', 'ivfpq_run'])
def test_a_uri_prefix_keeps_results_to_one_object(run, request):
    out = request.getfixturevalue(run)
    hits = json.loads(ragbeam('query', '--output', out, '--json', '-k', '5', '--uri-prefix',
                              str(out.parent.parent), 'uniform resource identifier').stdout)
    assert hits == []  # no object lives under the output's own folder
    uris = ds.dataset(out / 'chunks').to_table(columns=['uri']).column('uri').to_pylist()
    prefix = min(set(uris), key=lambda u: (uris.count(u) < 5, u))  # an object with 5+ chunks
    hits = json.loads(ragbeam('query', '--output', out, '--json', '-k', '5',
                              '--uri-prefix', prefix, 'uniform resource identifier').stdout)
    assert len(hits) == 5 and {h['uri'] for h in hits} == {prefix}


def _delta_rows(vectors: np.ndarray, ids: np.ndarray, rows, uri: str = '') -> pa.Table:
    """Synthetic chunk rows (of object i % 97, or all of `uri`) as the sink writes them."""
    return chunk_table([Chunk(f'{ids[i]:x}', int(ids[i]), uri or f'file:///synthetic/{i % 97}.txt', 'v',
                              'text', None, int(i), int(i) + 1, 'x', vectors[i].tobytes(),
                              'synthetic', 'utf-8') for i in rows], chunk_schema(DIM))


def test_an_incremental_commit_updates_ivfpq_masking_what_it_removed(synthetic, tmp_path):
    """Deletes (which rewrite every file holding a deleted row), appends and changed vectors:
    the update masks exactly the removed ids, adds exactly the new vectors, and stays on its
    base until those pass the rebuild fraction."""
    from deltalake import DeltaTable, write_deltalake

    vectors, ids, queries, *_ = synthetic
    n, table = 30_000, tmp_path / 'chunks'
    for rows in np.array_split(np.arange(n), 4):                             # v0-v3: 4 files
        write_deltalake(table, _delta_rows(vectors, ids, rows), mode='append')
    repeated = [i for i in range(n) if i % 97 == 5][:10]  # a retried write's repeat, elsewhere
    write_deltalake(table, _delta_rows(vectors, ids, repeated, 'file:///synthetic/again.txt'),
                    mode='append')
    built = build_index(str(tmp_path), 'ivfpq', table_version=4, rebuild_fraction=0.1)
    assert (built['built'], built['count']) == ('full', n)

    DeltaTable(table).delete("uri = 'file:///synthetic/5.txt'")             # rewrites them all
    write_deltalake(table, _delta_rows(vectors, ids, range(n, n + 500)), mode='append')
    moved = [i for i in range(n + 500) if i % 97 == 7]                        # new vectors
    DeltaTable(table).delete("uri = 'file:///synthetic/7.txt'")
    changed = vectors.copy()  # new vectors: rows of the fixture that this table never holds
    changed[moved] = vectors[50_000:50_000 + len(moved)]
    write_deltalake(table, _delta_rows(changed, ids, moved), mode='append')
    version = DeltaTable(table).version()
    meta = build_index(str(tmp_path), 'ivfpq', table_version=version, rebuild_fraction=0.1,
                       keep_versions=1)
    removed = {int(ids[i]) for i in range(n) if i % 97 == 5 and i not in repeated}
    live = sorted(set(int(i) for i in ids[:n + 500]) - removed)
    assert meta['built'] == 'update' and meta['base'] == {'dir': 'v00000004', 'table_version': 4}
    moved_in_base = [i for i in moved if i < n]
    assert meta['tombstones']['count'] == len(removed) + len(moved_in_base)
    assert meta['delta']['count'] == 500 + len(moved_in_base) and meta['count'] == len(live)
    # the base stays (an update stands on it) with --index-versions 1
    assert sorted(p.name for p in (tmp_path / 'index').iterdir()) == [
        'index.json', 'lexical', 'v00000004', f'v{version:08d}']
    # and their lexical indexes (each one whole; the base's for --as-of)
    assert sorted(p.name for p in (tmp_path / 'index' / 'lexical').iterdir()) == [
        'v00000004', f'v{version:08d}']
    searcher = Searcher(str(tmp_path))
    assert searcher.ids().tolist() == live
    scores, found = searcher.search(queries, 10)
    assert (found != -1).all() and not removed & set(found.ravel().tolist())
    # an added vector and a changed one are found by themselves, the changed one by its new value
    new_vectors = np.stack([vectors[n + 3], changed[moved[0]]])
    _, top = searcher.search(new_vectors, 1)
    assert top[:, 0].tolist() == [int(ids[n + 3]), int(ids[moved[0]])]
    # recall against exact search over the live vectors
    kept = [i for i in range(n + 500) if int(ids[i]) not in removed]
    live_vectors = changed[kept]
    live_ids = ids[kept]
    exact = faiss.IndexFlatIP(DIM)
    exact.add(live_vectors)
    _, nearest = exact.search(queries, 10)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, live_ids[nearest])]) >= 0.9

    DeltaTable(table).delete("uri < 'file:///synthetic/3'")                # past the fraction
    meta = build_index(str(tmp_path), 'ivfpq', table_version=DeltaTable(table).version(),
                       rebuild_fraction=0.1, keep_versions=1)
    assert meta['built'] == 'full' and 'base' not in meta
    assert sorted(p.name for p in (tmp_path / 'index').iterdir()) == [
        'index.json', 'lexical', f'v{DeltaTable(table).version():08d}']
    assert meta['lexical']['built'] == 'full'  # past the fraction too
