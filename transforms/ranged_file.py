"""A read-only, seekable file over ranged reads of one object version, with a small block cache.

Parquet footers and PDF cross-reference tables are read from the end and objects are parsed
lazily, so opening a file through it costs the blocks actually touched, not the object.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from typing import Callable

# Small blocks: PDF objects are small and scattered, and an engine that looks up page N walks
# the page objects before it (PDFium does), one block each. Reads that go on where the last
# one ended (a stream) read ahead instead, so they cost few requests.
BLOCK_BYTES = 4 << 10
MAX_BLOCKS = 1024  # 4 MiB
READ_AHEAD = 1 << 20


class RangedFile(io.RawIOBase):
    """File object whose reads are served from at most `max_blocks` cached blocks.

    `read_range(start, end)` returns bytes [start, end) of the object. The blocks a read
    misses are fetched in one request per run of missing blocks, and cached: an engine that
    reads a big stream twice, or a fallback engine that reads what the first one read, pays
    once. A read that starts where the last one ended reads ahead, twice as far each time up
    to READ_AHEAD; any other read fetches only its own blocks. A read larger than the whole
    cache bypasses it. `bytes_fetched` and `requests` count what was asked of the store.
    """

    def __init__(self, read_range: Callable[[int, int], bytes], size: int,
                 block_bytes: int = BLOCK_BYTES, max_blocks: int = MAX_BLOCKS, name: str = ''):
        super().__init__()
        self._read_range = read_range
        self._size = size
        self._block = block_bytes
        self._max_blocks = max_blocks
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self.name = name
        self.bytes_fetched = 0
        self.requests = 0
        self._next_block = -1
        self._last_end = -1
        self._ahead = 0
        self._max_ahead = max(1, min(max_blocks // 4, READ_AHEAD // block_bytes))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        # one copy through the buffer protocol: a ctypes array (what pypdfium2 passes) is
        # otherwise filled one element at a time, 20x slower than PDFium's whole extraction
        memoryview(buffer).cast('B')[:len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b''
        first, last = self._pos // self._block, (end - 1) // self._block
        if last - first + 1 > self._max_blocks:
            data = self._fetch(self._pos, end)
        else:
            data = b''.join(self._blocks(first, last, self._pos == self._last_end))
            offset = self._pos - first * self._block
            data = data[offset:offset + end - self._pos]
        self._pos += len(data)
        self._last_end = self._pos
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def _blocks(self, first: int, last: int, sequential: bool) -> list[bytes]:
        """Blocks first..last, each run of missing ones fetched in one request (and more
        ahead of it when the read is `sequential` and the run follows the last fetch)."""
        found, i = [], first
        while i <= last:
            block = self._cache.get(i)
            if block is not None:
                self._cache.move_to_end(i)
                found.append(block)
                i += 1
                continue
            j = i
            while j < last and j + 1 not in self._cache:
                j += 1
            if sequential and i == self._next_block:  # a stream read on: read ahead
                self._ahead = min(max(1, 2 * self._ahead), self._max_ahead)
            else:
                self._ahead = 0
            stop = min(j + self._ahead, (self._size - 1) // self._block)
            while stop > j and stop in self._cache:
                stop -= 1
            data = self._fetch(i * self._block, min(self._size, (stop + 1) * self._block))
            for k in range(i, stop + 1):
                block = data[(k - i) * self._block:(k - i + 1) * self._block]
                self._cache[k] = block
                if k <= j:
                    found.append(block)
            self._next_block = stop + 1
            i = j + 1
        while len(self._cache) > self._max_blocks:
            self._cache.popitem(last=False)
        return found

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._read_range(start, end)
        self.requests += 1
        self.bytes_fetched += len(data)
        return data
