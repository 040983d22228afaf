"""The vector index over a run's chunks: built by streaming the chunk Parquet, then queried."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from transforms import outputs
from transforms.store import StoreConfig

INDEX_FILE = 'faiss.index'
BATCH_ROWS = 16384

_log = logging.getLogger(__name__)


def build_index(output: str, index_type: str, config: StoreConfig = StoreConfig()) -> dict:
    """Builds DIR/index from DIR/chunks, adding each id64 once; returns index.json's content.

    'auto' is a flat (exact) index for now; approximate types come with the index issue.
    """
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config)
    dim, model = _dim_and_model(chunks)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    seen: set[int] = set()
    for batch in chunks.batches(['id64', 'embedding'], BATCH_ROWS):
        ids = batch.column('id64').to_numpy()
        keep = np.fromiter((i not in seen for i in ids.tolist()), dtype=bool, count=len(ids))
        if not keep.any():
            continue
        seen.update(ids[keep].tolist())
        vectors = batch.column('embedding').flatten().to_numpy(zero_copy_only=False)
        index.add_with_ids(vectors.reshape(-1, dim)[keep].astype(np.float32), ids[keep])
    meta = {'type': 'flat', 'requested_type': index_type, 'metric': 'inner_product',
            'dim': dim, 'count': int(index.ntotal), 'model': model, 'file': INDEX_FILE}
    _write_index(index, outputs.path(output, 'index', INDEX_FILE))
    outputs.write_json(outputs.path(output, 'index', 'index.json'), meta)
    _log.info('ragbeam: index %s of %d vectors written', meta['type'], meta['count'])
    return meta


def _dim_and_model(chunks: outputs.ParquetFolder) -> tuple[int, str]:
    dim = chunks.schema().field('embedding').type.list_size
    models = set()
    for batch in chunks.batches(['model'], BATCH_ROWS):
        models.update(pc.unique(batch.column('model')).to_pylist())
    if len(models) > 1:
        raise ValueError(f'chunks of several models cannot share one index: {sorted(models)}')
    return dim, (models.pop() if models else None)


def _write_index(index, file_path: str) -> None:
    if outputs.is_local(file_path):
        os.makedirs(os.path.dirname(file_path), exist_ok=True)
        faiss.write_index(index, file_path)
        return
    with tempfile.NamedTemporaryFile(suffix='.index') as tmp:
        faiss.write_index(index, tmp.name)
        with open(tmp.name, 'rb') as src, FileSystems.create(file_path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def search(output: str, vector: np.ndarray, k: int) -> list[tuple[float, int]]:
    """The k nearest (score, id64) to one vector."""
    meta = outputs.read_json(outputs.path(output, 'index', 'index.json'))
    file_path = outputs.path(output, 'index', meta['file'])
    if outputs.is_local(file_path):
        index = faiss.read_index(file_path)
    else:
        with tempfile.NamedTemporaryFile(suffix='.index') as tmp:
            with FileSystems.open(file_path, compression_type='uncompressed') as src:
                shutil.copyfileobj(src, tmp, 8 << 20)
            tmp.flush()
            index = faiss.read_index(tmp.name)
    scores, ids = index.search(vector.reshape(1, -1).astype(np.float32), k)
    return [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i != -1]


def lookup(output: str, ids: list[int], config: StoreConfig = StoreConfig()) -> dict[int, dict]:
    """The chunk rows of the given id64s, by id64."""
    chunks = outputs.ParquetFolder(outputs.path(output, 'chunks'), config)
    wanted = pa.array(ids, type=pa.int64())
    table = chunks.table(['id64', 'chunk_id', 'uri', 'page', 'start', 'end', 'text'],
                         where=lambda b: pc.is_in(b.column('id64'), value_set=wanted))
    return {row['id64']: row for row in table.to_pylist()}
