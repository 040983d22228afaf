"""Object stores behind one small interface: list, read a byte range, check the version.

Local files are read with seek + read and pinned to size + mtime; other Beam FileSystems
schemes go through a generic, unpinned fallback.
"""
from __future__ import annotations

import os
from typing import Iterator

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems

from transforms.types import ObjectRef


class ObjectChangedError(IOError):
    """The object is no longer the version that was listed."""


class Store:
    """Lists objects and reads byte ranges of one listed version."""

    def list(self, pattern: str) -> Iterator[ObjectRef]:
        """Every object matching `pattern`; a directory or prefix means everything below it."""
        if FileSystems.get_scheme(pattern) is None and os.path.isdir(pattern):
            pattern = os.path.join(pattern, '**')
        for match in FileSystems.match([pattern])[0].metadata_list:
            yield self.ref(match)

    def ref(self, meta: FileMetadata) -> ObjectRef:
        return ObjectRef(meta.path, meta.size_in_bytes,
                         f'{meta.size_in_bytes}-{int(meta.last_updated_in_seconds * 1e6)}')

    def read_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of the listed version (fewer only at the object's end)."""
        with FileSystems.open(ref.uri, compression_type='uncompressed') as f:
            f.seek(start)
            return f.read(end - start)


class LocalStore(Store):
    """Local files: absolute paths, version = size-mtime_ns, checked on every read."""

    def ref(self, meta: FileMetadata) -> ObjectRef:
        path = os.path.abspath(meta.path)
        return ObjectRef(path, meta.size_in_bytes, _local_version(os.stat(path)))

    def read_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        with open(ref.uri, 'rb') as f:
            if _local_version(os.fstat(f.fileno())) != ref.version:
                raise ObjectChangedError(f'{ref.uri} changed after listing')
            f.seek(start)
            return f.read(end - start)


def _local_version(st: os.stat_result) -> str:
    return f'{st.st_size}-{st.st_mtime_ns}'


def store_for(uri: str) -> Store:
    """The store that serves `uri`'s scheme."""
    return LocalStore() if FileSystems.get_scheme(uri) is None else Store()
