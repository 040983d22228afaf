"""Documents posted to `ragbeam serve`: stored under a safe name in the uploads location, and
indexed by incremental runs that never overlap.

An upload streams to a local spool file in pieces, counted as they come, so the server holds
no more than a piece of it; past the limit the spool is deleted and nothing reaches the
location. Once whole, it is accepted by content (a PDF header, or text in an encoding ragbeam
reads), then copied into the location in 256 KiB pieces.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.decode import DETECT_BYTES, UndecodableError, detect_encoding
from transforms.readers import has_pdf_header

PIECE_BYTES = 256 * 1024
_UNSAFE = re.compile(r'[^A-Za-z0-9._-]+')


class UploadError(ValueError):
    """An upload that is refused: `status` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safe_name(filename: Optional[str]) -> str:
    """A file name that stays inside the uploads location: the last path segment (either
    slash), characters outside [A-Za-z0-9._-] replaced, no leading dot, at most 120."""
    base = re.split(r'[\\/]', filename or '')[-1]
    name = _UNSAFE.sub('_', base).lstrip('._')[:120]
    return name or 'upload'


class Spool:
    """One upload on its way in: written piece by piece to a local temporary file, counted
    against the limit."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        fd, self.path = tempfile.mkstemp(prefix='ragbeam-upload-')
        self._file = os.fdopen(fd, 'wb')

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.discard()
            raise UploadError(413, f'the upload is larger than --max-upload-bytes '
                                   f'({self.limit:,} bytes)')
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class Uploads:
    """The uploads location (a folder, s3:// or gs://)."""

    def __init__(self, location: str, max_bytes: int):
        self.location, self.max_bytes = location.rstrip('/'), max_bytes

    def spool(self) -> Spool:
        return Spool(self.max_bytes)

    def store(self, spool: Spool, filename: Optional[str], replace: bool = False) -> str:
        """Moves a whole spooled upload into the location under its safe name; its URI."""
        try:
            spool.close()
            _check_content(spool.path, spool.size)
            target = outputs.path(self.location, safe_name(filename))
            if not replace and FileSystems.exists(target):
                raise UploadError(409, f'{os.path.basename(target)} was uploaded before; '
                                       'send replace=true to replace it')
            with open(spool.path, 'rb') as src, FileSystems.create(target) as dst:
                for piece in iter(lambda: src.read(PIECE_BYTES), b''):
                    dst.write(piece)
            return target
        finally:
            spool.discard()


def _check_content(path: str, size: int) -> None:
    """Text or PDF, by the first bytes, whatever the name says."""
    if not size:
        raise UploadError(415, 'the upload is empty')
    with open(path, 'rb') as f:
        head = f.read(DETECT_BYTES)
    if has_pdf_header(head):
        return
    try:
        detect_encoding(head, size)
    except UndecodableError as e:
        raise UploadError(415, f'not text or PDF: {e}') from e


@dataclass
class Run:
    """One incremental run over the uploads location: what it took in and how it went."""
    id: int
    uploads: list[str]
    state: str = 'queued'  # queued, running, committed, failed
    queued_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    version: Optional[int] = None
    message: str = ''

    def public(self) -> dict:
        return {'id': self.id, 'state': self.state, 'uploads': list(self.uploads),
                'queued_at': self.queued_at, 'started_at': self.started_at,
                'finished_at': self.finished_at, 'version': self.version,
                'message': self.message}


class Indexer:
    """Schedules `ragbeam run --input LOCATION --output DIR` after uploads: uploads within
    `batch_seconds` of each other share one run, and one run at a time; after each commit
    `on_commit` is called (the server switches to the new version)."""

    def __init__(self, location: str, output: str, run_args: list[str],
                 on_commit: Callable[[], None], batch_seconds: float = 2.0):
        self._argv = [sys.executable, '-m', 'pipeline', 'run', '--input', location,
                      '--output', output, *run_args]
        self._on_commit, self._batch = on_commit, batch_seconds
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self.runs: dict[int, Run] = {}
        self._pending: Optional[Run] = None
        self._last_upload = 0.0
        threading.Thread(target=self._work, name='ragbeam-indexer', daemon=True).start()

    def add(self, uri: str) -> Run:
        """The run that will index `uri` (one still gathering uploads, or a new one)."""
        with self._lock:
            if self._pending is None:
                self._pending = Run(next(self._ids), [])
                self.runs[self._pending.id] = self._pending
            self._pending.uploads.append(uri)
            self._last_upload = time.time()
            self._lock.notify_all()
            return self._pending

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._pending is None or time.time() - self._last_upload < self._batch:
                    wait = None if self._pending is None else (
                        self._batch - (time.time() - self._last_upload))
                    self._lock.wait(wait)
                run, self._pending = self._pending, None
            self._run(run)

    def _run(self, run: Run) -> None:
        run.state, run.started_at = 'running', time.time()
        proc = subprocess.run(self._argv, capture_output=True, text=True)
        run.finished_at = time.time()
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            run.state, run.message = 'failed', (lines[-1] if lines else f'exit {proc.returncode}')
            return
        summary = [line for line in proc.stdout.splitlines() if 'table version' in line]
        run.message = summary[-1] if summary else proc.stdout.strip()[-500:]
        found = re.search(r'table version (\d+)', run.message)
        run.version = int(found.group(1)) if found else None
        try:
            self._on_commit()
        except (OSError, ValueError) as e:  # the new version's index cannot be loaded
            run.state, run.message = 'failed', f'committed, but not served: {e}'
            return
        run.state = 'committed'
