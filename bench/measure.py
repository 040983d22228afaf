"""Peak resident memory of a command and all its child processes, sampled while it runs.

Two peaks: RSS, and its anonymous part. RSS also counts the pages of shared libraries that a
process has mapped, clean and reclaimable, and how many of them there are depends on the page
cache: the same 200 MB text run measured 330 MB in a virtualenv installed an hour earlier and
400 MB in one just installed, with the same anonymous memory (about 250 MB). The anonymous
memory (heap, buffers, models: what a run's data and models take) is what the tests bound.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import psutil

from transforms.monitor import anon_mb


@dataclass
class Measurement:
    """How a command ended, how long it took and the peaks of its process tree's memory."""
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    output: str
    peak_anon_mb: float = 0.0  # RSS less file-backed pages (see the module's note)
    peak_rss_mb_by: dict = field(default_factory=dict)  # per group of processes, with `group`
    peak_process_rss_mb_by: dict = field(default_factory=dict)  # its largest single process


def run_measured(cmd: list[str], interval: float = 0.05,
                 group: Callable[[psutil.Process], str] | None = None,
                 also: Sequence[int] = (), **popen) -> Measurement:
    """Runs `cmd`, sampling the summed RSS of the process and its descendants; with `group`,
    also the peak of each group's summed RSS (Python workers apart from an engine's JVM).
    `also`: the pids of processes that work for the command without being its children (a
    Flink cluster, a worker pool), counted with their descendants."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)
    root = psutil.Process(proc.pid)
    peak = peak_anon = 0
    peak_by: dict[str, int] = {}
    process_peak_by: dict[str, int] = {}
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            for pid in also:
                try:
                    other = psutil.Process(pid)
                    tree += [other] + other.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
            sizes = [(p, _rss(p)) for p in tree]
            peak = max(peak, sum(size for _, size in sizes))
            peak_anon = max(peak_anon, sum(anon_mb(p.pid) for p in tree))
            if group is not None:
                now: dict[str, int] = {}
                for p, size in sizes:
                    key = _group_of(group, p)
                    now[key] = now.get(key, 0) + size
                    process_peak_by[key] = max(process_peak_by.get(key, 0), size)
                for key, size in now.items():
                    peak_by[key] = max(peak_by.get(key, 0), size)
        except psutil.NoSuchProcess:
            pass
        time.sleep(interval)
    reader.join()
    return Measurement(proc.returncode, time.time() - started, peak / 2**20, ''.join(chunks),
                       peak_anon, _mb(peak_by), _mb(process_peak_by))


def _mb(by: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 2**20, 1) for k, v in sorted(by.items())}


def _group_of(group: Callable[[psutil.Process], str], p: psutil.Process) -> str:
    try:
        return group(p)
    except psutil.Error:
        return 'other'


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def warm_cache(*paths: str) -> None:
    """Reads each file once so that every run finds it in the page cache."""
    for path in paths:
        with open(path, 'rb') as f:
            while f.read(64 << 20):
                pass


def save_report(out: str, name: str, runs: list, summary: dict,
                chart: Callable[[list, str], None], **extra) -> None:
    """OUT/NAME.json (machine, runs, summary, extra settings) and OUT/NAME.png drawn by `chart`."""
    import apache_beam as beam

    os.makedirs(out, exist_ok=True)
    report = {
        'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                    'platform': platform.platform(), 'beam': beam.__version__},
        **extra,
        'runs': [asdict(r) for r in runs],
        'summary': summary,
    }
    with open(os.path.join(out, f'{name}.json'), 'w') as f:
        json.dump(report, f, indent=2)
    chart(runs, os.path.join(out, f'{name}.png'))
    print(f'\nwrote {out}/{name}.json and {out}/{name}.png')


def save_figure(fig, path: str, title: str = '') -> None:
    """Titles, lays out, writes and closes a matplotlib figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
