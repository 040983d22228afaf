"""Updating an ivfpq index in place of a rebuild, after an incremental commit.

A full build is a *base*: its on-disk lists, re-rank codes and trained (empty) index. A later
table version's index reuses that base as it is and adds two small files in its own folder:
- a *delta*: the vectors of the rows in files the table gained since the base's version, in an
  exact SQ8 index (the base's re-rank codec, so its scores compare with the base's re-ranked
  ones);
- *tombstones*: the base ids of rows in files the table lost since then (replaced or deleted
  objects, rewritten files), masked at search time with an IDSelector (FAISS's on-disk lists
  cannot remove ids).
Both are measured against the base, not the previous version: each update replaces the last
one's delta, and when delta plus tombstones pass --index-rebuild-fraction of the base, the
index is rebuilt instead.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import faiss
import numpy as np
import pyarrow.compute as pc

from apache_beam.io.filesystems import FileSystems

from transforms import corpus, outputs
from transforms.index.files import (CODEC_FILE, DELTA_FILE, TOMBSTONES_FILE, RerankCodes,
                                    local_copy, save_npy, version_dir, writable)
from transforms.index.plan import BATCH_ROWS, embeddings
from transforms.store import StoreConfig

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """What a table version changes against the base index: ids to mask, vectors to add."""
    tombstones: np.ndarray        # sorted base ids no longer in the table, or with new vectors
    delta_ids: np.ndarray         # sorted ids to add, in the order of `delta_vectors`
    delta_vectors: np.ndarray
    live_base: int                # base ids still in the table


def base_of(meta: dict) -> dict:
    """The base a (current) ivfpq index's meta stands on: its own folder for a full build."""
    return meta.get('base') or {'dir': meta['dir'], 'table_version': meta['table_version']}


def try_update(output: str, current: dict, table_version: Optional[int], config: StoreConfig,
               rebuild_fraction: float) -> Optional[dict]:
    """The meta of table `table_version`'s index as an update of `current`'s base (its delta
    and tombstones written into their version folder), or None when it must be rebuilt."""
    if (current.get('type') != 'ivfpq' or table_version is None or 'dir' not in current
            or current.get('table_version') is None or rebuild_fraction <= 0):
        return None
    base = base_of(current)
    if base['table_version'] == table_version:
        return None  # its own base: a rebuild of that version was asked for
    root = outputs.path(output, 'index')
    base_dir = outputs.path(root, base['dir'])
    if not FileSystems.exists(outputs.path(base_dir, CODEC_FILE)):
        return None  # its base is gone
    update = _changes(output, base, base_dir, table_version, config, current,
                      rebuild_fraction)
    if update is None:
        return None
    name = version_dir(table_version)
    index_dir = outputs.path(root, name)
    outputs.remove(root, [name])  # what an earlier build of this version left
    with tempfile.TemporaryDirectory(prefix='ragbeam-delta-') as tmp:
        codec = faiss.read_index(local_copy(outputs.path(base_dir, CODEC_FILE), tmp))
    delta = faiss.IndexIDMap2(codec)
    if len(update.delta_ids):
        delta.add_with_ids(update.delta_vectors, update.delta_ids)
    with writable(outputs.path(index_dir, DELTA_FILE)) as local:
        faiss.write_index(delta, local)
    save_npy(outputs.path(index_dir, TOMBSTONES_FILE), update.tombstones,
             np.arange(len(update.tombstones)))
    count = update.live_base + len(update.delta_ids)
    _log.info('ragbeam: ivfpq index updated: %d vectors added, %d masked, on the base of table '
              'version %s', len(update.delta_ids), len(update.tombstones), base['table_version'])
    return dict(current, count=count, table_version=table_version, dir=name, base=base,
                delta={'file': DELTA_FILE, 'count': int(len(update.delta_ids))},
                tombstones={'file': TOMBSTONES_FILE, 'count': int(len(update.tombstones))},
                built='update')


