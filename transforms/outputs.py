"""The output layout under --output: paths, preparing the folder, small JSON and Parquet files."""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

RUN_OUTPUTS = ('chunks', 'manifest', 'errors', 'index', 'report.json')


class OutputError(OSError):
    """The output location cannot be written."""


def path(output: str, *parts: str) -> str:
    """A path under the output location, local or object store."""
    return FileSystems.join(output, *parts)


def is_local(output: str) -> bool:
    return FileSystems.get_scheme(output) is None


def prepare(output: str) -> None:
    """Makes the output location, checks it is writable, and removes an earlier run's outputs."""
    try:
        if is_local(output):
            os.makedirs(output, exist_ok=True)
        probe = path(output, f'.ragbeam-write-test-{uuid.uuid4().hex}')
        with FileSystems.create(probe) as f:
            f.write(b'ok')
        FileSystems.delete([probe])
    except Exception as e:  # any filesystem's error means the same thing to the user
        raise OutputError(f'cannot write to --output {output}: {e}') from e
    stale = [path(output, name) for name in RUN_OUTPUTS]
    stale = [p for p in stale if FileSystems.exists(p)]
    if stale:
        FileSystems.delete(stale)


def write_json(file_path: str, obj) -> None:
    with FileSystems.create(file_path, mime_type='application/json') as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode('utf-8'))


def read_json(file_path: str):
    with FileSystems.open(file_path, compression_type='uncompressed') as f:
        return json.loads(f.read())


def parquet_files(folder: str) -> list[str]:
    """The Parquet files directly in `folder`, sorted."""
    pattern = path(folder, '*.parquet')
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def dataset(folder: str) -> Optional[ds.Dataset]:
    """A pyarrow dataset over a folder of Parquet files (None when it holds none)."""
    files = parquet_files(folder)
    if not files:
        return None
    if is_local(folder):
        return ds.dataset(files, format='parquet')
    fs, _ = pafs.FileSystem.from_uri(folder)  # object stores: pyarrow reads row groups by range
    return ds.dataset([f.split('://', 1)[1] for f in files], format='parquet', filesystem=fs)


def ensure_table(folder: str, schema: pa.Schema) -> None:
    """Writes an empty Parquet file with `schema` when a run produced no rows in `folder`."""
    if parquet_files(folder):
        return
    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink)
    with FileSystems.create(path(folder, 'empty-00000-of-00001.parquet')) as f:
        f.write(sink.getvalue())
