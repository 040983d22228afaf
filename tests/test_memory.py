"""Memory does not grow with object size: a 200 MB text object in a fraction of a 512 MB worker.

The bound is on the anonymous memory (bench.measure): the RSS of the same run also counts
95-170 MB of shared-library pages, as many as the page cache holds (more just after an
install), and that part does not depend on the data.
"""
from __future__ import annotations

import sys

import pyarrow.dataset as ds

from bench.generate import write_text
from bench.measure import run_measured
from tests.conftest import ROOT


def test_large_text_object_stays_under_400mb(tmp_path):
    size = 200 * 2**20
    src = tmp_path / 'big.txt'
    write_text(str(src), size)
    out = tmp_path / 'out'
    m = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(src),
                      '--output', str(out), '--index-type', 'none', '--embedder', 'hash'],
                     cwd=ROOT)
    assert m.returncode == 0, m.output[-3000:]
    assert m.peak_anon_mb < 320, f'peak anonymous memory {m.peak_anon_mb:.0f} MB'  # seen: 225-256
    assert m.peak_rss_mb <= 512, f'peak RSS {m.peak_rss_mb:.0f} MB'
    chunks = ds.dataset(out / 'chunks').to_table(columns=['start', 'end'])
    assert chunks.num_rows > size // 1000 * 0.95
