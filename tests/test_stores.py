"""S3 (moto's HTTP server, a fault-injecting proxy) and GCS (emulator): same chunks as local."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import CORPUS, check_output, ragbeam
from tests.servers import FaultProxy
from transforms.store import (GCSStore, ObjectChangedError, ObjectNotFoundError, S3Store,
                              StoreConfig, glob_to_prefix)


def chunk_set(out: Path) -> set:
    """(path relative to the corpus folder, start, end, text) of every chunk of the table's
    current version (its log's files: a compacted folder still holds the old ones)."""
    from deltalake import DeltaTable

    table = DeltaTable(str(out / 'chunks')).to_pyarrow_dataset().to_table(
        columns=['uri', 'start', 'end', 'text'])
    return {(uri.split('/text/', 1)[1], s, e, t) for uri, s, e, t in zip(
        *(table.column(c).to_pylist() for c in ('uri', 'start', 'end', 'text')))}


def manifest(out: Path) -> dict:
    return {r['uri'].rsplit('/', 1)[1]: r for r in ds.dataset(out / 'manifest').to_table().to_pylist()}


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
            for line in f.read_text().splitlines()]


def test_glob_patterns():
    prefix, matches = glob_to_prefix('docs/*/a?.txt')
    assert prefix == 'docs/' and matches('docs/x/ab.txt') and not matches('docs/x/y/ab.txt')
    prefix, matches = glob_to_prefix('docs/**.md')
    assert prefix == 'docs/' and matches('docs/a/b/c.md') and not matches('docs/a.txt')
    prefix, matches = glob_to_prefix('docs/sub')
    assert matches('docs/sub') and matches('docs/sub/x') and not matches('docs/subway')


def test_s3_gives_the_same_chunks_as_local(s3, text_run, tmp_path):
    out = tmp_path / 's3'
    ragbeam('run', '--input', 's3://corpus/text/**', '--output', out,
            '--s3-endpoint-url', s3.endpoint)
    check_output(out, '--input', CORPUS / 'text')
    assert chunk_set(out) == chunk_set(text_run)
    report = json.loads((out / 'report.json').read_text())
    assert report['objects_ok'] == 22 and report['bytes_read'] == report['bytes_listed']


def test_faults_are_retried_and_change_nothing(s3, text_run, tmp_path):
    proxy = FaultProxy(s3.port)
    try:
        out = tmp_path / 'faulty'
        ragbeam('run', '--input', 's3://corpus/text/**', '--output', out,
                '--s3-endpoint-url', proxy.endpoint, '--split-bytes', '262144',
                '--window-bytes', '65536')
    finally:
        proxy.stop()
    assert proxy.faults_injected >= 10
    assert chunk_set(out) == chunk_set(text_run)
    report = json.loads((out / 'report.json').read_text())
    assert report['objects_ok'] == 22
    assert report['counters']['store_retries'] >= proxy.faults_injected


def test_changed_and_deleted_objects_fail_cleanly(s3, tmp_path):
    client = s3.client()
    for name in ('changed', 'deleted', 'kept'):
        client.put_object(Bucket='corpus', Key=f'mut/{name}.txt', Body=f'{name} text. ' * 200)
    proxy = FaultProxy(s3.port, faults=False)
    proxy.hooks['mut/changed.txt'] = lambda: client.put_object(
        Bucket='corpus', Key='mut/changed.txt', Body=b'a new version ' * 300)
    proxy.hooks['mut/deleted.txt'] = lambda: client.delete_object(Bucket='corpus', Key='mut/deleted.txt')
    try:
        out = tmp_path / 'mut'
        ragbeam('run', '--input', 's3://corpus/mut/**', '--output', out,
                '--s3-endpoint-url', proxy.endpoint)
    finally:
        proxy.stop()
    rows = manifest(out)
    assert rows['kept.txt']['status'] == 'ok' and rows['kept.txt']['chunks'] >= 1
    assert rows['changed.txt']['status'] == 'failed'
    assert rows['changed.txt']['reason'].startswith('changed during read')
    assert rows['deleted.txt']['status'] == 'failed' and rows['deleted.txt']['reason'].startswith('not found')
    kinds = {e['uri'].rsplit('/', 1)[1]: (e['stage'], e['error_type']) for e in errors(out)}
    assert kinds == {'changed.txt': ('read', 'ObjectChangedError'),
                     'deleted.txt': ('read', 'ObjectNotFoundError')}
    uris = set(ds.dataset(out / 'chunks').to_table(columns=['uri']).column('uri').to_pylist())
    assert uris == {'s3://corpus/mut/kept.txt'}


