"""Local servers for tests: moto's S3, a fault-injecting proxy, a GCS emulator, and
`ragbeam serve` itself.

MotoS3 and FakeGCS answer the same calls (create_bucket, put, put_bodies, delete,
upload_tree, download_tree, endpoint_args), so that a test can run on either.

Everything listens on 127.0.0.1 and is started and stopped by the tests themselves.
"""
from __future__ import annotations

import http.client
import logging
import os
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
S3_ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
          'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_EC2_METADATA_DISABLED': 'true'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's threaded HTTP server: a real S3 endpoint on 127.0.0.1."""
    scheme = 's3'

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger('werkzeug').setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f'http://{host}:{port}'
        self.port = port
        self.endpoint_args = ('--s3-endpoint-url', self.endpoint)

    def client(self, **kwargs):
        import boto3

        return boto3.client('s3', endpoint_url=self.endpoint, region_name='us-east-1',
                            aws_access_key_id='testing', aws_secret_access_key='testing', **kwargs)

    def upload_tree(self, bucket: str, root: Path, prefix: str) -> None:
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        for path in sorted(root.rglob('*')):
            if path.is_file():
                s3.put_object(Bucket=bucket, Key=f'{prefix}/{path.relative_to(root)}',
                              Body=path.read_bytes())

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def delete(self, bucket: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            self.client().delete_objects(Bucket=bucket, Delete={
                'Objects': [{'Key': key} for key in keys[i:i + 1000]]})

    def put_many(self, bucket: str, keys: Iterable[str], body: bytes) -> None:
        """Puts many small objects straight into the server's backend (HTTP PUTs take minutes)."""
        self.put_bodies(bucket, ((key, body) for key in keys))

    def put_bodies(self, bucket: str, items: Iterable[tuple[str, bytes]]) -> None:
        """Puts (key, body) objects straight into the server's backend."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]['global']
        for key, body in items:
            backend.put_object(bucket, key, body)

    def download_tree(self, bucket: str, prefix: str, dest: Path) -> None:
        s3 = self.client()
        for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get('Contents', ()):
                target = dest / obj['Key'][len(prefix):].lstrip('/')
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(s3.get_object(Bucket=bucket, Key=obj['Key'])['Body'].read())

    def stop(self) -> None:
        self._server.stop()


class FaultProxy:
    """An HTTP proxy in front of an S3 or GCS endpoint that breaks some ranged GETs on purpose.

    Of the object reads (GETs with a Range header), in turn: every 4th+1 is answered
    503 SlowDown, every 4th+2 has its body cut in half, every 7th+3 is answered 500. Hooks run
    before the first read of a key (to overwrite or delete it under the reader's feet).
    Counts the body bytes of object reads it passes on.
    """

    def __init__(self, upstream_port: int, faults: bool = True):
        self.reads = 0
        self.faults_injected = 0
        self.bytes_served = 0
        self.hooks: dict[str, Callable[[], None]] = {}
        self._faults = faults
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                fault, hook = proxy._plan(self.command, self.path, self.headers)
                if hook:
                    hook()
                if fault in (503, 500):
                    code = 'SlowDown' if fault == 503 else 'InternalError'
                    payload = f'<Error><Code>{code}</Code><Message>injected</Message></Error>'.encode()
                    self.send_response(fault)
                    self.send_header('Content-Type', 'application/xml')
                    self.send_header('Content-Length', str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection('127.0.0.1', upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != 'host'}
                headers['Host'] = f'127.0.0.1:{upstream_port}'  # GCS's XML API answers one host
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ('transfer-encoding', 'connection', 'content-length'):
                        self.send_header(k, v)
                # a HEAD's length is the object's, which its empty body does not show
                self.send_header('Content-Length', resp.getheader('Content-Length', '0')
                                 if self.command == 'HEAD' else str(len(data)))
                self.end_headers()
                if fault == 'cut' and len(data) > 1:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command == 'GET' and 'Range' in self.headers:
                    with proxy._lock:
                        proxy.bytes_served += len(data)
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _plan(self, method: str, path: str, headers) -> tuple:
        if method != 'GET' or 'Range' not in headers:
            return None, None
        # the key, as S3 (/bucket/key) or GCS (/download/storage/v1/b/bucket/o/key) names it
        where = unquote(path.split('?', 1)[0])
        with self._lock:
            self.reads += 1
            n = self.reads
            key = next((k for k in self.hooks if where.endswith('/' + k)), None)
            hook = self.hooks.pop(key) if key else None
            fault = None
            if self._faults:
                fault = {1: 503, 2: 'cut'}.get(n % 4) or (500 if n % 7 == 3 else None)
                self.faults_injected += fault is not None
        return fault, hook

    def stop(self) -> None:
        self._server.shutdown()


class FakeGCS:
    """The shared fake-gcs-server (SHARED/tools/fake-gcs-server: GCS's JSON and XML APIs,
    generation preconditions honoured) on 127.0.0.1, in memory; STORAGE_EMULATOR_HOST points
    the clients of this process and its children at it."""
    scheme = 'gs'

    def __init__(self, binary: Path):
        import urllib.request

        self.port = free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        address = f'127.0.0.1:{self.port}'
        # -public-host: the XML routes answer only that host; -external-url: the Location of a
        # resumable upload (Beam's gcsio writes that way)
        self._proc = subprocess.Popen(
            [str(binary), '-backend', 'memory', '-scheme', 'http', '-host', '127.0.0.1',
             '-port', str(self.port), '-public-host', address, '-external-url', self.endpoint,
             '-log-level', 'error'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f'{self.endpoint}/storage/v1/b', timeout=2).read()
                break
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f'{binary} did not start on {address}')
                time.sleep(0.1)
        os.environ['STORAGE_EMULATOR_HOST'] = self.endpoint
        self.endpoint_args = ('--gcs-endpoint-url', self.endpoint)

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project='test', credentials=AnonymousCredentials(),
                              client_options={'api_endpoint': self.endpoint})

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(bucket)

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client().bucket(bucket).blob(key).upload_from_string(body)

    def put_bodies(self, bucket: str, items: Iterable[tuple[str, bytes]]) -> None:
        """Puts many (key, body) objects, 16 uploads at a time."""
        from concurrent.futures import ThreadPoolExecutor

        b = self.client().bucket(bucket)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda item: b.blob(item[0]).upload_from_string(item[1]), items))

    def delete(self, bucket: str, keys: Iterable[str]) -> None:
        b = self.client().bucket(bucket)
        for key in keys:
            b.blob(key).delete()

    def upload_tree(self, bucket: str, root: Path, prefix: str) -> None:
        self.create_bucket(bucket)
        self.put_bodies(bucket, ((f'{prefix}/{path.relative_to(root)}', path.read_bytes())
                                 for path in sorted(root.rglob('*')) if path.is_file()))

    def download_tree(self, bucket: str, prefix: str, dest: Path) -> None:
        for blob in self.client().list_blobs(bucket, prefix=prefix):
            target = dest / blob.name[len(prefix):].lstrip('/')
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob.download_as_bytes())

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()
        os.environ.pop('STORAGE_EMULATOR_HOST', None)


class RagbeamServer:
    """`python -m ragbeam serve ARGS` on a free port of 127.0.0.1, up once GET /api/status
    answers (its first answer in `status`); its output goes to `log`, or a temporary file."""

    def __init__(self, *args, log: Optional[Path] = None, timeout: float = 300):
        import psutil

        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self._log = open(log, 'w+') if log else tempfile.TemporaryFile('w+')
        started = time.time()
        self.proc = subprocess.Popen([sys.executable, '-m', 'ragbeam', 'serve', '--port',
                                      str(self.port), *map(str, args)], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self.proc.pid)
        while True:
            try:
                with urllib.request.urlopen(self.url + '/api/status', timeout=60) as response:
                    self.status = json.loads(response.read())
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > started + timeout:
                    output = self.output()
                    self.stop()
                    raise RuntimeError(f'the server did not start: {output[-2000:]}')
                time.sleep(0.3)
        self.start_seconds = time.time() - started

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def rss_mb(self) -> float:
        """The server process's RSS (the runs it starts for uploads are apart)."""
        return self.process.memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
