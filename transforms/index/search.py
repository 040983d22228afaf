"""Searching an index and reading back the rows of the hits."""
from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa

from transforms import outputs
from transforms.index.files import (META_FILE, cached_copy, kept_versions, quiet_stdout,
                                    version_dir)
from transforms.store import StoreConfig


class NoIndexError(ValueError):
    """The output has no index, or none of the table version asked for."""


def index_meta(output: str, version: int | None = None) -> dict:
    """index.json of the current index, or of the index of table `version` (--as-of)."""
    from apache_beam.io.filesystems import FileSystems

    root = outputs.path(output, 'index')
    current = outputs.path(root, META_FILE)
    if not FileSystems.exists(current):
        raise NoIndexError(f'no index in {output} (run `ragbeam run` or `ragbeam index` first)')
    meta = outputs.read_json(current)
    if version is None or meta.get('table_version') == version:
        return meta
    wanted = outputs.path(root, version_dir(version), META_FILE)
    if not FileSystems.exists(wanted):
        kept = ', '.join(map(str, kept_versions(root))) or 'none'
        raise NoIndexError(f'no index of table version {version} is kept in {root} (kept: '
                           f'{kept}; `ragbeam history` lists the versions, --index-versions '
                           'sets how many keep their index)')
    return outputs.read_json(wanted)


class Searcher:
    """A loaded index and the search settings it was built with.

    ivfpq's lists and re-rank codes stay on disk, memory-mapped; an output in a bucket is
    searched from a local copy of its index folder (`cached_copy`).
    """

    def __init__(self, output: str, version: int | None = None):
        self.meta = index_meta(output, version)
        index_dir = outputs.path(output, 'index', *([self.meta['dir']] if 'dir' in self.meta
                                                    else []))
        folder = index_dir if outputs.is_local(index_dir) else cached_copy(index_dir)
        self._params = self.meta.get('search') or {}
        with quiet_stdout():
            self._index = faiss.read_index(os.path.join(folder, self.meta['file']),
                                           faiss.IO_FLAG_ONDISK_SAME_DIR)
        self._rerank = None
        if 'nprobe' in self._params:
            faiss.extract_index_ivf(self._index).nprobe = self._params['nprobe']
            self._rerank = _Rerank(folder, self._params['codec'], self._params['rerank'])
        if 'efSearch' in self._params:
            self._hnsw = faiss.downcast_index(self._index.index).hnsw

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, id64s) of the k nearest chunks of each query; id -1 where there are fewer."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta['dim'])
        if 'efSearch' in self._params:
            self._hnsw.efSearch = max(self._params['efSearch'], k)
        if self._rerank is None:
            return self._index.search(queries, k)
        _, candidates = self._index.search(queries, k * self._params['k_factor'])
        return self._rerank.top(queries, candidates, k)

    def ids(self) -> np.ndarray:
        """Every id64 the index holds, sorted."""
        if self._rerank is None:
            return np.sort(faiss.vector_to_array(self._index.id_map))
        lists = faiss.extract_index_ivf(self._index).invlists
        return np.sort(np.concatenate([np.empty(0, dtype=np.int64)] + [
            faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
            for n in range(lists.nlist) if lists.list_size(n)]))


class _Rerank:
    """SQ8 codes of every vector, in per-shard files sorted by id64, memory-mapped."""

    def __init__(self, folder: str, codec: str, shards: list[str]):
        self._codec = faiss.read_index(os.path.join(folder, codec))
        self._shards = [(np.load(os.path.join(folder, f'{s}.ids.npy'), mmap_mode='r'),
                         np.load(os.path.join(folder, f'{s}.sq8.npy'), mmap_mode='r'))
                        for s in shards]

    def top(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple:
        """The k best candidates of each query by their decoded vectors' inner product."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found != -1]
            codes = self._codes(found)
            exact = self._codec.sa_decode(codes) @ query
            best = np.argsort(-exact, kind='stable')[:k]
            scores[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return scores, ids

    def _codes(self, wanted: np.ndarray) -> np.ndarray:
        codes = np.empty((len(wanted), self._codec.sa_code_size()), dtype=np.uint8)
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


RESULT_COLUMNS = ['id64', 'chunk_id', 'uri', 'page', 'start', 'end', 'text']
MAX_CANDIDATES = 10_000


def parse_entity(text: str) -> tuple[str, str]:
    """'LABEL:TEXT' -> (label, text), as `ragbeam query --entity` takes it."""
    label, sep, name = text.partition(':')
    if not sep or not label.strip() or not name.strip():
        raise ValueError(f'--entity {text!r}: expected LABEL:TEXT, for example PERSON:Ada Lovelace')
    return label.strip(), name.strip()


def mentions(entities, entity: tuple[str, str]) -> bool:
    """Whether a chunk's entities hold `entity` (label and text, case-insensitive)."""
    label, name = entity[0].casefold(), entity[1].casefold()
    return any(e['label'].casefold() == label and e['text'].casefold() == name
               for e in entities or ())


def query(output: str, vector: np.ndarray, k: int, uri_prefix: str = '',
          config: StoreConfig = StoreConfig(), entity: tuple[str, str] | None = None,
          version: int | None = None) -> list[dict]:
    """The k nearest chunks to `vector` ({score, chunk_id, uri, page, start, end, text}),
    only from objects whose URI starts with `uri_prefix` and, with `entity` (label, text),
    only chunks that mention that entity; from the current index, or the index of table
    `version`. The rows come from the table version the index was built from.

    With a filter, more candidates are drawn until k match or MAX_CANDIDATES were looked at.
    """
    searcher = Searcher(output, version)
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config,
                                   searcher.meta.get('table_version'))
    columns = RESULT_COLUMNS + (['entities'] if entity else [])
    if entity and 'entities' not in chunks.schema().names:
        raise ValueError(f'{output} has no entities (run with --entities spacy)')
    filtered = bool(uri_prefix or entity)
    wanted = k * 10 if filtered else k
    while True:
        scores, ids = searcher.search(vector, min(wanted, max(1, searcher.meta['count'])))
        hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i != -1]
        rows = chunks.rows_with('id64', pa.array([i for _, i in hits], type=pa.int64()),
                                columns).to_pylist()
        by_id = {row.pop('id64'): row for row in rows}
        results = []
        for score, i in hits:
            row = by_id.get(i)
            if row is None or not row['uri'].startswith(uri_prefix):
                continue
            if entity and not mentions(row.pop('entities'), entity):
                continue
            results.append(dict(score=round(score, 6), **row))
        if len(results) >= k or wanted >= min(MAX_CANDIDATES, searcher.meta['count']):
            return results[:k]
        wanted *= 4