def test_s3_reads_are_pinned_and_exact(s3):
    client = s3.client()
    client.put_object(Bucket='corpus', Key='pin/a.txt', Body=b'0123456789' * 100)
    store = S3Store(StoreConfig(s3_endpoint_url=s3.endpoint, max_attempts=2))
    ref = next(store.list('s3://corpus/pin/a.txt'))
    assert (ref.size, store.read_range(ref, 5, 15)) == (1000, b'5678901234')
    assert store.read_range(ref, 990, 5000) == b'0123456789'
    client.put_object(Bucket='corpus', Key='pin/a.txt', Body=b'changed')
    with pytest.raises(ObjectChangedError):
        store.read_range(ref, 0, 10)
    client.delete_object(Bucket='corpus', Key='pin/a.txt')
    with pytest.raises(ObjectNotFoundError):
        store.read_range(ref, 0, 10)


def test_listing_5000_keys_asks_for_one_page_at_a_time(s3):
    """Each page of 1,000 keys is asked for only once the one before it has been consumed, so
    a listing holds one page, however many keys match. (Its memory cannot be measured here
    apart from moto's, which serves the pages in this process: 10 MB a page under tracemalloc.)"""
    s3.client().create_bucket(Bucket='many')
    s3.put_many('many', (f'k/{i:06d}.txt' for i in range(5000)), b'x')
    store = S3Store(StoreConfig(s3_endpoint_url=s3.endpoint))
    asked = []
    list_page = store._client.list_objects_v2
    store._client.list_objects_v2 = lambda **kw: asked.append(kw) or list_page(**kw)
    listing = store.list('s3://many/k/**')
    pages_when = [(next(listing), len(asked))[1] for _ in range(2500)]
    assert pages_when == [i // 1000 + 1 for i in range(2500)]
    assert 2500 + sum(1 for _ in listing) == 5000 and len(asked) == 5
    assert all(kw['MaxKeys'] == 1000 for kw in asked)


def test_beams_s3_filesystem_shares_one_boto3_client_per_setting(s3):
    """Beam's S3IO made a new boto3 session and client for every call (0.3-0.5 s each); after
    share_beam_s3_clients, S3IOs of one setting share one boto3 client, and each keeps its own
    download state: two files read interleaved come back whole."""
    from apache_beam.io.aws import s3io
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.store import share_beam_s3_clients

    share_beam_s3_clients()
    share_beam_s3_clients()  # idempotent
    options = PipelineOptions([f'--s3_endpoint_url={s3.endpoint}'])
    a, b = s3io.S3IO(options=options), s3io.S3IO(options=options)
    assert a.client is not b.client and a.client.client is b.client.client
    other = s3io.S3IO(options=PipelineOptions([f'--s3_endpoint_url={s3.endpoint}',
                                               '--s3_region_name=eu-west-1']))
    assert other.client.client is not a.client.client
    bodies = {'one': os.urandom(3 << 20), 'two': os.urandom(3 << 20)}
    for name, body in bodies.items():
        s3.client().put_object(Bucket='corpus', Key=f'shared/{name}', Body=body)
    with a.open('s3://corpus/shared/one', read_buffer_size=1 << 20) as one, \
            b.open('s3://corpus/shared/two', read_buffer_size=1 << 20) as two:
        parts = {'one': [], 'two': []}
        while True:
            got = [one.read(1 << 19), two.read(1 << 19)]
            if not any(got):
                break
            parts['one'].append(got[0])
            parts['two'].append(got[1])
    assert {k: b''.join(v) for k, v in parts.items()} == bodies


def test_outputs_on_s3_and_query_from_s3(s3, tmp_path):
    s3.client().create_bucket(Bucket='results')
    ragbeam('run', '--input', CORPUS / 'text', '--output', 's3://results/run1',
            '--s3-endpoint-url', s3.endpoint)
    s3.client().put_object(Bucket='results', Key='run1/chunks/stale-from-an-old-run.parquet',
                           Body=b'not parquet')  # not in the Delta log: no reader sees it
    proc = ragbeam('run', '--input', CORPUS / 'text', '--output', 's3://results/run1',
                   '--s3-endpoint-url', s3.endpoint)  # incremental: nothing changed
    assert 'nothing to commit, table version 0' in proc.stdout
    local = tmp_path / 'copy'
    s3.download_tree('results', 'run1', local)
    check_output(local, '--input', CORPUS / 'text')
    hits = json.loads(ragbeam('query', '--output', 's3://results/run1', '--s3-endpoint-url',
                              s3.endpoint, '--json', '-k', '3', 'uniform resource identifier').stdout)
    assert hits and hits[0]['uri'].endswith('rfc3986.txt')
    # ivfpq's shard stage, merge and memory-mapped search, through the bucket
    ragbeam('index', '--output', 's3://results/run1', '--s3-endpoint-url', s3.endpoint,
            '--index-type', 'ivfpq')
    keys = [o['Key'] for o in s3.client().list_objects_v2(
        Bucket='results', Prefix='run1/index/')['Contents']]
    assert 'run1/index/v00000000/faiss.ivfdata' in keys and not any('shards/' in k or 'trained' in k
                                                         for k in keys), keys
    again = json.loads(ragbeam('query', '--output', 's3://results/run1', '--s3-endpoint-url',
                               s3.endpoint, '--json', '-k', '3', 'uniform resource identifier').stdout)
    assert again[0]['chunk_id'] == hits[0]['chunk_id']
    # queries search a local copy of the bucket's index (and of its lexical index), fetched
    # again when it changes
    copies = list(Path(os.environ['RAGBEAM_CACHE']).iterdir())
    cached, = [c for c in copies if (c / 'faiss.ivfdata').exists()]
    lexical, = [c for c in copies if c != cached]
    assert (lexical / 'meta.json').exists() and (lexical / 'ids.npy').exists()
    ragbeam('index', '--output', 's3://results/run1', '--s3-endpoint-url', s3.endpoint,
            '--index-type', 'flat')
    ragbeam('query', '--output', 's3://results/run1', '--s3-endpoint-url', s3.endpoint, 'URI')
    assert sorted(p.name for p in cached.iterdir()) == ['.stamp', 'faiss.index', 'index.json']


def test_gcs_gives_the_same_chunks_as_local(gcs, text_run, tmp_path):
    out = tmp_path / 'gcs'
    ragbeam('run', '--input', 'gs://corpus/text/**', '--output', out)
    check_output(out, '--input', CORPUS / 'text')
    assert chunk_set(out) == chunk_set(text_run)


def test_a_corpus_on_gcs_equals_a_local_run_and_every_command_works_on_it(gcs, text_run,
                                                                          tmp_path):
    """--output gs://: the Delta tables, the indexes, staging and the commit through the
    emulator (found through STORAGE_EMULATOR_HOST, as google-cloud-storage finds it); query,
    history, report and compact read and write there, and DuckDB reads the chunk table."""
    gcs.create_bucket('results')
    out = 'gs://results/run1'
    ragbeam('run', '--input', 'gs://corpus/text/[a-p]*', '--output', out)
    second = ragbeam('run', '--input', 'gs://corpus/text/**', '--output', out)
    assert 'new 8, changed 0, retried 0, unchanged 14' in second.stdout, second.stdout
    compacted = ragbeam('compact', '--output', out)  # the two runs' small files, merged
    assert 'table version 2' in compacted.stdout, compacted.stdout
    local = tmp_path / 'copy'
    gcs.download_tree('results', 'run1', local)
    check_output(local, '--input', CORPUS / 'text')
    assert chunk_set(local) == chunk_set(text_run)
    hits = json.loads(ragbeam('query', '--output', out, '--json', '-k', '3',
                              'percent-encoding of reserved characters').stdout)
    assert len(hits) == 3 and all(h['uri'].startswith('gs://corpus/text/') for h in hits)
    history = json.loads(ragbeam('history', '--output', out, '--json').stdout)
    assert [r['version'] for r in history] == [2, 1, 0]
    assert 'objects' in ragbeam('report', '--output', out).stdout
    import duckdb
    import duckdb_extension_delta
    import duckdb_extension_httpfs

    con = duckdb.connect()
    for package in (duckdb_extension_httpfs, duckdb_extension_delta):  # offline: from PyPI
        folder = os.path.dirname(package.__file__)
        con.execute(f"LOAD '{next(Path(folder).rglob('*.duckdb_extension'))}'")
    con.execute(f"CREATE SECRET emulator (TYPE GCS, KEY_ID 'none', SECRET 'none', ENDPOINT "
                f"'{gcs.endpoint.split('//')[1]}', URL_STYLE 'path', USE_SSL false)")
    count, = con.execute(f"SELECT count(*) FROM delta_scan('{out}/chunks')").fetchone()
    from deltalake import DeltaTable
    assert count == DeltaTable(str(local / 'chunks')).to_pyarrow_dataset().count_rows() > 2000


def test_without_google_credentials_a_gcs_output_is_one_line_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (
        'STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS')}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'), NO_GCE_CHECK='True')
    for args in (('run', '--input', CORPUS / 'text', '--output', 'gs://results/x'),
                 ('query', '--output', 'gs://results/x', 'text')):
        proc = ragbeam(*args, check=False, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr
        line, = [l for l in proc.stderr.splitlines() if l.startswith('ragbeam: error:')]
        assert 'gs://results/x: no Google Cloud credentials found' in line


def test_gcs_reads_are_exact_and_deleted_objects_are_not_found(gcs):
    bucket = gcs.client().bucket('corpus')
    bucket.blob('pin/a.txt').upload_from_string(b'0123456789' * 100)
    store = GCSStore(StoreConfig(max_attempts=2))
    ref = next(store.list('gs://corpus/pin/a.txt'))
    assert ref.size == 1000 and int(ref.version) > 0
    assert store.read_range(ref, 5, 15) == b'5678901234'
    bucket.blob('pin/a.txt').delete()
    with pytest.raises(ObjectNotFoundError):
        store.read_range(ref, 0, 10)


def test_the_query_cache_keeps_only_the_index_versions_the_bucket_keeps(s3, tmp_path,
                                                                        monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms import outputs
    from transforms.index.files import cached_copy

    client = s3.client()
    client.create_bucket(Bucket='cache')
    for version in ('v00000001', 'v00000002'):
        client.put_object(Bucket='cache', Key=f'out/index/{version}/index.json', Body=b'{}')
    monkeypatch.setenv('RAGBEAM_CACHE', str(tmp_path / 'cache'))
    outputs.configure(PipelineOptions([f'--s3_endpoint_url={s3.endpoint}']),
                      StoreConfig(s3_endpoint_url=s3.endpoint))
    try:
        one = cached_copy('s3://cache/out/index/v00000001')
        two = cached_copy('s3://cache/out/index/v00000002')
        assert os.path.isfile(os.path.join(one, 'index.json')) and one != two
        client.delete_object(Bucket='cache', Key='out/index/v00000001/index.json')  # pruned
        client.put_object(Bucket='cache', Key='out/index/v00000003/index.json', Body=b'{}')
        three = cached_copy('s3://cache/out/index/v00000003')
    finally:
        outputs.configure(PipelineOptions([]), StoreConfig())
    assert sorted(os.listdir(tmp_path / 'cache')) == sorted(os.path.basename(f)
                                                            for f in (two, three))