def _changes(output: str, base: dict, base_dir: str, table_version: int, config: StoreConfig,
             current: dict, rebuild_fraction: float) -> Optional[Update]:
    """The tombstones and the delta of `table_version` against the base, or None when they
    pass the rebuild fraction, the model changed, or files of the base's version are gone.

    Only the files the table lost and gained since the base's version are read. A gained file
    that ragbeam's commit wrote as a copy of a base file's rows (less replaced objects') is
    read for its ids alone. Of another gained file, a row whose id the base holds with the
    same SQ8 code is neither masked nor added; one whose vector changed is both.
    """
    chunks_path = outputs.path(output, 'chunks')
    before = outputs.ParquetFolder(chunks_path, config, base['table_version'])
    if before.missing:
        _log.info('ragbeam: files of table version %s are gone (vacuumed?); rebuilding the '
                  'index', base['table_version'])
        return None
    now = outputs.ParquetFolder(chunks_path, config, table_version)
    before_uris, now_uris = {r.uri for r in before.refs}, {r.uri for r in now.refs}
    lost = [r for r in before.refs if r.uri not in now_uris]
    gained = [r for r in now.refs if r.uri not in before_uris]
    lost_files = {corpus.table_relpath(chunks_path, r.uri) for r in lost}
    copies = corpus.copied_files(chunks_path, config.delta_storage_options(chunks_path),
                                 base['table_version'], table_version)
    with tempfile.TemporaryDirectory(prefix='ragbeam-base-') as tmp:
        rerank = _base_codes(base_dir, current, tmp)
        base_ids = rerank.ids()
        limit = rebuild_fraction * len(base_ids)
        removed = np.unique(np.concatenate([np.empty(0, np.int64)] + [
            before.column(ref, 'id64') for ref in lost]))
        changed, ids, vectors, seen = [], [], [], []
        dim = current['dim']
        for ref in gained:
            if copies.get(corpus.table_relpath(chunks_path, ref.uri)) in lost_files:
                seen.append(now.column(ref, 'id64'))  # base rows, copied: only their ids
                continue
            parquet = now.open(ref)
            for batch in outputs.row_group_batches(parquet, range(parquet.num_row_groups),
                                                   ['id64', 'embedding', 'model'], BATCH_ROWS):
                if set(pc.unique(batch.column('model')).to_pylist()) - {current.get('model')}:
                    _log.info('ragbeam: the model changed; rebuilding the index')
                    return None
                batch_ids = batch.column('id64').to_numpy()
                batch_vectors = embeddings(batch, dim)
                seen.append(batch_ids)
                in_base = np.isin(batch_ids, base_ids)
                same = np.zeros(len(batch_ids), dtype=bool)
                if in_base.any():
                    same[in_base] = (rerank.codes(batch_ids[in_base]) ==
                                     rerank.codec.sa_encode(batch_vectors[in_base])).all(axis=1)
                changed.append(batch_ids[in_base & ~same])
                ids.append(batch_ids[~same])
                vectors.append(batch_vectors[~same])
                if sum(map(len, ids)) > limit:
                    return None
    if len(removed):  # an id may also be in a file that stayed (a retried write's repeat)
        seen += [now.column(ref, 'id64') for ref in now.refs if ref.uri in before_uris]
    every = np.concatenate([np.empty(0, np.int64)] + seen)
    gone = np.intersect1d(np.setdiff1d(removed, every), base_ids)
    tombstones = np.union1d(gone, np.concatenate([np.empty(0, np.int64)] + changed))
    delta_ids, first = np.unique(np.concatenate([np.empty(0, np.int64)] + ids),
                                 return_index=True)  # a repeated row once
    if len(tombstones) + len(delta_ids) > limit:
        return None
    stacked = np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)
    return Update(tombstones, np.ascontiguousarray(delta_ids),
                  np.ascontiguousarray(stacked[first], dtype=np.float32),
                  len(base_ids) - len(tombstones))


def _base_codes(base_dir: str, current: dict, tmp: str) -> RerankCodes:
    """The base's re-rank codes (every id of the base, once), from local copies in `tmp`."""
    names = [current['search']['codec']] + [f'{name}.{part}.npy'
                                            for name in current['search']['rerank']
                                            for part in ('ids', 'sq8')]
    folder = base_dir
    if not outputs.is_local(base_dir):
        for name in names:
            local_copy(outputs.path(base_dir, name), tmp)
        folder = tmp
    return RerankCodes(folder, current['search']['codec'], current['search']['rerank'])


def load_mask(folder: str, meta: dict):
    """(the delta index or None, the IDSelector that hides the tombstones or None) of an
    updated index's folder (local)."""
    if 'delta' not in meta:
        return None, None
    delta = faiss.read_index(os.path.join(folder, meta['delta']['file']))
    tombstones = np.load(os.path.join(folder, meta['tombstones']['file']))
    if not len(tombstones):
        return delta, None
    return delta, Mask(tombstones)


class Mask:
    """An IDSelector that passes every id but the tombstones (it keeps their array alive)."""

    def __init__(self, tombstones: np.ndarray):
        self.ids = np.ascontiguousarray(tombstones, dtype=np.int64)
        self._batch = faiss.IDSelectorBatch(len(self.ids), faiss.swig_ptr(self.ids))
        self.selector = faiss.IDSelectorNot(self._batch)

    def hides(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, self.ids)
