"""The output layout under --output: paths, preparing the folder, small JSON and Parquet files."""
from __future__ import annotations

import json
import os
import uuid
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.ranged_file import RangedFile
from transforms.store import (GCS_EMULATOR_ENV, Store, StoreConfig, StoreError,
                              adapt_beam_filesystems, require_credentials, store_for)
from transforms.types import ObjectRef



class OutputError(OSError):
    """The output location cannot be written."""


def path(output: str, *parts: str) -> str:
    """A path under the output location, local or object store."""
    return FileSystems.join(output, *parts)


def is_local(output: str) -> bool:
    return FileSystems.get_scheme(output) is None


def configure(options: PipelineOptions, config: StoreConfig) -> None:
    """Points Beam's FileSystems (which write the outputs) at the run's stores and credentials."""
    FileSystems.set_options(options)
    endpoint = config.gcs_endpoint()
    if endpoint:
        # Beam's gcsio reads the emulator from the environment, and so do the worker processes
        # that a runner starts from this one
        os.environ[GCS_EMULATOR_ENV] = endpoint
        # Emulator mode needs no credentials; without this Beam spends ~20 s looking for them.
        from apache_beam.internal.gcp import auth
        auth._Credentials._credentials_init = True
        auth._Credentials._credentials = None
    adapt_beam_filesystems()


def prepare(output: str, config: StoreConfig) -> None:
    """Makes the output location and checks it is writable; an earlier run's corpus stays
    until this run commits."""
    try:
        require_credentials(output, config)
    except StoreError as e:
        raise OutputError(str(e)) from e
    try:
        if is_local(output):
            os.makedirs(output, exist_ok=True)
        probe = path(output, f'.ragbeam-write-test-{uuid.uuid4().hex}')
        with FileSystems.create(probe) as f:
            f.write(b'ok')
        FileSystems.delete([probe])
    except Exception as e:  # any filesystem's error means the same thing to the user
        raise OutputError(f'cannot write to --output {output}: {e}') from e


def remove(folder: str, names: Iterable[str]) -> None:
    """Deletes the files and folders `names` under `folder`, where they exist."""
    names = list(names)
    stale = [p for p in (path(folder, name) for name in names) if FileSystems.exists(p)]
    if not is_local(folder):  # buckets have no folders: every object under each prefix
        stale += [m.path for name in names
                  for m in FileSystems.match([path(folder, name, '**')])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)


def children(folder: str) -> set[str]:
    """The names directly under a folder (on object stores: the first part of each key)."""
    if is_local(folder):
        return set(os.listdir(folder)) if os.path.isdir(folder) else set()
    prefix = path(folder, '')
    found = FileSystems.match([path(folder, '**')])[0].metadata_list
    return {m.path[len(prefix):].split('/', 1)[0] for m in found if m.path.startswith(prefix)}


def write_json(file_path: str, obj) -> None:
    """Writes `obj` as JSON; readers see the old file or the new one, never a part (a local
    file is renamed into place; an object store's PUT is atomic)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode('utf-8')
    if is_local(file_path):
        os.makedirs(os.path.dirname(os.path.abspath(file_path)), exist_ok=True)
        tmp = f'{file_path}.{os.getpid()}.tmp'
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, file_path)
        return
    with FileSystems.create(file_path, mime_type='application/json') as f:
        f.write(data)


def read_json(file_path: str):
    with FileSystems.open(file_path, compression_type='uncompressed') as f:
        return json.loads(f.read())


def active_files(table_path: str, storage_options: Optional[dict] = None,
                 version: Optional[int] = None) -> Optional[set[str]]:
    """The URIs of the files that make up a Delta table now (or at `version`); None when it
    is not one."""
    from deltalake import DeltaTable
    if not DeltaTable.is_deltatable(table_path, storage_options=storage_options):
        return None
    return {normal_uri(u) for u in
            DeltaTable(table_path, version=version, storage_options=storage_options).file_uris()}


def normal_uri(uri: str) -> str:
    """A local file's path without `file://`, as Beam's FileSystems list it."""
    return uri[len('file://'):] if uri.startswith('file://') else uri


class ParquetFolder:
    """The Parquet files of one output table, read file by file: the files a Delta table's
    log names (a Delta folder also holds files that are no longer part of it), or the
    Parquet files directly in a plain folder.

    On object stores each file is opened over ranged reads (footer first, then the row groups
    of the columns asked for), never downloaded whole.
    """

    def __init__(self, folder: str, config: StoreConfig = StoreConfig(),
                 version: Optional[int] = None):
        self.folder = folder
        self._store = store_for(folder, config)
        live = active_files(folder, config.delta_storage_options(folder), version)
        if live is None:
            found = self._store.list(path(folder, '*.parquet'))
        else:
            found = [r for r in self._store.list(path(folder, '**')) if normal_uri(r.uri) in live]
        self.refs = sorted(found, key=lambda r: r.uri)
        # files the table's log names that are not there (vacuumed, or deleted by hand)
        self.missing = sorted((live or set()) - {normal_uri(r.uri) for r in found})

    def schema(self) -> Optional[pa.Schema]:
        return self.open(self.refs[0]).schema_arrow if self.refs else None

    def column(self, ref: ObjectRef, name: str) -> np.ndarray:
        """One column of one of the files, read row group by row group, as a NumPy array."""
        parquet = self.open(ref)
        return np.concatenate([np.empty(0, np.int64)] + [
            parquet.read_row_group(g, columns=[name]).column(name).to_numpy()
            for g in range(parquet.num_row_groups)])

    def batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        for ref in self.refs:
            parquet = self.open(ref)
            yield from row_group_batches(parquet, range(parquet.num_row_groups), columns,
                                         batch_size)

    def table(self, columns: list[str]) -> pa.Table:
        """All rows of `columns`."""
        batches = list(self.batches(columns, 65536))
        if not batches:
            return self.schema().empty_table().select(columns)
        return pa.Table.from_batches(batches)

    def open(self, ref: ObjectRef) -> pq.ParquetFile:
        """One of the files (a listed ref), opened for reading."""
        return open_parquet(ref, self._store)


def row_group_batches(parquet: pq.ParquetFile, groups: Iterable[int], columns: list[str],
                      batch_size: int) -> Iterator[pa.RecordBatch]:
    """Batches of some row groups, one group at a time: pyarrow's iter_batches over many groups
    keeps every group it has read in memory until it is done (410 MB for 250k embeddings)."""
    for group in groups:
        yield from parquet.iter_batches(batch_size=batch_size, row_groups=[group],
                                        columns=columns)


def open_parquet(ref: ObjectRef, store: Store) -> pq.ParquetFile:
    """A Parquet file: local, or over ranged reads of the listed version."""
    if is_local(ref.uri):
        return pq.ParquetFile(ref.uri)
    return pq.ParquetFile(RangedFile(lambda a, b: store.read_range(ref, a, b), ref.size,
                                     name=ref.uri))
