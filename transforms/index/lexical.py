"""The lexical index beside the vectors: BM25 over each table version's chunks, in tantivy.

DIR/index/lexical/vN is a tantivy index of table version N and ids.npy, the sorted id64s it
holds. A document is a chunk: `id64` (i64, indexed and fast), `words` (its words, with their
frequencies and positions) and `pairs` (each pair of neighbouring words, frequencies only),
from `transforms.index.tokens`, joined by spaces for tantivy's whitespace tokenizer; a
query's come from the same functions. Scoring is tantivy's BM25 (k1 1.2, b 0.75) of the
query's words and pairs, plus PHRASE_BOOST x the BM25 of its words as a phrase, where a
chunk holds them in that order.

Every kept version's folder is a whole index. An incremental run starts from a copy of the
current version's (hard links on a local disk, server-side copies in a bucket: tantivy
writes each segment file once and never changes it), deletes the ids the table lost, adds
the rows it gained, and commits; the index.json that names the new folder is written after
it, so a run that dies leaves the previous index current. Past --index-rebuild-fraction of
changed ids, or on another tantivy, tokenizer or scoring (schema) version, it is rebuilt
from the table.

The build runs in the driver and streams the chunk table one row group at a time: its memory
is tantivy's writer heap (WRITER_HEAP_BYTES) plus a batch of text. tantivy indexes on up to
WRITER_THREADS threads and merges its segments in the background.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from typing import Iterator, Optional

import numpy as np
import tantivy
from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.index.files import LEXICAL_DIR, cached_copy, local_copy, save_npy, version_dir
from transforms.index.plan import BATCH_ROWS, part_batches, plan
from transforms.index.search import TIE_MARGIN
from transforms.index.tokens import TOKENIZER, pairs, words
from transforms.store import StoreConfig

IDS_FILE = 'ids.npy'
LIBRARY = 'tantivy'
SCORING = 'bm25(k1=1.2,b=0.75) + 2 x phrase'
PHRASE_BOOST = 2.0               # a chunk holding the query's words in its order scores more
WRITER_HEAP_BYTES = 128 << 20
WRITER_THREADS = 2
_REWRITTEN = {'meta.json', '.managed.json'}   # the files tantivy replaces (the rest: never)
_LOCKS = {'.tantivy-meta.lock', '.tantivy-writer.lock'}

_log = logging.getLogger(__name__)


def library_version() -> str:
    return metadata.version(LIBRARY)


def build(output: str, table_version: Optional[int], config: StoreConfig,
          current: Optional[dict], rebuild_fraction: float) -> dict:
    """Writes the lexical index of `table_version` into DIR/index/lexical/vN: an update of
    `current` (the current index.json's lexical entry) while the changed ids stay within
    `rebuild_fraction` of it, else a full build. Returns its index.json entry."""
    started = time.time()
    root = outputs.path(output, 'index', LEXICAL_DIR)
    name = version_dir(table_version)
    dest = outputs.path(root, name)
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config, table_version)
    base = _base(root, current, name, rebuild_fraction)
    outputs.remove(root, [name])  # what an earlier build of this version left
    with tempfile.TemporaryDirectory(prefix='ragbeam-lexical-') as tmp:
        work = dest if outputs.is_local(dest) else os.path.join(tmp, name)
        os.makedirs(work, exist_ok=True)
        done = _update(work, base, chunks, rebuild_fraction, tmp) if base else None
        if done is None:  # (an update that gives up does so before it writes to `work`)
            done = _full(work, chunks, config)
        ids, built, added, deleted = done
        save_npy(os.path.join(work, IDS_FILE), ids, np.arange(len(ids)))
        if work != dest:
            _upload(work, dest, base)
    entry = {'library': LIBRARY, 'version': library_version(), 'tokenizer': TOKENIZER,
             'scoring': SCORING, 'dir': f'{LEXICAL_DIR}/{name}', 'table_version': table_version,
             'count': int(len(ids)), 'built': built, 'added': added, 'deleted': deleted,
             'seconds': round(time.time() - started, 3)}
    _log.info('ragbeam: lexical index of %d chunks written (%s: %d added, %d deleted)',
              len(ids), built, added, deleted)
    return entry


def _base(root: str, current: Optional[dict], name: str, rebuild_fraction: float
          ) -> Optional[str]:
    """The folder of the current lexical index an update may start from, or None."""
    if (not current or rebuild_fraction <= 0 or current.get('library') != LIBRARY
            or current.get('version') != library_version()
            or current.get('tokenizer') != TOKENIZER or current.get('scoring') != SCORING):
        return None
    folder = outputs.path(root, current['dir'].split('/', 1)[1])
    if current['dir'].endswith('/' + name) or not FileSystems.exists(
            outputs.path(folder, IDS_FILE)):
        return None  # a rebuild of its own version, or it is gone
    return folder


def _schema() -> tantivy.Schema:
    schema = tantivy.SchemaBuilder()
    schema.add_integer_field('id64', indexed=True, fast=True)
    schema.add_text_field('words', tokenizer_name='whitespace', index_option='position')
    schema.add_text_field('pairs', tokenizer_name='whitespace', index_option='freq')
    return schema.build()


def _writer(index: tantivy.Index) -> tantivy.IndexWriter:
    threads = max(1, min(WRITER_THREADS, os.cpu_count() or 1))
    return index.writer(WRITER_HEAP_BYTES, threads)


def _add(writer: tantivy.IndexWriter, ids: list[int], texts: list[str]) -> None:
    for id64, text in zip(ids, texts):
        found = words(text)
        writer.add_document(tantivy.Document(id64=[id64], words=[' '.join(found)],
                                             pairs=[' '.join(pairs(found))]))


def _commit(writer: tantivy.IndexWriter) -> None:
    writer.commit()
    writer.wait_merging_threads()


def _full(work: str, chunks: outputs.ParquetFolder, config: StoreConfig) -> tuple:
    """Every distinct id of the table version (the plan skips the repeats of a retried write)."""
    index = tantivy.Index(_schema(), path=work)
    writer = _writer(index)
    chunk_plan = plan(chunks)
    ids = []
    for part in chunk_plan.parts:
        for batch in part_batches(part, config, ['id64', 'text']):
            _add(writer, batch.column('id64').to_pylist(), batch.column('text').to_pylist())
            ids.append(batch.column('id64').to_numpy())
    _commit(writer)
    every = np.sort(np.concatenate([np.empty(0, np.int64)] + ids))
    return every, 'full', int(len(every)), 0


def _update(work: str, base: str, chunks: outputs.ParquetFolder, rebuild_fraction: float,
            tmp: str) -> Optional[tuple]:
    """The base's index, less the ids the table lost, plus the rows it gained; None when
    those pass `rebuild_fraction` of the base."""
    with tempfile.TemporaryDirectory(prefix='ragbeam-lexical-ids-', dir=tmp) as ids_tmp:
        base_ids = np.load(local_copy(outputs.path(base, IDS_FILE), ids_tmp))
    per_file = {ref: chunks.column(ref, 'id64') for ref in chunks.refs}
    now = np.unique(np.concatenate([np.empty(0, np.int64)] + list(per_file.values())))
    gone, new = np.setdiff1d(base_ids, now), np.setdiff1d(now, base_ids)
    if len(gone) + len(new) > rebuild_fraction * len(base_ids):
        return None
    _copy_base(base, work)
    index = tantivy.Index.open(work)
    writer = _writer(index)
    for id64 in gone.tolist():
        writer.delete_documents_by_term('id64', id64)
    added = np.zeros(len(new), dtype=bool)
    for ref, ids in per_file.items():
        rows = _rows_to_add(ids, new, added)
        if len(rows):
            for batch_ids, texts in _rows_of(chunks, ref, rows):
                _add(writer, batch_ids, texts)
    _commit(writer)
    return now, 'update', int(len(new)), int(len(gone))


def _rows_to_add(ids: np.ndarray, new: np.ndarray, added: np.ndarray) -> np.ndarray:
    """The rows of a file whose id is new and not added yet (each id once), marking them."""
    at = np.minimum(np.searchsorted(new, ids), max(len(new) - 1, 0))
    hit = np.flatnonzero((new[at] == ids) & ~added[at]) if len(new) else np.empty(0, np.int64)
    _, first = np.unique(at[hit], return_index=True)
    rows = np.sort(hit[first])
    added[at[rows]] = True
    return rows


def _rows_of(chunks: outputs.ParquetFolder, ref, rows: np.ndarray) -> Iterator[tuple]:
    """(id64s, texts) of some rows of a file, batch by batch."""
    parquet = chunks.open(ref)
    offset = 0
    for batch in outputs.row_group_batches(parquet, range(parquet.num_row_groups),
                                           ['id64', 'text'], BATCH_ROWS):
        mine = (rows[(rows >= offset) & (rows < offset + batch.num_rows)] - offset).tolist()
        offset += batch.num_rows
        if mine:
            ids, texts = batch.column('id64').to_pylist(), batch.column('text').to_pylist()
            yield [ids[r] for r in mine], [texts[r] for r in mine]


def _copy_base(base: str, work: str) -> None:
    """The base's tantivy files in `work`: linked where local (copied: the files it rewrites)."""
    for name in outputs.children(base) - _LOCKS - {IDS_FILE}:
        source = outputs.path(base, name)
        if not outputs.is_local(base):
            local_copy(source, work)
        elif name in _REWRITTEN:
            shutil.copyfile(source, os.path.join(work, name))
        else:
            os.link(source, os.path.join(work, name))


def _upload(work: str, dest: str, base: Optional[str]) -> None:
    """The local index in `work` to the bucket folder `dest`; the base's segment files that
    it kept are copied within the store."""
    in_base = outputs.children(base) if base else set()
    for name in sorted(set(os.listdir(work)) - _LOCKS):
        if name in in_base and name not in _REWRITTEN | {IDS_FILE}:
            FileSystems.copy([outputs.path(base, name)], [outputs.path(dest, name)])
            continue
        with open(os.path.join(work, name), 'rb') as src, \
                FileSystems.create(outputs.path(dest, name)) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


class LexicalSearcher:
    """A version's lexical index, opened from its folder (a bucket's through a local copy)."""

    def __init__(self, output: str, entry: dict):
        folder = outputs.path(output, 'index', *entry['dir'].split('/'))
        if not outputs.is_local(folder):
            folder = cached_copy(folder)
        self.entry = entry
        self._index = tantivy.Index.open(folder)
        self._schema = self._index.schema
        self._searcher = self._index.searcher()

    def search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(BM25 scores, id64s) of the k best chunks for `text`'s terms, best first."""
        phrase = words(text)
        if not phrase or k < 1:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        clauses = [(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, field, term))
                   for field, found in (('words', phrase), ('pairs', pairs(phrase)))
                   for term in dict.fromkeys(found)]
        if len(phrase) > 2:  # the whole text as it stands in a chunk
            clauses.append((tantivy.Occur.Should, tantivy.Query.boost_query(
                tantivy.Query.phrase_query(self._schema, 'words', phrase), PHRASE_BOOST)))
        query = tantivy.Query.boolean_query(clauses)
        hits = self._searcher.search(query, k + TIE_MARGIN, count=False).hits
        ids = np.asarray(self._searcher.fast_field_values('id64', [a for _, a in hits]),
                         dtype=np.int64)
        scores = np.asarray([score for score, _ in hits], dtype=np.float32)
        order = np.lexsort((ids, -scores))[:k]  # equal scores by id64, as the vectors
        return scores[order], ids[order]

    def ids(self) -> np.ndarray:
        """Every id64 the index holds, sorted."""
        count = self._searcher.num_docs
        if not count:
            return np.empty(0, np.int64)
        hits = self._searcher.search(tantivy.Query.all_query(), count, count=False).hits
        return np.sort(np.asarray(self._searcher.fast_field_values(
            'id64', [address for _, address in hits]), dtype=np.int64))
