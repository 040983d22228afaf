"""What workers tell about themselves while they run.

- The resident memory of each stage (read, pdf_child, entities, embed, write), sampled at most
  every SAMPLE_SECONDS, as Beam distributions `rss_mb_<stage>` (the report shows their max)
  and the time each stage spends, as counters `stage_ms_<stage>`.
- One warning line per stage and process when the memory passes --memory-warn-mb, naming
  the stage, the object and the RSS.
- Counts of work done (objects and bytes listed, bytes read, chunks written, objects done)
  for the driver's progress line: when the driver set $RAGBEAM_PROGRESS_DIR (local runs,
  in-process or worker processes), each process writes its counts there once a second.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from apache_beam.metrics import Metrics

STAGES = ('read', 'pdf_child', 'entities', 'embed', 'write')
SAMPLE_SECONDS = 0.2
PROGRESS_ENV = 'RAGBEAM_PROGRESS_DIR'
PROGRESS_SECONDS = 1.0

_log = logging.getLogger(__name__)
_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


@dataclass(frozen=True)
class MonitorOptions:
    """How many reads a worker process runs at once, and when it warns about its memory."""
    memory_warn_mb: int = field(default=450, metadata={
        'flag': '--memory-warn-mb',
        'help': 'a worker whose resident memory passes this logs one warning per stage, '
                'naming the stage, the object and the RSS'})
    reads_per_worker: int = field(default=2, metadata={
        'flag': '--reads-per-worker',
        'help': 'restrictions (byte or page ranges) one worker process reads at once; each '
                'holds a read window, an embedding batch and a row group, and a runner may '
                'send more bundles at once (Prism sends up to 8)'})

    def validate(self) -> None:
        if self.memory_warn_mb < 1:
            raise ValueError('--memory-warn-mb must be positive')
        if self.reads_per_worker < 1:
            raise ValueError('--reads-per-worker must be at least 1')


_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()
_HOLDER = threading.local()


@contextlib.contextmanager
def read_slot(slots: int) -> Iterator[None]:
    """Holds one of the `slots` read slots of this process while a restriction is read.

    Beam's Python harness runs at once every bundle a runner sends it. A thread that holds a
    slot already (a reader whose output reaches another reader in the same fused stage)
    takes none: the readers of one thread never wait on each other.
    """
    depth = getattr(_HOLDER, 'depth', 0)
    slot = contextlib.nullcontext()
    if not depth:
        with _SLOTS_LOCK:
            slot = _SLOTS.setdefault(slots, threading.BoundedSemaphore(slots))
    with slot:
        _HOLDER.depth = depth + 1
        try:
            yield
        finally:
            _HOLDER.depth = depth


def rss_mb(pid: int | str = 'self') -> float:
    """Resident memory of a process (this one by default), in MB; 0 when it is gone."""
    try:
        with open(f'/proc/{pid}/statm') as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        if pid == 'self':
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return 0.0


def anon_mb(pid: int | str = 'self') -> float:
    """The anonymous part of a process's resident memory (RssAnon + RssShmem), in MB: RSS
    less the pages of mapped files (shared libraries), which are clean, reclaimable, and as
    many as the page cache happens to hold; 0 when /proc does not tell."""
    try:
        with open(f'/proc/{pid}/status') as f:
            return sum(int(line.split()[1]) for line in f
                       if line.startswith(('RssAnon:', 'RssShmem:'))) / 1024
    except (OSError, ValueError, IndexError):
        return 0.0


_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


class StageMonitor:
    """The memory and time of one stage in one DoFn instance."""

    def __init__(self, stage: str, warn_mb: int):
        self._stage = stage
        self._warn_mb = warn_mb
        self._rss = Metrics.distribution('ragbeam', f'rss_mb_{stage}')
        self._ms = Metrics.counter('ragbeam', f'stage_ms_{stage}')
        self._next = 0.0

    def sample(self, uri: str = '', rss: Optional[float] = None) -> None:
        """Records the RSS (this process's, or `rss` of another one), at most every
        SAMPLE_SECONDS; warns the first time the stage passes the limit in this process."""
        now = time.monotonic()
        if rss is None:
            if now < self._next:
                return
            self._next = now + SAMPLE_SECONDS
            rss = rss_mb()
        self._rss.update(int(rss))
        if rss > self._warn_mb:
            with _WARNED_LOCK:
                if self._stage in _WARNED:
                    return
                _WARNED.add(self._stage)
            _log.warning('ragbeam: memory warning: stage %s at %.0f MB (over --memory-warn-mb '
                         '%d) while on %s', self._stage, rss, self._warn_mb, uri or '-')

    @contextlib.contextmanager
    def timed(self, uri: str = '') -> Iterator[None]:
        """Adds the time of the block to the stage's counter and samples the RSS after it."""
        started = time.monotonic()
        try:
            yield
        finally:
            self._ms.inc(int((time.monotonic() - started) * 1000))
            self.sample(uri)


class _WorkCounts:
    """This process's counts of work done, written for the driver's progress line. A new
    progress folder (the next run in the same process) starts from zero."""

    def __init__(self):
        self._counts: Counter = Counter()
        self._folder: Optional[str] = None
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def add(self, **counts: int) -> None:
        folder = os.environ.get(PROGRESS_ENV)
        if not folder:
            return
        with self._lock:
            if folder != self._folder:
                self._folder, self._counts = folder, Counter()
            self._counts.update(counts)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_forever, daemon=True,
                                                name='ragbeam-progress')
                self._thread.start()

    def bundle_done(self) -> None:
        """Writes the counts now (at the end of a bundle), so that the driver's last sample,
        taken when the job is done, has them all (the writer thread waits a second)."""
        if self._folder is not None:
            self.flush()

    def _write_forever(self) -> None:
        while True:
            self.flush()
            time.sleep(PROGRESS_SECONDS)

    def flush(self) -> None:
        with self._lock:
            folder, data = self._folder, json.dumps(dict(self._counts))
        path = os.path.join(folder, f'{os.getpid()}.json')
        try:
            with open(path + '.tmp', 'w') as f:
                f.write(data)
            os.replace(path + '.tmp', path)
        except OSError:
            pass  # the run is over and its driver removed the folder


WORK = _WorkCounts()


def read_progress(folder: str) -> Counter:
    """The sum of every process's counts in the progress folder."""
    total: Counter = Counter()
    try:
        names = [n for n in os.listdir(folder) if n.endswith('.json')]
    except OSError:
        return total
    for name in names:
        try:
            with open(os.path.join(folder, name)) as f:
                total.update(json.load(f))
        except (OSError, ValueError):
            continue
    return total
