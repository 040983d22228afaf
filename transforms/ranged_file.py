"""A read-only, seekable file over ranged reads of one object version, with a small block cache.

Parquet footers and PDF cross-reference tables are read from the end and objects are parsed
lazily, so opening a file through it costs the blocks actually touched, not the object.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from typing import Callable

BLOCK_BYTES = 64 << 10  # small: PDF objects are small and scattered
MAX_BLOCKS = 64


class RangedFile(io.RawIOBase):
    """File object whose reads are served from at most `max_blocks` cached blocks.

    `read_range(start, end)` returns bytes [start, end) of the object. Reads larger than two
    blocks bypass the cache. `bytes_fetched` counts every byte asked of the store.
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
        buffer[:len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b''
        if end - self._pos > 2 * self._block:
            data = self._fetch(self._pos, end)
        else:
            first, last = self._pos // self._block, (end - 1) // self._block
            data = b''.join(self._block_at(i) for i in range(first, last + 1))
            offset = self._pos - first * self._block
            data = data[offset:offset + end - self._pos]
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def _block_at(self, i: int) -> bytes:
        block = self._cache.get(i)
        if block is None:
            block = self._fetch(i * self._block, min(self._size, (i + 1) * self._block))
            self._cache[i] = block
            if len(self._cache) > self._max_blocks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return block

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._read_range(start, end)
        self.bytes_fetched += len(data)
        return data
