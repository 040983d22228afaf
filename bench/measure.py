"""Peak resident memory of a command and all its child processes, sampled while it runs."""
from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measurement:
    """How a command ended, how long it took and the peak RSS of its process tree."""
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    output: str


def run_measured(cmd: list[str], interval: float = 0.05, **popen) -> Measurement:
    """Runs `cmd`, sampling the summed RSS of the process and its descendants."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)
    root = psutil.Process(proc.pid)
    peak = 0
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(_rss(p) for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(interval)
    reader.join()
    return Measurement(proc.returncode, time.time() - started, peak / 2**20, ''.join(chunks))


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0
