"""The PDF engine in a child process, so that a crash, a pathological page or a runaway
allocation costs only that child.

The child (`python -m transforms.pdf_sandbox`) imports only its engine (transforms.pdf_engines:
PDFium by default, or pypdf). It opens one PDF at a time over a RangedFile whose reads it asks
of the parent, so the parent's store does every read (version pinning, retries, byte counts)
and the child never holds more than its block cache and the engine's parsed objects. The
document stays open in the child across requests for the same object version, so the page
ranges one worker reads of one PDF open it once. Messages are length-prefixed pickles over
the child's stdin and stdout.
"""
from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transforms.pdf_engines import extractor_name, open_document
from transforms.ranged_file import RangedFile

_HEADER = struct.Struct('>I')
# The engine process re-opens its document when it has grown this much since the open: the
# engine's caches, not the page, are what grow along a big PDF.
REOPEN_GROWTH_MB = 24
CRASH_PAGE_ENV = 'RAGBEAM_TEST_ENGINE_CRASH_PAGE'  # tests: the child segfaults on this page index


class PdfError(Exception):
    """The engine (or the sandbox) could not do what was asked; carries the error's class:
    the engine's own, or EngineCrashed, PageTimeout, MemoryLimit from the sandbox."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class PdfLimits:
    """Bounds on one PDF: pages, decompressed bytes per stream, time and memory per page."""
    max_pages: int = field(default=10000, metadata={
        'flag': '--pdf-max-pages', 'help': 'PDFs with more pages fail with a reason'})
    max_stream_bytes: int = field(default=64 << 20, metadata={
        'flag': '--pdf-max-stream-bytes', 'size': True,
        'help': "largest decompressed stream (pypdf's limits), so a PDF bomb is a clear failure"})
    page_timeout_seconds: float = field(default=60.0, metadata={
        'flag': '--pdf-page-timeout',
        'help': 'seconds one page may take; then it is cut off with an error record'})
    max_worker_mb: int = field(default=1024, metadata={
        'flag': '--pdf-max-worker-mb',
        'help': 'memory of the PDF engine process before the page is cut off'})

    def validate(self) -> None:
        if self.page_timeout_seconds <= 0 or self.max_pages < 1 or self.max_stream_bytes < 1:
            raise ValueError('--pdf-page-timeout, --pdf-max-pages and --pdf-max-stream-bytes '
                             'must be positive')
        if self.max_worker_mb < 1:
            raise ValueError('--pdf-max-worker-mb must be positive')


def _send(stream, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError('sandbox pipe closed')
    (n,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(n))


class PdfSandbox:
    """Parent side: one child process, restarted after a timeout, a crash or too much memory."""

    def __init__(self, limits: PdfLimits, engine: str = 'pdfium'):
        self._limits = limits
        self._engine = engine
        self._proc: Optional[subprocess.Popen] = None
        self._document: Optional[tuple[Callable[[int, int], bytes], int, Any]] = None
        self._opened: Optional[tuple[Any, tuple[int, str]]] = None  # (key, (pages, extractor))
        self._read_error: Optional[Exception] = None
        self.bytes_read = 0  # every byte served to the child, over its whole life
        self.restarts = 0

    def open(self, read_range: Callable[[int, int], bytes], size: int, key: Any = None) -> tuple[int, str]:
        """Opens a PDF in the child; returns (page count, extractor). The PDF that `key` names
        (an object version) is not opened again while the child holds it."""
        self._document = (read_range, size, key)
        if key is not None and self.holds(key):
            return self._opened[1]
        self._opened = None
        result = self._call(('open', size), self._limits.page_timeout_seconds)
        self._opened = (key, tuple(result))
        return self._opened[1]

    def holds(self, key: Any) -> bool:
        """Whether the engine process has the PDF that `key` names open."""
        return self._opened is not None and self._opened[0] == key and self._alive()

    def page(self, index: int) -> tuple[str, bool]:
        """(extracted text, whether a page without text draws images) of page `index` (0-based)."""
        return self._call(('page', index), self._limits.page_timeout_seconds)

    def page_images(self, index: int, dpi: int = 300) -> list[bytes]:
        """PNGs to OCR for page `index`: the whole page rendered at `dpi` (PDFium), or the
        page's embedded images (pypdf, which cannot render)."""
        return self._call(('images', index, dpi), self._limits.page_timeout_seconds)

    def child_rss_mb(self) -> float:
        """Resident memory of the engine process (0 when none runs)."""
        return _rss_mb(self._proc.pid) if self._alive() else 0.0

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._opened = None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _call(self, request: tuple, timeout: float):
        if not self._alive():
            self._start()
            if request[0] != 'open' and self._document is not None:  # a fresh child after a crash
                result = self._exchange(('open', self._document[1]), timeout)
                self._opened = (self._document[2], tuple(result))
        return self._exchange(request, timeout)

    def _start(self) -> None:
        self.close()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            os.environ.get('PYTHONPATH')])))
        self._proc = subprocess.Popen(
            [sys.executable, '-m', 'transforms.pdf_sandbox'], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        _send(self._proc.stdin, ('config', self._limits, self._engine))

    def _exchange(self, request: tuple, timeout: float):
        """Sends a request and serves the child's reads until its answer, within `timeout`."""
        proc = self._proc
        _send(proc.stdin, request)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, min(remaining, 0.5)))
            if not ready:
                if remaining <= 0:
                    self._kill()
                    raise PdfError('PageTimeout', f'{request[0]} took longer than {timeout:g} s')
                if _rss_mb(proc.pid) > self._limits.max_worker_mb:
                    self._kill()
                    raise PdfError('MemoryLimit',
                                   f'{request[0]} used more than {self._limits.max_worker_mb} MB')
                continue
            try:
                message = _recv(proc.stdout)
            except EOFError:
                code = proc.wait()
                self._kill()
                raise PdfError('EngineCrashed', f'the {self._engine} process died during '
                               f'{request[0]} ({_exit_reason(code)})')
            kind = message[0]
            if kind == 'read':
                _send(proc.stdin, self._serve_read(message[1], message[2]))
            elif kind == 'ok':
                return message[1]
            else:
                read_error, self._read_error = self._read_error, None
                raise read_error or PdfError(message[1], message[2])

    def _kill(self) -> None:
        """Ends a child that failed; the next request starts a fresh one."""
        self.close()
        self.restarts += 1

    def _serve_read(self, start: int, end: int) -> tuple:
        try:
            data = self._document[0](start, end)
        except Exception as e:  # to the engine an I/O error; to our caller, the store's own error
            self._read_error = e
            return ('read-error', type(e).__name__, str(e))
        self.bytes_read += len(data)
        return ('data', data)


