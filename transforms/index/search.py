"""Searching an index and reading back the rows of the hits."""
from __future__ import annotations

import functools
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
        """(scores, id64s) of the k nearest chunks of each query; id -1 where there are fewer.
        Equal scores are in id64 order, whatever order the index added them in (of the
        TIE_MARGIN candidates past the k-th)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta['dim'])
        return _merge(*self._search(queries, k + TIE_MARGIN, k), k)

    def _search(self, queries: np.ndarray, k: int, asked: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best; ivfpq re-ranks the candidates that `asked` results need: k_factor for
        each of the first ten (recall@10), four for each one past them (a fused or filtered
        query's long list)."""
        if 'efSearch' in self._params:
            self._hnsw.efSearch = max(self._params['efSearch'], k)
        if self._rerank is None:
            return self._index.search(queries, k)
        wanted = max(k, min(asked, 10) * self._params['k_factor'] + 4 * max(0, asked - 10))
        ivf = faiss.extract_index_ivf(self._index)
        # the lists hold ntotal / nlist vectors each: probe enough of them to hold `wanted`
        # (a filtered query asks for many; past all of them, every list)
        nprobe = int(min(ivf.nlist, max(self._params['nprobe'],
                                        -(-ivf.nlist * wanted // max(1, ivf.ntotal)))))
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if self._mask is not None:
            params = faiss.SearchParametersIVF(sel=self._mask.selector, nprobe=nprobe)
        _, candidates = self._index.search(queries, wanted, params=params)
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


TIE_MARGIN = 16


def _merge(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of (scores, ids), equal scores by id64, -1 ids last."""
    scores = np.where(ids == -1, -np.inf, scores)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
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


MODES = ('hybrid', 'dense', 'lexical')
FUSIONS = ('convex', 'rrf')      # measured: README, "Hybrid retrieval"
LEXICAL_WEIGHT = 0.6             # convex fusion: the BM25 list's share
RRF_K = 60                       # reciprocal-rank fusion: a list's rank r adds 1 / (RRF_K + r)
FUSED_DEPTH = 100                # candidates drawn from each list that hybrid fuses


def query_mode(meta: dict, mode: str | None) -> str:
    """The mode a query runs in: `mode`, or hybrid where the index has a lexical side."""
    if mode is None:
        return 'hybrid' if meta.get('lexical') else 'dense'
    if mode not in MODES:
        raise ValueError(f'--mode {mode!r}: expected one of {", ".join(MODES)}')
    if mode != 'dense' and not meta.get('lexical'):
        raise ValueError(f'--mode {mode} needs the lexical index, and this index has none '
                         '(ragbeam index --output DIR builds it; --lexical-index tantivy)')
    return mode


class Retriever:
    """The searchers of one index version and the chunk rows of its table version, loaded
    once for many queries (`query` is one)."""

    def __init__(self, output: str, config: StoreConfig = StoreConfig(),
                 version: int | None = None):
        self.output = output
        self.meta = index_meta(output, version)
        self._version = version
        self._searchers: dict = {}
        self._locator = None
        self.chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config,
                                            self.meta.get('table_version'))

    @functools.cached_property
    def has_entities(self) -> bool:
        schema = self.chunks.schema()
        return schema is not None and 'entities' in schema.names

    def _searcher(self, name: str):
        if name not in self._searchers:
            from transforms.index.lexical import LexicalSearcher
            self._searchers[name] = (Searcher(self.output, self._version) if name == 'dense'
                                     else LexicalSearcher(self.output, self.meta['lexical']))
        return self._searchers[name]

    def ranked(self, depth: int, vector: np.ndarray | None, text: str | None,
               mode: str) -> dict[str, list[tuple[float, int]]]:
        """Each list's (score, id64) of the `depth` best chunks, best first."""
        lists = {}
        for name in (('dense', 'lexical') if mode == 'hybrid' else (mode,)):
            query_input = vector if name == 'dense' else text
            if query_input is None:
                raise ValueError(f'a {mode} query needs ' +
                                 ('a vector' if name == 'dense' else 'its text'))
            scores, ids = self._searcher(name).search(query_input, depth)
            lists[name] = [(float(s), int(i)) for s, i in zip(np.ravel(scores), np.ravel(ids))
                           if i != -1]
        return lists

    def search(self, k: int, vector: np.ndarray | None = None, text: str | None = None,
               mode: str | None = None, uri_prefix: str = '',
               entity: tuple[str, str] | None = None, fusion: str = 'convex',
               with_entities: bool = False) -> list[dict]:
        """The k best chunks ({score, chunk_id, uri, page, start, end, text, and each list's
        rank and score; with `with_entities`, the chunk's entities where the table has
        them}): by `vector` (dense), by `text` (lexical, BM25), or both fused
        (hybrid, `fuse`: the default when `text` is given and the index has a lexical
        side). Only chunks of objects whose URI starts with `uri_prefix` and, with `entity`
        (label, text), only chunks that mention it.

        Filters apply to each list before fusion; with one, more candidates are drawn until
        k match or MAX_CANDIDATES were looked at.
        """
        mode = query_mode(self.meta, 'dense' if text is None and mode is None else mode)
        has_entities = self.has_entities
        if entity and not has_entities:
            raise ValueError(f'{self.output} has no entities (run with --entities spacy)')
        keep = with_entities and has_entities
        columns = RESULT_COLUMNS + (['entities'] if entity or keep else [])
        count = max(1, self.meta['count'])
        filtered = bool(uri_prefix or entity)
        wanted = max(k, FUSED_DEPTH if mode == 'hybrid' else k) * (10 if filtered else 1)
        while True:
            depth = min(wanted, count)
            lists = self.ranked(depth, vector, text, mode)
            by_id = {}
            if filtered:
                by_id = self._rows({i for hits in lists.values() for _, i in hits}, columns)
                lists = {name: [(s, i) for s, i in hits if i in by_id and
                                by_id[i]['uri'].startswith(uri_prefix) and
                                (not entity or mentions(by_id[i]['entities'], entity))]
                         for name, hits in lists.items()}
            results = fuse(lists, fusion)
            if len(results) >= k or depth >= min(MAX_CANDIDATES, count):
                break
            wanted *= 4
        results = results[:k]
        if not filtered:
            by_id = self._rows({i for _, i, _ in results}, columns)
        return [dict(score=round(score, 6), **{c: v for c, v in by_id[i].items()
                                               if c != 'entities' or keep}, **ranks)
                for score, i, ranks in results if i in by_id]

    def _rows(self, ids: set[int], columns: list[str]) -> dict[int, dict]:
        if self._locator is None:
            self._locator = _RowLocator(self.chunks)
        return self._locator.rows(ids, columns)


class _RowLocator:
    """Which row group of which chunk file holds each id64 of a table version: the id64
    column read once, so that each query reads only the row groups of its hits."""

    def __init__(self, chunks: outputs.ParquetFolder):
        self._files = [chunks.open(ref) for ref in chunks.refs]
        ids, groups = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for f, parquet in enumerate(self._files):
            for g in range(parquet.num_row_groups):
                column = parquet.read_row_group(g, columns=['id64']).column('id64').to_numpy()
                ids.append(column)
                groups.append(np.full(len(column), (f << 32) | g, dtype=np.int64))
        every = np.concatenate(ids)
        order = np.argsort(every, kind='stable')
        self._ids, self._groups = every[order], np.concatenate(groups)[order]

    def rows(self, wanted: set[int], columns: list[str]) -> dict[int, dict]:
        """{id64: row of `columns`} of the `wanted` ids the table holds (a repeated id's
        first row)."""
        keys = np.asarray(sorted(wanted), dtype=np.int64)
        at = np.minimum(np.searchsorted(self._ids, keys), max(len(self._ids) - 1, 0))
        found = (self._ids[at] == keys) if len(self._ids) else np.zeros(len(keys), bool)
        value_set = pa.array(keys[found], type=pa.int64())
        by_file: dict[int, list[int]] = {}
        for packed in sorted(set(self._groups[at[found]].tolist())):
            by_file.setdefault(packed >> 32, []).append(packed & 0xFFFFFFFF)
        out: dict[int, dict] = {}
        for f, groups in by_file.items():  # a file's groups decoded on pyarrow's threads
            table = self._files[f].read_row_groups(groups, columns=['id64'] + [
                c for c in columns if c != 'id64'], use_threads=True)
            table = table.filter(pc.is_in(table.column('id64'), value_set=value_set))
            for row in table.to_pylist():
                out.setdefault(row.pop('id64'), row)
        return out


def query(output: str, vector: np.ndarray | None, k: int, uri_prefix: str = '',
          config: StoreConfig = StoreConfig(), entity: tuple[str, str] | None = None,
          version: int | None = None, text: str | None = None,
          mode: str | None = None, fusion: str = 'convex') -> list[dict]:
    """`Retriever.search` of the current index, or of the index of table `version`; the rows
    come from the table version the index was built from."""
    return Retriever(output, config, version).search(k, vector, text, mode, uri_prefix, entity,
                                                     fusion)


def fuse(lists: dict[str, list[tuple[float, int]]], fusion: str = 'convex'
         ) -> list[tuple[float, int, dict]]:
    """(score, id64, {LIST_rank, LIST_score}) best first: one list's own scores, or two lists'
    fusion (ties: the better rank in either list, then the id).

    convex: LEXICAL_WEIGHT x the BM25 score + (1 - LEXICAL_WEIGHT) x the vector score, each
    min-max scaled over its list (a chunk missing from a list scores 0 there); rrf: the sum
    of 1 / (RRF_K + rank) over the lists.
    """
    if fusion not in FUSIONS:
        raise ValueError(f'--fusion {fusion!r}: expected one of {", ".join(FUSIONS)}')
    ranks: dict[int, dict] = {}
    for name, hits in lists.items():
        for rank, (score, i) in enumerate(hits, 1):
            ranks.setdefault(i, {f'{n}_{what}': None for n in lists for what in ('rank', 'score')})
            ranks[i][f'{name}_rank'], ranks[i][f'{name}_score'] = rank, round(score, 6)
    if len(lists) == 1:
        (hits,) = lists.values()
        return [(score, i, ranks[i]) for score, i in hits]
    fused = {i: 0.0 for i in ranks}
    for name, hits in lists.items():
        if fusion == 'rrf':
            for rank, (_, i) in enumerate(hits, 1):
                fused[i] += 1.0 / (RRF_K + rank)
            continue
        if not hits:
            continue
        weight = LEXICAL_WEIGHT if name == 'lexical' else 1.0 - LEXICAL_WEIGHT
        low, high = hits[-1][0], hits[0][0]
        for score, i in hits:
            fused[i] += weight * ((score - low) / (high - low) if high > low else 1.0)
    best = {i: min(r[f'{n}_rank'] or len(ranks) + 1 for n in lists) for i, r in ranks.items()}
    order = sorted(fused, key=lambda i: (-fused[i], best[i], i))
    return [(fused[i], i, ranks[i]) for i in order]
