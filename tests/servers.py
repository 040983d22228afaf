"""Local object-store servers for tests: moto's S3, a fault-injecting proxy, a GCS emulator.

Everything listens on 127.0.0.1 and is started and stopped by the tests themselves.
"""
from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable

S3_ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
          'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_EC2_METADATA_DISABLED': 'true'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's threaded HTTP server: a real S3 endpoint on 127.0.0.1."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger('werkzeug').setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f'http://{host}:{port}'
        self.port = port

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
    """An HTTP proxy in front of an S3 endpoint that breaks some ranged GETs on purpose.

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
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
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
        key = path.split('?', 1)[0].split('/', 2)[-1]
        with self._lock:
            self.reads += 1
            n = self.reads
            hook = self.hooks.pop(key, None)
            fault = None
            if self._faults:
                fault = {1: 503, 2: 'cut'}.get(n % 4) or (500 if n % 7 == 3 else None)
                self.faults_injected += fault is not None
        return fault, hook

    def stop(self) -> None:
        self._server.shutdown()


class GCSEmulator:
    """gcp-storage-emulator in this process; STORAGE_EMULATOR_HOST points clients at it."""

    def __init__(self):
        from gcp_storage_emulator.server import create_server

        self.port = free_port()
        self.host = f'http://127.0.0.1:{self.port}'
        os.environ['STORAGE_EMULATOR_HOST'] = self.host
        self._server = create_server('127.0.0.1', self.port, in_memory=True)
        self._server.start()

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project='test', credentials=AnonymousCredentials())

    def upload_tree(self, bucket: str, root: Path, prefix: str) -> None:
        b = self.client().create_bucket(bucket)
        for path in sorted(root.rglob('*')):
            if path.is_file():
                b.blob(f'{prefix}/{path.relative_to(root)}').upload_from_string(path.read_bytes())

    def download_tree(self, bucket: str, prefix: str, dest: Path) -> None:
        for blob in self.client().list_blobs(bucket, prefix=prefix):
            target = dest / blob.name[len(prefix):].lstrip('/')
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob.download_as_bytes())

    def stop(self) -> None:
        self._server.stop()
        os.environ.pop('STORAGE_EMULATOR_HOST', None)
