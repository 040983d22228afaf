"""Searching an index and reading back the rows of the hits."""
from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa

from transforms import outputs
from transforms.index.files import (META_FILE, RerankCodes, cached_copy, kept_versions,
                                    quiet_stdout, version_dir)
from transforms.index.update import load_mask
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
        root = outputs.path(output, 'index')
        own = self._folder(root, self.meta.get('dir'))
        base = (self.meta.get('base') or {}).get('dir')
        folder = self._folder(root, base) if base else own
        self._params = self.meta.get('search') or {}
        with quiet_stdout():
            self._index = faiss.read_index(os.path.join(folder, self.meta['file']),
                                           faiss.IO_FLAG_ONDISK_SAME_DIR)
        self._rerank = None
        self._delta, self._mask = load_mask(own, self.meta)
        if 'nprobe' in self._params:
            faiss.extract_index_ivf(self._index).nprobe = self._params['nprobe']
            self._rerank = RerankCodes(folder, self._params['codec'], self._params['rerank'])
        if 'efSearch' in self._params:
            self._hnsw = faiss.downcast_index(self._index.index).hnsw

    @staticmethod
    def _folder(root: str, name: str | None) -> str:
        """A local folder of the index version `name`: itself, or the cached copy of a bucket's."""
        index_dir = outputs.path(root, name) if name else root
        return index_dir if outputs.is_local(index_dir) else cached_copy(index_dir)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, id64s) of the k nearest chunks of each query; id -1 where there are fewer."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta['dim'])
        if 'efSearch' in self._params:
            self._hnsw.efSearch = max(self._params['efSearch'], k)
        if self._rerank is None:
            return self._index.search(queries, k)
        params = None
        if self._mask is not None:
            params = faiss.SearchParametersIVF(sel=self._mask.selector,
                                               nprobe=self._params['nprobe'])
        _, candidates = self._index.search(queries, k * self._params['k_factor'], params=params)
        scores, ids = self._rerank.top(queries, candidates, k)
        if self._delta is None or not self._delta.ntotal:
            return scores, ids
        added, added_ids = self._delta.search(queries, k)
        return _merge(np.hstack([scores, added]), np.hstack([ids, added_ids]), k)

    def ids(self) -> np.ndarray:
        """Every id64 the index holds, sorted."""
        if self._rerank is None:
            return np.sort(faiss.vector_to_array(self._index.id_map))
        lists = faiss.extract_index_ivf(self._index).invlists
        base = np.concatenate([np.empty(0, dtype=np.int64)] + [
            faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
            for n in range(lists.nlist) if lists.list_size(n)])
        if self._mask is not None:
            base = base[~self._mask.hides(base)]
        if self._delta is not None:
            base = np.concatenate([base, faiss.vector_to_array(self._delta.id_map)])
        return np.sort(base)


def _merge(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of (scores, ids), -1 ids last."""
    scores = np.where(ids == -1, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


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
