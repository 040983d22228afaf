"""glibc heap settings that keep a worker's RSS to what it holds; elsewhere than glibc, none.

glibc gives each thread that allocates an arena of its own and keeps what was freed in it, and
it raises its mmap threshold after each large free, so later large buffers come from a heap
that fragments and is not given back. Both show as RSS that grows with the length of a run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ARENAS = 2
"""At most this many malloc arenas: Prism runs up to 8 bundles at once on the threads of one
worker, and a 1 GiB text peaked at 531 MB of Python RSS with glibc's default, 457 MB with 2."""
MMAP_THRESHOLD = 4 << 20
"""Allocations of this size or more are mapped, and unmapped when freed, whatever was freed
before: a 1 GiB text on the FnApiRunner peaked at 428 MB with glibc's moving threshold, 408 MB
with this (`bench.bench_text engines`); a torch minilm run over the shared corpus at 833 MB,
757 MB with it."""

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _mallopt(param: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.mallopt(param, value)
    except (OSError, AttributeError):
        pass


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> None:
    """A fixed mmap threshold for this process (it also stops glibc raising it)."""
    _mallopt(_M_MMAP_THRESHOLD, threshold)


def bound(arenas: int = ARENAS, threshold: int = MMAP_THRESHOLD) -> None:
    """Both settings for this process, and as defaults for the processes it starts (glibc reads
    MALLOC_ARENA_MAX and MALLOC_MMAP_THRESHOLD_ at a process's start); a value already in the
    environment wins."""
    os.environ.setdefault('MALLOC_ARENA_MAX', str(arenas))
    os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', str(threshold))
    _mallopt(_M_ARENA_MAX, int(os.environ['MALLOC_ARENA_MAX']))
    map_large_allocations(int(os.environ['MALLOC_MMAP_THRESHOLD_']))
