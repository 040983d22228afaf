"""The hash embedder: deterministic, unit length, lexical similarity."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from transforms.embed import HashEmbedder

TEXTS = ['Beam splits objects into byte ranges.', 'Объекты делятся на диапазоны байтов.',
         '对象被分成字节范围。', '', '!!!', 'beam splits objects into BYTE ranges']


def test_vectors_are_unit_length_and_stable():
    v, q = HashEmbedder().embed(TEXTS), HashEmbedder().embed_queries(TEXTS)
    assert v.shape == q.shape == (len(TEXTS), 384) and v.dtype == q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(v, HashEmbedder().embed(TEXTS))
    assert q[0] @ q[5] > 0.99 and abs(q[0] @ q[1]) < 0.5


def test_short_chunks_score_as_if_they_had_the_pivot_features():
    """A chunk's vector keeps its features' direction; a chunk with n < PIVOT features puts
    the rest of its length in dimension 0, which queries never use, so a query's score with
    it is its score with a chunk of PIVOT features."""
    e = HashEmbedder()
    short, long_ = 'beam splits objects', ' '.join(f'word{i}' for i in range(200))
    v, q = e.embed([short, long_]), e.embed_queries([short, long_])
    assert (q[:, 0] == 0).all() and v[1, 0] == 0 and v[0, 0] > 0.9
    features = np.count_nonzero(q[0])
    assert q[0] @ v[0] == pytest.approx((features / e.PIVOT) ** 0.5, rel=1e-5)
    np.testing.assert_allclose(q[1], v[1], atol=1e-6)  # past the pivot: the same vector


def test_vectors_do_not_depend_on_the_process_hash_seed():
    code = ('from transforms.embed import HashEmbedder;'
            'print(HashEmbedder().embed(["split invariant chunk ids"]).tobytes().hex())')
    outs = {subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           env={'PYTHONHASHSEED': seed, 'PATH': ''}).stdout for seed in ('1', '2')}
    assert len(outs) == 1 and outs.pop()


def test_batches_give_the_same_vectors_as_single_texts():
    e = HashEmbedder()
    together = e.embed(TEXTS)
    alone = np.vstack([e.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-6)
