"""The driver's watch over a run: the process tree's memory every second, and a progress line.

The progress comes from the counts that local workers write (transforms.monitor.WORK): on the
in-process FnApiRunner and its worker processes. On a terminal the line is redrawn in place
every second; otherwise a line is logged every PROGRESS_LOG_SECONDS.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Optional

import psutil

from transforms.monitor import PROGRESS_ENV, anon_mb, read_progress

SAMPLE_SECONDS = 1.0
PROGRESS_LOG_SECONDS = 10.0
MAX_SERIES = 7200  # past two hours at 1 s, the series is thinned to every other point

_log = logging.getLogger(__name__)


def tree_memory_mb(root: psutil.Process) -> tuple[float, float]:
    """Summed resident memory of a process and all its descendants, and its anonymous part
    (transforms.monitor.anon_mb), in MB."""
    rss = anon = 0.0
    for p in [root] + root.children(recursive=True):
        try:
            rss += p.memory_info().rss / 2**20
        except psutil.Error:
            continue
        anon += anon_mb(p.pid)
    return rss, anon


def progress_line(counts: dict, elapsed: float) -> str:
    """`ragbeam: 12/78 objects, 3.2/66.1 MB read (5%), 1,234 chunks, 1.2 MB/s, ETA 52 s`."""
    listed, done = counts.get('objects_listed', 0), counts.get('objects_done', 0)
    total, read = counts.get('bytes_listed', 0), counts.get('bytes_read', 0)
    chunks = counts.get('chunks_written', 0)
    rate = read / elapsed if elapsed > 0 else 0.0
    share = min(1.0, read / total) if total else 0.0
    eta = f', ETA {(total - read) / rate:.0f} s' if rate > 0 and read < total else ''
    return (f'ragbeam: {done}/{listed} objects, {read / 1e6:.1f}/{total / 1e6:.1f} MB read '
            f'({100 * share:.0f}%), {chunks:,} chunks, {rate / 1e6:.1f} MB/s{eta}')


class RunMonitor:
    """Context manager around a pipeline run: `series` holds [seconds, tree RSS MB, bytes read,
    chunks written] each second, `peak_mb` the largest tree RSS seen and `peak_anon_mb` the
    largest anonymous part of it."""

    def __init__(self, stream=None, sample_seconds: float = SAMPLE_SECONDS):
        self._stream = stream or sys.stderr
        self._interval = sample_seconds
        self._tty = hasattr(self._stream, 'isatty') and self._stream.isatty()
        self._stop = threading.Event()
        self._root = psutil.Process()
        self.series: list[list[float]] = []
        self.peak_mb = 0.0
        self.peak_anon_mb = 0.0
        self._folder: Optional[str] = None
        self._saved_env: Optional[str] = None

    def __enter__(self) -> 'RunMonitor':
        self._folder = tempfile.mkdtemp(prefix='ragbeam-progress-')
        self._saved_env = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = self._folder
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True, name='ragbeam-monitor')
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._tty:
            self._stream.write('\n')
            self._stream.flush()
        if self._saved_env is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = self._saved_env
        shutil.rmtree(self._folder, ignore_errors=True)

    def _watch(self) -> None:
        next_log = self._started + PROGRESS_LOG_SECONDS
        while not self._stop.wait(self._interval):
            counts = self._sample()
            now = time.monotonic()
            line = progress_line(counts, now - self._started) + f', RSS {self.series[-1][1]:.0f} MB'
            if self._tty:
                self._stream.write('\r' + line[:200] + '\x1b[K')
                self._stream.flush()
            elif now >= next_log:
                next_log = now + PROGRESS_LOG_SECONDS
                _log.info('%s', line)

    def _sample(self) -> dict:
        counts = read_progress(self._folder)
        rss, anon = tree_memory_mb(self._root)
        self.peak_mb = max(self.peak_mb, rss)
        self.peak_anon_mb = max(self.peak_anon_mb, anon)
        self.series.append([round(time.monotonic() - self._started, 1), round(rss, 1),
                            counts.get('bytes_read', 0), counts.get('chunks_written', 0)])
        if len(self.series) > MAX_SERIES:
            self.series = self.series[::2]
        return counts
