"""`ragbeam serve` over real HTTP: uvicorn started as a user would, on a free port of
127.0.0.1; search, status, uploads (the limit, safe names, the token, runs), and memory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.conftest import CORPUS, ROOT, ragbeam
from tests.servers import RagbeamServer

TOKEN = 'a-test-token-of-some-length'
FILES = ['rfc3986.txt', 'pep-0008.rst']


class Server(RagbeamServer):
    """The server, and the requests the tests make of it."""

    def request(self, path: str, data=None, headers=None, method=None):
        """(status, JSON body) of one request."""
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {},
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str):
        return self.request(path)[1]

    def upload(self, name: str, body: bytes, token: str = TOKEN, query: str = ''):
        boundary = 'ragbeamtestboundary'
        data = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                ).encode() + body + f'\r\n--{boundary}--\r\n'.encode()
        return self.request('/api/documents' + query, data, {
            'Content-Type': f'multipart/form-data; boundary={boundary}',
            **({'Authorization': f'Bearer {token}'} if token else {})}, 'POST')

    def wait_run(self, run_id: int) -> dict:
        deadline = time.time() + 300
        while time.time() < deadline:
            run = self.get(f'/api/runs/{run_id}')
            if run['state'] in ('committed', 'failed'):
                return run
            time.sleep(0.5)
        raise AssertionError(f'run {run_id} did not finish')


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """A corpus of two texts, served with uploads into a folder, behind a token."""
    root = tmp_path_factory.mktemp('serve')
    src, out, uploads = root / 'src', root / 'out', root / 'uploads'
    src.mkdir()
    for name in FILES:
        shutil.copy2(CORPUS / 'text' / name, src / name)
    ragbeam('run', '--input', src, '--output', out)
    (root / 'token').write_text(TOKEN + '\n')
    server = Server('--output', out, '--uploads', uploads, '--token-file', root / 'token',
                    '--embedder', 'hash')
    yield server, uploads
    server.stop()


def test_search_answers_json_and_a_bad_parameter_is_a_422(served):
    server, _ = served
    status, found = server.request('/api/search?' + urllib.parse.urlencode(
        {'q': 'percent-encoding of reserved characters', 'k': 3}))
    assert status == 200 and found['version'] == 0 and len(found['hits']) == 3
    hit = found['hits'][0]
    assert hit['uri'].endswith('rfc3986.txt') and hit['end'] > hit['start']
    assert {'chunk_id', 'page', 'text', 'score', 'dense_rank', 'lexical_rank'} <= set(hit)
    for bad in ('q=x&k=0', 'q=x&mode=psychic', 'k=3', 'q=x&k=many'):
        status, body = server.request('/api/search?' + bad)
        assert status == 422 and body['error'], (bad, body)
    status = server.get('/api/status')
    assert (status['chunks'], status['objects'], status['uploads']) == (
        status['last_run']['chunks'], 2, True)
    assert [c['version'] for c in server.get('/api/history')][-1] == 0


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(served):
    server, uploads = served
    spools = set(p for p in os.listdir('/tmp') if p.startswith('ragbeam-upload-'))
    status, body = server.upload('big.txt', b'a' * (60 * 2**20))  # its length said at once
    assert status == 413 and 'max-upload-bytes' in body['error']
    boundary = 'b0undary'

    def chunked():  # no Content-Length: the server counts the bytes as they stream in
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
               'filename="big.txt"\r\n\r\n').encode()
        for _ in range(60):
            yield b'a' * 2**20
        yield f'\r\n--{boundary}--\r\n'.encode()

    status, body = server.request('/api/documents', chunked(), {
        'Content-Type': f'multipart/form-data; boundary={boundary}',
        'Authorization': f'Bearer {TOKEN}'}, 'POST')
    assert status == 413 and 'max-upload-bytes' in body['error']
    assert not (uploads / 'big.txt').exists()
    assert set(p for p in os.listdir('/tmp') if p.startswith('ragbeam-upload-')) <= spools


def test_uploads_need_the_token_and_are_accepted_by_content(served):
    server, uploads = served
    assert server.upload('a.txt', b'some text', token='wrong-token-wrong-token')[0] == 401
    assert server.upload('a.txt', b'some text', token='')[0] == 401
    status, body = server.upload('picture.txt', bytes(range(256)) * 64)
    assert status == 415 and 'not text or PDF' in body['error']
    assert not any(uploads.glob('picture*')) if uploads.exists() else True


def test_uploads_are_stored_safely_indexed_together_and_searchable_after_their_run(served):
    server, uploads = served
    first = server.upload('../../etc/passwd', b'The zebra-striped lighthouse keeper '
                                              b'counts seventeen herons at dawn.\n')
    second = server.upload('notes.md', b'# Notes\n\nA quince orchard beside the canal '
                                       b'flowers in April.\n')
    assert first[0] == second[0] == 202
    assert first[1]['uri'] == str(uploads / 'passwd') and (uploads / 'passwd').is_file()
    assert first[1]['run'] == second[1]['run']  # two uploads in quick succession: one run
    run = server.wait_run(first[1]['run'])
    assert run['state'] == 'committed' and run['version'] == 1, run
    assert sorted(run['uploads']) == sorted([str(uploads / 'passwd'), str(uploads / 'notes.md')])
    hits = server.get('/api/search?' + urllib.parse.urlencode(
        {'q': 'lighthouse keeper herons', 'k': 1, 'mode': 'lexical'}))
    assert hits['version'] == 1 and hits['hits'][0]['uri'] == str(uploads / 'passwd')
    assert server.upload('notes.md', b'other notes')[0] == 409  # no overwrite...
    status, again = server.upload('notes.md', b'other notes', query='?replace=true')
    assert status == 202 and server.wait_run(again['run'])['state'] == 'committed'


def test_memory_stays_flat_over_queries_and_over_a_40_mb_upload(served):
    server, _ = served
    words = ['uri', 'scheme', 'percent', 'encoding', 'style', 'indentation', 'authority',
             'fragment', 'query', 'naming', 'comments', 'imports']

    def queries(n, start=0):
        for i in range(start, start + n):
            text = f'{words[i % 12]} {words[(i * 7) % 12]} {i}'
            server.get('/api/search?' + urllib.parse.urlencode({'q': text, 'k': 10}))

    queries(200)
    after_200 = server.rss_mb()
    queries(1800, 200)
    after_2000 = server.rss_mb()
    assert after_2000 <= after_200 * 1.05, (after_200, after_2000)
    before = server.rss_mb()
    status, body = server.upload('big-notes.txt', b'a line of an uploaded text file\n' * (
        40 * 2**20 // 32), query='?replace=true')
    assert status == 202, body
    assert server.rss_mb() - before <= 10, (before, server.rss_mb())


def test_a_server_open_beyond_loopback_needs_a_token(served, tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'ragbeam', 'serve', '--output', tmp_path,
                           '--host', '0.0.0.0'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        'ragbeam: error: --host 0.0.0.0 serves beyond this machine: give --token-file')
