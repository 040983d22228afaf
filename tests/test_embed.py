"""The hash embedder: deterministic, unit length, lexical similarity."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from transforms.embed import HashEmbedder

TEXTS = ['Beam splits objects into byte ranges.', 'Объекты делятся на диапазоны байтов.',
         '对象被分成字节范围。', '', '!!!', 'beam splits objects into BYTE ranges']


def test_vectors_are_unit_length_and_stable():
    v = HashEmbedder().embed(TEXTS)
    assert v.shape == (len(TEXTS), 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(v, HashEmbedder().embed(TEXTS))
    assert v[0] @ v[5] > 0.99 and abs(v[0] @ v[1]) < 0.5


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
