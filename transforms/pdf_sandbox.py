"""pypdf in a child process, so that a pathological page can be cut off and its memory freed.

The child (`python -m transforms.pdf_sandbox`) imports only pypdf. It opens one PDF at a time
over a RangedFile whose reads it asks of the parent, so the parent's store does every read
(version pinning, retries, byte counts) and the child never sees more than its block cache.
Messages are length-prefixed pickles over the child's stdin and stdout.
"""
from __future__ import annotations

import gc
import io
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transforms.ranged_file import RangedFile

_HEADER = struct.Struct('>I')


class PdfError(Exception):
    """pypdf (or the sandbox) could not do what was asked; carries pypdf's error class."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class PasswordRequired(Exception):
    """The PDF is encrypted with a password that is not empty."""


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
        'help': 'memory of the pypdf process before the page is cut off'})

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

    def __init__(self, limits: PdfLimits):
        self._limits = limits
        self._proc: Optional[subprocess.Popen] = None
        self._document: Optional[tuple[Callable[[int, int], bytes], int]] = None
        self._read_error: Optional[Exception] = None
        self.bytes_read = 0

    def open(self, read_range: Callable[[int, int], bytes], size: int) -> int:
        """Opens a PDF in the child; returns its page count."""
        self._document = (read_range, size)
        return self._call(('open', size), self._limits.page_timeout_seconds)

    def page(self, index: int) -> tuple[str, bool]:
        """(extracted text, whether a page without text draws images) of page `index` (0-based)."""
        return self._call(('page', index), self._limits.page_timeout_seconds)

    def page_images(self, index: int) -> list[bytes]:
        """The images of page `index`, each as PNG bytes."""
        return self._call(('images', index), self._limits.page_timeout_seconds)

    def child_rss_mb(self) -> float:
        """Resident memory of the pypdf process (0 when none runs)."""
        return _rss_mb(self._proc.pid) if self._proc is not None and self._proc.poll() is None else 0.0

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _call(self, request: tuple, timeout: float):
        if self._proc is None or self._proc.poll() is not None:
            self._start()
            if request[0] != 'open' and self._document is not None:
                self._exchange(('open', self._document[1]), timeout)
        return self._exchange(request, timeout)

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            os.environ.get('PYTHONPATH')])))
        self._proc = subprocess.Popen(
            [sys.executable, '-m', 'transforms.pdf_sandbox'], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        _send(self._proc.stdin, ('limits', self._limits))

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
                    self.close()
                    raise PdfError('PageTimeout', f'{request[0]} took longer than {timeout:g} s')
                if _rss_mb(proc.pid) > self._limits.max_worker_mb:
                    self.close()
                    raise PdfError('MemoryLimit',
                                   f'{request[0]} used more than {self._limits.max_worker_mb} MB')
                continue
            try:
                message = _recv(proc.stdout)
            except EOFError:
                self.close()
                raise PdfError('SandboxCrashed', f'the pypdf process died during {request[0]}')
            kind = message[0]
            if kind == 'read':
                _send(proc.stdin, self._serve_read(message[1], message[2]))
            elif kind == 'ok':
                return message[1]
            else:
                read_error, self._read_error = self._read_error, None
                raise read_error or PdfError(message[1], message[2])

    def _serve_read(self, start: int, end: int) -> tuple:
        try:
            data = self._document[0](start, end)
        except Exception as e:  # to pypdf an I/O error; to our caller, the store's own error
            self._read_error = e
            return ('read-error', type(e).__name__, str(e))
        self.bytes_read += len(data)
        return ('data', data)


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


def _configure(limits: PdfLimits) -> None:
    from pypdf._configuration import CURRENT_CONFIGURATION, DEFAULT_CONFIGURATION

    n = limits.max_stream_bytes
    CURRENT_CONFIGURATION.set(DEFAULT_CONFIGURATION.with_overwrites(
        maximum_declared_stream_length=n, array_based_stream_maximum_output_length=n,
        jbig2_maximum_output_length=n, lzw_maximum_output_length=n,
        run_length_maximum_output_length=n, zlib_maximum_output_length=n,
        brotli_maximum_output_length=n, image_maximum_buffer_size=n,
        page_tree_maximum_page_entries=limits.max_pages + 1))
    logging.getLogger('pypdf').setLevel(logging.ERROR)


_INHERITABLE = ('/Resources', '/MediaBox', '/CropBox', '/Rotate')
_MAX_TREE_DEPTH = 100


def _page_tree(reader):
    from pypdf.errors import PdfReadError
    from pypdf.generic import DictionaryObject

    pages = reader.root_object.get('/Pages')
    pages = pages.get_object() if pages is not None else None
    if not isinstance(pages, DictionaryObject):
        raise PdfReadError('Invalid object in /Pages')
    return pages


def _page_count(reader) -> int:
    """The page count from the root's /Count, without reading every page object."""
    count = _page_tree(reader).get('/Count')
    return int(count) if count is not None else len(reader.pages)


