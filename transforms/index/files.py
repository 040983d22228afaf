"""Index files: writing them where the output is, local copies, and the query-side cache."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Iterator, Optional

import faiss
import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms import outputs

INDEX_FILE = 'faiss.index'
IVF_DATA_FILE = 'faiss.ivfdata'
CODEC_FILE = 'rerank.sq8'
TRAINED_FILE = 'trained.index'   # staging: the empty trained index the shards start from
SHARDS_DIR = 'shards'            # staging: each shard's inverted lists, merged then removed
NPY_BLOCK_ROWS = 16384
DELTA_FILE = 'delta.sq8'         # an updated index: the vectors added since its base
TOMBSTONES_FILE = 'tombstones.npy'  # an updated index: its base's ids no longer in the table
META_FILE = 'index.json'         # in each version's folder, and at DIR/index: the current one
LEXICAL_DIR = 'lexical'          # DIR/index/lexical/vN: the lexical index of each kept version


def version_dir(table_version: int | None) -> str:
    """The folder under DIR/index of the index of one table version."""
    return 'unversioned' if table_version is None else f'v{table_version:08d}'


def kept_versions(index_root: str) -> list[int]:
    """The table versions whose index is kept under DIR/index, oldest first."""
    return sorted(int(name[1:]) for name in outputs.children(index_root)
                  if name.startswith('v') and name[1:].isdigit())


def prune(index_root: str, keep: int, current: str) -> None:
    """Keeps the current index and the newest `keep` versions in all, and the bases they are
    updates of; removes the rest (older versions, a layout without version folders, a dead
    build's half-written folder); and the lexical indexes of the same versions (each one is
    whole, but a kept base can be searched --as-of)."""
    versions = [version_dir(v) for v in kept_versions(index_root)]
    kept = {current} | set(versions[-keep:] if keep else ())
    bases = set()
    for name in kept:
        meta_path = outputs.path(index_root, name, META_FILE)
        if FileSystems.exists(meta_path):
            bases.add((outputs.read_json(meta_path).get('base') or {}).get('dir', name))
    outputs.remove(index_root, sorted(outputs.children(index_root) - kept - bases
                                      - {META_FILE, LEXICAL_DIR}))
    lexical_root = outputs.path(index_root, LEXICAL_DIR)
    outputs.remove(lexical_root, sorted(outputs.children(lexical_root) - kept - bases))


@contextlib.contextmanager
def writable(file_path: str) -> Iterator[str]:
    """A local path to write `file_path` at: itself, or a temporary file copied up after."""
    if outputs.is_local(file_path):
        os.makedirs(os.path.dirname(file_path), exist_ok=True)
        yield file_path
        return
    with tempfile.TemporaryDirectory(prefix='ragbeam-upload-') as tmp:
        local = os.path.join(tmp, os.path.basename(file_path))
        yield local
        with open(local, 'rb') as src, FileSystems.create(file_path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def local_copy(file_path: str, folder: str, size: Optional[int] = None) -> str:
    """`file_path` itself when local, else a copy of it in `folder`; `size`, where the
    caller listed it, saves listing it again."""
    if outputs.is_local(file_path):
        return file_path
    local = os.path.join(folder, os.path.basename(file_path))
    # exactly the listed size, never a read at the end: that asks GCS's API for an empty
    # range, which the emulator answers with a 416 whose body is cut (a short file still fails)
    left = size if size is not None else (
        FileSystems.match([file_path])[0].metadata_list[0].size_in_bytes)
    with FileSystems.open(file_path, compression_type='uncompressed') as src, \
            open(local, 'wb') as dst:
        while left:
            block = src.read(min(left, 8 << 20))
            if not block:
                raise OSError(f'{file_path}: {left} bytes short of its listed size')
            dst.write(block)
            left -= len(block)
    return local


def save_npy(file_path: str, array: np.ndarray, order: np.ndarray) -> None:
    """Writes `array[order]` as a .npy file, in blocks of rows (no second copy of it)."""
    with writable(file_path) as local, open(local, 'wb') as f:
        np.lib.format.write_array_header_1_0(f, {
            'descr': np.lib.format.dtype_to_descr(array.dtype), 'fortran_order': False,
            'shape': (len(order),) + array.shape[1:]})
        for start in range(0, len(order), NPY_BLOCK_ROWS):
            f.write(array[order[start:start + NPY_BLOCK_ROWS]].tobytes())


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """FAISS's on-disk lists print to the C stdout, which `query --json` keeps for JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


class RerankCodes:
    """SQ8 codes of every vector, in per-shard files sorted by id64, memory-mapped."""

    def __init__(self, folder: str, codec: str, shards: list[str]):
        self.codec = faiss.read_index(os.path.join(folder, codec))
        self._shards = [(np.load(os.path.join(folder, f'{s}.ids.npy'), mmap_mode='r'),
                         np.load(os.path.join(folder, f'{s}.sq8.npy'), mmap_mode='r'))
                        for s in shards]

    def top(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple:
        """The k best candidates of each query by their decoded vectors' inner product."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found != -1]
            codes = self.codes(found)
            exact = self.codec.sa_decode(codes) @ query
            best = np.argsort(-exact, kind='stable')[:k]
            scores[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return scores, ids

    def ids(self) -> np.ndarray:
        """Every id that has codes, sorted."""
        return np.sort(np.concatenate([np.empty(0, np.int64)] + [i for i, _ in self._shards]))

    def codes(self, wanted: np.ndarray) -> np.ndarray:
        codes = np.empty((len(wanted), self.codec.sa_code_size()), dtype=np.uint8)
        missing = np.ones(len(wanted), dtype=bool)
        for shard_ids, shard_codes in self._shards:
            if not len(shard_ids):
                continue
            at = np.minimum(np.searchsorted(shard_ids, wanted), len(shard_ids) - 1)
            hit = missing & (shard_ids[at] == wanted)
            codes[hit] = shard_codes[at[hit]]
            missing &= ~hit
        if missing.any():
            raise RuntimeError(f'{int(missing.sum())} ids of the index have no re-rank codes')
        return codes


CACHE_ENV = 'RAGBEAM_CACHE'


def cached_copy(index_dir: str) -> str:
    """A local copy of a bucket's index folder under $RAGBEAM_CACHE (default ~/.cache/ragbeam),
    fetched again only when the folder's files, sizes or times changed. A fetch also drops
    the copies of the same output's index versions that the bucket no longer keeps."""
    files = sorted(FileSystems.match([outputs.path(index_dir, '*')])[0].metadata_list,
                   key=lambda m: m.path)
    stamp = json.dumps([(m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in files])
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'ragbeam')
    index_root, name = index_dir.rstrip('/').rsplit('/', 1)
    prefix = 'index-' + hashlib.sha256(index_root.encode()).hexdigest()[:16] + '-'
    folder = os.path.join(root, prefix + name)
    stamp_file = os.path.join(folder, '.stamp')
    if os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
        return folder
    kept = outputs.children(index_root)
    for old in os.listdir(root) if os.path.isdir(root) else ():
        if old.startswith(prefix) and old[len(prefix):] not in kept | {name}:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix='fetching-', dir=root)
    for m in files:
        local_copy(m.path, fresh, m.size_in_bytes)
    with open(os.path.join(fresh, '.stamp'), 'w') as f:
        f.write(stamp)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(fresh, folder)
    except OSError:  # another query put its copy there first
        shutil.rmtree(fresh, ignore_errors=True)
    return folder