def _exit_reason(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f'signal {signal.Signals(-code).name}'
        except ValueError:
            return f'signal {-code}'
    return f'exit status {code}'


def _rss_mb(pid: int) -> float:
    try:
        with open(f'/proc/{pid}/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


# ---------------------------------------------------------------- the child process

class _ParentReads:
    """The child's read_range: asks the parent for bytes over the pipe."""

    def __init__(self, requests, replies):
        self._out, self._in = requests, replies

    def __call__(self, start: int, end: int) -> bytes:
        _send(self._out, ('read', start, end))
        reply = _recv(self._in)
        if reply[0] != 'data':
            raise OSError(f'{reply[1]}: {reply[2]}')
        return reply[1]


def _reopen(document, file: RangedFile, limits: PdfLimits):
    """The same PDF, opened afresh over the same file: what the engine had parsed so far (PDFium
    keeps every object it has read, image streams included, until the document closes) is
    freed, and the block cache makes the second open cost no reads."""
    engine = type(document)
    document.close()
    gc.collect()
    file.seek(0)
    document = engine(limits)
    document.open(file)
    return document


def _child_main() -> None:
    requests, replies = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # nothing but messages on the pipe
    document = file = None
    opened_mb = 0.0
    limits, engine = PdfLimits(), 'pdfium'
    while True:
        try:
            message = _recv(replies)
        except EOFError:
            return
        op = message[0]
        try:
            if op == 'config':
                limits, engine = message[1], message[2]
                continue
            if op == 'open':
                if document is not None:
                    document.close()
                document = None
                gc.collect()  # the last document's objects sit in reference cycles
                file = RangedFile(_ParentReads(requests, replies), message[1])
                document, pages = open_document(engine, file, limits)
                if pages > limits.max_pages:
                    raise ValueError(f'{pages} pages, more than the limit of {limits.max_pages}')
                result = (pages, extractor_name(document.name))
                opened_mb = _rss_mb(os.getpid())
            elif op == 'page':
                if os.environ.get(CRASH_PAGE_ENV) == str(message[1]):
                    os.kill(os.getpid(), signal.SIGSEGV)  # tests: an engine that crashes
                result = document.page(message[1])
                if _rss_mb(os.getpid()) > opened_mb + REOPEN_GROWTH_MB:
                    document = _reopen(document, file, limits)
                    opened_mb = _rss_mb(os.getpid())
            elif op == 'images':
                result = document.page_images(message[1], message[2])
            else:
                raise ValueError(f'unknown request {op!r}')
            _send(requests, ('ok', result))
        except Exception as e:  # every engine failure is reported, the child lives on
            _send(requests, ('error', getattr(e, 'error_type', type(e).__name__), str(e)[:2000]))


if __name__ == '__main__':
    _child_main()