def _nth_page(reader, index: int):
    """Page `index`, found by walking the page tree with each node's /Count.

    Unlike reader.pages[index], which first reads every page object of the document, this
    reads only the nodes on the way to the page. A node whose /Count equals its number of
    kids has only pages as kids, so the page is its kid at `index`, read alone; otherwise the
    kids before the page are read to learn their counts.
    """
    from pypdf.generic import NameObject

    node, inherit = _page_tree(reader), {}
    for _ in range(_MAX_TREE_DEPTH):
        inherit.update({NameObject(a): node[a] for a in _INHERITABLE if a in node})
        kids = node['/Kids']
        if node.get('/Count') == len(kids) and index < len(kids):
            kid = kids[index].get_object()
            if not _is_tree_node(kid):
                return _leaf_page(reader, kids[index], kid, inherit)
        for kid_ref in kids:
            kid = kid_ref.get_object()
            count = int(kid.get('/Count', 0)) if _is_tree_node(kid) else 1
            if index >= count:
                index -= count
            elif _is_tree_node(kid):
                node = kid
                break
            else:
                return _leaf_page(reader, kid_ref, kid, inherit)
        else:
            raise IndexError(f'page {index} is not in the page tree')
    raise RecursionError(f'page tree deeper than {_MAX_TREE_DEPTH}')


def _is_tree_node(obj) -> bool:
    return obj.get('/Type') == '/Pages' or ('/Type' not in obj and '/Kids' in obj)


def _leaf_page(reader, ref, obj, inherit: dict):
    """A PageObject as pypdf's own page list builds it, with the inherited attributes."""
    from pypdf import PageObject

    page = PageObject(reader, getattr(ref, 'indirect_reference', None) or ref)
    page.update(obj)
    for attribute, value in inherit.items():
        if attribute not in page:
            page[attribute] = value
    return page


def _open_reader(file):
    """A PdfReader that reads only the trailer and cross-reference data to open a good PDF.

    pypdf's lenient mode checks every cross-reference entry by reading the object it points
    to, which on a big PDF means reading objects all over the file. Strict mode skips that;
    a PDF that fails it is opened again leniently (and repaired as pypdf can). Parsing after
    the open is lenient either way, as a plain PdfReader's is.
    """
    from pypdf import PdfReader

    try:
        reader = PdfReader(file, strict=True)
    except Exception:  # any strictness failure: let the lenient reader repair what it can
        file.seek(0)
        return PdfReader(file, strict=False)
    reader.strict = False
    return reader


def _has_images(page) -> bool:
    resources = page.get('/Resources') or {}
    xobjects = resources.get('/XObject') if hasattr(resources, 'get') else None
    if not xobjects:
        return False
    xobjects = xobjects.get_object()
    return any(x.get_object().get('/Subtype') in ('/Image', '/Form') for x in xobjects.values())


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.image.save(buffer, format='PNG')
    return buffer.getvalue()


def _child_main() -> None:
    requests, replies = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # nothing but messages on the pipe
    reader = None
    limits = PdfLimits()
    while True:
        try:
            message = _recv(replies)
        except EOFError:
            return
        op = message[0]
        try:
            if op == 'limits':
                limits = message[1]
                _configure(limits)
                continue
            if op == 'open':
                reader = None
                gc.collect()  # the last reader's page cache sits in reference cycles
                reader = _open_reader(RangedFile(_ParentReads(requests, replies), message[1]))
                if reader.is_encrypted and not reader.decrypt(''):
                    raise PasswordRequired('password required: the PDF is encrypted with a user password')
                pages = _page_count(reader)
                if pages > limits.max_pages:
                    raise ValueError(f'{pages} pages, more than the limit of {limits.max_pages}')
                result = pages
            elif op == 'page':
                page = _nth_page(reader, message[1])
                text = page.extract_text()
                result = (text, not text.strip() and _has_images(page))
            elif op == 'images':
                result = [_png(image) for image in _nth_page(reader, message[1]).images]
            else:
                raise ValueError(f'unknown request {op!r}')
            _send(requests, ('ok', result))
        except Exception as e:  # every pypdf failure is reported, the child lives on
            _send(requests, ('error', type(e).__name__, str(e)[:2000]))


if __name__ == '__main__':
    _child_main()
